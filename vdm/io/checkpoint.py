"""Reading one model's weights, config and metadata from a training checkpoint or a bundle part.

`load_params(path, item="ema")`, `load_metadata(path)`, `load_config(path)`, where `path` is a
training workdir, its `checkpoints/` directory (both: latest step) or one step directory (the
layout: `vdm.io.manager`). The two weight directories of an exported model (`vdm.io.bundle`:
`MODEL/denoiser`, `MODEL/vae`, EMA weights only) load the same way, so a new run can start from
the bundled model (`--config.vae.checkpoint=vdm/assets/default_model/vae`,
`--config.train.init_from=vdm/assets/default_model/denoiser`).

Given a workdir (or its checkpoints dir), a step whose files are damaged is named in a warning
and the previous step is read instead, as training resumes (`newest_readable`); a step directory
given explicitly is read as it is, and a damaged one is an `UnreadableCheckpointError` naming the
file. `load_checkpoint` reads a step's config, metadata and weights together; `recorded_vae`
checks the VAE path a denoiser checkpoint records before anything follows it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from typing import Any, TypeVar

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from vdm import config as config_lib
from vdm.errors import UserError
from vdm.io import bundle
from vdm.io.manager import (
    ARRAY_ITEMS,
    CHECKPOINT_SUBDIR,
    UnreadableCheckpointError,
    checkpoint_dir,
    describe_error,
    registry,
)

PyTree = Any
T = TypeVar("T")
log = logging.getLogger(__name__)


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
    if bundle.is_bundle(path):
        raise FileNotFoundError(
            f"'{path}' is an exported model, which holds two models: give its "
            f"'{bundle.PARTS[0]}/' or '{bundle.PARTS[1]}/' directory."
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


def weights_dir(path: str) -> str:
    """The directory holding the weights `path` names: the step directory a workdir, checkpoints
    dir or step dir resolves to, or an exported model's `denoiser/` / `vae/` itself."""
    if bundle.part_of(path) is not None:
        return os.path.abspath(os.path.expanduser(str(path)))
    directory, step = resolve(path)
    return os.path.join(directory, str(step))


def _reader(directory: str) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory, options=options, handler_registry=registry())


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
    restored, _ = _restore_params(path, item, _target_for(sharding))
    return restored


def _target_for(sharding):
    """`make_target` placing every array as `sharding` says (default: replicated everywhere)."""
    if sharding is None:
        mesh = jax.sharding.Mesh(np.array(jax.devices(), dtype=object), ("devices",))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return lambda metadata, _: abstract_from_metadata(metadata, sharding)


def _restore_params(path: str, item: str, make_target) -> tuple[PyTree, int | None]:
    """Restores the "ema" (falling back to "params" when the run had no EMA) or "params" item
    of the checkpoint at `path` into `make_target(item metadata, "'step dir' (item)")`:
    (tree, step); step is None for an exported model's weights. A workdir's newest readable
    step is used (see `newest_readable`)."""
    if item not in ("ema", "params"):
        raise ValueError(f"item must be 'ema' or 'params', got {item!r}.")
    if bundle.part_of(path) is not None:
        if item != "ema":
            raise FileNotFoundError(
                f"'{path}' is an exported model's weights, which are EMA weights only; there is "
                f"no '{item}' item (use a training workdir)."
            )
        where = f"'{os.path.abspath(os.path.expanduser(str(path)))}' (exported)"
        return bundle.restore_tree(path, lambda metadata: make_target(metadata, where)), None

    def read(step_dir: str) -> tuple[PyTree, int]:
        return _restore_item(step_dir, item, make_target), int(os.path.basename(step_dir))

    return newest_readable(path, read)


def _restore_item(step_dir: str, item: str, make_target) -> PyTree:
    """One weights item of a step directory (see `_restore_params`).

    Raises:
      UnreadableCheckpointError: a damaged file (the item's directory and the cause named).
    """
    if item == "ema" and not os.path.isdir(os.path.join(step_dir, "ema")):
        log.info("%s has no EMA item (trained with optim.ema_decay=0); loading 'params'.", step_dir)
        item = "params"
    item_dir = os.path.join(step_dir, item)
    if not os.path.isdir(item_dir):
        raise FileNotFoundError(
            f"Checkpoint step '{step_dir}' has no '{item}' item (found "
            f"{sorted(os.listdir(step_dir))}); expected items {ARRAY_ITEMS}."
        )
    try:
        stored = ocp.StandardCheckpointHandler().metadata(epath.Path(item_dir))
    except Exception as e:  # noqa: BLE001 - a damaged _METADATA file
        raise UnreadableCheckpointError(f"{item_dir}: {describe_error(e)}") from e
    target = make_target(stored, f"'{step_dir}' ({item})")  # a model mismatch raises here
    mngr = _reader(os.path.dirname(step_dir))
    try:
        args = ocp.args.Composite(**{item: ocp.args.StandardRestore(target)})
        return mngr.restore(int(os.path.basename(step_dir)), args=args)[item]
    except Exception as e:  # noqa: BLE001 - truncated or garbage array files
        raise UnreadableCheckpointError(f"{item_dir}: {describe_error(e)}") from e
    finally:
        mngr.close()


