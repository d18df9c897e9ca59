"""Training checkpoints: an orbax `CheckpointManager` over `workdir/checkpoints` with named items.

Layout (`workdir/checkpoints/<step>/<item>/`), one directory per saved step:

  params      trainable parameters (orbax StandardSave; sharded arrays, restorable on any mesh)
  opt_state   {"step": int32, "opt_state": optax state}
  ema         EMA of the parameters (what sampling uses); absent when optim.ema_decay == 0
  data_iter   the data iterator's `get_state()`, one JSON file per process
  config      the run's config (JSON)
  metadata    `task.metadata(...)` (JSON): latent statistics, frozen VAE / text encoder references

Orbax writes each step to `<step>.orbax-checkpoint-tmp` and renames it when complete, so a save
killed half-way is never listed as a step. A step directory that exists but cannot be restored
(truncated by hand, a bad disk), its data-iterator state included, is named in a warning and moved
aside to `<step>.corrupt` by `restore_latest`, which then falls back to the previous step. A save
that cannot be written (a full disk) stops with a `CheckpointWriteError` naming the directory; the
steps written before it stay intact. Reading one model's weights for inference or fine-tuning:
`vdm.io.checkpoint`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from vdm.errors import ConfigError, UserError

PyTree = Any
log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
ARRAY_ITEMS = ("params", "opt_state", "ema")
JSON_ITEMS = ("config", "metadata")
DATA_ITEM = "data_iter"
ALL_ITEMS = ARRAY_ITEMS + (DATA_ITEM,) + JSON_ITEMS


# ----------------------------------------------------------------------------- errors


class UnreadableCheckpointError(UserError):
    """A checkpoint file that exists but cannot be read (truncated, garbage, a bad disk)."""


class CheckpointWriteError(UserError):
    """A checkpoint that cannot be written (no space left on device, no permission...)."""


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _chain(e: BaseException | None) -> list[BaseException]:
    chain: list[BaseException] = []
    while e is not None and all(e is not c for c in chain):
        chain.append(e)
        e = e.__cause__ if e.__cause__ is not None or e.__suppress_context__ else e.__context__
    return chain


def describe_error(e: BaseException, limit: int = 300) -> str:
    """One line for an error from orbax / tensorstore: the innermost message (orbax wraps the
    precise one, e.g. `OUT_OF_RANGE: Error reading "fc2.kernel/0.0" in OCDBT database at local
    file "<dir>"`, in a long TensorStore spec dump)."""
    for cause in reversed(_chain(e)):
        lines = str(cause).strip().splitlines()
        if lines:
            line = lines[0].split(" See full TensorStore details")[0]
            return f"{type(cause).__name__}: {line[:limit]}"
    return type(e).__name__


def is_out_of_space(e: BaseException) -> bool:
    """Whether `e` (or what caused it) is a full disk, an exceeded quota or file-size limit."""
    for cause in _chain(e):
        if isinstance(cause, OSError) and cause.errno in _NO_SPACE:
            return True
        text = str(cause)
        if any(os.strerror(n) in text for n in _NO_SPACE) or "RESOURCE_EXHAUSTED" in text:
            return True
    return False


class _QuietFailedSaves(logging.Filter):
    """Drops orbax's tracebacks of a failed background write (a full disk gives one per file):
    `CheckpointManager.wait` / the next `save` raise that failure as one `CheckpointWriteError`.
    With `VDM_TRACEBACK=1` they are kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        failed_write = record.levelno >= logging.ERROR and (
            ("orbax" in record.pathname and record.exc_info)
            # asyncio's "Task exception was never retrieved" for orbax's write coroutines
            or (record.name == "asyncio" and "orbax" in record.getMessage())
        )
        return not failed_write or bool(os.environ.get("VDM_TRACEBACK"))


_QUIET = _QuietFailedSaves()


def quiet_closed_event_loop() -> None:
    """Installs a sys.unraisablehook that drops tensorstore's late callbacks into an orbax event
    loop that a failed or interrupted read / write already closed ("RuntimeError: Event loop is
    closed", one traceback per pending file) or interrupted while it was being built (no
    self-pipe socket); anything else goes to the previous hook. Kept with VDM_TRACEBACK=1."""
    if sys.unraisablehook is not _quiet_closed_loop:
        global _previous_unraisablehook
        _previous_unraisablehook = sys.unraisablehook
        sys.unraisablehook = _quiet_closed_loop


