"""The parts of the training loop's body, each with one job and its own state.

* `DeviceBatches`: this process's host batches, checked and laid out for the step.
* `MetricWriter`: scalars to TensorBoard and `metrics.jsonl`.
* `NanGuard`: reads each step's scalars one step late and stops on a non-finite value.
* `Throughput`: steps / videos / tokens per second over a log window.
* `CheckpointSaver`: restores the newest checkpoint and saves the state with its metadata.
* `Evaluator`: the task's evaluation, logged.
* `Preemption`: SIGTERM (or the multi-host sync point) -> save and stop.

They hold device values only through the run's layout (`vdm.train.setup.TrainSetup.layout`), so
none of them knows how the step is parallelised.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np

from vdm.io import manager
from vdm.train import say
from vdm.train.setup import TrainSetup
from vdm.train.state import TrainState

PyTree = Any
log = logging.getLogger(__name__)


class DeviceBatches:
    """This process's batches from a data iterator, as the step takes them.

    Each host batch goes through `task.device_batch` (tokenize, cast), is checked to hold this
    process's `train.batch_size / process_count` rows, and is laid out by the run's layout.
    """

    def __init__(self, setup: TrainSetup, iterator: Iterator):
        self.setup = setup
        self.iterator = iterator
        self.global_batch = int(setup.config.train.batch_size)
        self.local_batch = self.global_batch // jax.process_count()

    def __iter__(self):
        return self

    def __next__(self):
        batch = self.setup.task.device_batch(next(self.iterator))
        for k, v in batch.items():
            if np.shape(v)[0] != self.local_batch:
                raise ValueError(
                    f"The data iterator yielded '{k}' with {np.shape(v)[0]} rows; this process "
                    f"expects train.batch_size / process_count = {self.global_batch} / "
                    f"{jax.process_count()} = {self.local_batch}."
                )
        return self.setup.layout.put_batch(batch)

    def get_state(self) -> bytes | None:
        """The iterator's position (None when it cannot say), checkpointed for an exact resume."""
        return self.iterator.get_state() if hasattr(self.iterator, "get_state") else None


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
            tb, self._tb = self._tb, None
            try:
                tb.close()
            except OSError as e:  # e.g. a full disk (the checkpoint save reports it too)
                log.warning("TensorBoard events in %s not written: %s", tb.logdir, e)
                for writer in tb.all_writers.values():  # or tensorboardX retries at exit
                    writer.event_writer._closed = True
                    writer.event_writer._worker.stop()


class NanGuard:
    """Brings each step's scalars to the host one step late and stops on a non-finite one.

    Fetching the previous step's metrics while the current one runs keeps the host from waiting
    on the device every step; every step is still checked before anything after it could be
    saved. The fetched values collect in `window` until the next log line.
    """

    def __init__(self, layout, workdir: str):
        self.layout = layout
        self.workdir = workdir
        self.pending: tuple[int, Any] | None = None  # (step, device metrics) not yet fetched.
        self.window: dict[str, list[float]] = {}

    def push(self, step: int, metrics, last_saved: int | None) -> None:
        """Fetches and checks the pending step, then holds `metrics` of `step` back."""
        self.flush(last_saved)
        self.pending = (step, metrics)

    def flush(self, last_saved: int | None) -> None:
        """Fetches and checks the pending step now (before a log line, a save or an evaluation)."""
        if self.pending is None:
            return
        step, metrics = self.pending
        self.pending = None
        m = self.layout.fetch(metrics)
        check_finite(step, m, self.workdir, last_saved)
        for k, v in m.items():
            self.window.setdefault(k, []).append(v)

    def take_means(self) -> dict[str, float]:
        """The window's mean per metric ("train/<name>"), and a fresh window."""
        means = {f"train/{k}": float(np.mean(v)) for k, v in self.window.items()}
        self.window = {}
        return means


def check_finite(step: int, m: Mapping[str, float], workdir: str, last_saved: int | None) -> None:
    """Raises FloatingPointError naming the step and the last good checkpoint on a NaN / inf."""
    bad = {
        k: m[k] for k in ("loss", "grad_norm", "param_norm") if k in m and not math.isfinite(m[k])
    }
    if bad:
        where = (
            f"the last good checkpoint is step {last_saved} in {manager.checkpoint_dir(workdir)}"
            if last_saved is not None
            else "no checkpoint was written in this run"
        )
        raise FloatingPointError(
            f"Training stopped: non-finite {', '.join(f'{k}={v}' for k, v in bad.items())} at step "
            f"{step} (the update from step {step - 1} to {step}). Nothing was saved after it; "
            f"{where}. Lower optim.learning_rate, keep optim.grad_clip > 0, or check the data."
        )


class Throughput:
    """Steps, videos and tokens per second over a log window.

    The window counts steps and wall time since the last log line, minus the time spent saving
    and evaluating. It starts after the first step of a run, which compiles: that step is never
    in a window.
    """

    def __init__(self, global_batch: int, tokens_per_example: int | None):
        self.global_batch = global_batch
        self.tokens = int(tokens_per_example) if tokens_per_example else None
        self.started: float | None = None
        self.steps = 0
        self.paused = 0.0

    @property
    def running(self) -> bool:
        return self.started is not None

    def start(self) -> None:
        """Opens a new window now."""
        self.started, self.steps, self.paused = time.perf_counter(), 0, 0.0

    def count(self) -> None:
        self.steps += 1

    def pause(self, seconds: float) -> None:
        self.paused += seconds

    def rates(self) -> dict[str, float]:
        """ "perf/..." scalars of the window (empty when it holds no step)."""
        elapsed = time.perf_counter() - self.started - self.paused
        if not self.steps or elapsed <= 0:
            return {}
        steps_per_s = self.steps / elapsed
        out = {
            "perf/steps_per_sec": steps_per_s,
            "perf/videos_per_sec": steps_per_s * self.global_batch,
        }
        if self.tokens:
            out["perf/tokens_per_sec"] = steps_per_s * self.global_batch * self.tokens
        return out


