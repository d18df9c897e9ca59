"""Checkpoints: an orbax `CheckpointManager` with named items, and loaders for inference.

Layout (`workdir/checkpoints/<step>/<item>/`), one directory per saved step:

  params      trainable parameters (orbax StandardSave; sharded arrays, restorable on any mesh)
  opt_state   {"step": int32, "opt_state": optax state}
  ema         EMA of the parameters (what sampling uses); absent when optim.ema_decay == 0
  data_iter   the data iterator's `get_state()`, one JSON file per process
  config      the run's config (JSON)
  metadata    `task.metadata(...)` (JSON): latent statistics, frozen VAE / text encoder references

Orbax writes each step to `<step>.orbax-checkpoint-tmp` and renames it when complete, so a save
killed half-way is never listed as a step. A step directory that exists but cannot be restored
(truncated by hand, a bad disk) is moved aside to `<step>.corrupt` by `restore_latest`, which then
falls back to the previous step.

Inference: `load_params(path, item="ema")`, `load_metadata(path)`, `load_config(path)`, where
`path` is a workdir, its `checkpoints/` directory (both: latest step) or one step directory.
The two weight directories of an exported model (`vdm.tools.export`: `MODEL/denoiser`,
`MODEL/vae`, EMA weights only) load the same way, so a new run can start from the bundled model
(`--config.vae.checkpoint=vdm/assets/default_model/vae`,
`--config.train.init_from=vdm/assets/default_model/denoiser`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from vdm.errors import ConfigError

PyTree = Any
log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
ARRAY_ITEMS = ("params", "opt_state", "ema")
JSON_ITEMS = ("config", "metadata")
DATA_ITEM = "data_iter"
ALL_ITEMS = ARRAY_ITEMS + (DATA_ITEM,) + JSON_ITEMS


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
        payload = json.loads(path.read_text())
        if payload["encoding"] == "bytes":
            return payload["state"].encode("utf-8")
        return payload["state"]


ocp.args.register_with_handler(DataIterHandler, for_save=True)(DataIterSave)
ocp.args.register_with_handler(DataIterHandler, for_restore=True)(DataIterRestore)


def _registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
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
            self.directory, options=options, handler_registry=_registry()
        )

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
        self._mngr.save(step, args=ocp.args.Composite(**items), force=True)

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

        When the newest step fails to restore, older ones are tried; once one works, the newer
        unreadable ones are moved aside to `<step>.corrupt` (so the run can write those steps
        again). If no step restores (e.g. the config changed the parameter shapes), nothing is
        moved and a ValueError names the directory and the newest step's error.
        """
        steps = self.all_steps()
        first_error, failed = None, []
        for step in reversed(steps):
            try:
                restored = self.restore(step, arrays=arrays, json_items=json_items, data=data)
            except Exception as e:  # noqa: BLE001 - any unreadable step falls back to the previous.
                first_error = first_error or e
                failed.append(step)
                log.warning(
                    "Checkpoint step %d in %s cannot be restored (%s: %s); trying an older one.",
                    step,
                    self.directory,
                    type(e).__name__,
                    e,
                )
                continue
            for bad in failed:
                self._move_aside(bad)
            return step, restored
        if first_error is not None:
            raise ConfigError(
                f"Cannot resume from {self.directory}: none of its steps {steps} restores into "
                f"the state of this config (newest step: {type(first_error).__name__}: "
                f"{first_error}). Use a fresh workdir, or the config the checkpoint was trained "
                f"with (saved in each step's 'config' item)."
            ) from first_error
        return None, None

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
        """Blocks until pending async saves are on disk."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager's threads."""
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------- inference loaders


def _is_step_dir(path: str) -> bool:
    return os.path.basename(os.path.normpath(path)).isdigit() and any(
        os.path.isdir(os.path.join(path, item)) for item in ("params", "ema")
    )


def _steps_in(directory: str) -> list[int]:
    if not os.path.isdir(directory):
        return []
    return sorted(
        int(n)
        for n in os.listdir(directory)
        if n.isdigit() and os.path.isdir(os.path.join(directory, n))
    )


BUNDLE_PARTS = ("denoiser", "vae")
BUNDLE_CONFIG = "model.json"


def bundle_part(path: str) -> tuple[str, str] | None:
    """`(model_dir, part)` when `path` is the `denoiser/` or `vae/` weights of an exported model
    dir (`vdm.tools.export`), else None."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    parent, part = os.path.split(os.path.normpath(path))
    is_part = part in BUNDLE_PARTS and os.path.isdir(path)
    if is_part and os.path.isfile(os.path.join(parent, BUNDLE_CONFIG)):
        return parent, part
    return None


def bundle_meta(model_dir: str) -> dict:
    """An exported model dir's model.json: config, latent statistics, text encoder, sources."""
    with open(os.path.join(model_dir, BUNDLE_CONFIG)) as f:
        return json.load(f)


