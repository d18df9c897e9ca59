"""How the train step's arguments are laid out on devices: global arrays over the mesh.

The training loop never looks at the parallel mode; it moves the state, the frozen weights, the
batches and the metrics through a layout object. `Layout` is the default one: every argument is a
global `jax.Array` sharded over the mesh by the logical-axis rules, so the state the step returns
is already the canonical one that checkpoints and evaluation read. The data-parallel alternative
(in the adapter module beside this one) has the same methods; `vdm.train.step.make_layout` picks
one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from vdm.parallel import mesh as mesh_lib

PyTree = Any


class Layout:
    """Global arrays sharded over `mesh` by the logical-axis `rules`.

    Attributes:
      mesh: the device mesh.
      rules: logical-axis rules (`config.mesh.logical_axis_rules`).
    """

    def __init__(self, mesh: Mesh, rules):
        self.mesh = mesh
        self.rules = rules

    def state_shardings(self, boxed: PyTree) -> PyTree:
        """Shardings of a boxed (logically partitioned) abstract state: the rules decide."""
        return mesh_lib.logical_to_sharding(boxed, self.mesh, self.rules)

    def frozen_shardings(self, frozen: PyTree) -> PyTree:
        """Shardings of `task.frozen()` (boxed leaves by the rules, the rest replicated)."""
        return mesh_lib.logical_to_sharding(frozen, self.mesh, self.rules)

    def put_frozen(self, frozen: PyTree, shardings: PyTree) -> PyTree:
        """`task.frozen()` (boxed or not) placed once as the step's frozen argument."""
        return jax.tree.map(
            lambda x, s: jax.device_put(jnp.asarray(x), s), mesh_lib.unbox(frozen), shardings
        )

    def put_state(self, state: PyTree) -> PyTree:
        """A state created or restored with the state shardings, as the step takes it."""
        return state

    def put_batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """This process's rows of a batch -> the step's batch argument."""
        return mesh_lib.shard_batch(batch, self.mesh)

    def global_view(self, tree: PyTree) -> PyTree:
        """A step argument or result (state, frozen weights) as global arrays over the mesh."""
        return tree

    def fetch(self, metrics: Mapping[str, jax.Array]) -> dict[str, float]:
        """The step's scalar metrics on the host."""
        return {k: float(v) for k, v in jax.device_get(metrics).items()}