def _quiet_closed_loop(unraisable) -> None:
    e = unraisable.exc_value
    closed = isinstance(e, RuntimeError) and str(e) == "Event loop is closed"
    # An interrupt that lands while asyncio builds a loop leaves one without its self-pipe, whose
    # __del__ then fails on the missing socket: the same interrupted read, not a second error.
    half_built = isinstance(e, AttributeError) and "'_ssock'" in str(e)
    if not (closed or half_built) or os.environ.get("VDM_TRACEBACK"):
        _previous_unraisablehook(unraisable)


_previous_unraisablehook = sys.unraisablehook


# ----------------------------------------------------------------------------- data iterator item


@dataclasses.dataclass
class DataIterSave(ocp.args.CheckpointArgs):
    """The data iterator's state: grain's `get_state()` bytes (JSON inside) or a JSON-able dict."""

    state: Any


@dataclasses.dataclass
class DataIterRestore(ocp.args.CheckpointArgs):
    """Restores what `DataIterSave` wrote for this process."""


class DataIterHandler(ocp.CheckpointHandler):
    """Per-process JSON files `process_<i>-of-<n>.json` (each host has its own shard's position).

    grain's `DataLoaderIterator.get_state()` returns JSON-encoded bytes; a custom iterator may
    return a dict. Both round-trip to the same type. Unlike grain's own orbax handler this takes
    a *snapshot* of the state (taken when the save starts), not the live iterator, so a batch
    drawn while an async save is in flight cannot leak into the checkpoint.
    """

    def _file(self, directory: epath.Path) -> epath.Path:
        return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def save(self, directory: epath.Path, args: DataIterSave):
        state = args.state
        if isinstance(state, bytes):
            payload = {"encoding": "bytes", "state": state.decode("utf-8")}
        else:
            payload = {"encoding": "json", "state": state}
        self._file(directory).write_text(json.dumps(payload))

    def restore(self, directory: epath.Path, args: DataIterRestore | None = None):
        path = self._file(directory)
        if not path.exists():
            found = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
            raise FileNotFoundError(
                f"No data-iterator state for process {jax.process_index()} of "
                f"{jax.process_count()} at {path} (found {found}); the checkpoint was written "
                "by a run with a different number of processes."
            )
        try:
            payload = json.loads(path.read_text())
            if payload["encoding"] == "bytes":
                return payload["state"].encode("utf-8")
            return payload["state"]
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # truncated or garbage
            raise UnreadableCheckpointError(
                f"The data-iterator state {path} is damaged ({type(e).__name__}: {e})."
            ) from None


ocp.args.register_with_handler(DataIterHandler, for_save=True)(DataIterSave)
ocp.args.register_with_handler(DataIterHandler, for_restore=True)(DataIterRestore)


def registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """Which handler reads/writes each named item (so a fresh manager can read any item)."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for name in ARRAY_ITEMS:
        registry.add(name, ocp.args.StandardSave)
        registry.add(name, ocp.args.StandardRestore)
    for name in JSON_ITEMS:
        registry.add(name, ocp.args.JsonSave)
        registry.add(name, ocp.args.JsonRestore)
    registry.add(DATA_ITEM, DataIterSave, DataIterHandler())
    registry.add(DATA_ITEM, DataIterRestore, DataIterHandler())
    return registry


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types from numpy / jax scalars and arrays, tuples and ConfigDicts."""

    def default(o):
        if isinstance(o, (np.generic, np.ndarray, jax.Array)):
            return np.asarray(o).tolist()
        if isinstance(o, ml_collections.ConfigDict):
            return o.to_dict()
        if isinstance(o, (set, frozenset)):
            return sorted(o)
        raise TypeError(f"{type(o).__name__} is not JSON-serialisable: {o!r}")

    return json.loads(json.dumps(obj, default=default))


def _shape_difference(target: PyTree, stored: PyTree) -> str:
    """'' when `stored` (an item's metadata tree) holds arrays of `target`'s shapes, else what
    differs, briefly."""
    is_leaf = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")  # noqa: E731
    want = sorted(tuple(x.shape) for x in jax.tree.leaves(target, is_leaf=is_leaf))
    stored = getattr(stored, "tree", stored)
    have = sorted(tuple(x.shape) for x in jax.tree.leaves(stored, is_leaf=is_leaf))
    if len(want) != len(have):
        return f"holds {len(have)} arrays, this config's state {len(want)}"
    if want != have:
        diff = sorted(set(have) - set(want))[:4]
        return f"holds arrays of other shapes than this config's state (e.g. {diff})"
    return ""


# ----------------------------------------------------------------------------- manager


def checkpoint_dir(workdir: str) -> str:
    """Where a training run in `workdir` keeps its step directories."""
    return os.path.join(workdir, CHECKPOINT_SUBDIR)