class CheckpointSaver:
    """The workdir's checkpoints: restores the newest readable one, saves the state.

    A checkpoint holds the items "params", "opt_state" ({"step", "opt_state"}), "ema" (when the
    run keeps an EMA), the JSON items "config" and "metadata" (`task.metadata` of the weights
    sampling uses) and the data iterator's position. Leaving the `with` block waits for in-flight
    async saves, also when training stops with an error.
    """

    def __init__(self, setup: TrainSetup, workdir: str):
        self.setup = setup
        self.manager = manager.CheckpointManager.for_workdir(workdir, setup.config.checkpoint)
        self.use_ema = setup.abstract_state.ema_params is not None
        config = setup.config
        self.config_json = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        self.last_saved: int | None = None
        self.provenance: dict | None = None  # `vdm.provenance.run_record`, saved in "metadata"

    def __enter__(self) -> CheckpointSaver:
        return self

    def __exit__(self, *exc) -> None:
        self.manager.close()

    def _items(self, state: TrainState) -> dict[str, PyTree]:
        items = {
            "params": state.params,
            "opt_state": {"step": state.step, "opt_state": state.opt_state},
        }
        if self.use_ema:
            items["ema"] = state.ema_params
        return items

    def restore(self) -> tuple[int, TrainState | None, Any]:
        """(step, state as global arrays, data-iterator state) of the newest readable checkpoint;
        (0, None, None) when there is none."""
        start, restored = self.manager.restore_latest(
            arrays=self._items(self.setup.abstract_state), data=True
        )
        if start is None:
            return 0, None, None
        state = TrainState(
            step=restored["opt_state"]["step"],
            params=restored["params"],
            opt_state=restored["opt_state"]["opt_state"],
            ema_params=restored.get("ema"),
        )
        # A damaged data-iterator state made the step unreadable above (an older step was used);
        # a missing one (an iterator without state, another process count) restarts the data.
        data_state = restored.get(manager.DATA_ITEM)
        say(f"Resumed from step {start} ({self.manager.directory}).")
        self.last_saved = start if start > 0 else None
        return start, state, data_state

    def save(self, step: int, state: TrainState, frozen: PyTree, batches: DeviceBatches) -> None:
        """Starts saving `state` (the step's layout) at `step`, unless that step is saved."""
        if self.last_saved == step:
            return
        layout = self.setup.layout
        state = layout.global_view(state)
        weights = state.ema_params if self.use_ema else state.params
        metadata = self.setup.task.metadata(weights, layout.global_view(frozen))
        if self.provenance is not None:
            metadata = {**metadata, "provenance": self.provenance}
        t0 = time.perf_counter()
        self.manager.save(
            step,
            arrays=self._items(state),
            json_items={"config": self.config_json, "metadata": metadata},
            data_state=batches.get_state(),
        )
        log.info("Checkpoint %d started (%.2fs blocking).", step, time.perf_counter() - t0)
        self.last_saved = step

    def wait(self) -> None:
        """Blocks until the saves in flight are on disk."""
        self.manager.wait()


class Evaluator:
    """`task.evaluate` on the weights sampling uses (EMA when kept), its results logged."""

    def __init__(self, setup: TrainSetup, frozen: PyTree, workdir: str, writer: MetricWriter):
        self.setup = setup
        self.frozen = frozen
        self.workdir = workdir
        self.writer = writer

    def __call__(self, step: int, state: TrainState, saver: CheckpointSaver) -> None:
        if saver.last_saved == step:
            # Evaluation may import modules on first use, and lazy importers (etils, used by
            # tfds) swap `builtins.__import__` process-wide while they run, which breaks an async
            # save's writer threads inside orbax. The save takes seconds against minutes of
            # evaluation: let it finish first.
            saver.wait()
        layout = self.setup.layout
        state = layout.global_view(state)
        params = state.ema_params if state.ema_params is not None else state.params
        results = self.setup.task.evaluate(
            params, layout.global_view(self.frozen), step, self.workdir
        )
        if results:
            results = {k if k.startswith("eval/") else f"eval/{k}": v for k, v in results.items()}
            self.writer.write(step, results)
            say(f"step {step} eval: " + ", ".join(f"{k}={v:.4g}" for k, v in results.items()))


class Preemption:
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
        """Whether this run must save and stop after `step` (the same answer on every process)."""
        if not self._multi:
            return self.flag
        from jax.experimental import multihost_utils

        try:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        except RuntimeError:  # preemption service disabled
            return False

    def restore(self) -> None:
        """Puts back the SIGTERM handler that was there before."""
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None


def progress_bar(start: int, num_steps: int):
    """A tqdm bar over the run's steps on process 0 (disabled elsewhere)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=num_steps,
        initial=start,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        disable=jax.process_index() != 0,
    )