def resolve(path: str) -> tuple[str, int]:
    """`(checkpoints_dir, step)` for a workdir, a checkpoints dir or a step dir.

    Raises:
      FileNotFoundError: naming `path` and the layouts that were looked for.
    """
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"Checkpoint path '{path}' does not exist. Give a training workdir, its "
            f"'{CHECKPOINT_SUBDIR}/' directory, or one step directory "
            f"('{CHECKPOINT_SUBDIR}/<step>')."
        )
    if os.path.isfile(os.path.join(path, BUNDLE_CONFIG)):
        raise FileNotFoundError(
            f"'{path}' is an exported model, which holds two models: give its "
            f"'{BUNDLE_PARTS[0]}/' or '{BUNDLE_PARTS[1]}/' directory."
        )
    if _is_step_dir(path):
        return os.path.dirname(os.path.normpath(path)), int(
            os.path.basename(os.path.normpath(path))
        )
    for directory in (checkpoint_dir(path), path):
        steps = _steps_in(directory)
        if steps:
            return directory, steps[-1]
    raise FileNotFoundError(
        f"No checkpoint found at '{path}': expected a workdir with "
        f"'{CHECKPOINT_SUBDIR}/<step>/' directories, a checkpoints directory with numbered step "
        f"directories, or a step directory holding items {ARRAY_ITEMS}. Found: "
        f"{sorted(os.listdir(path))[:10] if os.path.isdir(path) else 'a file'}."
    )


def _reader(directory: str) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory, options=options, handler_registry=_registry())


def abstract_from_metadata(tree_metadata: PyTree, sharding) -> PyTree:
    """`ShapeDtypeStruct` targets from an orbax item's metadata tree and a sharding (or tree)."""
    tree = getattr(tree_metadata, "tree", tree_metadata)
    is_leaf = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")  # noqa: E731
    if callable(sharding) and not isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding(m)),
            tree,
            is_leaf=is_leaf,
        )
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
            tree,
            is_leaf=is_leaf,
        )
    return jax.tree.map(
        lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s),
        tree,
        sharding,
        is_leaf=is_leaf,
    )


def load_params(path: str, item: str = "ema", *, sharding=None) -> PyTree:
    """Loads the EMA (or raw) parameters of a checkpoint, without the optimizer state.

    Args:
      path: a training workdir / its checkpoints dir (latest step) or a step directory.
      item: "ema" (what sampling uses; falls back to "params" when the run had no EMA) or
        "params".
      sharding: where to put the arrays: a `jax.sharding.Sharding` for every leaf, a pytree of
        shardings matching the params, or a function `ArrayMetadata -> Sharding`. Default:
        replicated over all devices (on one device this is simply that device).

    Returns:
      The parameter pytree (nested dicts of jax.Arrays, unboxed).

    Raises:
      FileNotFoundError: no checkpoint at `path`.
    """
    if sharding is None:
        mesh = jax.sharding.Mesh(np.array(jax.devices(), dtype=object), ("devices",))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    restored, _ = _restore_params(
        path, item, lambda metadata, _: abstract_from_metadata(metadata, sharding)
    )
    return restored


def _restore_params(path: str, item: str, make_target) -> tuple[PyTree, int | None]:
    """Restores the "ema" (falling back to "params" when the run had no EMA) or "params" item
    of the checkpoint at `path` into `make_target(item metadata, "'step dir' (item)")`:
    (tree, step); step is None for an exported model's weights."""
    if item not in ("ema", "params"):
        raise ValueError(f"item must be 'ema' or 'params', got {item!r}.")
    if bundle_part(path) is not None:
        if item != "ema":
            raise FileNotFoundError(
                f"'{path}' is an exported model's weights, which are EMA weights only; there is "
                f"no '{item}' item (use a training workdir)."
            )
        path = os.path.abspath(os.path.expanduser(str(path)))
        with ocp.StandardCheckpointer() as ckptr:
            target = make_target(ckptr.metadata(path).item_metadata, f"'{path}' (exported)")
            return ckptr.restore(path, target), None
    directory, step = resolve(path)
    step_dir = os.path.join(directory, str(step))
    if item == "ema" and not os.path.isdir(os.path.join(step_dir, "ema")):
        log.info("%s has no EMA item (trained with optim.ema_decay=0); loading 'params'.", step_dir)
        item = "params"
    if not os.path.isdir(os.path.join(step_dir, item)):
        raise FileNotFoundError(
            f"Checkpoint step '{step_dir}' has no '{item}' item (found "
            f"{sorted(os.listdir(step_dir))}); expected items {ARRAY_ITEMS}."
        )
    mngr = _reader(directory)
    try:
        target = make_target(mngr.item_metadata(step)[item], f"'{step_dir}' ({item})")
        restored = mngr.restore(
            step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)})
        )[item]
        return restored, step
    finally:
        mngr.close()


def _shapes(tree: PyTree) -> dict[str, tuple]:
    is_leaf = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")  # noqa: E731
    flat = jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)
    return {jax.tree_util.keystr(k, simple=True, separator="/"): tuple(x.shape) for k, x in flat}


