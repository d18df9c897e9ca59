"""Wan 2.1 fine-tuning steps for `vdm.tools.aot.wan`: the REAL stage "wan" train step, full and
LoRA, as `train.py` builds it from configs/wan_finetune.py (and its ":lora" variant).

The step is `vdm.train.setup.build(task, config, mesh).train_step`, the jitted
`vdm.train.step.train_step` training runs, for `vdm.tasks.wan.WanTask` (wrapped by
`vdm.tasks.lora.wrap` when `optim.lora_rank > 0`, as `vdm.train.loop` does): Wan's flow-matching
loss on a cached batch (latent means float16 [B, 21, 60, 104, 16], UMT5 states float16
[B, 512, 4096] and their mask), classifier-free-guidance dropout to the null context, then vdm's
optimizer (clipping + AdamW), no EMA (configs/wan_finetune.py). `AbstractWanTask` is that task
with the preset's architecture and abstract frozen inputs instead of a pipeline directory and a
latent cache: its `loss`, `init`, `dummy_batch` and `frozen` structure are WanTask's own.

  train  `optim.lora_rank` forced to 0: every param trains (param_dtype float32 by default:
         12 bytes per param of state + 4 of gradients).
  lora   `optim.lora_rank` / `lora_alpha` / `learning_rate` and `model.param_dtype` (bfloat16) of
         configs/wan_finetune.py:lora when the config sets no rank: adapters train (float32),
         the base is a frozen input.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from vdm import parallel
from vdm.config import load_config_file
from vdm.models.wan.transformer import WanTransformer
from vdm.models.wan.vae import WanVAE
from vdm.rng import base_key
from vdm.tasks import lora as lora_task
from vdm.tasks.base import Task
from vdm.tasks.wan import WanTask
from vdm.tools.aot.abstract import sharded
from vdm.tools.aot.programs import train_passes
from vdm.tools.aot.wan import (
    TEXT_LENGTH,
    WanBuilt,
    compile_program,
    figures,
    forward_flops,
    report,
    splash_flops,
)
from vdm.train import setup as train_setup

# The stage's config file (its ":lora" variant gives the LoRA program's rank and rates).
WAN_FINETUNE = os.path.normpath(
    os.path.join(os.path.dirname(__file__), "..", "..", "..", "configs", "wan_finetune.py")
)


class AbstractWanTask(WanTask):
    """`WanTask` on the preset of `b` (nothing read): its frozen inputs and pretrained weights
    are `jax.ShapeDtypeStruct`s."""

    def __init__(self, config, b: WanBuilt):  # noqa: D107 (WanTask's reads files)
        Task.__init__(self, config)
        self.root = f"(abstract Wan 2.1 {b.name}: nothing read)"
        m = config.model
        self.module = WanTransformer(b.arch, attention_kernel=m.attention_kernel,
                                     sequence_parallel=m.sequence_parallel, remat=m.remat,
                                     dtype=jnp.dtype(m.dtype),
                                     param_dtype=jnp.dtype(m.param_dtype))  # fmt: skip
        self.module.check()
        z = WanVAE().z_dim
        self.latent_stats = {"shift": np.zeros(z, np.float32), "scale": np.ones(z, np.float32)}
        self.latent_shape = tuple(b.latent_shape)
        self.context_shape = (int(config.text_encoder.max_length), b.arch.text_dim)

    def pretrained(self, abstract_params):
        return abstract_params  # the LoRA base: shapes and shardings only

    def frozen(self):
        """WanTask.frozen's structure: latent statistics and the null context, abstract."""
        z = len(self.latent_stats["shift"])
        return {
            "shift": jax.ShapeDtypeStruct((z,), jnp.float32),
            "scale": jax.ShapeDtypeStruct((z,), jnp.float32),
            "null_ctx": jax.ShapeDtypeStruct((1, *self.context_shape), jnp.float32),
        }


def step_config(config, kind: str):
    """`config` for the "train" (lora_rank 0) or "lora" program (configs/wan_finetune.py:lora's
    rank, alpha, learning rate and base param_dtype unless the config sets a rank)."""
    c = config.copy_and_resolve_references()
    with c.unlocked():
        c.stage = "wan"
        if kind == "train":
            c.optim.lora_rank = 0
        elif int(c.optim.get("lora_rank", 0) or 0) == 0:
            ref = load_config_file(WAN_FINETUNE, "lora")
            c.optim.update(lora_rank=ref.optim.lora_rank, lora_alpha=ref.optim.lora_alpha,
                           learning_rate=ref.optim.learning_rate)  # fmt: skip
            c.model.param_dtype = ref.model.param_dtype  # the frozen base's storage
    return c


def _step_program(b: WanBuilt, kind: str):
    """The jitted stage "wan" train step on abstract (state, batch, key, frozen): (compiled,
    seconds)."""
    config = step_config(b.config, kind)
    task = lora_task.wrap(AbstractWanTask(config, b), config)
    setup = train_setup.build(task, config, b.mesh)
    parallel.check_batch_size(int(config.train.batch_size), b.mesh)
    frozen = sharded(parallel.unbox(task.frozen()), setup.frozen_shardings)
    key = jax.eval_shape(lambda: base_key(config.seed))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=parallel.replicated(b.mesh))
    args = (setup.abstract_state, train_setup.abstract_batch(setup), key, frozen)
    what = "train step (LoRA)" if kind == "lora" else "train step (full)"
    return compile_program(setup.train_step, args, what, b)


def compile_train(b: WanBuilt, kind: str, full_depth: bool = False):
    """The "train" (full) or "lora" step on `config.train.batch_size` videos: a ProgramReport
    (model FLOPs 3 x forward per video, the usual 6ND-style count, for both)."""
    config = step_config(b.config, kind)
    batch = int(config.train.batch_size)
    parallel.check_batch_size(batch, b.mesh)
    fig = figures(b, functools.partial(_step_program, kind=kind), full_depth)
    o, m = config.optim, config.model
    what = "full fine-tuning" if kind == "train" else f"LoRA rank {int(o.lora_rank)}"
    desc = (
        f"stage 'wan' train step (vdm.train.step via vdm.train.setup.build, vdm.tasks.wan"
        f"{'' if kind == 'train' else ' + vdm.tasks.lora'}), {what}, batch {batch}, cached "
        f"latents + UMT5 states, "
        + (f"params {m.param_dtype}" if kind == "train" else f"frozen base {m.param_dtype}, "
           "adapters float32")
        + f", compute {m.dtype}, remat {m.remat}"
    )  # fmt: skip
    f = forward_flops(b.arch, b.tokens, TEXT_LENGTH)
    extra = splash_flops(b, batch * train_passes(config))
    return report(kind, desc, fig, b, extra_flops=extra, model_flops=3.0 * batch * f)
