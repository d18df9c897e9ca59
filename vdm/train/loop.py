"""The training loop shared by every stage: state, optimizer, EMA, jitted step, checkpoints, logs.

A `vdm.tasks.Task` says what is learned (init, loss, frozen weights, batches, evaluation); this
module does the rest the same way for every stage:

* `TrainState` holds the step, f32 parameters, the optax state and the EMA of the parameters.
* `create_train_state` builds it with `jax.eval_shape` -> logical-axis shardings ->
  `jax.jit(init, out_shardings=...)`, so no host ever holds the full unsharded state.
* `make_train_step` returns ONE pure step `train_step(state, batch, key, frozen) -> (state,
  metrics)`, jitted with explicit shardings and the state donated (or `jax.pmap`-ed for
  `config.parallel="pmap"`). `key` is the run's base key; the step folds in `state.step` (and the
  device index under pmap), so a restarted run draws exactly the same noise.
* `train_and_evaluate(config, workdir)` resumes from `workdir` on its own and is exactly
  resumable: the parameters after a run killed at any point and restarted are bit-identical to an
  uninterrupted run (state, EMA and data-iterator position are all checkpointed; keys derive from
  the step).

Units: a *step* is one call of `train_step` on one global batch of `train.batch_size` videos. With
`optim.accumulate_steps = k > 1` the optimizer updates every k steps (optax.MultiSteps) on the mean
gradient of k batches; the learning-rate schedule and EMA count optimizer *updates*
(`optim.warmup_steps` and `train.num_steps` are in steps and divided by k).

Fine-tuning: `train.init_from` starts a fresh run from another checkpoint's (EMA) weights, and
`optim.freeze` (a regex over "/"-joined parameter paths, e.g. "^encoder/") holds the matching
parameters fixed: their gradients are dropped (XLA then skips their backward pass), they get no
optimizer state and their EMA stays equal to them. Example, Stable Diffusion's decoder-only VAE
fine-tune, which keeps the latent space a trained denoiser expects:
`--config.train.init_from=workdirs/vae --config.optim.freeze=^encoder/`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from vdm import parallel
from vdm.errors import ConfigError
from vdm.io import checkpoint as ckpt_lib
from vdm.models.layers import count_params
from vdm.rng import base_key, stream

PyTree = Any
log = logging.getLogger(__name__)

# A data-iterator factory: (config, split, *, batch_size, shuffle, seed, process_index,
# process_count) -> iterable of host batches; the iterator may have get_state()/set_state().
IteratorFactory = Callable[..., Any]


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


# ----------------------------------------------------------------------------- optimizer


def _accumulate(optim_config) -> int:
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
    k = _accumulate(optim_config)
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
    k = _accumulate(optim_config)
    if k > 1:
        # Accumulates k gradients, then applies the inner optimizer once on their mean.
        tx = optax.MultiSteps(tx, every_k_schedule=k)
    return tx, schedule


def _ema_decay(optim_config, num_updates: jax.Array) -> jax.Array:
    decay = jnp.float32(optim_config.ema_decay)
    if optim_config.get("ema_warmup", True):
        # Early on the average would be dominated by the random init; this ramp (0.1, 0.18, ...)
        # lets EMA weights be useful after a few hundred updates, not only after 1/(1-decay).
        n = num_updates.astype(jnp.float32)
        decay = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
    return decay


# ----------------------------------------------------------------------------- state


def _init_fn(task, tx, config) -> Callable[[jax.Array], TrainState]:
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


def state_shardings(task, config, mesh: Mesh, tx=None) -> tuple[TrainState, TrainState]:
    """Abstract state and its shardings, without allocating anything.

    Args:
      task: the Task.
      config: the run config (uses optim, train.num_steps, seed, mesh, parallel).
      mesh: the device mesh.
      tx: the optimizer (default: `make_optimizer(config.optim, ...)`).

    Returns:
      (abstract TrainState of `jax.ShapeDtypeStruct` with `.sharding` set, TrainState of
      `NamedSharding`). Under `parallel="pmap"` every sharding is replicated.
    """
    if tx is None:
        tx, _ = make_optimizer(config.optim, config.train.num_steps)
    init = parallel.with_sharding_rules(
        _init_fn(task, tx, config), mesh, config.mesh.logical_axis_rules
    )
    boxed = jax.eval_shape(init, stream(base_key(config.seed), "init"))
    if config.parallel == "pmap":
        shardings = jax.tree.map(lambda _: parallel.replicated(mesh), parallel.unbox(boxed))
    else:
        shardings = parallel.logical_to_sharding(boxed, mesh, config.mesh.logical_axis_rules)
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
      shardings: the state's shardings if already known (from `state_shardings`).

    Returns:
      (state, shardings of the state).
    """
    if tx is None:
        tx, _ = make_optimizer(config.optim, config.train.num_steps)
    if shardings is None:
        _, shardings = state_shardings(task, config, mesh, tx)
    init = parallel.with_sharding_rules(
        _init_fn(task, tx, config), mesh, config.mesh.logical_axis_rules
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
    _say(f"Initialised the parameters from {path} ({origin}, EMA weights); optimizer fresh.")
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    fresh = flax.traverse_util.flatten_dict(state.params, sep="/")
    new = sorted(set(fresh) - set(flat))
    if new:
        blocks = sorted({k.split("/")[0] for k in new})
        _say(
            f"{len(new)} parameters ({count_params([fresh[k] for k in new]):,} values) are not in "
            f"{path} or match train.init_skip, and keep their fresh initialisation: under "
            + ", ".join(blocks[:8])
            + (" ..." if len(blocks) > 8 else "")
        )
        params = flax.traverse_util.unflatten_dict({**fresh, **flat}, sep="/")
    # A copy: params and EMA are donated to the step separately, so they must not share buffers.
    ema = None if state.ema_params is None else jax.tree.map(jnp.copy, params)
    return state.replace(params=params, ema_params=ema)


# ----------------------------------------------------------------------------- the step


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


def _train_step(state: TrainState, batch, key, frozen, *, task, tx, schedule, config, axis_name):
    """One update; pure. `axis_name` is set under pmap (gradients are pmean'd over it)."""
    k = _accumulate(config.optim)
    key = step_key(key, state.step, axis_name)

    def loss_fn(params):
        return task.loss(params, frozen, batch, key)

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

    updates_before = state.step // k  # optimizer updates applied before this step
    ema = state.ema_params
    if ema is not None:
        applied = (state.step + 1) % k == 0  # MultiSteps applies on every k-th step only.
        decay = _ema_decay(config.optim, updates_before)
        ema = jax.tree.map(
            lambda e, p: jnp.where(applied, decay * e + (1.0 - decay) * p, e), ema, params
        )
        if trainable is not None:  # frozen: EMA == params exactly (no rounding drift).
            ema = jax.tree.map(lambda e, p, t: e if t else p, ema, params, trainable)
    metrics = dict(task_metrics)
    metrics.update(
        loss=loss,
        grad_norm=optax.tree.norm(grads),
        param_norm=optax.tree.norm(params),
        update_norm=optax.tree.norm(updates),
        learning_rate=schedule(updates_before),
    )
    metrics = {name: jnp.asarray(v, jnp.float32) for name, v in metrics.items()}
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
    return new_state, metrics


def make_train_step(
    task,
    config,
    mesh: Mesh,
    *,
    tx=None,
    schedule=None,
    shardings: TrainState | None = None,
    frozen_shardings: PyTree | None = None,
) -> Callable:
    """Builds the train step, compiled once.

    Args:
      task: the Task.
      config: the run config.
      mesh: the device mesh (for "pmap" only its devices matter).
      tx, schedule: optimizer and its schedule (default: `make_optimizer(config.optim, ...)`).
      shardings: TrainState of shardings (default: from `state_shardings`).
      frozen_shardings: shardings of `task.frozen()` (default: from `prepare_frozen`).

    Returns:
      `train_step(state, batch, key, frozen) -> (state, metrics)`. "jit": global arrays laid out
      as `shardings` / `parallel.batch_sharding(mesh)`; the input state is donated. "pmap": every
      argument but `key` in pmap layout (leading local-device axis, see
      `parallel.to_pmap_replicated` / `parallel.pmap_batch`); metrics come back per device.
      `key` is always the run's base key (`vdm.rng.base_key(config.seed)`).
    """
    if tx is None or schedule is None:
        tx, schedule = make_optimizer(config.optim, config.train.num_steps)
    step = functools.partial(_train_step, task=task, tx=tx, schedule=schedule, config=config)
    if config.parallel == "pmap":
        return jax.pmap(
            functools.partial(step, axis_name=parallel.PMAP_AXIS),
            axis_name=parallel.PMAP_AXIS,
            in_axes=(0, 0, None, 0),
            donate_argnums=(0,),
            devices=list(mesh.devices.flat),
        )
    if shardings is None:
        _, shardings = state_shardings(task, config, mesh, tx)
    if frozen_shardings is None:
        frozen_shardings = parallel.logical_to_sharding(
            task.frozen(), mesh, config.mesh.logical_axis_rules
        )
    fn = parallel.with_sharding_rules(
        functools.partial(step, axis_name=None), mesh, config.mesh.logical_axis_rules
    )
    return jax.jit(
        fn,
        in_shardings=(
            shardings,
            parallel.batch_sharding(mesh),
            parallel.replicated(mesh),
            frozen_shardings,
        ),
        out_shardings=(shardings, parallel.replicated(mesh)),
        donate_argnums=(0,),
    )


def prepare_frozen(task, config, mesh: Mesh, frozen: PyTree = None) -> tuple[PyTree, PyTree]:
    """`task.frozen()` placed on devices once: (frozen arrays, their shardings).

    Boxed leaves follow the logical-axis rules, others are replicated. Under pmap the result is
    in pmap layout (one copy per local device) and the shardings are None.

    Args:
      task: the Task.
      config: the run config.
      mesh: the device mesh.
      frozen: `task.frozen()` if already computed.

    Returns:
      (frozen arrays on devices, their shardings).
    """
    if frozen is None:
        frozen = task.frozen()
    if config.parallel == "pmap":
        local = parallel.local_devices(mesh)
        return parallel.to_pmap_replicated(parallel.unbox(frozen), local), None
    shardings = parallel.logical_to_sharding(frozen, mesh, config.mesh.logical_axis_rules)
    return parallel.put_replicated(frozen, mesh, config.mesh.logical_axis_rules), shardings


# ----------------------------------------------------------------------------- logging


class MetricWriter:
    """Scalars to TensorBoard (tensorboardX) and `metrics.jsonl` in the workdir; process 0 only."""

    def __init__(self, workdir: str, *, resume_step: int = 0):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not self.active:
            return
        if os.path.exists(self.path):
            # Steps after the restored checkpoint were never kept; drop them so the file reads as
            # one run (a killed run logged past its last checkpoint; 0 = a fresh start).
            with open(self.path) as f:
                lines = [
                    ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= resume_step
                ]
            with open(self.path, "w") as f:
                f.writelines(lines)
        # tensorboardX imports torch whenever it is installed (~5 s, only to accept torch tensors);
        # we log Python floats, so hide torch during the import unless someone already loaded it.
        hide_torch = "torch" not in sys.modules
        if hide_torch:
            sys.modules["torch"] = None
        try:
            from tensorboardX import SummaryWriter
        finally:
            if hide_torch:
                del sys.modules["torch"]
        # purge_step: TensorBoard hides what earlier event files logged after the restored step.
        self._tb = SummaryWriter(
            os.path.join(workdir, "tensorboard"),
            purge_step=resume_step + 1 if resume_step else None,
        )

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.active:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        for k, v in scalars.items():
            self._tb.add_scalar(k, v, step)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **scalars}) + "\n")

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)
    log.info(message)


