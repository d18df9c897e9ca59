"""Wan 2.1 text-to-video through vdm's `Pipeline`: the same per-example keys, devices, samplers
and files as vdm's own models, with Wan's transformer, VAE and prompt encoding.

    pipe = vdm.load_pipeline("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")   # or a local directory
    videos = pipe.resize(num_frames=33, height=480, width=832)(["a cat walks on the grass"])

A Wan fine-tuning run (stage "wan", configs/wan_finetune.py) loads with `load_wan_checkpoint`:
the base pipeline with the run's weights (LoRA adapters merged into the base).

Equal to diffusers' `WanPipeline` given the same initial latents, for its UniPC (Wan's default)
and FlowMatch Euler schedulers, up to float rounding (tests/test_wan_pipeline.py). Differences in
form only: guidance is computed as cond + (g - 1)(cond - uncond) in one batched call, and the
latents are un-normalised as z * std + mean (diffusers: z / (1 / std) + mean).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vdm.errors import UserError
from vdm.inference.pipeline import Pipeline
from vdm.io import checkpoint
from vdm.models import lora
from vdm.models.wan import files
from vdm.models.wan import pipeline as wan
from vdm.models.wan import text as wan_text
from vdm.models.wan import vae as wan_vae
from vdm.models.wan.transformer_weights import load_transformer
from vdm.models.wan.vae_weights import load_vae


@dataclasses.dataclass
class WanPipeline(Pipeline):
    """A Wan 2.1 text-to-video pipeline (`text`: UMT5, `vae`: WanVAE, `model`: WanTransformer;
    `config` from `vdm.models.wan.pipeline.wan_config`). Call it as any `Pipeline`."""

    def _latent_shape(self) -> tuple[int, ...]:
        d = self.config.data
        patch = self.model.config.patch_size
        return wan.latent_shape(self.vae, patch, d.num_frames, d.height, d.width)

    def resize(self, num_frames=None, height=None, width=None) -> WanPipeline:
        """This pipeline making `num_frames` (4k + 1) frames of `height` x `width` (multiples of
        16); None keeps the current value.

        Raises:
          UserError: a size Wan cannot make (named).
        """
        d = self.config.data
        size = {"num_frames": num_frames, "height": height, "width": width}
        size = {k: int(d[k] if v is None else v) for k, v in size.items()}
        spatial = self.vae.spatial_factor * max(self.model.config.patch_size[1:])
        wan.check_size(size["num_frames"], size["height"], size["width"], spatial)
        if all(size[k] == d[k] for k in size):
            return self
        config = self.config.copy_and_resolve_references()
        config.data.update(size)
        return dataclasses.replace(self, config=config)

    def model_fn(self, params, time_grid: str = "uniform"):
        """The WanTransformer at diffusers' timestep (t * 1000; an exact integer on the
        diffusers_unipc grid, as diffusers passes it)."""
        n = self.config.diffusion.num_train_timesteps
        return wan.model_fn(self.model, params, n, time_grid == "diffusers_unipc")

    def decode(self, vae_params, z):
        """Wan's streaming VAE decode (one latent frame per scan step), clamped to [-1, 1]."""
        return wan_vae.decode(self.vae, vae_params, z)

    def encode_one(self, prompt: str):
        """Wan's prompt encoding (`vdm.models.wan.text.encode_prompts_and_mask`, through the
        pipeline's kept text program): cleaned, UMT5 hidden states, zeros past the prompt."""
        hidden, mask = self._encode_text([wan_text.prompt_clean(str(prompt))])
        return wan_text.zero_past_prompt(hidden, mask), mask


