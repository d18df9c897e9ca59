"""The alignment score: how well a video matches a prompt, by the trained alignment model.

    aligner = load_aligner(pipe)                      # the model's own alignment part
    scores = aligner.score_videos(videos, prompts)    # cos(video tower, text head) in [-1, 1]

The score is the cosine between the video tower's embedding of the video's VAE latents and the
text head's embedding of the prompt (`vdm.models.alignment`). Pixel videos are encoded with the
pipeline's VAE (posterior mean) first, so any video of the model's size can be scored, generated
or real (folder clips included). `latent_score_fn` is the same score on normalized latents, pure
and differentiable: alignment guidance steers the sampler with its gradient.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from vdm import config as config_lib
from vdm.errors import UserError
from vdm.io import bundle, checkpoint
from vdm.models import alignment as al
from vdm.models import autoencoder as ae

PyTree = Any


@dataclasses.dataclass
class Aligner:
    """A trained alignment model with the text encoder and VAE of the pipeline it scores for.

    Attributes:
      model, params: the alignment model and its (EMA) weights.
      pipe: the `vdm.inference.pipeline.Pipeline` whose text encoder, VAE and latent statistics
        the alignment model was trained on (checked by `load_aligner`).
      source: where the weights were read from.
    """

    model: al.AlignmentModel
    params: PyTree
    pipe: Any
    source: str = ""

    def __post_init__(self):
        self._video = jax.jit(
            lambda p, z: self.model.apply({"params": p}, z, method="encode_video")
        )
        self._text = jax.jit(
            lambda p, c, m: self.model.apply({"params": p}, c, m, method="encode_text")
        )
        pipe = self.pipe
        shift, scale = pipe._shift, pipe._scale

        def encode(vae_params, x):
            return (ae.encode(pipe.vae, vae_params, ae.from_uint8(x)) - shift) / scale

        self._encode = jax.jit(encode)

    def fingerprint(self) -> str:
        """A short hash of the weights (what a cached program that closes over them depends on)."""
        h = hashlib.sha256()
        for leaf in jax.tree.leaves(self.params):
            h.update(np.asarray(leaf).tobytes())
        return h.hexdigest()[:16]

    def embed_prompts(self, prompts: Sequence[str]) -> np.ndarray:
        """Unit text embeddings `[B, E]` (each distinct prompt encoded once, at batch 1)."""
        ctx, mask = self.pipe.encode_prompts(list(prompts))
        return np.asarray(self._text(self.params, jnp.asarray(ctx), jnp.asarray(mask)))

    def embed_latents(self, z: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Unit video embeddings `[B, E]` of normalized latents `[B, t, h, w, c]`."""
        out = [
            np.asarray(self._video(self.params, jnp.asarray(z[i : i + batch_size])))
            for i in range(0, len(z), batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, self.model.embed_dim), np.float32)

    def latents(self, videos: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Normalized VAE latents (posterior mean) of uint8 videos `[B, T, H, W, 3]`."""
        out = [
            np.asarray(self._encode(self.pipe.vae_params, jnp.asarray(videos[i : i + batch_size])))
            for i in range(0, len(videos), batch_size)
        ]
        return np.concatenate(out)

    def embed_videos(self, videos: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Unit video embeddings `[B, E]` of uint8 videos (VAE-encoded first)."""
        return self.embed_latents(self.latents(videos, batch_size), batch_size)

    def score_videos(
        self, videos: np.ndarray, prompts: Sequence[str], batch_size: int = 32
    ) -> np.ndarray:
        """The alignment score of each video with its prompt, float32 `[B]` in [-1, 1].
        `batch_size=1` makes each score independent of the other videos' (XLA may round
        differently at other batch shapes)."""
        if len(videos) != len(prompts):
            raise ValueError(f"{len(videos)} videos but {len(prompts)} prompts.")
        return (self.embed_videos(videos, batch_size) * self.embed_prompts(prompts)).sum(-1)

    def latent_score_fn(self):
        """`fn(params, z [B, ...], ctx [B, L, D], mask [B, L]) -> scores [B]`, pure: the score of
        normalized latents against text-encoder contexts (differentiable in z)."""

        def fn(params, z, ctx, mask):
            v = self.model.apply({"params": params}, z, method="encode_video")
            s = self.model.apply({"params": params}, ctx, mask, method="encode_text")
            return (v * s).sum(-1)

        return fn


def read(path: str) -> tuple[dict, dict, PyTree]:
    """(alignment config section, facts {text_encoder, latent_stats}, params) from an exported
    model dir's alignment part or a stage "alignment" training checkpoint."""
    if bundle.is_bundle(path):
        meta, params = bundle.read_alignment(path)
        config = config_lib.upgrade(ConfigDict(meta["config"]))
        return config, meta, params
    try:
        config, meta, params = checkpoint.load_checkpoint(path, item="ema")
    except FileNotFoundError as e:
        raise UserError(f"No alignment model at '{path}': {e}") from None
    if config.stage != "alignment":
        raise UserError(
            f"'{path}' is a checkpoint of stage '{config.stage}', not an alignment model; pass a "
            "workdir of configs/alignment.py or an exported model dir with an alignment part."
        )
    return config, meta, params


def load_aligner(pipe, path: str | None = None) -> Aligner:
    """The alignment model for `pipe`: `path` (a stage "alignment" workdir / step dir, or an
    exported model dir), else `pipe.config.alignment.checkpoint`, else the bundled model's.

    Raises:
      UserError: no alignment model there, or one trained on another text encoder or VAE
        latents than `pipe`'s (its scores would mean nothing).
    """
    path = path or pipe.config.get("alignment", {}).get("checkpoint", "") or bundle.DEFAULT_MODEL
    if not os.path.exists(path) or (bundle.is_bundle(path) and not bundle.has_alignment(path)):
        raise UserError(
            f"No alignment model at '{path}'. Train one (python train.py --config "
            "configs/alignment.py --workdir WD) and pass it (--alignment WD)."
        )
    config, meta, params = read(path)
    check_compatible(path, meta, pipe.config.text_encoder.name, pipe.latent_stats)
    model = al.AlignmentModel.from_config(config.alignment)
    return Aligner(model=model, params=params, pipe=pipe, source=os.path.abspath(path))


def check_compatible(path: str, meta: dict, text_encoder: str, latent_stats: dict) -> None:
    """Raises UserError unless the alignment model at `path` (its facts `meta`, from `read`) was
    trained on `text_encoder` and on latents with `latent_stats` (the VAE of the model it would
    score): otherwise its scores would mean nothing."""
    if meta.get("text_encoder") != text_encoder:
        raise UserError(
            f"The alignment model '{path}' was trained on text encoder "
            f"'{meta.get('text_encoder')}', the model it would score uses '{text_encoder}'."
        )
    ours = {k: [float(x) for x in np.ravel(v)] for k, v in latent_stats.items()}
    theirs = {k: [float(x) for x in np.ravel(v)] for k, v in meta.get("latent_stats", {}).items()}
    if set(ours) != set(theirs) or any(not np.allclose(ours[k], theirs[k]) for k in ours):
        raise UserError(
            f"The alignment model '{path}' was trained on another VAE's latents (its latent "
            "statistics differ from the model's); train one on this model's VAE."
        )


def bundle_part(path: str) -> tuple[dict, PyTree]:
    """(alignment.json contents, weights) for bundling the alignment model at `path` (a stage
    "alignment" workdir / step dir, or an exported model dir with an alignment part, whose
    recorded figures are kept) into an exported model with `bundle.write_alignment`."""
    config, meta, params = read(path)
    part = dict(meta) if bundle.is_bundle(path) else {"source": os.path.abspath(path)}
    part.update(
        config=config_lib.to_dict(config),
        text_encoder=meta["text_encoder"],
        latent_stats=meta["latent_stats"],
    )
    return part, params
