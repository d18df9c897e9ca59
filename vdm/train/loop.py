"""The training loop shared by every stage: `train_and_evaluate(config, workdir)`.

A `vdm.tasks.Task` says what is learned; `vdm.train.setup.build` turns it into the optimizer,
state shardings and compiled step once; this module runs the steps and calls the parts of
`vdm.train.hooks` (metrics, NaN guard, throughput, checkpoints, evaluation, preemption) in order.

The loop resumes from `workdir` on its own and is exactly resumable: the parameters after a run
killed at any point and restarted are bit-identical to an uninterrupted run (state, EMA and
data-iterator position are all checkpointed; keys derive from the step).

Fine-tuning: `train.init_from` starts a fresh run from another checkpoint's (EMA) weights
(`vdm.train.state.init_params_from`), usually with `optim.freeze` (see `vdm.train.optim`).
A stage that fine-tunes a pretrained model (stage "wan") starts from `Task.pretrained` instead.
With `optim.lora_rank > 0` it trains low-rank adapters on the `train.init_from` (else the
pretrained) weights instead (`vdm.tasks.lora`): the state and checkpoints hold the adapters, the
base is a frozen input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax

from vdm import parallel, provenance
from vdm.data import loader as data_loader
from vdm.errors import UserError
from vdm.io import checkpoint
from vdm.models.layers import count_params
from vdm.rng import base_key
from vdm.tasks import get_task
from vdm.tasks import lora as lora_task
from vdm.train import hooks, say
from vdm.train import setup as setup_lib
from vdm.train.optim import check_freeze
from vdm.train.setup import TrainSetup
from vdm.train.state import TrainState, init_params_from, start_from

PyTree = Any
log = logging.getLogger(__name__)

# A data-iterator factory: (config, split, *, batch_size, shuffle, seed, process_index,
# process_count) -> iterable of host batches; the iterator may have get_state()/set_state().
IteratorFactory = Callable[..., Any]


def default_iterator_factory(
    config, split, *, batch_size, shuffle, seed, process_index, process_count
):
    """`vdm.data.loader.make_loader` (the grain loader of `config.data`)."""
    return data_loader.make_loader(
        config,
        split,
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
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
      The final TrainState as global arrays (replicated over the mesh by the data-parallel
      layout).

    Raises:
      FloatingPointError: a non-finite loss or gradient (nothing is saved after it).
      ValueError: a config the mesh or batch cannot satisfy.
    """
    # Multi-host from the environment (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    # JAX_PROCESS_ID) when the caller has not initialised jax.distributed; a no-op otherwise.
    parallel.initialize_distributed()
    task = lora_task.wrap(get_task(config) if task is None else task, config)
    os.makedirs(workdir, exist_ok=True)
    mesh = parallel.make_mesh(config.mesh, devices)
    parallel.check_batch_size(int(config.train.batch_size), mesh)
    setup = setup_lib.build(task, config, mesh)
    frozen_host = task.frozen()
    num_frozen = count_params(frozen_host)
    frozen = setup_lib.place_frozen(setup, frozen_host)
    del frozen_host
    _announce(setup, num_frozen)
    with contextlib.ExitStack() as stack:
        saver = stack.enter_context(hooks.CheckpointSaver(setup, workdir))
        start, state, data_state = _initial_state(setup, saver, workdir)
        iterator = _open_data(
            setup, make_iterator or default_iterator_factory, data_state, start, saver
        )
        parts = _Parts.open(stack, setup, workdir, start, frozen, iterator, saver)
        state = _train(parts, state, start)
        return setup.layout.global_view(state)


def _announce(setup: TrainSetup, num_frozen: int) -> None:
    """One line: parameter counts (after checking `optim.freeze`), mesh, layout, batch."""
    config = setup.config
    num_trainable, num_held = check_freeze(setup.abstract_state.params, config.optim)
    say(
        f"{type(setup.task).__name__}: {num_trainable:,} trainable parameters, "
        + (f"{num_held:,} held by optim.freeze={config.optim.freeze!r}, " if num_held else "")
        + f"{num_frozen:,} frozen; {parallel.describe_mesh(setup.mesh)}; "
        f"parallel={config.parallel}; global batch {int(config.train.batch_size)}"
        + (
            f" x {config.optim.accumulate_steps} accumulated"
            if config.optim.accumulate_steps > 1
            else ""
        )
    )


def _initial_state(
    setup: TrainSetup, saver: hooks.CheckpointSaver, workdir: str
) -> tuple[int, TrainState, Any]:
    """(first step, state laid out for the step, data-iterator state or None).

    The newest readable checkpoint of `workdir` wins; else a fresh state, with the weights of
    `train.init_from` when set.
    """
    train = setup.config.train
    init_from = train.get("init_from", "")
    start, state, data_state = saver.restore()
    lora = isinstance(setup.task, lora_task.LoraTask)  # its task reads init_from as the base
    if state is None:
        state = setup_lib.init_state(setup)
        if init_from and not lora:
            state = init_params_from(
                state,
                init_from,
                setup.abstract_state.params,
                keep_new=train.get("init_new_params", False),
                skip=train.get("init_skip", ""),
            )
        elif not lora:
            pretrained = setup.task.pretrained(setup.abstract_state.params)
            if pretrained is not None:
                state = start_from(state, pretrained)
                say(f"Initialised the parameters from {setup.task.pretrained_source}.")
    elif init_from and not lora:
        say(f"train.init_from is ignored: {workdir} has its own checkpoint (resumed).")
    return start, setup.layout.put_state(state), data_state