def newest_readable(path: str, read: Callable[[str], T]) -> T:
    """`read(step_dir)` of the step `path` names.

    A step directory is read as it is: damaged, it is an error naming the file. For a workdir
    or a checkpoints dir the newest step is tried first; a damaged one (`read` raises
    `UnreadableCheckpointError`) is named in a warning and the previous step is tried, as
    training resumes.

    Raises:
      UnreadableCheckpointError: the step given, or every step of the workdir, is damaged.
      FileNotFoundError: no checkpoint at `path`.
    """
    directory, step = resolve(path)
    if _is_step_dir(os.path.abspath(os.path.expanduser(str(path)))):
        step_dir = os.path.join(directory, str(step))
        try:
            return read(step_dir)
        except UnreadableCheckpointError as e:
            raise UnreadableCheckpointError(
                f"Checkpoint step '{step_dir}' cannot be read: {e}. Give another step "
                "directory, or the run's workdir (its newest readable step is used)."
            ) from None
    failures = []
    for s in reversed(_steps_in(directory)):
        try:
            return read(os.path.join(directory, str(s)))
        except UnreadableCheckpointError as e:
            log.warning("Checkpoint step %d cannot be read (%s); trying an older step.", s, e)
            failures.append(f"step {s}: {e}")
    raise UnreadableCheckpointError(
        f"No step of '{directory}' can be read ({'; '.join(failures[:2])}). Restore the "
        "checkpoints from a copy, or train again."
    )


def _shapes(tree: PyTree) -> dict[str, tuple]:
    is_leaf = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")  # noqa: E731
    flat = jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)
    return {jax.tree_util.keystr(k, simple=True, separator="/"): tuple(x.shape) for k, x in flat}


def _check_fit(want: dict, have: dict, where: str, allow_missing: bool) -> list[str]:
    """The parameter names a checkpoint (`have`: name -> shape) lacks of a model (`want`).

    Raises:
      ValueError: extra names, other shapes, missing names (unless `allow_missing`) or nothing
        in common, each difference named.
    """
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
    return missing


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
        missing = _check_fit(want, have, where, allow_missing)
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
    part = bundle.part_of(path)
    if part is not None:
        return bundle.part_item(*part, item)
    return newest_readable(path, lambda step_dir: _read_json(step_dir, item))


def _read_json(step_dir: str, item: str):
    file = os.path.join(step_dir, item, "metadata")
    if not os.path.exists(file):
        raise FileNotFoundError(
            f"Checkpoint step '{step_dir}' has no '{item}' item (expected the JSON file {file})."
        )
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:  # truncated or garbage (JSONDecodeError, UnicodeDecodeError)
        raise UnreadableCheckpointError(f"{file}: {type(e).__name__}: {e}") from None


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
    """The config a checkpoint was trained with (JSON lists turned back into tuples), upgraded to
    the current schema (`vdm.config.upgrade`)."""
    config = ml_collections.ConfigDict(_lists_to_tuples(_load_json(path, "config")))
    return config_lib.upgrade(config)


def load_checkpoint(
    path: str, item: str = "ema"
) -> tuple[ml_collections.ConfigDict, dict[str, Any], PyTree]:
    """(config, metadata, weights) of one training checkpoint step, read together: a workdir's
    newest step whose three read cleanly (a damaged newer one is named in a warning and skipped),
    or the step directory `path` itself (damaged: an `UnreadableCheckpointError` naming it).
    Weights are replicated as `load_params` places them. An exported model's `denoiser/` or
    `vae/` is read as it is (one step, no fallback)."""
    if bundle.part_of(path) is not None:
        return load_config(path), load_metadata(path), load_params(path, item=item)

    def read(step_dir: str):
        config = config_lib.upgrade(
            ml_collections.ConfigDict(_lists_to_tuples(_read_json(step_dir, "config")))
        )
        metadata = _read_json(step_dir, "metadata")
        return config, metadata, _restore_item(step_dir, item, _target_for(None))

    return newest_readable(path, read)


VAE_FIELD = "vae_checkpoint"


def recorded_vae(metadata: dict[str, Any], where: str, *, override: str | None = None) -> str:
    """The VAE checkpoint a denoiser checkpoint's metadata records (`vae_checkpoint`), checked
    before it is followed: it must exist and be a VAE (an autoencoder run or a bundle's `vae/`).
    "" when none is recorded. With `override` (the VAE the caller gives) an unusable recorded
    path is replaced by it, with a warning.

    Raises:
      UserError: the recorded path does not exist or is not a VAE checkpoint (the field named,
        and how to give another VAE).
    """
    path = str(metadata.get(VAE_FIELD) or "")
    if not path:
        return ""
    problem = _not_a_vae(path)
    if problem is None:
        return path
    message = (
        f"The checkpoint '{where}' records its VAE in metadata field '{VAE_FIELD}' as '{path}', "
        f"which {problem}."
    )
    if override:
        log.warning("%s Using the VAE given instead: %s", message, override)
        return override
    raise UserError(
        f"{message} Give the VAE it was trained with: `vdm.load_pipeline(checkpoint, vae=VAE_DIR)` "
        "(a VAE workdir, step dir or an exported model's vae/), or move the VAE run back to that "
        "path."
    )


def stage_of(path: str) -> str:
    """The training stage ("autoencoder" or "denoiser") of a training checkpoint or of an
    exported model's `vae/` / `denoiser/` part.

    Raises:
      FileNotFoundError: no checkpoint at `path` (a whole exported model is named with its parts).
      UnreadableCheckpointError: its config cannot be read.
    """
    part = bundle.part_of(path)
    if part is not None:
        return "denoiser" if part[1] == "denoiser" else "autoencoder"
    return load_config(path).get("stage")


def _not_a_vae(path: str) -> str | None:
    """Why `path` is not a VAE checkpoint (None when it is one)."""
    if not os.path.exists(os.path.expanduser(path)):
        return "does not exist"
    try:
        stage = stage_of(path)
    except (FileNotFoundError, UnreadableCheckpointError) as e:
        return f"is not a readable VAE checkpoint ({e})"
    return None if stage == "autoencoder" else f"is a '{stage}' checkpoint, not a VAE"
