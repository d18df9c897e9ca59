"""The denoising training loss, per example, for every objective (see `schedules`).

    t ~ p(t)                        stream "time"   (logit-normal or uniform; flow shift;
                                                     discrete objectives snap to the n / N grid)
    eps ~ N(0, I)                   stream "noise"
    x_t = alpha(t) x0 + sigma(t) eps
    cond -> null_cond w.p. p_drop   stream "cfg_dropout" (classifier-free guidance training)
    loss = mean over non-batch axes of (model(x_t, t, cond) - target)^2

with target v = eps - x0 (flow: the conditional velocity d x_t / dt, whose regression solution is
E[eps - x0 | x_t], the marginal velocity of the probability-flow ODE), eps (the "simple" loss of Ho
et al. 2020, whose minimiser is E[eps | x_t] = -sigma * score), or v = alpha eps - sigma x0
(Salimans & Ho 2022, well-conditioned at both ends of the schedule). All are unweighted MSE in the
model's own parametrisation; the time distribution is the only weighting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from vdm import rng
from vdm.diffusion import schedules

PyTree = Any


def drop_condition(cond: PyTree, null_cond: PyTree, key: jax.Array, p: float) -> PyTree:
    """Replaces each example's condition by the null condition with probability `p`.

    Args:
      cond: a pytree whose leaves have the batch on axis 0, e.g. `(context [B,L,D], mask [B,L])`.
      null_cond: the same structure; each leaf's batch axis is B or 1 (broadcast).
      key: PRNG key (the "cfg_dropout" stream).
      p: drop probability.

    Returns:
      A pytree like `cond` where the dropped examples hold `null_cond`'s values in every leaf.
    """
    leaves = jax.tree.leaves(cond)
    if not leaves:
        return cond
    if jax.tree.structure(cond) != jax.tree.structure(null_cond):
        raise ValueError(
            "null_cond must have the same pytree structure as cond; got "
            f"{jax.tree.structure(null_cond)} vs {jax.tree.structure(cond)}."
        )
    b = leaves[0].shape[0]
    drop = jax.random.bernoulli(key, p, (b,))

    def pick(c, n):
        n = jnp.broadcast_to(jnp.asarray(n, c.dtype), c.shape)
        return jnp.where(drop.reshape((b,) + (1,) * (c.ndim - 1)), n, c)

    return jax.tree.map(pick, cond, null_cond)


def diffusion_loss(
    model_fn: Callable[[jax.Array, jax.Array, PyTree], jax.Array],
    x0: jax.Array,
    cond: PyTree,
    key: jax.Array,
    diffusion_config,
    null_cond: PyTree | None = None,
) -> jax.Array:
    """Per-example denoising loss (the math is in the module docstring).

    Args:
      model_fn: `model_fn(x_t [B,...], t [B], cond) -> raw output [B,...]` (velocity for flow,
        eps or v for the discrete objectives).
      x0: clean data (normalized latents) [B, ...].
      cond: conditioning pytree with batch axis 0 (e.g. `(context, mask)`); passed through.
      key: PRNG key for this step; the "time", "noise" and "cfg_dropout" streams are folded from it.
      diffusion_config: `config.diffusion` (or a `schedules.DiffusionSpec`).
      null_cond: the unconditional condition (empty-prompt embedding), same structure as `cond`,
        batch B or 1. When given and `cfg_dropout > 0`, each example's cond is replaced by it with
        probability `cfg_dropout`; when None no dropout happens.

    Returns:
      float32 [B]: mean squared error of each example over its non-batch axes.
    """
    spec = schedules.DiffusionSpec.from_config(diffusion_config)
    b = x0.shape[0]
    x0 = x0.astype(jnp.float32)
    t = schedules.sample_training_time(rng.stream(key, "time"), b, spec)
    eps = jax.random.normal(rng.stream(key, "noise"), x0.shape, jnp.float32)
    alpha, sigma = schedules.alpha_sigma(t, spec)
    x_t = schedules._expand(alpha, x0) * x0 + schedules._expand(sigma, x0) * eps
    if null_cond is not None and spec.cfg_dropout > 0:
        cond = drop_condition(cond, null_cond, rng.stream(key, "cfg_dropout"), spec.cfg_dropout)
    out = model_fn(x_t, t, cond).astype(jnp.float32)
    if out.shape != x0.shape:
        raise ValueError(f"model_fn returned shape {out.shape}; expected x0's shape {x0.shape}.")
    target = schedules.training_target(x0, eps, t, spec)
    return jnp.mean(jnp.square(out - target), axis=tuple(range(1, x0.ndim)))
