"""Alignment guidance: steer each sampler step toward videos the alignment model scores higher.

At every step the sampler's (classifier-free-guided) prediction of the clean latents x0_hat moves
along the gradient of the alignment score cos(video tower(x0_hat), text head(prompt)):

    x0 <- x0_hat + scale * g / rms(g),   g = d score / d x0_hat   (per video)

and the raw output is adjusted to predict that x0 at the same x_t (`samplers.steer_output`). The
video tower works on latents, so no decoder runs in the loop; the cost is one tower forward and
backward per step (small beside the denoiser). `scale` is in units of the normalized latents'
per-element RMS (about 1): each step moves x0_hat by `scale` RMS. Deterministic, so videos stay
reproducible from the seed.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp

from vdm.errors import UserError
from vdm.inference.pipeline import Pipeline


@dataclasses.dataclass
class GuidedPipeline(Pipeline):
    """A `Pipeline` whose sampler is steered by an alignment model (module docstring).

    Attributes (besides Pipeline's):
      aligner: the `vdm.inference.alignment.Aligner` (its model and weights are used).
      alignment_scale: the step size `scale` (> 0).
    """

    aligner: Any = None
    alignment_scale: float = 0.0

    def _closure_key(self) -> str:
        key = json.loads(super()._closure_key())
        key += ["alignment", self.aligner.fingerprint(), float(self.alignment_scale)]
        return json.dumps(key, sort_keys=True, default=repr)

    def x0_guide(self, ctx, mask):
        score_fn = self.aligner.latent_score_fn()
        params, scale = self.aligner.params, float(self.alignment_scale)

        def guide(x0, t):
            del t
            g = jax.grad(lambda z: score_fn(params, z, ctx, mask).sum())(x0)
            axes = tuple(range(1, g.ndim))
            rms = jnp.sqrt(jnp.mean(g * g, axis=axes, keepdims=True))
            return x0 + scale * g / (rms + 1e-12)

        return guide


def guided(pipe: Pipeline, aligner, scale: float) -> Pipeline:
    """`pipe` steered by `aligner` with step `scale` (`pipe` itself when scale is 0).

    Raises:
      UserError: a negative or non-finite scale, or a sampler guidance cannot steer (unipc).
    """
    if not (scale >= 0 and scale < float("inf")):
        raise UserError(f"--alignment_guidance must be a finite number >= 0, got {scale}.")
    if scale == 0:
        return pipe
    fields = {f.name: getattr(pipe, f.name) for f in dataclasses.fields(Pipeline)}
    return GuidedPipeline(**fields, aligner=aligner, alignment_scale=float(scale))
