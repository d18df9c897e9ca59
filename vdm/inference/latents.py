"""The codec analogy, literally: denoised latents as a compact file, decoded elsewhere.

`sample.py --formats latent` writes `{prefix}{p:03d}_{i:02d}.npz` beside the videos, holding
  latents  float16 [t, h, w, c]  the sampler's result in the VAE's units (what the decoder takes:
                                 normalised latents * scale + shift)
  label    the file's samples.jsonl record as JSON (`vdm.inference.labels`: AI-generated, model,
           manifest hash, seed, prompt, sampler settings)
  shape    int64 [T, H, W, 3], the video it decodes to; fps its frame rate
`python -m vdm.decode FILE.npz` (`vdm.decode`) turns one into frames with the model's VAE.

The latents come from the same per-example keys and sampler as the videos (batch 1, one example
at a time), without the decoder; float16 keeps the file small (the decoded frames then differ from
the sampled video by rounding, a few uint8 levels at most).
"""

from __future__ import annotations

import functools
import io
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vdm.inference import pipeline

EXTENSION = "npz"


def _sample_one(pipe, params, ctx, mask, null_ctx, null_mask, noise_key, eta_key, guidance, eta,
                *, sampler, num_steps, spec, time_grid):  # fmt: skip
    """One example's denoised latents [1, t, h, w, c] in the decoder's units
    (`Pipeline.denoise`, from the same per-example keys as its video)."""
    noise_key, eta_key = (jax.random.wrap_key_data(k) for k in (noise_key, eta_key))
    noise = jax.vmap(lambda k: jax.random.normal(k, pipe.latent_shape, jnp.float32))(noise_key)
    return pipe.denoise(
        params,
        ctx,
        mask,
        null_ctx,
        null_mask,
        noise,
        guidance,
        eta,
        eta_key,
        sampler=sampler,
        num_steps=num_steps,
        spec=spec,
        time_grid=time_grid,
    )


def _program(pipe):
    """The jitted `_sample_one` of `pipe`, made once per pipeline (kept on it)."""
    if getattr(pipe, "_latent_program", None) is None:
        static = ("sampler", "num_steps", "spec", "time_grid")
        pipe._latent_program = jax.jit(functools.partial(_sample_one, pipe), static_argnames=static)
    return pipe._latent_program


def sample(pipe, prompts: Sequence[str], pairs, *, seed: int, settings) -> np.ndarray:
    """float32 latents [len(pairs), t, h, w, c] of (prompt index, sample index) `pairs`."""
    ctx, mask = pipe.encode_prompts(prompts)
    null_ctx, null_mask = pipe._null(settings.negative_prompt)
    spec = pipe.sampling_spec(settings.shift)
    out = []
    for p, i in pairs:
        p_idx, i_idx = np.array([p], np.int32), np.array([i], np.int32)
        keys = pipeline._EXAMPLE_KEYS(p_idx, i_idx, seed=seed)
        z = _program(pipe)(
            pipe.params, ctx[p_idx], mask[p_idx], null_ctx, null_mask, *keys,
            jnp.float32(settings.guidance), jnp.float32(settings.eta), sampler=settings.sampler,
            num_steps=settings.num_steps, spec=spec, time_grid=settings.time_grid,
        )  # fmt: skip
        out.append(np.asarray(z[0]))
    return np.stack(out)


def save(path: str, latents: np.ndarray, record: Mapping[str, Any], video_shape, fps) -> str:
    """Writes one video's latents and its label (module docstring) to `path` (compressed)."""
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        latents=np.asarray(latents, np.float16),
        label=np.array(json.dumps(record, sort_keys=True)),
        shape=np.asarray(video_shape, np.int64),
        fps=np.float64(fps),
    )
    with open(path, "wb") as f:
        f.write(buffer.getvalue())
    return path


def load(path: str) -> tuple[np.ndarray, dict, tuple[int, ...], float]:
    """(latents float32 [t, h, w, c], label dict, video shape, fps) of a latent file.

    Raises:
      ValueError: not a latent file written by `save` (named).
    """
    try:
        with np.load(os.path.expanduser(path), allow_pickle=False) as f:
            latents, label, fps = f["latents"], str(f["label"]), float(f["fps"])
            shape = tuple(int(s) for s in f["shape"])
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(
            f"'{path}' is not a vdm latent file (sample.py --formats latent): {e}."
        ) from None
    return latents.astype(np.float32), json.loads(label), shape, fps
