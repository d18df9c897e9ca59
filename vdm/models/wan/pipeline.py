"""What sampling a Wan 2.1 Diffusers-format pipeline needs beyond its modules: its vdm config
(read from model_index.json and scheduler/scheduler_config.json, with Wan's defaults), the video
sizes it accepts, the denoiser call in diffusers' timestep units, and prompt encodings.

`vdm.inference.wan.WanPipeline` puts these into vdm's `Pipeline` (this module sits in the models
layer, below vdm.inference, so it knows nothing of the pipeline class itself).

Defaults (`config.sample`, `config.data`) are diffusers' `WanPipeline.__call__` ones: 81 frames
of 480 x 832 at 16 fps, 50 steps, guidance 5.0, prompts up to 512 tokens; the sampler and time
grid follow the pipeline's scheduler (UniPC for the published models, flow_shift 3.0 for 480p;
Wan recommends 5.0 for 720p), and the negative prompt is Wan's own (`NEGATIVE_PROMPT`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from ml_collections import ConfigDict

from vdm.errors import ConfigError, UserError
from vdm.models.wan import files
from vdm.models.wan import text as wan_text

# Wan 2.1's `sample_neg_prompt` (wan/configs/shared_config.py in Wan-Video/Wan2.1), the negative
# prompt Wan's own generate scripts use: vivid colours, overexposure, static, blurry details,
# subtitles, ..., extra fingers, deformed limbs, messy background, walking backwards.
NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
    "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，"
    "毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
NUM_FRAMES, HEIGHT, WIDTH, FPS = 81, 480, 832, 16  # diffusers' WanPipeline / Wan's sample_fps
NUM_STEPS, GUIDANCE = 50, 5.0

# Scheduler settings vdm's samplers implement: (key, the value it must have when present).
_UNIPC = (
    ("prediction_type", "flow_prediction"),
    ("use_flow_sigmas", True),
    ("solver_order", 2),
    ("solver_type", "bh2"),
    ("predict_x0", True),
    ("lower_order_final", True),
    ("final_sigmas_type", "zero"),
    ("timestep_spacing", "linspace"),
    ("thresholding", False),
    ("use_karras_sigmas", False),
    ("disable_corrector", []),
    ("solver_p", None),
)
_EULER = (
    ("use_dynamic_shifting", False),
    ("shift_terminal", None),
    ("use_karras_sigmas", False),
    ("use_exponential_sigmas", False),
    ("use_beta_sigmas", False),
    ("invert_sigmas", False),
    ("stochastic_sampling", False),
)
SCHEDULERS = {  # diffusers class -> (vdm sampler, vdm time grid, shift key, settings)
    "UniPCMultistepScheduler": ("unipc", "diffusers_unipc", "flow_shift", _UNIPC),
    "FlowMatchEulerDiscreteScheduler": ("euler", "diffusers_euler", "shift", _EULER),
}


def is_wan_pipeline(path: str) -> bool:
    """Whether `path` is a local Diffusers-format directory whose model_index.json names
    WanPipeline (a damaged model_index.json reads as False: the caller's error names the path)."""
    index = os.path.join(os.path.expanduser(path), "model_index.json")
    if not os.path.isfile(index):
        return False
    try:
        return files.read_config(index).get("_class_name") == "WanPipeline"
    except ValueError:
        return False


def _check_index(root: str, index: Mapping[str, Any]) -> None:
    """Refuses Wan pipelines other than Wan 2.1 text-to-video (Wan 2.2's two experts or
    per-token timesteps), naming what differs."""
    if index.get("_class_name") != "WanPipeline":
        raise ConfigError(
            f"'{root}' holds a {index.get('_class_name')!r}, not a WanPipeline (text-to-video); "
            "vdm runs Wan 2.1 text-to-video pipelines only."
        )
    extra = [k for k in ("transformer_2",) if index.get(k) not in (None, [None, None])]
    extra += [k for k in ("boundary_ratio",) if index.get(k) is not None]
    extra += [k for k in ("expand_timesteps",) if index.get(k)]
    if extra:
        raise ConfigError(
            f"'{root}' is a Wan 2.2 pipeline ({', '.join(extra)} in model_index.json); vdm "
            "implements Wan 2.1 text-to-video (one transformer, one timestep per video)."
        )


def _scheduler(root: str) -> tuple[str, str, float, int]:
    """(sampler, time grid, shift, num_train_timesteps) of the pipeline's scheduler, checked to
    be one vdm's samplers reproduce."""
    cfg = files.read_config(files.component_dir(root, "scheduler"))
    name = cfg.get("_class_name")
    if name not in SCHEDULERS:
        raise ConfigError(
            f"'{root}/scheduler' is a {name!r}; vdm samples Wan with {sorted(SCHEDULERS)} only."
        )
    sampler, grid, shift_key, expected = SCHEDULERS[name]
    bad = [f"{k}={cfg[k]!r} (vdm: {v!r})" for k, v in expected if k in cfg and cfg[k] != v]
    if bad:
        raise ConfigError(
            f"'{root}/scheduler' {name} has settings vdm's {sampler} sampler does not implement: "
            f"{', '.join(bad)}."
        )
    return sampler, grid, float(cfg.get(shift_key, 1.0)), int(cfg.get("num_train_timesteps", 1000))


def wan_config(root: str) -> ConfigDict:
    """The vdm config of the Wan pipeline in directory `root`: Wan's defaults in `sample` and
    `data` (module docstring), the scheduler's settings in `sample` and `diffusion`.

    Raises:
      FileNotFoundError: a missing part; ConfigError: not Wan 2.1 text-to-video, or a
        scheduler setting vdm does not implement.
    """
    _check_index(root, files.read_config(os.path.join(root, "model_index.json")))
    sampler, grid, shift, n_train = _scheduler(root)
    return ConfigDict(
        {
            "family": "wan",
            "model": {"path": os.path.abspath(root), "dtype": "float32"},
            "text_encoder": {"name": os.path.abspath(root), "max_length": wan_text.MAX_LENGTH,
                             "dtype": "float32"},
            "diffusion": {"objective": "flow", "shift": shift, "num_train_timesteps": n_train},
            "sample": {"sampler": sampler, "time_grid": grid, "num_steps": NUM_STEPS,
                       "guidance": GUIDANCE, "eta": 0.0, "negative_prompt": NEGATIVE_PROMPT,
                       "shift": shift},
            "data": {"num_frames": NUM_FRAMES, "height": HEIGHT, "width": WIDTH, "fps": FPS},
        }
    )  # fmt: skip


def check_size(num_frames: int, height: int, width: int, spatial: int = 16) -> None:
    """Raises UserError naming each bad value unless frames are 4k + 1 and height and width are
    positive multiples of `spatial` (the VAE's 8 times the transformer's patch 2 for Wan 2.1)."""
    problems = []
    if num_frames < 1 or (num_frames - 1) % 4:
        k = max(0, (num_frames - 1) // 4)
        problems.append(
            f"--num_frames {num_frames} is not 4k + 1 (Wan's VAE keeps frame 0 and compresses "
            f"4 frames into 1); e.g. {4 * k + 1} or {4 * k + 5}"
        )
    for flag, size in (("--height", height), ("--width", width)):
        if size < spatial or size % spatial:
            down = max(spatial, size // spatial * spatial)
            problems.append(
                f"{flag} {size} is not a positive multiple of {spatial} (VAE factor 8 x patch 2); "
                f"e.g. {down} or {down + spatial}"
            )
    if problems:
        raise UserError("Invalid Wan video size: " + "; ".join(problems) + ".")


def latent_shape(vae, patch_size, num_frames: int, height: int, width: int) -> tuple[int, ...]:
    """(t, h, w, z_dim) of a `num_frames` x `height` x `width` video for the WanVAE `vae`
    and a transformer with `patch_size`; sizes checked first (`check_size`)."""
    spatial = vae.spatial_factor * max(patch_size[1:])
    check_size(num_frames, height, width, spatial)
    t = (num_frames - 1) // vae.temporal_factor + 1
    if t % patch_size[0]:
        raise UserError(
            f"--num_frames {num_frames} gives {t} latent frames, not a multiple of the "
            f"transformer's temporal patch {patch_size[0]}."
        )
    fs = vae.spatial_factor
    return (t, height // fs, width // fs, vae.z_dim)


def model_fn(module, params, num_train_timesteps: int, integer_times: bool):
    """`f(x, t, (ctx, mask))` for vdm's samplers: the WanTransformer at diffusers' timestep
    t * num_train_timesteps (the mask is unused: Wan's context is zero past each prompt).

    With `integer_times` (the diffusers_unipc grid, whose times are integers / N) the product is
    rounded, so the model sees exactly diffusers' integer timestep (float32 k / N * N can be an
    ulp off k)."""

    def f(x, t, cond):
        timestep = jnp.asarray(t, jnp.float32) * jnp.float32(num_train_timesteps)
        if integer_times:
            timestep = jnp.round(timestep)
        return module.apply({"params": params}, x, timestep, cond[0])

    return f
