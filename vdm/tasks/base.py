"""The contract between a training stage and the shared training loop (`vdm.train.loop`).

A `Task` says *what* is learned: how parameters are initialised, what the loss is, which frozen
weights it needs, how host batches become device arrays, and how it is evaluated. `vdm.train`
does the rest the same way for every stage: mesh and shardings, optimizer, EMA, the compiled step,
checkpoints, logging, resume. Stages are registered by name in `vdm.tasks.get_task`.
"""

from __future__ import annotations

import abc
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict

PyTree = Any


class Task(abc.ABC):
    """One training stage ("autoencoder" or "denoiser").

    Attributes:
      tokens_per_example: how many tokens (or pixels) one training example is, for the loop's
        tokens/s log; None (the default) leaves that figure out. A class attribute or a property.
    """

    tokens_per_example: int | None = None

    def __init__(self, config: ConfigDict):
        self.config = config

    @abc.abstractmethod
    def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        """A device batch of zeros with the real shapes and dtypes (for init and eval_shape)."""

    @abc.abstractmethod
    def init(self, key: jax.Array, batch: dict[str, jax.Array]) -> PyTree:
        """Trainable parameters. Leaves may be `nn.Partitioned` boxes carrying logical axis names
        (from `nn.with_logical_partitioning`); the training setup maps them to mesh
        shardings."""

    def pretrained(self, abstract_params: PyTree) -> PyTree | None:
        """The weights a fresh run starts from when this stage fine-tunes a pretrained model
        (stage "wan": `model.pretrained`), placed with `abstract_params`' shardings (unboxed
        `jax.ShapeDtypeStruct`s with `.sharding`); None (the default): `init`'s.

        The loop puts them into a fresh state (params and EMA, optimizer from step 0); LoRA
        (`vdm.tasks.lora`) takes them as its frozen base when `train.init_from` is unset."""
        return None

    @property
    def pretrained_source(self) -> str:
        """Where `pretrained` reads from (recorded in checkpoints); "" when it returns None."""
        return ""

    def frozen(self) -> PyTree:
        """Frozen weights the loss needs (VAE, text encoder, latent statistics); {} if none.

        Passed to `loss` as an argument (never closed over), so they are sharded once and not
        baked into the compiled program as constants."""
        return {}

    @abc.abstractmethod
    def loss(
        self, params: PyTree, frozen: PyTree, batch: dict[str, jax.Array], key: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Scalar training loss (the mean of per-example losses) and scalar metrics.

        Pure and jit-able. `key` is already folded with the step (and, in the data-parallel
        layout, with the device: see `vdm.train.step.step_key`); derive named streams from it with
        `vdm.rng.stream(key, "noise")`."""

    @abc.abstractmethod
    def device_batch(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        """Host batch from the data pipeline -> numeric arrays for the step (drops strings,
        tokenizes captions, casts). Runs on the host, outside jit."""

    def evaluate(self, params: PyTree, frozen: PyTree, step: int, workdir: str) -> dict[str, float]:
        """Held-out metrics and previews (contact sheets) written under `workdir`. Outside jit."""
        return {}

    def metadata(self, params: PyTree, frozen: PyTree) -> dict[str, Any]:
        """JSON-able facts saved with each checkpoint (item "metadata"), e.g. the VAE's latent
        statistics or the paths of the frozen VAE / text encoder a denoiser was trained with."""
        return {}
