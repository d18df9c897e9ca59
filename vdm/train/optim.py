"""The optimizer: AdamW with warmup + cosine decay, clipping, accumulation, `optim.freeze`, EMA.

Units: a *step* is one call of the train step on one global batch of `train.batch_size` videos.
With `optim.accumulate_steps = k > 1` the optimizer updates every k steps (optax.MultiSteps) on the
mean gradient of k batches; the learning-rate schedule and EMA count optimizer *updates*
(`optim.warmup_steps` and `train.num_steps` are in steps and divided by k).

Fine-tuning: `optim.freeze` (a regex over "/"-joined parameter paths, e.g. "^encoder/") holds the
matching parameters fixed: their gradients are dropped (XLA then skips their backward pass), they
get no optimizer state and their EMA stays equal to them. Example, Stable Diffusion's
decoder-only VAE fine-tune, which keeps the latent space a trained denoiser expects:
`--config.train.init_from=workdirs/vae --config.optim.freeze=^encoder/`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vdm import parallel
from vdm.errors import ConfigError

PyTree = Any


def accumulate_steps(optim_config) -> int:
    """`optim.accumulate_steps` (k: the optimizer updates every k train steps), checked."""
    k = int(optim_config.accumulate_steps)
    if k < 1:
        raise ConfigError(f"optim.accumulate_steps must be >= 1, got {k}.")
    return k


def learning_rate_schedule(optim_config, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 then cosine decay to `end_lr_factor * lr` (or constant).

    The schedule's argument is the number of optimizer updates so far.

    Args:
      optim_config: `config.optim`.
      num_steps: `train.num_steps` (in train steps; divided by `accumulate_steps`).

    Returns:
      An optax schedule.
    """
    k = accumulate_steps(optim_config)
    lr = float(optim_config.learning_rate)
    warmup = int(optim_config.warmup_steps) // k
    total = max(num_steps // k, warmup + 1)
    if optim_config.decay == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=lr,
            warmup_steps=warmup,
            decay_steps=total,
            end_value=lr * float(optim_config.end_lr_factor),
        )
    if optim_config.decay == "constant":
        if warmup == 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]
        )
    raise ConfigError(f"optim.decay={optim_config.decay!r} is not one of ('cosine', 'constant').")


def _decay_mask(params: PyTree) -> PyTree:
    # Weight decay on matrices and kernels only: decaying biases and norm scales towards 0 only
    # fights the normalisation (the usual AdamW practice).
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def param_path(path) -> str:
    """ "encoder/conv_in/kernel" for a pytree key path (box attributes like `.value` skipped)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
    return "/".join(parts)


def _freeze_regex(optim_config) -> re.Pattern | None:
    pattern = optim_config.get("freeze", "") or ""
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(
            f"optim.freeze={pattern!r} is not a valid regular expression ({e})."
        ) from None


def trainable_mask(params: PyTree, optim_config) -> PyTree | None:
    """True per parameter that trains, False where `optim.freeze` matches; None if no freeze."""
    regex = _freeze_regex(optim_config)
    if regex is None:
        return None
    return jax.tree_util.tree_map_with_path(
        lambda path, _: regex.search(param_path(path)) is None, params
    )


def check_freeze(params: PyTree, optim_config) -> tuple[int, int]:
    """(trainable, frozen) scalar counts; a ConfigError if `optim.freeze` matches none or all.

    Either case is almost certainly a typo in the pattern, and silently training everything (or
    nothing) would waste the run.
    """
    mask = trainable_mask(params, optim_config)
    leaves = jax.tree_util.tree_leaves_with_path(parallel.unbox(params))
    if mask is None:
        return sum(math.prod(np.shape(x)) for _, x in leaves), 0
    flags = jax.tree.leaves(parallel.unbox(mask))
    trainable = sum(math.prod(np.shape(x)) for (_, x), f in zip(leaves, flags, strict=True) if f)
    frozen = sum(math.prod(np.shape(x)) for (_, x), f in zip(leaves, flags, strict=True) if not f)
    if trainable == 0 or frozen == 0:
        examples = sorted({"/".join(param_path(p).split("/")[:2]) for p, _ in leaves})[:12]
        raise ConfigError(
            f"optim.freeze={optim_config.freeze!r} matches "
            f"{'every' if trainable == 0 else 'no'} parameter, so "
            f"{'nothing would train' if trainable == 0 else 'it freezes nothing'}. It is a regex "
            f"searched in '/'-joined parameter paths; some of this model's: {examples}."
        )
    return trainable, frozen


def make_optimizer(optim_config, num_steps: int) -> tuple[optax.GradientTransformation, Callable]:
    """AdamW with warmup + cosine decay, global-norm clipping, optional gradient accumulation,
    and `optim.freeze`d parameters left out (see the module docstring).

    Args:
      optim_config: `config.optim`.
      num_steps: `train.num_steps`.

    Returns:
      (optax transformation, learning-rate schedule over optimizer updates).
    """
    schedule = learning_rate_schedule(optim_config, num_steps)
    parts = []
    if optim_config.grad_clip and optim_config.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(float(optim_config.grad_clip)))
    parts.append(
        optax.adamw(
            schedule,
            b1=float(optim_config.b1),
            b2=float(optim_config.b2),
            weight_decay=float(optim_config.weight_decay),
            mask=_decay_mask,
        )
    )
    tx = optax.chain(*parts)
    if _freeze_regex(optim_config) is not None:
        # Frozen parameters: no AdamW moments, a zero update, no weight decay.
        labels = lambda params: jax.tree.map(  # noqa: E731
            lambda t: "train" if t else "frozen", trainable_mask(params, optim_config)
        )
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    k = accumulate_steps(optim_config)
    if k > 1:
        # Accumulates k gradients, then applies the inner optimizer once on their mean.
        tx = optax.MultiSteps(tx, every_k_schedule=k)
    return tx, schedule


def ema_decay(optim_config, num_updates: jax.Array) -> jax.Array:
    decay = jnp.float32(optim_config.ema_decay)
    if optim_config.get("ema_warmup", True):
        # Early on the average would be dominated by the random init; this ramp (0.1, 0.18, ...)
        # lets EMA weights be useful after a few hundred updates, not only after 1/(1-decay).
        n = num_updates.astype(jnp.float32)
        decay = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
    return decay


def update_ema(ema: PyTree, params: PyTree, step: jax.Array, trainable, optim_config) -> PyTree:
    """The EMA after the train step that started at `step` (its new `params` given).

    Under accumulation the parameters change only on every k-th step, and so does the average.
    Parameters held by `optim.freeze` (`trainable` False) keep EMA == params exactly, with no
    rounding drift from averaging equal values.

    Args:
      ema: the EMA before the step.
      params: the parameters after the step.
      step: `state.step` before the step (int32 scalar).
      trainable: `trainable_mask(...)` of the parameters, or None when nothing is frozen.
      optim_config: `config.optim`.

    Returns:
      The new EMA.
    """
    k = accumulate_steps(optim_config)
    applied = (step + 1) % k == 0  # MultiSteps applies on every k-th step only.
    decay = ema_decay(optim_config, step // k)
    ema = jax.tree.map(
        lambda e, p: jnp.where(applied, decay * e + (1.0 - decay) * p, e), ema, params
    )
    if trainable is not None:
        ema = jax.tree.map(lambda e, p, t: e if t else p, ema, params, trainable)
    return ema
