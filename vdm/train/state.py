"""The training state: what it holds, and how it is created sharded without a host copy.

`create_train_state` builds it with `jax.eval_shape` -> the layout's shardings (logical-axis rules
for global arrays) -> `jax.jit(init, out_shardings=...)`, so no host ever holds the full unsharded
state. `init_params_from` (`train.init_from`) starts a fresh run from another checkpoint's weights.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from vdm import parallel
from vdm.errors import ConfigError
from vdm.io import checkpoint as ckpt_lib
from vdm.models.layers import count_params
from vdm.rng import base_key, stream
from vdm.train import say
from vdm.train.optim import make_optimizer

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (a pytree; all leaves are arrays).

    Attributes:
      step: int32 scalar, number of train steps done (= the next step's index).
      params: trainable parameters (float32; modules compute in their own `dtype`).
      opt_state: the optax state (AdamW moments, schedule counts, accumulated gradients).
      ema_params: exponential moving average of `params` (what sampling uses); None when
        `optim.ema_decay == 0`.
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    ema_params: PyTree | None


def init_fn(task, tx, config) -> Callable[[jax.Array], TrainState]:
    """init(key) -> TrainState with *boxed* leaves (logical axis names kept for sharding)."""
    use_ema = float(config.optim.ema_decay) > 0

    def init(key):
        batch = jax.tree.map(jnp.asarray, task.dummy_batch(1))
        params = task.init(key, batch)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),  # Moments inherit the params' boxes -> same shardings.
            ema_params=params if use_ema else None,
        )

    return init


def state_shardings(
    task, config, mesh: Mesh, tx=None, layout: parallel.Layout | None = None
) -> tuple[TrainState, TrainState]:
    """Abstract state and its shardings, without allocating anything.

    Args:
      task: the Task.
      config: the run config (uses optim, train.num_steps, seed, mesh).
      mesh: the device mesh.
      tx: the optimizer (default: `make_optimizer(config.optim, ...)`).
      layout: how the step's arguments sit on devices (default: global arrays sharded by
        `config.mesh.logical_axis_rules`; `vdm.train.setup.build` passes the run's layout).

    Returns:
      (abstract TrainState of `jax.ShapeDtypeStruct` with `.sharding` set, TrainState of
      `NamedSharding`).
    """
    if tx is None:
        tx, _ = make_optimizer(config.optim, config.train.num_steps)
    if layout is None:
        layout = parallel.Layout(mesh, config.mesh.logical_axis_rules)
    init = parallel.with_sharding_rules(
        init_fn(task, tx, config), mesh, config.mesh.logical_axis_rules
    )
    boxed = jax.eval_shape(init, stream(base_key(config.seed), "init"))
    shardings = layout.state_shardings(boxed)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        parallel.unbox(boxed),
        shardings,
    )
    return abstract, shardings


def create_train_state(
    task, config, mesh: Mesh, tx=None, shardings: TrainState | None = None
) -> tuple[TrainState, TrainState]:
    """A freshly initialised, sharded TrainState (init runs under jit with `out_shardings`).

    Args:
      task: the Task.
      config: the run config.
      mesh: the device mesh.
      tx: the optimizer (default: from `config.optim`).
      shardings: the state's shardings if already known (`state_shardings`; default: global
        arrays by the logical-axis rules).

    Returns:
      (state, shardings of the state).
    """
    if tx is None:
        tx, _ = make_optimizer(config.optim, config.train.num_steps)
    if shardings is None:
        _, shardings = state_shardings(task, config, mesh, tx)
    init = parallel.with_sharding_rules(
        init_fn(task, tx, config), mesh, config.mesh.logical_axis_rules
    )
    unboxed_init = lambda key: parallel.unbox(init(key))  # noqa: E731
    state = jax.jit(unboxed_init, out_shardings=shardings)(stream(base_key(config.seed), "init"))
    return state, shardings


def init_params_from(
    state: TrainState,
    path: str,
    abstract_params: PyTree,
    *,
    keep_new: bool = False,
    skip: str = "",
) -> TrainState:
    """`state` with params (and EMA) set to checkpoint `path`'s EMA weights (`train.init_from`).

    The optimizer state stays fresh (moments 0, schedule from step 0): this starts a new run.
    With `keep_new` (`train.init_new_params`), parameters the checkpoint lacks keep `state`'s
    fresh initialisation: a model grown from the checkpoint. Blocks appended to the denoiser are
    then exactly the identity (adaLN-Zero gates and the cross-attention output start at 0), so the
    grown model starts as the checkpoint's function. Parameters matching the regex `skip`
    (`train.init_skip`) keep their fresh initialisation too, whatever the checkpoint holds under
    their names (e.g. the patch embedding and output layer after a `model.patch_size` change).

    Raises:
      ConfigError: no checkpoint at `path`, or one of another architecture (differences named).
    """
    try:
        params, step = ckpt_lib.load_params_like(
            path, abstract_params, item="ema", allow_missing=keep_new, skip=skip
        )
    except re.error as e:
        raise ConfigError(f"train.init_skip={skip!r} is not a valid regex: {e}") from None
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"train.init_from={path!r}: {e}") from None
    origin = "an exported model" if step is None else f"step {step}"
    say(f"Initialised the parameters from {path} ({origin}, EMA weights); optimizer fresh.")
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    fresh = flax.traverse_util.flatten_dict(state.params, sep="/")
    new = sorted(set(fresh) - set(flat))
    if new:
        blocks = sorted({k.split("/")[0] for k in new})
        say(
            f"{len(new)} parameters ({count_params([fresh[k] for k in new]):,} values) are not in "
            f"{path} or match train.init_skip, and keep their fresh initialisation: under "
            + ", ".join(blocks[:8])
            + (" ..." if len(blocks) > 8 else "")
        )
        params = flax.traverse_util.unflatten_dict({**fresh, **flat}, sep="/")
    return start_from(state, params)


def start_from(state: TrainState, params: PyTree) -> TrainState:
    """`state` with params and EMA set to `params` (the optimizer state stays fresh)."""
    # A copy: params and EMA are donated to the step separately, so they must not share buffers.
    ema = None if state.ema_params is None else jax.tree.map(jnp.copy, params)
    return state.replace(params=params, ema_params=ema)