def _record_provenance(saver: hooks.CheckpointSaver, config, data, start: int) -> bool:
    """What the checkpoints record about this run's data (`vdm.provenance`); a resumed run whose
    data differs from its checkpoint's warns and keeps both. Returns whether it differs."""
    record = provenance.run_record(config, data)
    if data and data["dropped"]:
        say(
            f"Data: {data['dropped']} of {data['num_examples']} examples dropped "
            f"({data['dropped_excluded']} on config.data.exclude lists, "
            f"{data['dropped_no_consent']} without consent); recorded in each checkpoint."
        )
    previous = None
    if start > 0:
        step_dir = os.path.join(saver.manager.directory, str(start))
        try:
            previous = checkpoint.load_metadata(step_dir).get(provenance.FIELD)
        except (OSError, ValueError, UserError) as e:  # a damaged JSON item does not stop a run
            log.warning("Cannot read the provenance of %s: %s", step_dir, e)
    saver.provenance, warning = provenance.resumed(record, previous, start)
    if warning:
        log.warning(warning)
        say(f"Warning: {warning}")
    return warning is not None


def _open_data(
    setup: TrainSetup, make_iterator: IteratorFactory, data_state, start: int, saver
) -> Iterator:
    """This process's data iterator, at the restored position when there is one."""
    config = setup.config
    loader = make_iterator(
        config,
        config.data.train_split,
        batch_size=int(config.train.batch_size),
        shuffle=True,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    changed = _record_provenance(saver, config, getattr(loader, "provenance", None), start)
    it = iter(loader)
    if data_state is not None:
        if hasattr(it, "set_state"):
            try:
                it.set_state(data_state)
            except ValueError:  # grain: another number of examples (e.g. a new opt-out list)
                if not changed:
                    raise
                say("The training data changed: the data order restarts from the beginning.")
                it = iter(loader)
        else:
            log.warning("The data iterator has no set_state(); data restarts from the beginning.")
    elif start > 0:
        log.warning("Resuming at step %d without data state: the data order is not exact.", start)
    return it


@dataclasses.dataclass
class _Parts:
    """The loop body's parts for one run (closed by the run's ExitStack)."""

    setup: TrainSetup
    frozen: PyTree
    batches: hooks.DeviceBatches
    saver: hooks.CheckpointSaver
    writer: hooks.MetricWriter
    guard: hooks.NanGuard
    meter: hooks.Throughput
    evaluator: hooks.Evaluator
    preemption: hooks.Preemption
    bar: Any

    @classmethod
    def open(cls, stack, setup, workdir, start, frozen, iterator, saver) -> _Parts:
        writer = hooks.MetricWriter(workdir, resume_step=start)
        stack.callback(writer.close)
        preemption = hooks.Preemption()
        stack.callback(preemption.restore)
        bar = hooks.progress_bar(start, int(setup.config.train.num_steps))
        stack.callback(bar.close)
        return cls(
            setup=setup,
            frozen=frozen,
            batches=hooks.DeviceBatches(setup, iterator),
            saver=saver,
            writer=writer,
            guard=hooks.NanGuard(setup.layout, workdir),
            meter=hooks.Throughput(
                int(setup.config.train.batch_size), setup.task.tokens_per_example
            ),
            evaluator=hooks.Evaluator(setup, frozen, workdir, writer),
            preemption=preemption,
            bar=bar,
        )


class _Due(NamedTuple):
    """What happens after a step: a log line, a checkpoint, an evaluation."""

    log: bool
    save: bool
    eval: bool

    @classmethod
    def at(cls, step: int, train, checkpoint) -> _Due:
        last = step == int(train.num_steps)
        every = int(checkpoint.every_steps)
        eval_every = int(train.eval_every_steps)
        return cls(
            log=step % max(int(train.log_every_steps), 1) == 0 or last,
            save=(every > 0 and step % every == 0) or last,
            eval=eval_every > 0 and (step % eval_every == 0 or last),
        )


def _train(p: _Parts, state: TrainState, start: int) -> TrainState:
    """Steps `start` .. `train.num_steps` (or until preempted); the state after the last."""
    config = p.setup.config
    key = base_key(config.seed)
    for i in range(start, int(config.train.num_steps)):
        state, metrics = p.setup.train_step(state, next(p.batches), key, p.frozen)
        done = i + 1
        # Read the previous step's scalars while this one runs, checking each before any save.
        p.guard.push(done, metrics, p.saver.last_saved)
        if p.meter.running:
            p.meter.count()
        else:  # The first step of this run compiles: not throughput.
            p.guard.flush(p.saver.last_saved)
            p.meter.start()
        p.bar.update(1)
        preempted = p.preemption.reached(done)
        due = _Due.at(done, config.train, config.checkpoint)
        if any(due) or preempted:
            p.guard.flush(p.saver.last_saved)
        if due.log and p.guard.window:
            _log(p, done)
        t0 = time.perf_counter()
        if due.save or preempted:
            p.saver.save(done, state, p.frozen, p.batches)
        if due.eval:
            p.evaluator(done, state, p.saver)
        p.meter.pause(time.perf_counter() - t0)
        if preempted:
            p.saver.wait()
            say(f"Preemption signal: saved a checkpoint at step {done}; stopping.")
            break
    return state


def _log(p: _Parts, step: int) -> None:
    """The window's mean metrics and throughput to the writer and the progress bar."""
    scalars = p.guard.take_means()
    scalars.update(p.meter.rates())
    p.writer.write(step, scalars)
    p.bar.set_postfix(loss=f"{scalars['train/loss']:.4g}", refresh=False)
    p.meter.start()
