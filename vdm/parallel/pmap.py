"""The pmap layout: plain data parallelism with `jax.pmap` over this process's devices.

With `config.parallel="pmap"` every argument of the step but the key carries a leading
local-device axis: the state and the frozen weights hold one identical copy per device
(`to_replicated`), the batch is split into one slice per device (`shard_batch`), gradients are
averaged with `lax.pmean` over `AXIS`, and the metrics come back once per device. `PmapLayout`
hides all of that behind the methods of `vdm.parallel.layout.Layout`, so the training loop does not
know which mode runs; `vdm.train.step` (the step factory) is the only other module that does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vdm.parallel import mesh as mesh_lib
from vdm.parallel.layout import Layout

PyTree = Any
MODE = "pmap"
MODES = ("jit", MODE)  # The values of `config.parallel`; "jit" is the mesh layout.
AXIS = "batch"  # axis_name of the pmapped step (lax.pmean / lax.axis_index use it).


def local_devices(mesh: Mesh) -> list[jax.Device]:
    """This process's devices of `mesh`, in mesh order (the pmap devices of this process)."""
    return [d for d in mesh.devices.flat if d.process_index == jax.process_index()]


def local_sharding(devices: Sequence[jax.Device] | None = None) -> NamedSharding:
    """Sharding of a pmap argument: leading dim over this process's devices."""
    devices = list(jax.local_devices() if devices is None else devices)
    return NamedSharding(Mesh(np.array(devices, dtype=object), (AXIS,)), P(AXIS))


def to_replicated(tree: PyTree, devices: Sequence[jax.Device] | None = None) -> PyTree:
    """Arrays -> pmap layout `[n_local, ...]`, one identical copy per local device.

    `jax.device_put_replicated` is gone; this builds the stacked array from per-device buffers
    (copies of each array's shard on that device when it is already replicated there, else a
    host transfer), so no host ever materialises `n_local` copies.
    """
    devices = list(jax.local_devices() if devices is None else devices)
    sharding = local_sharding(devices)

    def rep(x):
        buffers = []
        by_device = {}
        if isinstance(x, jax.Array) and x.is_fully_replicated:
            by_device = {s.device: s.data for s in x.addressable_shards}
        host = None
        for d in devices:
            if d in by_device:
                buffers.append(jax.device_put(by_device[d][None], d))
            else:
                if host is None:
                    host = np.asarray(jax.device_get(x))
                buffers.append(jax.device_put(host[None], d))
        shape = (len(devices),) + tuple(np.shape(x))
        return jax.make_array_from_single_device_arrays(shape, sharding, buffers)

    return jax.tree.map(rep, tree)


def from_replicated(tree: PyTree, mesh: Mesh) -> PyTree:
    """pmap layout `[n_local, ...]` -> arrays replicated over all devices of `mesh`.

    Replicas are identical (same update from pmean'd gradients), so each device keeps its own
    copy; the result is an ordinary global array that orbax can save from every process.
    """
    sharding = mesh_lib.replicated(mesh)

    def unrep(x):
        shards = {s.device: s.data for s in x.addressable_shards}
        buffers = []
        for d in local_devices(mesh):
            if d in shards:
                buffers.append(shards[d][0])
            else:  # A mesh device outside this pmap (should not happen): copy from the first.
                buffers.append(jax.device_put(x.addressable_shards[0].data[0], d))
        return jax.make_array_from_single_device_arrays(x.shape[1:], sharding, buffers)

    return jax.tree.map(unrep, tree)


def shard_batch(batch: Mapping[str, Any], num_local_devices: int) -> dict[str, np.ndarray]:
    """Host-local batch `[B_local, ...]` -> `[n_local, B_local / n_local, ...]` for pmap."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.shape[0] % num_local_devices:
            raise ValueError(
                f"Local batch of {v.shape[0]} (field '{k}') does not divide over "
                f"{num_local_devices} local devices for parallel='pmap'."
            )
        out[k] = v.reshape((num_local_devices, v.shape[0] // num_local_devices) + v.shape[1:])
    return out


class PmapLayout(Layout):
    """The pmap layout of the step's arguments (see the module docstring).

    The canonical (checkpointed, evaluated) state is replicated over the whole mesh; the step
    sees one copy per local device.
    """

    def __init__(self, mesh: Mesh):
        super().__init__(mesh, rules=())
        self.devices = local_devices(mesh)

    def state_shardings(self, boxed: PyTree) -> PyTree:
        return jax.tree.map(lambda _: mesh_lib.replicated(self.mesh), mesh_lib.unbox(boxed))

    def frozen_shardings(self, frozen: PyTree) -> None:
        return None

    def put_frozen(self, frozen: PyTree, shardings: PyTree = None) -> PyTree:
        return to_replicated(mesh_lib.unbox(frozen), self.devices)

    def put_state(self, state: PyTree) -> PyTree:
        return to_replicated(state, self.devices)

    def put_batch(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return shard_batch(batch, len(self.devices))

    def global_view(self, tree: PyTree) -> PyTree:
        return from_replicated(tree, self.mesh)

    def fetch(self, metrics: Mapping[str, jax.Array]) -> dict[str, float]:
        return {k: float(v[0]) for k, v in jax.device_get(metrics).items()}
