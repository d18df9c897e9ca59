"""Device mesh, logical-axis shardings, host batch -> global arrays, multi-host init.

The train step runs as one `jax.jit` over a `Mesh` with axes (`data`, `fsdp`, `sequence`,
`tensor`). Parameters carry logical axis names (`nn.with_logical_partitioning`);
`config.mesh.logical_axis_rules` maps them to mesh axes. The batch is split over (`data`, `fsdp`);
`sequence` splits the denoiser's tokens by frames (logical "frames"; attention across the split is
`vdm.parallel.sequence`), `tensor` splits heads and MLP width; both hold replicas of the batch.
(The data-parallel alternative selected by `config.parallel` has its own layout adapter next to
this module; see `vdm.train.step`.)

Sharding rule for awkward shapes: when an array dimension is not divisible by the product of the
mesh axes its logical name maps to (e.g. 3 RGB channels over fsdp=2), that dimension falls back to
replicated and a warning names the parameter. Training stays correct; only that dimension's memory
is not split. Batches are different: a global batch that does not divide over (`data`, `fsdp`) is a
user error and raises `vdm.errors.ConfigError` (a ValueError).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vdm.errors import ConfigError

PyTree = Any
MESH_AXES = ("data", "fsdp", "sequence", "tensor")
# Batch dim is split over these; `sequence` and `tensor` hold replicas of it.
BATCH_AXES = ("data", "fsdp")

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- multi-host


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
) -> bool:
    """Starts `jax.distributed` for a multi-process run; a no-op for a single process.

    Values come from the arguments, else the environment: `JAX_COORDINATOR_ADDRESS`
    ("host:port"), `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`. With `auto=True` and nothing given,
    JAX's own cluster detection (TPU pods, SLURM, Open MPI) fills everything in. Must run before
    any other JAX call touches the devices.

    A process that stops (killed, a lost host) is noticed by the others after
    `$VDM_HEARTBEAT_TIMEOUT_S` seconds (default 100, JAX's): they then stop with JAX's "another
    task died" error (a non-zero exit) instead of waiting in a collective.

    Args:
      coordinator_address: "host:port" of process 0's coordinator service.
      num_processes: total number of processes.
      process_id: this process's index in [0, num_processes).
      auto: let JAX detect the cluster when nothing is given.

    Returns:
      True if `jax.distributed` was initialised (now or before), False for a single process.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if jax.distributed.is_initialized():
        return True
    if coordinator_address is None and num_processes is None and not auto:
        return False
    if num_processes == 1 and coordinator_address is None:
        return False
    if coordinator_address is not None and (num_processes is None or process_id is None):
        raise ConfigError(
            f"Multi-process run with coordinator {coordinator_address!r} needs both "
            f"num_processes (got {num_processes}) and process_id (got {process_id}); pass "
            "--num_processes/--process_id or set JAX_NUM_PROCESSES/JAX_PROCESS_ID."
        )
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        heartbeat_timeout_seconds=_heartbeat_timeout(),
    )
    log.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def _heartbeat_timeout() -> int:
    value = os.environ.get("VDM_HEARTBEAT_TIMEOUT_S", "100")
    try:
        seconds = int(value)
    except ValueError:
        seconds = 0
    if seconds <= 0:
        raise ConfigError(
            f"VDM_HEARTBEAT_TIMEOUT_S={value!r}: give a whole number of seconds > 0 (how long a "
            "silent process is waited for before the others stop)."
        )
    return seconds


# ----------------------------------------------------------------------------- mesh