class CheckpointManager:
    """orbax `CheckpointManager` over `workdir/checkpoints` with vdm's named items.

    All processes must call `save` / `restore` (orbax coordinates who writes what).

    Args:
      directory: the checkpoints directory (see `checkpoint_dir(workdir)`).
      max_to_keep: keep the newest this many steps; <= 0 keeps all.
      async_save: write arrays in a background thread after a short blocking device->host copy.
      create: create `directory` if missing (False for read-only use).
    """

    def __init__(
        self, directory: str, *, max_to_keep: int = 3, async_save: bool = True, create: bool = True
    ):
        self.directory = os.path.abspath(directory)
        policy = None
        if max_to_keep and max_to_keep > 0:
            policy = ocp.checkpoint_managers.LatestN(n=max_to_keep)
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            preservation_policy=policy,
            create=create,
            # Partial `<step>.orbax-checkpoint-tmp` dirs of a killed save are ignored either way;
            # cleaning them on start keeps the directory tidy.
            cleanup_tmp_directories=create,
        )
        self._mngr = ocp.CheckpointManager(
            self.directory, options=options, handler_registry=registry()
        )
        self._pending: int | None = None  # the step an async save is writing
        for name in ("absl", "asyncio"):
            logging.getLogger(name).addFilter(_QUIET)  # once: the same filter object
        quiet_closed_event_loop()

    @classmethod
    def for_workdir(cls, workdir: str, checkpoint_config) -> CheckpointManager:
        """The manager of a training run, from `config.checkpoint`."""
        return cls(
            checkpoint_dir(workdir),
            max_to_keep=checkpoint_config.max_to_keep,
            async_save=checkpoint_config.async_save,
        )

    def all_steps(self) -> list[int]:
        """Completed steps on disk, ascending (re-read from the directory)."""
        self._mngr.reload()
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(
        self,
        step: int,
        *,
        arrays: Mapping[str, PyTree],
        json_items: Mapping[str, Any] | None = None,
        data_state: Any = None,
    ) -> None:
        """Starts saving `step` (returns after the blocking device->host copy when async).

        Args:
          step: the step number (the directory name).
          arrays: pytrees of jax/numpy arrays by item name (subset of ARRAY_ITEMS).
          json_items: JSON-able values by item name (subset of JSON_ITEMS).
          data_state: the data iterator's `get_state()` (bytes or dict); None to skip.
        """
        items = {}
        for name, tree in arrays.items():
            if name not in ARRAY_ITEMS:
                raise ValueError(f"Unknown array item '{name}'; valid: {ARRAY_ITEMS}.")
            items[name] = ocp.args.StandardSave(tree)
        for name, value in (json_items or {}).items():
            if name not in JSON_ITEMS:
                raise ValueError(f"Unknown JSON item '{name}'; valid: {JSON_ITEMS}.")
            items[name] = ocp.args.JsonSave(to_jsonable(value))
        if data_state is not None:
            items[DATA_ITEM] = DataIterSave(data_state)
        with self._writing(step):
            self._mngr.save(step, args=ocp.args.Composite(**items), force=True)
        self._pending = step

    @contextlib.contextmanager
    def _writing(self, step: int | None):
        """Turns a failed write (here or in the async save of `step`) into one short error."""
        try:
            yield
        except Exception as e:
            if self._pending is not None and self._pending not in self._mngr.all_steps():
                step = self._pending  # the async save before this one failed
            what = f"checkpoint step {step}" if step is not None else "a checkpoint"
            why = "no space left on device" if is_out_of_space(e) else describe_error(e)
            done = [s for s in self._mngr.all_steps() if s != step]
            raise CheckpointWriteError(
                f"Cannot write {what} to {self.directory}: {why}. The steps written before it "
                f"({sorted(done) or 'none'}) are intact; free space (or fix the directory) and "
                "run again: training resumes from the newest complete step."
            ) from e

    def restore(
        self,
        step: int,
        *,
        arrays: Mapping[str, PyTree],
        json_items: Sequence[str] = (),
        data: bool = False,
    ) -> dict[str, Any]:
        """Restores `step` into abstract targets.

        Args:
          step: which step.
          arrays: item name -> pytree of `jax.ShapeDtypeStruct` with `.sharding` (the layout to
            restore into; any mesh, not necessarily the one it was saved from).
          json_items: JSON items to read.
          data: also read this process's data-iterator state.

        Returns:
          item name -> restored value.
        """
        items = {name: ocp.args.StandardRestore(t) for name, t in arrays.items()}
        items.update({name: ocp.args.JsonRestore() for name in json_items})
        if data:
            items[DATA_ITEM] = DataIterRestore()
        restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
        return {name: restored[name] for name in items}

    def restore_latest(
        self, *, arrays: Mapping[str, PyTree], json_items: Sequence[str] = (), data: bool = False
    ) -> tuple[int | None, dict[str, Any] | None]:
        """Restores the newest step that restores cleanly; `(None, None)` if there is none.

        With `data`, this process's data-iterator state is part of the step (a damaged one makes
        the step unreadable); a step without one (another number of processes, an iterator
        without state) restores without it: no `DATA_ITEM` in the result.

        When the newest step fails to restore, a warning names the damaged item and its error and
        older steps are tried; once one works, the newer unreadable ones are moved aside to
        `<step>.corrupt` (so the run can write those steps again).

        Raises:
          ConfigError: no step fits the state of this config (other shapes); nothing is moved.
          UnreadableCheckpointError: no step restores and some are damaged (each named).
        """
        steps = self.all_steps()
        failed: list[tuple[int, bool, str]] = []  # (step, damaged, why)
        for step in reversed(steps):
            with_data = data and os.path.exists(self._data_file(step))
            try:
                restored = self.restore(step, arrays=arrays, json_items=json_items, data=with_data)
            except Exception as e:  # noqa: BLE001 - any unreadable step falls back to the previous.
                damaged, why = self._diagnose(step, arrays, with_data, e)
                failed.append((step, damaged, why))
                log.warning(
                    "Checkpoint step %d in %s cannot be restored: %s; trying an older step.",
                    step,
                    self.directory,
                    why,
                )
                continue
            for bad, _, _ in failed:
                self._move_aside(bad)
            return step, restored
        if failed:
            self._raise_none_restores(steps, failed)
        return None, None

    def _raise_none_restores(self, steps: list[int], failed: list[tuple[int, bool, str]]):
        whys = "; ".join(f"step {s}: {why}" for s, _, why in failed[:3])
        if any(damaged for _, damaged, _ in failed):
            raise UnreadableCheckpointError(
                f"Cannot resume from {self.directory}: none of its steps {steps} can be read "
                f"({whys}). Restore the checkpoints from a copy, or move the damaged step "
                "directories away (an empty checkpoints directory starts the run afresh)."
            )
        raise ConfigError(
            f"Cannot resume from {self.directory}: none of its steps {steps} restores into the "
            f"state of this config ({whys}). Use a fresh workdir, or the config the checkpoint "
            f"was trained with (saved in each step's 'config' item)."
        )

    def _data_file(self, step: int) -> str:
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        return os.path.join(self.directory, str(step), DATA_ITEM, name)

    def _diagnose(
        self, step: int, arrays: Mapping[str, PyTree], data: bool, error: BaseException
    ) -> tuple[bool, str]:
        """Why `step` does not restore: `(True, "<item dir>: error")` for a damaged file,
        `(False, "<item>: ...")` when the stored arrays have other shapes than `arrays`."""
        step_dir = os.path.join(self.directory, str(step))
        for name, target in arrays.items():
            item_dir = os.path.join(step_dir, name)
            if not os.path.isdir(item_dir):
                return False, f"it has no '{name}' item"
            try:
                stored = ocp.StandardCheckpointHandler().metadata(epath.Path(item_dir))
                differs = _shape_difference(target, stored)
                if differs:
                    return False, f"'{name}' {differs}"
                self.restore(step, arrays={name: target})
            except Exception as e:  # noqa: BLE001 - the cause is what is reported.
                return True, f"{item_dir}: {describe_error(e)}"
        if data:
            try:
                self.restore(step, arrays={}, data=True)
            except Exception as e:  # noqa: BLE001
                return True, describe_error(e)
        return True, f"{step_dir}: {describe_error(error)}"

    def _move_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            src = os.path.join(self.directory, str(step))
            dst = f"{src}.corrupt"
            n = 1
            while os.path.exists(dst):
                dst, n = f"{src}.corrupt{n}", n + 1
            os.rename(src, dst)
            log.warning("Moved unreadable checkpoint %s to %s; using an older step.", src, dst)
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes(f"vdm_move_aside_{step}")
        self._mngr.reload()

    def wait(self) -> None:
        """Blocks until pending async saves are on disk.

        Raises:
          CheckpointWriteError: a save could not be written (named, with the cause).
        """
        with self._writing(self._pending):
            self._mngr.wait_until_finished()
        self._pending = None

    def close(self) -> None:
        """Waits for pending saves and releases the manager's threads."""
        try:
            self.wait()
        finally:
            try:
                self._mngr.close()
            except Exception as e:  # noqa: BLE001 - a failed save is already being reported.
                log.debug("Closing the checkpoint manager: %s", describe_error(e))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
