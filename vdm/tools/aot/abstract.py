"""One config on one topology, abstractly: the mesh over the topology's devices, the config
stage's real Task with abstract frozen weights, the train setup (abstract state, shardings, the
jitted step) and the frozen encoders, every leaf a sharded `jax.ShapeDtypeStruct`.

The denoiser task is `DenoiserTask` (same loss, same batches) built with
`vdm.encoders.abstract(config)`: its frozen VAE and text-encoder params are abstract, so a
T5-XXL-size encoder is never downloaded or allocated. Its architecture comes from
`vdm.models.text.architectures` (known hub ids such as "google/t5-v1_1-xxl") or from the
`config.json` of a local model directory. The train state comes from `jax.eval_shape`: no
parameter is ever materialised.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from vdm import encoders as encoders_lib
from vdm import parallel, tasks
from vdm.errors import ConfigError
from vdm.tasks.denoiser import DenoiserTask
from vdm.tools.aot.chips import Topology, make_topology_mesh
from vdm.train import setup as train_setup
from vdm.train.setup import TrainSetup

PyTree = Any
FROZEN_SHARDINGS = ("rules", "replicated")


@dataclasses.dataclass(frozen=True)
class Built:
    """Everything the program compilers share for one (config, topology)."""

    topology: Topology
    train: TrainSetup  # `vdm.train.setup.build`'s: abstract state, shardings, the jitted step
    frozen: PyTree  # the train step's frozen inputs (`task.frozen()`), sharded abstract
    encoders: PyTree  # {"vae", "text"} for the sampler / text encoder ({} for the VAE stage)
    encoder_shardings: PyTree
    compiler_options: dict | None = None  # XLA options of its compiles (unrolled_cost's)
    # False: no FLOP-counting compiles for scanned blocks (memory only; `--nocount_flops`).
    count_flops: bool = True

    @property
    def config(self):
        return self.train.config

    @property
    def task(self):
        return self.train.task

    @property
    def mesh(self):
        return self.train.mesh


def abstract_task(config):
    """The config stage's Task with abstract frozen weights (`vdm.encoders.abstract`): the same
    `loss`, `dummy_batch` and `init` as training, nothing read or allocated."""
    if config.stage == "denoiser":
        return DenoiserTask(config, encoders_lib.abstract(config))
    return tasks.get_task(config)  # the autoencoder stage has no frozen weights.


def sharded(tree: PyTree, shardings: PyTree) -> PyTree:
    """`tree`'s leaves (arrays or ShapeDtypeStructs) as ShapeDtypeStructs with `shardings`."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings
    )


def build(config, topology: Topology, frozen_sharding: str = "rules") -> Built:
    """Abstract task, train setup and frozen inputs with their shardings on the topology's mesh.

    Args:
      config: the run config (stage, model, mesh, ...).
      topology: from `chips.get_topology`.
      frozen_sharding: "rules" shards boxed frozen weights by the logical-axis rules (as training
        does); "replicated" puts a full copy on every device.

    Returns:
      A `Built`.
    """
    if config.parallel != "jit":
        raise ConfigError(
            f"config.parallel={config.parallel!r}: AOT compiles the jit path (the other parallel "
            "modes run the same step with mesh data=N); use --config.parallel=jit."
        )
    if frozen_sharding not in FROZEN_SHARDINGS:
        raise ConfigError(f"frozen_sharding={frozen_sharding!r} is not 'rules' or 'replicated'.")
    mesh = make_topology_mesh(config, topology)
    task = abstract_task(config)
    rules = config.mesh.logical_axis_rules

    def place(tree):
        if frozen_sharding == "rules":
            return parallel.logical_to_sharding(tree, mesh, rules)
        return jax.tree.map(lambda _: parallel.replicated(mesh), parallel.unbox(tree))

    frozen = task.frozen()
    setup = train_setup.build(
        task, config, mesh, frozen_shardings=None if frozen_sharding == "rules" else place(frozen)
    )
    encoders = task.encoders.boxed(config.data) if isinstance(task, DenoiserTask) else {}
    encoder_shardings = place(encoders)
    return Built(
        topology,
        setup,
        sharded(parallel.unbox(frozen), setup.frozen_shardings),
        sharded(parallel.unbox(encoders), encoder_shardings),
        encoder_shardings,
    )