def mesh_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolves a config mesh shape (axis -> size, one -1 allowed) for `num_devices` devices.

    Args:
      shape: e.g. {"data": -1, "fsdp": 2}; axes left out have size 1.
      num_devices: how many devices the mesh must cover exactly.

    Returns:
      {"data": d, "fsdp": f, "sequence": s, "tensor": t} with d * f * s * t == num_devices.
    """
    shape = dict(shape)
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ConfigError(
            f"config.mesh.shape has unknown axes {unknown}; valid axes are {list(MESH_AXES)}."
        )
    sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ConfigError(f"config.mesh.shape={shape}: only one axis may be -1, got {fill}.")
    bad = {a: s for a, s in sizes.items() if s == 0 or s < -1}
    if bad:
        raise ConfigError(
            f"config.mesh.shape={shape}: axis sizes must be positive or -1, got {bad}."
        )
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if num_devices % fixed:
            raise ConfigError(
                f"config.mesh.shape={shape}: the fixed axes multiply to {fixed}, which does not "
                f"divide the {num_devices} devices, so -1 on '{fill[0]}' cannot fill the rest."
            )
        sizes[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(
            f"config.mesh.shape={shape} has {fixed} devices "
            f"({' x '.join(f'{a}={s}' for a, s in sizes.items())}) but {num_devices} are "
            "available; make the product equal the device count or set one axis to -1."
        )
    return sizes


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` with axes ("data", "fsdp", "sequence", "tensor") from `config.mesh`.

    Devices are laid out in `jax.devices()` order (process-major), so `data` is the axis that
    crosses hosts and `sequence` and `tensor` (the chattiest: all-to-alls / ring exchanges in every
    attention, and per-layer reductions) stay within a host. The mesh has Auto axis types (a plain
    `Mesh`, not `jax.make_mesh`), so shardings inside jit are inferred from the constraints.

    Args:
      mesh_config: `config.mesh` (uses `.shape`) or a plain {axis: size} mapping.
      devices: devices to use (default: all devices of all processes).

    Returns:
      The mesh.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape_cfg = mesh_config.shape if hasattr(mesh_config, "shape") else mesh_config
    sizes = mesh_shape(shape_cfg, len(devices))
    grid = np.array(devices, dtype=object).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def describe_mesh(mesh: Mesh) -> str:
    """One line, e.g. "mesh data=4 fsdp=2 sequence=1 tensor=1 (8 devices, 1 process, cpu)"."""
    axes = " ".join(f"{a}={s}" for a, s in mesh.shape.items())
    kind = mesh.devices.flat[0].platform
    n_proc = len({d.process_index for d in mesh.devices.flat})
    return f"mesh {axes} ({mesh.size} devices, {n_proc} process{'es' * (n_proc > 1)}, {kind})"


# ----------------------------------------------------------------------------- shardings


def normalize_rules(rules) -> tuple[tuple[str, Any], ...]:
    """Logical-axis rules as hashable tuples (JSON round trips turn tuples into lists)."""
    out = []
    for name, target in rules:
        if isinstance(target, list):
            target = tuple(target)
        out.append((name, target))
    return tuple(out)


def _axis_size(mesh: Mesh, entry) -> int:
    if entry is None:
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[n] for n in names)


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh, where: str, fallbacks: list) -> P:
    """Replicates the dims of `spec` that do not divide evenly over their mesh axes."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    fitted = []
    for dim, (size, entry) in enumerate(zip(shape, entries, strict=True)):
        n = _axis_size(mesh, entry)
        if n > 1 and size % n:
            fallbacks.append(f"{where} dim {dim} ({size} over {entry}={n})")
            entry = None
        fitted.append(entry)
    while fitted and fitted[-1] is None:
        fitted.pop()
    return P(*fitted)


_warned: set[str] = set()


def logical_to_mesh_spec(names: Sequence[str | None], rules) -> P:
    """PartitionSpec of one array from its logical dim names (flax semantics, duplicates allowed).

    Rules are tried in order; a rule shards every still-unassigned dim with its logical name over
    its mesh axes if none of those axes is used by the array yet (a mesh axis shards at most one
    dim). Unlike `nn.logical_to_mesh_axes` a name may repeat, e.g. a 3D conv kernel
    ("kernel", "kernel", "kernel", "conv_in", "conv_out"); names without a rule are replicated.
    """
    result: list[Any] = [None] * len(names)
    assigned = [False] * len(names)
    used: set[str] = set()
    for logical, target in normalize_rules(rules):
        for pos, name in enumerate(names):
            if name != logical or assigned[pos]:
                continue
            axes = () if target is None else (target if isinstance(target, tuple) else (target,))
            if used.intersection(axes):
                continue
            result[pos], assigned[pos] = target, True
            used.update(axes)
    return P(*result)


def _is_box(x) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def box(tree: PyTree, specs: PyTree) -> PyTree:
    """Boxes each leaf of `tree` with the logical axis names of `specs` (the inverse of `unbox`).

    Args:
      tree: arrays (e.g. weights loaded from a checkpoint, which carry no axis names).
      specs: a pytree like `tree` of `PartitionSpec`s of logical names (`nn.get_partition_spec`
        of the module's boxed `init`), e.g. `TextEncoder.logical_axes()`.

    Returns:
      `tree` with every leaf wrapped in `nn.LogicallyPartitioned`, so `logical_to_sharding` /
      `put_replicated` shard it by the logical-axis rules instead of replicating it.
    """
    is_spec = lambda x: isinstance(x, P)  # noqa: E731
    return jax.tree.map(
        lambda spec, x: nn.LogicallyPartitioned(x, tuple(spec)), specs, tree, is_leaf=is_spec
    )


