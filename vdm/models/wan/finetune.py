"""What fine-tuning a Wan 2.1 pipeline (stage "wan", `vdm.tasks.wan`) reads from its files.

Everything here reads configs only (no transformer weights), except `load_encoders`, which loads
the frozen VAE and UMT5 a latent cache is built with (`python -m vdm.tools.cache`):

* `cache_identity(root, num_frames, height, width)`: what a latent cache's arrays depend on (the
  pipeline's VAE and text encoder, the latent shape), in the keys of
  `vdm.data.cache.format.identity`, so a cache built from one Wan model is refused for another.
* `latent_stats(vae)`: the VAE's per-channel `latents_mean` / `latents_std`, WanPipeline's latent
  normalisation `(z - mean) / std`, as vdm's {"shift", "scale"}.
* `CleanedText`: the UMT5 encoder that cleans each prompt first, as WanPipeline does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from vdm.models.text import encoder as te
from vdm.models.wan import files
from vdm.models.wan import pipeline as wan_pipeline
from vdm.models.wan import text as wan_text
from vdm.models.wan import vae as wan_vae
from vdm.models.wan.transformer_config import WanTransformerConfig
from vdm.models.wan.vae_weights import load_vae, module_from_config


def transformer_config(root: str) -> WanTransformerConfig:
    """The transformer config of the pipeline directory `root`."""
    return WanTransformerConfig.from_diffusers(
        files.read_config(files.component_dir(root, "transformer"))
    )


def vae_module(root: str) -> wan_vae.WanVAE:
    """The pipeline's WanVAE module (no weights read)."""
    vae_dir = files.component_dir(root, "vae")
    config = files.read_config(vae_dir)
    config.setdefault("_name_or_path", os.path.join(vae_dir, "config.json"))
    return module_from_config(config)


def latent_shape(root: str, num_frames: int, height: int, width: int) -> tuple[int, ...]:
    """(t, h, w, z_dim) of a video of that size for the pipeline in `root` (size checked)."""
    patch = transformer_config(root).patch_size
    return wan_pipeline.latent_shape(vae_module(root), patch, num_frames, height, width)


def latent_stats(vae: wan_vae.WanVAE) -> dict[str, np.ndarray]:
    """{"shift": latents_mean, "scale": latents_std} (float32 [z_dim]) of the VAE.

    Raises:
      ValueError: the VAE config gives no per-channel statistics.
    """
    mean = np.asarray(vae.latents_mean, np.float32)
    std = np.asarray(vae.latents_std, np.float32)
    if mean.shape != (vae.z_dim,) or std.shape != (vae.z_dim,):
        raise ValueError(
            f"The Wan VAE config lacks per-channel latents_mean / latents_std for its {vae.z_dim} "
            "channels; Wan's DiT trains and samples on normalised latents."
        )
    return {"shift": mean, "scale": std}


def cache_identity(
    root: str, num_frames: int, height: int, width: int, max_length: int
) -> dict[str, Any]:
    """The identity a latent cache of the Wan pipeline in `root` records and is checked against
    (the keys of `vdm.data.cache.format.identity`; the VAE by its real directory and config, the
    text encoder by the pipeline's real directory)."""
    root = os.path.realpath(root)
    vae_dir = files.component_dir(root, "vae")
    vae_config = {k: v for k, v in files.read_config(vae_dir).items() if not k.startswith("_")}
    return {
        "data.num_frames": int(num_frames),
        "data.height": int(height),
        "data.width": int(width),
        "latent_shape": list(latent_shape(root, num_frames, height, width)),
        "vae.architecture": {"family": "wan", **vae_config},
        "vae.checkpoint": vae_dir,
        "vae.random_init_seed": None,
        "text_encoder.name": root,
        "text_encoder.max_length": int(max_length),
        "text_encoder.dtype": "float32",
    }


class CleanedText:
    """A `TextEncoder` whose `tokenize` cleans prompts as Wan does (`text.prompt_clean`) first;
    everything else is the wrapped encoder's."""

    def __init__(self, encoder: te.TextEncoder):
        self.encoder = encoder

    def tokenize(self, prompts: Sequence[str]):
        return self.encoder.tokenize([wan_text.prompt_clean(str(p)) for p in prompts])

    def __getattr__(self, name: str):
        return getattr(self.encoder, name)


def encode_video(module: wan_vae.WanVAE, params, video):
    """Posterior (mean, logvar) of a video in [-1, 1] (`vdm.data.cache.build` `encode_video`)."""
    return wan_vae.encode(module, params, video)


def load_encoders(
    root: str, max_length: int = wan_text.MAX_LENGTH
) -> tuple[CleanedText, wan_vae.WanVAE, Any, dict]:
    """(text encoder, VAE module, VAE params, latent statistics) of the pipeline in `root`, in
    float32 (the cache stores float16 contexts and float16 / float32 latents)."""
    text = wan_text.load_text_encoder(root, max_length=max_length, dtype=jnp.float32)
    vae, vae_params = load_vae(files.component_dir(root, "vae"))
    return CleanedText(text), vae, vae_params, latent_stats(vae)