def load_wan_pipeline(
    path: str,
    *,
    devices: Sequence[jax.Device] | None = None,
    dtype: str = "float32",
) -> WanPipeline:
    """A Wan 2.1 text-to-video pipeline from a Diffusers-format directory or hub id.

    Args:
      path: a local directory (model_index.json, transformer/, vae/, text_encoder/, tokenizer/,
        scheduler/) or a hub id such as "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" (downloaded to the
        Hugging Face cache when missing).
      devices: the devices to sample on (default: all local devices).
      dtype: compute and storage dtype of the text encoder and the transformer ("float32", or
        "bfloat16" to halve their memory; the VAE stays float32).

    Raises:
      UserError: no such directory / hub id, a missing part, or a pipeline vdm cannot run.
    """
    try:
        root = files.pipeline_dir(path)
        config = wan.wan_config(root)
        config.model.dtype = config.text_encoder.dtype = dtype
        text = wan_text.load_text_encoder(
            root, max_length=config.text_encoder.max_length, dtype=jnp.dtype(dtype)
        )
        model, params = load_transformer(root, jnp.dtype(dtype))
        vae, vae_params = load_vae(files.component_dir(root, "vae"))
    except (FileNotFoundError, ValueError) as e:  # ConfigError is a ValueError
        raise UserError(f"Cannot load the Wan pipeline '{path}': {e}") from None
    stats = {
        "shift": np.asarray(vae.latents_mean, np.float32),
        "scale": np.asarray(vae.latents_std, np.float32),
    }
    if stats["shift"].shape != (vae.z_dim,) or stats["scale"].shape != (vae.z_dim,):
        raise UserError(
            f"'{path}/vae/config.json' lacks per-channel latents_mean / latents_std for its "
            f"{vae.z_dim} channels; Wan's DiT samples normalised latents."
        )
    return WanPipeline(
        config=config,
        text=text,
        vae=vae,
        vae_params=vae_params,
        latent_stats=stats,
        model=model,
        params=params,
        devices=devices,
    )


def load_wan_checkpoint(path: str, *, devices: Sequence[jax.Device] | None = None) -> WanPipeline:
    """The pipeline of a Wan fine-tuning run (a workdir or checkpoint step dir of stage "wan"):
    its base pipeline (`model.pretrained`, recorded in the metadata) with the run's weights, the
    LoRA adapters of an `optim.lora_rank > 0` run merged into the base's, at the run's video size.

    Raises:
      UserError: no checkpoint, a base pipeline that cannot be read, or weights that do not fit it.
    """
    try:
        config, meta, params = checkpoint.load_checkpoint(path, item="ema")
    except FileNotFoundError as e:
        raise UserError(f"No vdm checkpoint found at '{path}': {e}") from None
    root = meta.get("wan", {}).get("pretrained") or config.model.pretrained
    pipe = load_wan_pipeline(root, devices=devices, dtype=str(config.model.param_dtype))
    try:
        if int(config.optim.get("lora_rank", 0) or 0) > 0:
            params = lora.merge(_lora_base(meta, root, pipe.params), params, config.optim)
        jax.tree.map(_check_fits, params, pipe.params)
    except ValueError as e:
        raise UserError(
            f"'{path}': its weights do not fit the Wan pipeline '{root}': {e}"
        ) from None
    params = jax.tree.map(lambda x, base: jnp.asarray(x, base.dtype), params, pipe.params)
    d = config.data
    pipe = dataclasses.replace(pipe, params=params)
    return pipe.resize(num_frames=d.num_frames, height=d.height, width=d.width)


def _lora_base(meta, root: str, pipeline_params):
    """The weights a LoRA run's adapters apply to: the pipeline's, or (a run with
    `train.init_from`) that checkpoint's EMA weights."""
    base = str(meta.get("lora", {}).get("base") or root)
    if os.path.realpath(base) == os.path.realpath(root):
        return pipeline_params
    try:
        return checkpoint.load_params(base, item="ema")
    except FileNotFoundError as e:
        raise UserError(
            f"The LoRA adapters' base checkpoint '{base}' cannot be read ({e}). Put it back there."
        ) from None


def _check_fits(x, base) -> None:
    if tuple(x.shape) != tuple(base.shape):
        raise ValueError(f"a weight of shape {tuple(x.shape)} for one of {tuple(base.shape)}")
