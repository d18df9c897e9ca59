"""Decoding a denoiser's latents with a decoder fine-tune of its VAE (`swap_vae`)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from vdm.errors import UserError
from vdm.io import checkpoint
from vdm.models import autoencoder as ae


def trees_equal(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    return [k for k, _ in la] == [k for k, _ in lb] and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for (_, x), (_, y) in zip(la, lb, strict=True)
    )


def swap_vae(pipe: Any, vae_path: str) -> Any:  # a vdm.inference.pipeline.Pipeline
    """`pipe` decoding with the VAE of checkpoint `vae_path` instead of its own.

    For a decoder-only fine-tune (`optim.freeze="^encoder/"`, configs/vae_quickstart_decoder.py):
    the denoiser knows only the latent space, so the new VAE must encode exactly as the old
    one: the same architecture, latent statistics and bit-identical encoder weights.

    Raises:
      UserError: no VAE checkpoint at `vae_path`, or one that encodes differently (named).
    """
    try:
        vae_config = checkpoint.load_config(vae_path)
        stats = checkpoint.load_metadata(vae_path).get("latent_stats")
        params = checkpoint.load_params(vae_path, item="ema")
    except FileNotFoundError as e:
        raise UserError(f"No VAE checkpoint at '{vae_path}': {e}") from None
    if vae_config.stage != "autoencoder":
        raise UserError(f"'{vae_path}' is a '{vae_config.stage}' checkpoint, not a VAE.")
    problems = []
    if ae.resolve_vae_config(vae_config.vae) != ae.resolve_vae_config(pipe.config.vae):
        problems.append("its architecture (config.vae) differs")
    elif not trees_equal(params["encoder"], pipe.vae_params["encoder"]):
        problems.append("its encoder weights differ (train it with optim.freeze='^encoder/')")
    if stats is None or not np.allclose(
        [stats["shift"], stats["scale"]],
        [pipe.latent_stats["shift"], pipe.latent_stats["scale"]],
        rtol=1e-6,
    ):
        problems.append("its latent statistics differ")
    if problems:
        raise UserError(
            f"VAE '{vae_path}' cannot replace this model's VAE: {'; '.join(problems)}. The "
            "denoiser was trained on the latents of its own VAE, so only the decoder may change."
        )
    config = pipe.config.copy_and_resolve_references()
    config.vae.checkpoint = os.path.abspath(vae_path)
    return dataclasses.replace(pipe, config=config, vae_params=params)
