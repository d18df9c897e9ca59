"""LoRA fine-tuning of any Task: `optim.lora_rank > 0` trains low-rank adapters only.

`wrap(task, config)` returns a Task whose trainable parameters are the adapters
(`vdm.models.lora`) and whose frozen inputs are the wrapped task's plus the base weights, read
from `train.init_from` (EMA weights) or, when that is unset, the wrapped task's own pretrained
weights (`Task.pretrained`, e.g. stage "wan"'s `model.pretrained`). The train state, the
optimizer state, the EMA and therefore the checkpoints hold adapters only; the base is
referenced (its absolute path recorded in each checkpoint's metadata under "lora"), not copied.
The train step runs the base with the adapters beside its kernels (`vdm.models.lora.attach`:
each `Linear` computes x W + (x A)(s B), no kernel-sized merge); sampling, evaluation, export
and `load_pipeline` see the merged weights W + (alpha / r) A B.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vdm import parallel, rng
from vdm.errors import ConfigError
from vdm.io import checkpoint as ckpt_lib
from vdm.models import lora
from vdm.tasks.base import Task

BASE = "lora_base"  # the base weights in the frozen inputs
TASK = "task"  # the wrapped task's own frozen inputs


def enabled(config) -> bool:
    """Whether `config.optim.lora_rank` asks for LoRA (a ConfigError when it is negative)."""
    rank = int(config.optim.get("lora_rank", 0) or 0)
    if rank < 0:
        raise ConfigError(f"optim.lora_rank must be >= 0 (0 = full fine-tuning), got {rank}.")
    return rank > 0


def check_config(config, pretrained_source: str = "") -> None:
    """ConfigError for a LoRA config that cannot work, naming the field and the fix
    (`pretrained_source`: the wrapped task's `Task.pretrained_source`, a base without init_from).
    """
    train, optim = config.train, config.optim
    if not train.get("init_from", "") and not pretrained_source:
        raise ConfigError(
            "optim.lora_rank > 0 fine-tunes a trained model: set train.init_from to its "
            "checkpoint (a training workdir, a step dir or an exported model's denoiser/)."
        )
    clashes = {
        "optim.freeze": optim.get("freeze", ""),
        "train.init_new_params": train.get("init_new_params", False),
        "train.init_skip": train.get("init_skip", ""),
    }
    set_ = [k for k, v in clashes.items() if v]
    if set_:
        raise ConfigError(
            f"optim.lora_rank > 0 trains adapters only and keeps the whole base frozen; "
            f"{', '.join(set_)} cannot be combined with it (unset, or set optim.lora_rank=0)."
        )
    if float(optim.get("lora_alpha", 0.0)) < 0:
        raise ConfigError(f"optim.lora_alpha must be >= 0 (0 = rank), got {optim.lora_alpha}.")
    lora.targets_regex(optim.get("lora_targets", ""))


def wrap(task: Task, config) -> Task:
    """`task` itself when LoRA is off, else its `LoraTask` (the config checked first)."""
    if not enabled(config) or isinstance(task, LoraTask):
        return task
    check_config(config, task.pretrained_source)
    return LoraTask(task, config)


class LoraTask(Task):
    """The wrapped task with adapters as its parameters and the base weights frozen."""

    def __init__(self, base: Task, config):
        super().__init__(config)
        self.base = base
        self.rank = int(config.optim.lora_rank)
        self.targets = config.optim.get("lora_targets", "")
        self.factor = lora.scale(self.rank, config.optim.get("lora_alpha", 0.0))
        init_from = config.train.get("init_from", "")
        # The base: a vdm checkpoint (train.init_from), else the task's pretrained weights.
        self.base_path = os.path.abspath(init_from) if init_from else base.pretrained_source
        self.from_checkpoint = bool(init_from)
        # The base's parameter shapes and logical axis names, and which adapted kernels a Linear
        # computes x W + (x A)(s B) for (the rest are merged; ConfigError when nothing matches).
        self._boxed, self.unmerged = lora.linear_targets(
            base.init,
            self.targets,
            jax.random.key(0),
            jax.tree.map(jnp.asarray, base.dummy_batch(1)),
        )

    @property
    def tokens_per_example(self):
        return self.base.tokens_per_example

    def dummy_batch(self, batch_size):
        return self.base.dummy_batch(batch_size)

    def device_batch(self, batch):
        return self.base.device_batch(batch)

    def init(self, key, batch):
        return lora.init_adapters(rng.stream(key, "lora"), self._boxed, self.rank, self.targets)

    def frozen(self):
        """The wrapped task's frozen inputs and the base weights (boxed: sharded like them)."""
        # Read replicated (as every frozen encoder is read); the step's layout then shards it.
        rep = NamedSharding(Mesh(np.array(jax.devices(), dtype=object), ("all",)), PartitionSpec())
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
            parallel.unbox(self._boxed),
        )
        if self.from_checkpoint:
            self._check_base_is_not_lora()
            try:
                params, _ = ckpt_lib.load_params_like(self.base_path, abstract, item="ema")
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(
                    f"train.init_from={self.base_path!r} (the LoRA base): {e}"
                ) from None
        else:
            params = self.base.pretrained(abstract)
        boxed = parallel.box(params, nn.get_partition_spec(self._boxed))
        return {TASK: self.base.frozen(), BASE: boxed}

    def _check_base_is_not_lora(self) -> None:
        try:
            base_optim = ckpt_lib.load_config(self.base_path).optim
        except FileNotFoundError:
            return  # load_params_like names the missing checkpoint
        if int(base_optim.get("lora_rank", 0) or 0) > 0:
            raise ConfigError(
                f"train.init_from={self.base_path!r} is itself a LoRA run (its checkpoints hold "
                "adapters only). Export it (python -m vdm.tools.export) and fine-tune the merged "
                "bundle's denoiser/ instead."
            )

    def merged(self, adapters, frozen):
        """The effective (merged) weights of `adapters` on the base in `frozen`."""
        return lora.apply(parallel.unbox(frozen[BASE]), adapters, self.factor)

    def loss(self, params, frozen, batch, key):
        frozen = jax.lax.stop_gradient(frozen)
        base = parallel.unbox(frozen[BASE])
        return self.base.loss(
            lora.attach(base, params, self.factor, self.unmerged), frozen[TASK], batch, key
        )

    def evaluate(self, params, frozen, step, workdir):
        return self.base.evaluate(self.merged(params, frozen), frozen[TASK], step, workdir)

    def metadata(self, params, frozen):
        meta = dict(self.base.metadata(self.merged(params, frozen), frozen[TASK]))
        meta["lora"] = {
            "base": self.base_path,
            "rank": self.rank,
            "alpha": float(self.config.optim.get("lora_alpha", 0.0)),
            "targets": self.targets or lora.DEFAULT_TARGETS,
        }
        return meta