def unbox(tree: PyTree) -> PyTree:
    """Strips `nn.Partitioned` boxes WITHOUT adding sharding constraints.

    (`nn.meta.unbox` constrains each value to its logical spec when a mesh is active, which would
    fight the divisibility fallback of `logical_to_sharding`; the jit `out_shardings` already say
    where everything goes.)
    """
    return jax.tree.map(
        lambda x: x.unbox(apply_constraint=False) if _is_box(x) else x, tree, is_leaf=_is_box
    )


def logical_to_sharding(tree: PyTree, mesh: Mesh, rules) -> PyTree:
    """`NamedSharding`s for a tree whose leaves may be boxed with logical axis names.

    Boxed leaves (`nn.LogicallyPartitioned` / `nn.Partitioned`, as produced by
    `nn.with_logical_partitioning`, also inside optimizer states built from boxed params) are
    mapped through `rules` (`logical_to_mesh_spec`: rules in priority order, a mesh axis used
    once per array). Unboxed leaves are replicated. Dims that do not divide over their mesh axes
    are replicated (with a warning).

    Args:
      tree: a pytree of arrays / `jax.ShapeDtypeStruct`s, possibly boxed (e.g. from eval_shape).
      mesh: the device mesh.
      rules: logical axis rules, e.g. `config.mesh.logical_axis_rules`.

    Returns:
      A pytree of `NamedSharding` with the *unboxed* structure of `tree`.
    """
    rules = normalize_rules(rules)
    fallbacks: list[str] = []

    def one(path, x):
        if _is_box(x):
            value = x.unbox(apply_constraint=False)
            if not hasattr(value, "shape"):  # an empty subtree, e.g. optax's MaskedNode
                return value
            spec = logical_to_mesh_spec(tuple(x.names), rules)
            where = jax.tree_util.keystr(path)
            return NamedSharding(mesh, _fit_spec(spec, value.shape, mesh, where, fallbacks))
        return NamedSharding(mesh, P())

    shardings = jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_box)
    message = "; ".join(fallbacks[:8]) + (
        f"; and {len(fallbacks) - 8} more" if len(fallbacks) > 8 else ""
    )
    if fallbacks and message not in _warned:
        _warned.add(message)
        log.warning("Replicating array dims not divisible by their mesh axes: %s.", message)
    return shardings


def replicated(mesh: Mesh) -> NamedSharding:
    """The fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim split over (`data`, `fsdp`), the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_divisor(mesh: Mesh) -> int:
    """How many ways the global batch is split (data * fsdp)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
    """Raises a clear ValueError unless the batch splits evenly over devices and processes."""
    n = batch_divisor(mesh)
    if global_batch % n:
        raise ConfigError(
            f"train.batch_size={global_batch} does not divide over the mesh batch axes "
            f"data x fsdp = {n} ({describe_mesh(mesh)}); use a multiple of {n}."
        )
    if global_batch % jax.process_count():
        raise ConfigError(
            f"train.batch_size={global_batch} does not divide over {jax.process_count()} "
            "processes; each process loads an equal share."
        )


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Host-local numpy batch -> global `jax.Array`s split over (`data`, `fsdp`).

    Each process passes only its own rows (`B_global / process_count` of them, as the loader
    yields them for its `process_index`); `jax.make_array_from_process_local_data` assembles the
    global array without any host holding all of it.

    Args:
      batch: dict of numpy arrays with a leading local-batch dim.
      mesh: the device mesh.

    Returns:
      Dict of global jax.Arrays with leading dim `B_local * process_count`.
    """
    sharding = batch_sharding(mesh)
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.ndim == 0:
            raise ValueError(f"Batch field '{k}' is a scalar; every field needs a batch dim.")
        out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out


def put_replicated(tree: PyTree, mesh: Mesh, rules=()) -> PyTree:
    """Puts a (possibly boxed) tree on `mesh`: boxed leaves by `rules`, the rest replicated."""
    shardings = logical_to_sharding(tree, mesh, rules)
    values = unbox(tree)
    return jax.tree.map(lambda x, s: jax.device_put(jnp.asarray(x), s), values, shardings)


def with_sharding_rules(fn, mesh: Mesh, rules):
    """Wraps `fn` so its trace sees `mesh` and the logical-axis `rules`.

    Inside, `nn.with_logical_constraint(x, ("batch", ...))` in modules turns into sharding
    constraints over `mesh` (flax needs both the rules context and an abstract mesh).
    """
    rules = normalize_rules(rules)

    def wrapped(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            return fn(*args, **kwargs)

    return wrapped
