"""The train step (pure, module level) and the factory that compiles it for the run's layout.

`train_step(state, batch, key, frozen) -> (state, metrics)` is one update. `key` is the run's
base key; the step folds in `state.step` (and the device index under pmap), so a restarted run
draws exactly the same noise. The factory compiles it one of two ways (`config.parallel`):

* "jit": one `jax.jit` over the mesh with explicit in/out shardings, the input state donated;
  every argument is a global array (`vdm.parallel.Layout`).
* "pmap": `jax.pmap` over this process's devices with gradients `pmean`'d; every argument but the
  key has a leading device axis (`vdm.parallel.pmap.PmapLayout`).

This module and `vdm.parallel.pmap` are the only ones that know which of the two runs: the rest
goes through the layout `make_layout` returns.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from vdm import parallel
from vdm.parallel import pmap as pmap_layout
from vdm.train.optim import accumulate_steps, trainable_mask, update_ema
from vdm.train.state import TrainState

PyTree = Any


def step_key(key: jax.Array, step: jax.Array, axis_name: str | None = None) -> jax.Array:
    """The key one train step hands to `task.loss`: `fold_in(base_key, step)`.

    Under pmap (`axis_name` set) it is also folded with the device index: each device holds
    different examples and must draw its own noise for them. Under jit the key is the same
    everywhere and the task draws noise for the *global* batch (with
    `jax_threefry_partitionable`, each device computes only its slice, and the numbers do not
    depend on the device count).
    """
    key = jax.random.fold_in(key, step)
    if axis_name is not None:
        key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    return key


def train_step(
    state: TrainState, batch, key, frozen, *, task, tx, schedule, config, axis_name=None
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update; pure. `axis_name` is set under pmap (gradients are pmean'd over it)."""
    key = step_key(key, state.step, axis_name)
    loss_fn = lambda params: task.loss(params, frozen, batch, key)  # noqa: E731
    (loss, task_metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    trainable = trainable_mask(grads, config.optim)
    if trainable is not None:
        # Dropping the frozen gradients here (not only in the optimizer) lets XLA remove their
        # backward pass and keeps them out of grad_norm.
        grads = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable)
    if axis_name is not None:
        grads, loss, task_metrics = jax.lax.pmean((grads, loss, task_metrics), axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
        ema = update_ema(ema, params, state.step, trainable, config.optim)
    metrics = dict(task_metrics)
    metrics.update(
        loss=loss,
        grad_norm=optax.tree.norm(grads),
        param_norm=optax.tree.norm(params),
        update_norm=optax.tree.norm(updates),
        # The schedule counts optimizer updates applied before this step.
        learning_rate=schedule(state.step // accumulate_steps(config.optim)),
    )
    metrics = {name: jnp.asarray(v, jnp.float32) for name, v in metrics.items()}
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
    return new_state, metrics


def make_layout(config, mesh: Mesh) -> parallel.Layout:
    """The layout of the step's arguments for `config.parallel` (chosen here, and only here)."""
    if config.parallel == pmap_layout.MODE:
        return pmap_layout.PmapLayout(mesh)
    return parallel.Layout(mesh, config.mesh.logical_axis_rules)


def make_train_step(
    task,
    config,
    mesh: Mesh,
    *,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    shardings: TrainState,
    frozen_shardings: PyTree,
) -> Callable:
    """Compiles `train_step` for the run (`vdm.train.setup.build` calls it).

    Args:
      task: the Task.
      config: the run config.
      mesh: the device mesh (for "pmap" only its devices matter).
      tx, schedule: optimizer and its schedule (`vdm.train.optim.make_optimizer`).
      shardings: TrainState of shardings (`vdm.train.state.state_shardings`; unused by "pmap").
      frozen_shardings: shardings of `task.frozen()` (unused by "pmap").

    Returns:
      `step(state, batch, key, frozen) -> (state, metrics)`, its arguments laid out as
      `make_layout(config, mesh)` puts them; the input state is donated. `key` is always the run's
      base key (`vdm.rng.base_key(config.seed)`).
    """
    step = functools.partial(train_step, task=task, tx=tx, schedule=schedule, config=config)
    if config.parallel == pmap_layout.MODE:
        return jax.pmap(
            functools.partial(step, axis_name=pmap_layout.AXIS),
            axis_name=pmap_layout.AXIS,
            in_axes=(0, 0, None, 0),
            donate_argnums=(0,),
            devices=list(mesh.devices.flat),
        )
    rules = config.mesh.logical_axis_rules
    return jax.jit(
        parallel.with_sharding_rules(step, mesh, rules),
        in_shardings=(
            shardings,
            parallel.batch_sharding(mesh),
            parallel.replicated(mesh),
            frozen_shardings,
        ),
        out_shardings=(shardings, parallel.replicated(mesh)),
        donate_argnums=(0,),
    )