def load_params_like(
    path: str, abstract: PyTree, item: str = "ema", *, allow_missing: bool = False, skip: str = ""
) -> tuple[PyTree, int]:
    """A checkpoint's EMA (or raw) parameters restored into the layout of `abstract`.

    For fine-tuning (`train.init_from`): `abstract` is the new run's parameter tree of
    `jax.ShapeDtypeStruct`s with shardings; each array lands sharded as the new run wants it.
    With `allow_missing` the checkpoint may lack some of `abstract`'s parameters (a model grown
    from it, e.g. deeper); the result then holds only the parameters the checkpoint has.
    Parameters whose name (`a/b/kernel`) matches the regex `skip` are not taken from the
    checkpoint, whatever their shape there (a layer to retrain, e.g. the denoiser's patch
    embedding after a patch-size change); the result lacks them.

    Returns:
      (parameters, the checkpoint's step).

    Raises:
      FileNotFoundError: no checkpoint at `path`.
      ValueError: the checkpoint's parameter names or shapes differ from `abstract` (each
        difference named), i.e. it is another architecture.
    """
    skipped = re.compile(skip).search if skip else lambda _: False
    want = {k: v for k, v in _shapes(abstract).items() if not skipped(k)}
    dropped = set()  # skipped names the checkpoint has: restored (as stored) and then dropped

    def checked(metadata, where):
        tree = getattr(metadata, "tree", metadata)
        have = _shapes(tree)
        dropped.update(k for k in have if skipped(k))
        have = {k: v for k, v in have.items() if k not in dropped}
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        shape = sorted(k for k in set(want) & set(have) if want[k] != have[k])
        if extra or shape or (missing and not allow_missing) or not set(have) & set(want):
            diffs = [f"missing in the checkpoint: {missing[:6]}"] if missing else []
            diffs += [f"not in this model: {extra[:6]}"] if extra else []
            diffs += [f"{k}: checkpoint {have[k]} vs model {want[k]}" for k in shape[:6]]
            raise ValueError(
                f"Checkpoint {where} does not fit this model's parameters; "
                + "; ".join(diffs)
                + (
                    ". Only parameters this model adds may be missing from it."
                    if allow_missing
                    else ". Initialising from it needs the same architecture."
                )
            )
        if not missing and not skip:
            return abstract
        flat = flax.traverse_util.flatten_dict(abstract, sep="/")
        target = {k: flat[k] for k in have}
        if dropped:  # orbax restores whole trees: read these replicated, in the stored shape
            stored = flax.traverse_util.flatten_dict(tree, sep="/")
            like = next(iter(target.values()))
            mesh = getattr(getattr(like, "sharding", None), "mesh", None)
            rep = None if mesh is None else jax.NamedSharding(mesh, jax.P())
            for k in dropped:
                target[k] = jax.ShapeDtypeStruct(stored[k].shape, stored[k].dtype, sharding=rep)
        return flax.traverse_util.unflatten_dict(target, sep="/")

    params, step = _restore_params(path, item, checked)
    if dropped:
        flat = flax.traverse_util.flatten_dict(params, sep="/")
        params = flax.traverse_util.unflatten_dict(
            {k: v for k, v in flat.items() if k not in dropped}, sep="/"
        )
    return params, step


def _load_json(path: str, item: str):
    part = bundle_part(path)
    if part is not None:
        return _bundle_item(*part, item)
    directory, step = resolve(path)
    file = os.path.join(directory, str(step), item, "metadata")
    if not os.path.exists(file):
        raise FileNotFoundError(
            f"Checkpoint step '{os.path.join(directory, str(step))}' has no '{item}' item "
            f"(expected the JSON file {file})."
        )
    with open(file) as f:
        return json.load(f)


def _bundle_item(model_dir: str, part: str, item: str) -> dict:
    """The config / metadata of an exported model's `part`, as a training checkpoint has them.

    The bundle's config is its denoiser run's; its `vae` section describes the VAE, but the rest
    (stage, optimizer, data) is not how the VAE was trained, so the VAE part has no config.
    """
    meta = bundle_meta(model_dir)
    if item == "config" and part == "denoiser":
        return meta["config"]
    if item == "metadata":
        out = {"latent_stats": meta["latent_stats"]}
        if part == "denoiser":
            out["text_encoder"] = meta.get("text_encoder", meta["config"]["text_encoder"]["name"])
            out["vae_checkpoint"] = os.path.join(model_dir, "vae")
        return out
    raise FileNotFoundError(
        f"'{os.path.join(model_dir, part)}' is an exported model's {part} weights: it has no "
        f"'{item}' of its own (its training config is the denoiser's, in "
        f"{os.path.join(model_dir, BUNDLE_CONFIG)})."
    )


def load_metadata(path: str) -> dict[str, Any]:
    """The `metadata` item (JSON dict from `task.metadata`) of a checkpoint."""
    return _load_json(path, "metadata")


def _lists_to_tuples(x):
    if isinstance(x, dict):
        return {k: _lists_to_tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_lists_to_tuples(v) for v in x)
    return x


def load_config(path: str) -> ml_collections.ConfigDict:
    """The config a checkpoint was trained with (JSON lists turned back into tuples)."""
    return ml_collections.ConfigDict(_lists_to_tuples(_load_json(path, "config")))