class _Preemption:
    """SIGTERM -> "save and stop at the next step boundary".

    Single process: a Python signal handler sets a flag. Multi-process: JAX's preemption sync
    manager (started by `jax.distributed.initialize`) catches SIGTERM and agrees on one step at
    which every process saves (`reached_preemption_sync_point`).
    """

    def __init__(self):
        self.flag = False
        self._old = None
        self._multi = jax.process_count() > 1
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        self.flag = True

    def reached(self, step: int) -> bool:
        if not self._multi:
            return self.flag
        from jax.experimental import multihost_utils

        try:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        except RuntimeError:  # preemption service disabled
            return False

    def restore(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None


# ----------------------------------------------------------------------------- the loop


def default_iterator_factory(
    config, split, *, batch_size, shuffle, seed, process_index, process_count
):
    """`vdm.data.loader.make_loader` (the grain loader of `config.data`)."""
    from vdm.data import loader as pipeline

    return pipeline.make_loader(
        config,
        split,
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
    )


def _tokens_per_example(task) -> int | None:
    n = getattr(task, "tokens_per_example", None)
    if callable(n):
        n = n()
    return int(n) if n else None


def _fetch(metrics, pmap: bool) -> dict[str, float]:
    host = jax.device_get(metrics)
    if pmap:
        host = {k: v[0] for k, v in host.items()}
    return {k: float(v) for k, v in host.items()}


def _check_finite(step: int, m: Mapping[str, float], workdir: str, last_saved: int | None):
    bad = {
        k: m[k] for k in ("loss", "grad_norm", "param_norm") if k in m and not math.isfinite(m[k])
    }
    if bad:
        where = (
            f"the last good checkpoint is step {last_saved} in {ckpt_lib.checkpoint_dir(workdir)}"
            if last_saved is not None
            else "no checkpoint was written in this run"
        )
        raise FloatingPointError(
            f"Training stopped: non-finite {', '.join(f'{k}={v}' for k, v in bad.items())} at step "
            f"{step} (the update from step {step - 1} to {step}). Nothing was saved after it; "
            f"{where}. Lower optim.learning_rate, keep optim.grad_clip > 0, or check the data."
        )


def train_and_evaluate(
    config,
    workdir: str,
    *,
    task=None,
    make_iterator: IteratorFactory | None = None,
    devices=None,
) -> TrainState:
    """Trains `config.stage` in `workdir`, resuming from its latest checkpoint.

    Args:
      config: the run config (see configs/base.py).
      workdir: checkpoints (`checkpoints/<step>/`), `metrics.jsonl`, TensorBoard events
        (`tensorboard/`) and the task's previews go here.
      task: the Task (default `vdm.tasks.get_task(config)`); tests pass a toy one.
      make_iterator: data-iterator factory with the signature of `default_iterator_factory`
        (default: the grain pipeline of `config.data`). Called with the GLOBAL batch size and
        this process's index/count; must yield this process's `batch_size / process_count` rows.
        If the iterator has `get_state()` / `set_state()` (grain's do) its position is
        checkpointed for an exact resume.
      devices: devices for the mesh (default all). Tests use it to run on a subset.

    Returns:
      The final TrainState (jax.Arrays laid out on the mesh; replicated under pmap).

    Raises:
      FloatingPointError: a non-finite loss or gradient (nothing is saved after it).
      ValueError: a config the mesh or batch cannot satisfy.
    """
    # Multi-host from the environment (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    # JAX_PROCESS_ID) when the caller has not initialised jax.distributed; a no-op otherwise.
    parallel.initialize_distributed()
    if task is None:
        from vdm.tasks import get_task

        task = get_task(config)
    make_iterator = make_iterator or default_iterator_factory
    pmap = config.parallel == "pmap"
    os.makedirs(workdir, exist_ok=True)

    mesh = parallel.make_mesh(config.mesh, devices)
    if pmap:
        pmap_devices = parallel.local_devices(mesh)
        n_local = len(pmap_devices)
    global_batch = int(config.train.batch_size)
    parallel.check_batch_size(global_batch, mesh)
    num_steps = int(config.train.num_steps)
    tx, schedule = make_optimizer(config.optim, num_steps)
    abstract, shardings = state_shardings(task, config, mesh, tx)
    frozen_host = task.frozen()
    num_frozen = count_params(frozen_host)
    frozen, frozen_shardings = prepare_frozen(task, config, mesh, frozen_host)
    del frozen_host
    use_ema = abstract.ema_params is not None

    num_trainable, num_held = check_freeze(abstract.params, config.optim)
    _say(
        f"{type(task).__name__}: {num_trainable:,} trainable parameters, "
        + (f"{num_held:,} held by optim.freeze={config.optim.freeze!r}, " if num_held else "")
        + f"{num_frozen:,} frozen; {parallel.describe_mesh(mesh)}; "
        f"parallel={config.parallel}; global batch {global_batch}"
        + (
            f" x {config.optim.accumulate_steps} accumulated"
            if config.optim.accumulate_steps > 1
            else ""
        )
    )

    with contextlib.ExitStack() as stack:
        # ---- state: restore the newest readable checkpoint, else initialise.
        # Closing waits for in-flight async saves, also when training stops with an error.
        ckpt = stack.enter_context(
            ckpt_lib.CheckpointManager.for_workdir(workdir, config.checkpoint)
        )
        arrays = {
            "params": abstract.params,
            "opt_state": {"step": abstract.step, "opt_state": abstract.opt_state},
        }
        if use_ema:
            arrays["ema"] = abstract.ema_params
        start, restored = ckpt.restore_latest(arrays=arrays)
        data_state = None
        if start is not None:
            state = TrainState(
                step=restored["opt_state"]["step"],
                params=restored["params"],
                opt_state=restored["opt_state"]["opt_state"],
                ema_params=restored.get("ema"),
            )
            try:
                data_state = ckpt.restore(start, arrays={}, data=True)[ckpt_lib.DATA_ITEM]
            except Exception as e:  # noqa: BLE001 - e.g. no iterator state or another process count.
                log.warning("Step %d: no usable data-iterator state (%s); data restarts.", start, e)
            _say(f"Resumed from step {start} ({ckpt.directory}).")
        else:
            start = 0
            state, _ = create_train_state(task, config, mesh, tx, shardings)
            init_from = config.train.get("init_from", "")
            if init_from:
                state = init_params_from(
                    state,
                    init_from,
                    abstract.params,
                    keep_new=config.train.get("init_new_params", False),
                    skip=config.train.get("init_skip", ""),
                )
        if start and config.train.get("init_from", ""):
            _say(f"train.init_from is ignored: {workdir} has its own checkpoint (resumed).")
        if pmap:
            state = parallel.to_pmap_replicated(state, pmap_devices)

        # ---- data.
        loader = make_iterator(
            config,
            config.data.train_split,
            batch_size=global_batch,
            shuffle=True,
            seed=config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        it: Iterator = iter(loader)
        if data_state is not None:
            if hasattr(it, "set_state"):
                it.set_state(data_state)
            else:
                log.warning(
                    "The data iterator has no set_state(); data restarts from the beginning."
                )
        elif start > 0:
            log.warning(
                "Resuming at step %d without data state: the data order is not exact.", start
            )

        train_step = make_train_step(
            task,
            config,
            mesh,
            tx=tx,
            schedule=schedule,
            shardings=shardings,
            frozen_shardings=frozen_shardings,
        )
        key = base_key(config.seed)
        local_batch = global_batch // jax.process_count()

        def device_batch(host_batch):
            batch = task.device_batch(host_batch)
            for k, v in batch.items():
                if np.shape(v)[0] != local_batch:
                    raise ValueError(
                        f"The data iterator yielded '{k}' with {np.shape(v)[0]} rows; this process "
                        f"expects train.batch_size / process_count = {global_batch} / "
                        f"{jax.process_count()} = {local_batch}."
                    )
            if pmap:
                return parallel.pmap_batch(batch, n_local)
            return parallel.shard_batch(batch, mesh)

        def canonical(tree):
            """State / params as global arrays (pmap layout -> replicated over the mesh)."""
            return parallel.from_pmap_replicated(tree, mesh) if pmap else tree

        config_json = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        last_saved = start if start > 0 else None

        def save(step: int):
            nonlocal last_saved
            if last_saved == step:
                return
            st = canonical(state)
            items = {"params": st.params, "opt_state": {"step": st.step, "opt_state": st.opt_state}}
            if use_ema:
                items["ema"] = st.ema_params
            unfrozen = frozen if not pmap else parallel.from_pmap_replicated(frozen, mesh)
            metadata = task.metadata(st.ema_params if use_ema else st.params, unfrozen)
            data = it.get_state() if hasattr(it, "get_state") else None
            t0 = time.perf_counter()
            ckpt.save(
                step,
                arrays=items,
                json_items={"config": config_json, "metadata": metadata},
                data_state=data,
            )
            log.info("Checkpoint %d started (%.2fs blocking).", step, time.perf_counter() - t0)
            last_saved = step

        def evaluate(step: int) -> None:
            st = canonical(state)
            params = st.ema_params if use_ema else st.params
            unfrozen = frozen if not pmap else parallel.from_pmap_replicated(frozen, mesh)
            results = task.evaluate(params, unfrozen, step, workdir) or {}
            if results:
                results = {
                    k if k.startswith("eval/") else f"eval/{k}": v for k, v in results.items()
                }
                writer.write(step, results)
                _say(f"step {step} eval: " + ", ".join(f"{k}={v:.4g}" for k, v in results.items()))

        writer = MetricWriter(workdir, resume_step=start)
        stack.callback(writer.close)
        preemption = _Preemption()
        stack.callback(preemption.restore)
        tokens = _tokens_per_example(task)
        log_every = max(int(config.train.log_every_steps), 1)
        eval_every = int(config.train.eval_every_steps)
        ckpt_every = int(config.checkpoint.every_steps)
        from tqdm.auto import tqdm

        bar = tqdm(
            total=num_steps,
            initial=start,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=jax.process_index() != 0,
        )
        stack.callback(bar.close)
        window: dict[str, list[float]] = {}
        # Throughput window: steps and wall time since the last log, minus time spent saving and
        # evaluating (the first step of a run, which compiles, is never in a window).
        window_start, window_steps, paused = None, 0, 0.0
        pending = None  # (step, device metrics) of the step whose values are not yet on the host.

        def absorb(step, metrics):
            m = _fetch(metrics, pmap)
            _check_finite(step, m, workdir, last_saved)
            for k, v in m.items():
                window.setdefault(k, []).append(v)
            return m

        for i in range(start, num_steps):
            batch = device_batch(next(it))
            state, metrics = train_step(state, batch, key, frozen)
            done = i + 1
            # Read the previous step's scalars while this one runs (one step of pipelining),
            # checking every step for NaN before anything could be saved.
            if pending is not None:
                absorb(*pending)
            pending = (done, metrics)
            if window_start is None:  # First step of this run: compile time, not throughput.
                absorb(*pending)
                pending = None
                window_start, window_steps = time.perf_counter(), 0
            else:
                window_steps += 1
            bar.update(1)
            preempted = preemption.reached(done)
            is_log = done % log_every == 0 or done == num_steps
            is_ckpt = ckpt_every > 0 and done % ckpt_every == 0
            is_eval = eval_every > 0 and (done % eval_every == 0 or done == num_steps)
            if pending is not None and (
                is_log or is_ckpt or is_eval or preempted or done == num_steps
            ):
                absorb(*pending)
                pending = None
            if is_log and window:
                elapsed = time.perf_counter() - window_start - paused
                scalars = {f"train/{k}": float(np.mean(v)) for k, v in window.items()}
                if window_steps and elapsed > 0:
                    steps_per_s = window_steps / elapsed
                    scalars["perf/steps_per_sec"] = steps_per_s
                    scalars["perf/videos_per_sec"] = steps_per_s * global_batch
                    if tokens:
                        scalars["perf/tokens_per_sec"] = steps_per_s * global_batch * tokens
                writer.write(done, scalars)
                bar.set_postfix(loss=f"{scalars['train/loss']:.4g}", refresh=False)
                window.clear()
                window_start, window_steps, paused = time.perf_counter(), 0, 0.0
            t0 = time.perf_counter()
            if is_ckpt or done == num_steps or preempted:
                save(done)
            if is_eval:
                if last_saved == done:
                    # Evaluation imports modules on first use (tfds, via etils' lazy imports, swaps
                    # `builtins.__import__` process-wide while it runs); a concurrent async save
                    # then fails inside orbax (humanize's function-level `from math import log`
                    # gets a LazyModule: "TypeError: 'LazyModule' object is not callable"). The
                    # save is seconds against minutes of evaluation: let it finish first.
                    ckpt.wait()
                evaluate(done)
            paused += time.perf_counter() - t0
            if preempted:
                ckpt.wait()
                _say(f"Preemption signal: saved a checkpoint at step {done}; stopping.")
                break
        return canonical(state)
