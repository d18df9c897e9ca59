"""Per-channel latent statistics: what makes the VAE's latents the denoiser's ~N(0, 1) inputs.

The denoiser sees `(z - shift) / scale` with per-channel `shift`, `scale` from
`compute_latent_stats` over encoded training data; the autoencoder stage stores them in its
checkpoint metadata (`vdm.tasks.autoencoder.AutoencoderTask.metadata`), and a latent cache in its
manifest.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def compute_latent_stats(latents: jnp.ndarray | np.ndarray | Iterable) -> dict[str, Any]:
    """Per-channel mean and std of latents, to make the denoiser's inputs unit-variance.

    Args:
      latents: an array [..., c] or an iterable of such arrays (e.g. one per batch); statistics
        are accumulated in float64 over every axis but the last.

    Returns:
      JSON-able {"shift": [c floats], "scale": [c floats], "count": int}; scale >= 1e-6.
    """
    if isinstance(latents, np.ndarray | jax.Array):
        latents = [latents]
    total = total_sq = None
    count = 0
    for z in latents:
        z = np.asarray(z, np.float64).reshape(-1, np.shape(z)[-1])
        s, sq = z.sum(0), np.square(z).sum(0)
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        count += z.shape[0]
    if not count:
        raise ValueError("compute_latent_stats got no latents.")
    mean = total / count
    var = np.maximum(total_sq / count - np.square(mean), 0.0)
    scale = np.maximum(np.sqrt(var), 1e-6)
    return {"shift": mean.tolist(), "scale": scale.tolist(), "count": int(count)}


def _stats_arrays(stats: Mapping[str, Any], channels: int):
    shift = jnp.asarray(stats["shift"], jnp.float32)
    scale = jnp.asarray(stats["scale"], jnp.float32)
    if shift.shape != (channels,) or scale.shape != (channels,):
        raise ValueError(
            f"Latent stats have shift {shift.shape} / scale {scale.shape}; the latents have "
            f"{channels} channels. Were they computed for another VAE?"
        )
    return shift, scale


def normalize_latents(z: jnp.ndarray, stats: Mapping[str, Any]) -> jnp.ndarray:
    """(z - shift) / scale per channel: VAE latents -> the denoiser's ~N(0, 1) inputs."""
    shift, scale = _stats_arrays(stats, z.shape[-1])
    return ((z - shift) / scale).astype(z.dtype)


def denormalize_latents(z: jnp.ndarray, stats: Mapping[str, Any]) -> jnp.ndarray:
    """z * scale + shift per channel: the denoiser's outputs -> latents for `decode`."""
    shift, scale = _stats_arrays(stats, z.shape[-1])
    return (z * scale + shift).astype(z.dtype)
