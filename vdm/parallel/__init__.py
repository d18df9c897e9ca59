"""Parallelism: the device mesh, logical-axis shardings, batches as global arrays, multi-host init.

`mesh.py` holds the mesh API, re-exported here (`from vdm import parallel; parallel.make_mesh`);
`layout.py` says how the train step's arguments sit on devices (global arrays over the mesh), and
the data-parallel alternative's layout has its own module beside it (imported by the step factory
only).
"""

from vdm.parallel.layout import Layout
from vdm.parallel.mesh import (
    BATCH_AXES,
    MESH_AXES,
    batch_divisor,
    batch_sharding,
    box,
    check_batch_size,
    describe_mesh,
    initialize_distributed,
    logical_to_mesh_spec,
    logical_to_sharding,
    make_mesh,
    mesh_shape,
    normalize_rules,
    put_replicated,
    replicated,
    shard_batch,
    unbox,
    with_sharding_rules,
)

__all__ = [
    "BATCH_AXES",
    "MESH_AXES",
    "Layout",
    "batch_divisor",
    "batch_sharding",
    "box",
    "check_batch_size",
    "describe_mesh",
    "initialize_distributed",
    "logical_to_mesh_spec",
    "logical_to_sharding",
    "make_mesh",
    "mesh_shape",
    "normalize_rules",
    "put_replicated",
    "replicated",
    "shard_batch",
    "unbox",
    "with_sharding_rules",
]
