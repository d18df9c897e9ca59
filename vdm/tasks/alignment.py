"""Stage "alignment": a text-video alignment model (`vdm.models.alignment`), trained contrastively
on VAE latents against the frozen text encoder's sentence embedding plus a small trained head.

It shares the denoiser stage's inputs exactly (raw videos + captions encoded in the step, or a
latent cache built by `python -m vdm.tools.cache`), so it inherits `DenoiserTask`'s batches,
frozen encoders and latent normalization; only the parameters, the loss and the evaluation
differ. Train on the training captions only: the held-out vocabulary (`vdm.data.captions`
VOCAB_*) must never reach it, or its retrieval figures on that split would mean nothing.

    python train.py --config configs/alignment.py --workdir workdirs/alignment
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vdm import rng
from vdm.data import cache
from vdm.eval import alignment as align_eval
from vdm.inference import alignment as aligner_lib
from vdm.models import alignment as al
from vdm.tasks.denoiser import DenoiserTask


class AlignmentTask(DenoiserTask):
    """Symmetric InfoNCE between video-tower embeddings of (normalized posterior-sample) latents
    and text-head embeddings of the captions' frozen sentence embeddings."""

    def __init__(self, config, encoders=None):
        super().__init__(config, encoders)
        self.align = al.AlignmentModel.from_config(config.alignment)

    @property
    def tokens_per_example(self) -> int:
        t, h, w, _ = self.latent_shape
        return t * (h // 2) * (w // 2)

    def init(self, key, batch):
        b = next(iter(batch.values())).shape[0]
        z = jnp.zeros((b, *self.latent_shape), jnp.float32)
        ctx = jnp.zeros((b, self.text.max_length, self.text.dim), jnp.float32)
        mask = jnp.ones((b, self.text.max_length), jnp.int32)
        return self.align.init(key, z, ctx, mask)["params"]

    def loss(self, params, frozen, batch, key):
        frozen = jax.lax.stop_gradient(frozen)
        z0, ctx, mask = self.latents_and_context(frozen, batch, rng.stream(key, "vae"))
        v, s, scale = self.align.apply({"params": params}, z0, ctx, mask)
        per_example, metrics = al.contrastive_loss(v, s, scale)
        return per_example.mean(), metrics

    def metadata(self, params, frozen):
        meta = super().metadata(params, frozen)
        meta["alignment"] = {"num_params": sum(x.size for x in jax.tree.leaves(params))}
        return meta

    def evaluate(self, params, frozen, step, workdir):
        """Label-matched retrieval on `alignment.eval_pairs` test pairs (moving digits only),
        per caption set (`vdm.eval.alignment`)."""
        n = int(self.config.alignment.eval_pairs)
        data_kind = cache.underlying_source(self.config.data.source).split(":", 1)[0]
        if n < 2 or data_kind != "moving_digits":
            return {}
        aligner = aligner_lib.Aligner(self.align, params, self.pipeline(None, frozen))
        results = align_eval.evaluate(aligner, self.config.data, n)
        return {f"eval/{c}/{k}": v for c, row in results.items() for k, v in row.items()}
