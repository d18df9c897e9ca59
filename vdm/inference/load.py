"""`vdm.load_pipeline`: whichever model a path or hub id holds, as a `Pipeline`.

* vdm's own models: an exported model dir (default: the bundled one), a denoiser training workdir
  or a checkpoint step dir (`vdm.inference.pipeline.load_pipeline`).
* Wan 2.1 text-to-video: a local Diffusers-format directory whose model_index.json names
  WanPipeline, or a hub id "org/name" that is not a local path
  (`vdm.inference.wan.load_wan_pipeline`); a Wan fine-tuning run's workdir or step dir (stage
  "wan", `vdm.inference.wan.load_wan_checkpoint`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax

from vdm.errors import UserError
from vdm.inference import pipeline, wan
from vdm.io import bundle, checkpoint
from vdm.models.text import hub
from vdm.models.wan import pipeline as wan_pipeline

DTYPES = ("float32", "bfloat16")  # what --dtype takes (Wan pipelines)


def is_wan(path: str | None) -> bool:
    """Whether `path` names a Wan pipeline: a local WanPipeline directory, or a hub id of the
    form "org/name" that is no local path (vdm's own models are never hub ids)."""
    if not path:
        return False
    if os.path.exists(os.path.expanduser(path)):
        return wan_pipeline.is_wan_pipeline(path)
    return path.count("/") == 1 and not path.startswith(".") and hub.is_hub_id(path)


def is_wan_run(path: str | None) -> bool:
    """Whether `path` is a training workdir or checkpoint of stage "wan" (a Wan fine-tune)."""
    if not path or not os.path.isdir(os.path.expanduser(path)) or bundle.is_bundle(path):
        return False
    try:
        return checkpoint.stage_of(path) == "wan"
    except (FileNotFoundError, UserError):
        return False


def load_pipeline(
    path: str | None = None,
    *,
    item: str = "ema",
    vae: str | None = None,
    devices: Sequence[jax.Device] | None = None,
    num_frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    dtype: str | None = None,
) -> pipeline.Pipeline:
    """The pipeline of the model at `path` (module docstring), making videos of `num_frames`
    x `height` x `width` (None: the model's default; only Wan models can change them).

    Args:
      path: a vdm model (default: the bundled one) or a Wan pipeline directory / hub id.
      item, vae: for vdm training checkpoints (`vdm.inference.pipeline.load_pipeline`).
      devices: the devices to sample on (default: all local devices).
      num_frames, height, width: the video size (Wan: 4k + 1 frames, multiples of 16).
      dtype: a Wan pipeline's text encoder and transformer dtype, "float32" (default) or
        "bfloat16"; vdm's own models and Wan fine-tuning runs use the dtype they were trained in.

    Raises:
      UserError: no model at `path`, a size the model cannot make, `vae` for a Wan model, or
        `dtype` for a model that does not take one.
    """
    if dtype is not None and (not is_wan(path) or dtype not in DTYPES):
        raise UserError(
            f"--dtype {dtype}: only a Wan pipeline (a directory or hub id) takes a dtype, one of "
            f"{list(DTYPES)}; vdm's own models and Wan fine-tuning runs sample in the dtype they "
            "were trained in. Drop --dtype."
        )
    if is_wan(path):
        if vae is not None:
            raise UserError("--vae swaps the VAE of vdm's own models, not Wan's.")
        d = wan_pipeline  # the size is checked before the (large) weights load
        d.check_size(num_frames or d.NUM_FRAMES, height or d.HEIGHT, width or d.WIDTH)
        try:
            pipe = wan.load_wan_pipeline(path, devices=devices, dtype=dtype or "float32")
        except UserError as e:
            if os.path.exists(os.path.expanduser(path)):
                raise
            raise UserError(
                f"'{path}' is no local path (a vdm workdir, checkpoint or exported model dir), "
                f"so it was taken for the hub id of a Wan pipeline: {e}"
            ) from None
    elif is_wan_run(path):
        if vae is not None:
            raise UserError("--vae swaps the VAE of vdm's own models, not Wan's.")
        pipe = wan.load_wan_checkpoint(path, devices=devices)
    else:
        pipe = pipeline.load_pipeline(path, item=item, vae=vae, devices=devices)
    return pipe.resize(num_frames=num_frames, height=height, width=width)
