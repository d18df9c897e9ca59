"""Everything built once before training: optimizer, state shardings, frozen shardings, the step.

`build(task, config, mesh)` is the one setup chain, shared by the training loop,
bench/train_step.py, the tests and `vdm.tools.aot`. It places nothing on devices and only traces
shapes, so it also works for a task whose `frozen()` returns abstract leaves
(`jax.ShapeDtypeStruct`s), as AOT compilation for a topology without its chips needs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax
from jax.sharding import Mesh

from vdm import parallel
from vdm.tasks.base import Task
from vdm.train import state as state_lib
from vdm.train.optim import make_optimizer
from vdm.train.state import TrainState
from vdm.train.step import make_layout, make_train_step

PyTree = Any


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """What a run builds once and reuses.

    Attributes:
      config: the run config.
      task: the Task.
      mesh: the device mesh.
      tx: the optimizer.
      schedule: the learning-rate schedule (over optimizer updates).
      abstract_state: the TrainState as `jax.ShapeDtypeStruct`s with `.sharding` set (global
        arrays; replicated in the data-parallel layout).
      state_shardings: TrainState of `NamedSharding`s.
      frozen_shardings: shardings of `task.frozen()` (None in the data-parallel layout).
      train_step: `step(state, batch, key, frozen) -> (state, metrics)`, compiled on first call
        (or lowered with `.lower(...)` for AOT), its arguments in `layout`.
      layout: how the step's arguments sit on devices (`vdm.parallel.Layout`): the loop moves
        state, batches, frozen weights and metrics through it.
    """

    config: Any
    task: Task
    mesh: Mesh
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_state: TrainState
    state_shardings: TrainState
    frozen_shardings: PyTree
    train_step: Callable
    layout: parallel.Layout


def build(task: Task, config, mesh: Mesh, *, frozen_shardings: PyTree = None) -> TrainSetup:
    """The run's setup, without placing anything on devices.

    Args:
      task: the Task (its `frozen()` may hold abstract leaves).
      config: the run config.
      mesh: the device mesh.
      frozen_shardings: shardings of `task.frozen()`; default: the layout's (boxed leaves by the
        logical-axis rules, the rest replicated). AOT passes its own (e.g. all replicated).

    Returns:
      The TrainSetup.

    Raises:
      ConfigError: an invalid `config.optim` (schedule, accumulation, freeze pattern).
    """
    tx, schedule = make_optimizer(config.optim, config.train.num_steps)
    layout = make_layout(config, mesh)
    abstract, shardings = state_lib.state_shardings(task, config, mesh, tx, layout)
    if frozen_shardings is None:
        frozen_shardings = layout.frozen_shardings(task.frozen())
    step = make_train_step(
        task,
        config,
        mesh,
        tx=tx,
        schedule=schedule,
        shardings=shardings,
        frozen_shardings=frozen_shardings,
    )
    return TrainSetup(
        config=config,
        task=task,
        mesh=mesh,
        tx=tx,
        schedule=schedule,
        abstract_state=abstract,
        state_shardings=shardings,
        frozen_shardings=frozen_shardings,
        train_step=step,
        layout=layout,
    )


def abstract_batch(setup: TrainSetup) -> dict[str, jax.ShapeDtypeStruct]:
    """The step's batch argument as `jax.ShapeDtypeStruct`s (`task.dummy_batch` of the global
    `train.batch_size`, split over the mesh's batch axes): what AOT lowers the step with."""
    batch = setup.task.dummy_batch(int(setup.config.train.batch_size))
    sharding = parallel.batch_sharding(setup.mesh)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in batch.items()}


def init_state(setup: TrainSetup) -> TrainState:
    """A freshly initialised state with the setup's shardings (global arrays, not yet laid out
    for the step: `setup.layout.put_state` does that)."""
    state, _ = state_lib.create_train_state(
        setup.task, setup.config, setup.mesh, setup.tx, setup.state_shardings
    )
    return state


def place_frozen(setup: TrainSetup, frozen: PyTree = None) -> PyTree:
    """`task.frozen()` (or `frozen` if already computed) placed once as the step's argument."""
    if frozen is None:
        frozen = setup.task.frozen()
    return setup.layout.put_frozen(frozen, setup.frozen_shardings)
