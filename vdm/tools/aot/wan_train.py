"""Wan 2.1 fine-tuning steps for `vdm.tools.aot.wan`: full (every param) and LoRA.

STAND-IN, until vdm.tasks has a Wan training stage: a minimal step built here over
WanTransformer's params, so it can be swapped for that stage's jitted step without touching the
reports. What it computes (Wan 2.1's rectified-flow objective, as diffusers' and DiffSynth's Wan
trainers do):

    sigma = shift * u / (1 + (shift - 1) u),  u ~ U(0, 1) per video      (flow shift, 3.0)
    x_sigma = (1 - sigma) x0 + sigma eps;  v = eps - x0
    loss = mean((WanTransformer(x_sigma, 1000 sigma, context) - v)^2)

on cached inputs (latents `[B, 21, 60, 104, 16]` float32 and UMT5 states `[B, 512, 4096]`
bfloat16: the VAE and text encoder are not in the step, as in vdm's cached denoiser stage),
then vdm's optimizer (`vdm.train.optim.make_optimizer(config.optim)`: global-norm clipping +
AdamW with warmup / cosine decay). No EMA and no gradient accumulation (each would add a float32
copy of the trained params). Compute in bfloat16; `config.model.remat` (set it to "block" at
this length) recomputes each block in the backward pass.

  train  float32 params, AdamW moments float32: 12 bytes per param of state + 4 of gradients,
         sharded by the logical-axis rules (`embed` -> fsdp, `heads` / `mlp` -> tensor).
  lora   `vdm.models.lora`: adapters (rank `optim.lora_rank`, default 32 here; targets
         `optim.lora_targets`, default the attention and feed-forward projections) trained in
         float32 with AdamW; the base weights bfloat16 and frozen (a step input, no state).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from vdm import parallel
from vdm.models import lora
from vdm.tools.aot.wan import (
    TEXT_LENGTH,
    WanBuilt,
    abstract_params,
    compile_program,
    figures,
    forward_flops,
    placed,
    report,
    sds,
    splash_flops,
)
from vdm.train import optim as optim_lib

DEFAULT_LORA_RANK = 32
# Attention passes of a train step per video: forward 1 + backward 2.5 (the flash backward
# recomputes the logits) + 1 recomputed forward with block remat (programs.train_passes).
TRAIN_PASSES = 4.5


def flow_loss(module, params, batch: dict, key: jax.Array, shift: float) -> jax.Array:
    """The rectified-flow loss of the module docstring on one batch."""
    x0, ctx = batch["latents"], batch["context"]
    k_u, k_eps = jax.random.split(key)
    u = jax.random.uniform(k_u, (x0.shape[0],), jnp.float32)
    sigma = shift * u / (1.0 + (shift - 1.0) * u)
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
    s = sigma[:, None, None, None, None]
    x = (1.0 - s) * x0 + s * eps
    v = module.apply({"params": params}, x, 1000.0 * sigma, ctx)
    return jnp.mean(jnp.square(v - (eps - x0)))


def _batch(b: WanBuilt, batch: int) -> dict:
    return dict(
        latents=sds(b, (batch, *b.latent_shape), jnp.float32),
        context=sds(b, (batch, TEXT_LENGTH, b.arch.text_dim), jnp.bfloat16),
    )


def _key(b: WanBuilt):
    key = jax.eval_shape(lambda: jax.random.key(0))
    return sds(b, key.shape, key.dtype, parallel.replicated(b.mesh))


def _optimizer(b: WanBuilt) -> optax.GradientTransformation:
    return optim_lib.make_optimizer(b.config.optim, int(b.config.train.num_steps))[0]


def _remat(b: WanBuilt) -> str:
    return str(b.config.model.remat)


def _full_program(b: WanBuilt, batch: int):
    """Full fine-tuning: (params, opt_state) -> updated, donated. (compiled, seconds)."""
    module = b.model(jnp.bfloat16, jnp.float32, _remat(b))
    boxed = abstract_params(b, module)
    tx = _optimizer(b)
    params, p_sh = placed(b, boxed)
    opt_state, o_sh = placed(b, jax.eval_shape(tx.init, boxed))
    shift = float(b.config.diffusion.shift)
    rep, bs = parallel.replicated(b.mesh), parallel.batch_sharding(b.mesh)

    def step(params, opt_state, batch, key):
        loss, grads = jax.value_and_grad(lambda p: flow_loss(module, p, batch, key, shift))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    fn = parallel.with_sharding_rules(step, b.mesh, b.rules)
    b_sh = {"latents": bs, "context": bs}
    jitted = jax.jit(fn, in_shardings=(p_sh, o_sh, b_sh, rep),
                     out_shardings=(p_sh, o_sh, rep), donate_argnums=(0, 1))  # fmt: skip
    args = (params, opt_state, _batch(b, batch), _key(b))
    return compile_program(jitted, args, "train (full)", b)


def _lora_program(b: WanBuilt, batch: int):
    """LoRA: (adapters, opt_state) -> updated, donated; the bf16 base is a frozen input."""
    module = b.model(jnp.bfloat16, jnp.bfloat16, _remat(b))
    base_boxed = abstract_params(b, module)
    o = b.config.optim
    rank = int(o.lora_rank) or DEFAULT_LORA_RANK
    factor = lora.scale(rank, o.get("lora_alpha", 0.0))
    ad_boxed = jax.eval_shape(
        functools.partial(lora.init_adapters, rank=rank, targets=o.get("lora_targets", "")),
        jax.random.key(0),
        base_boxed,
    )
    tx = _optimizer(b)
    base, base_sh = placed(b, base_boxed)
    adapters, a_sh = placed(b, ad_boxed)
    opt_state, o_sh = placed(b, jax.eval_shape(tx.init, ad_boxed))
    shift = float(b.config.diffusion.shift)
    rep, bs = parallel.replicated(b.mesh), parallel.batch_sharding(b.mesh)

    def step(adapters, opt_state, base, batch, key):
        def loss_fn(a):
            return flow_loss(module, lora.apply(base, a, factor), batch, key, shift)

        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    fn = parallel.with_sharding_rules(step, b.mesh, b.rules)
    b_sh = {"latents": bs, "context": bs}
    jitted = jax.jit(fn, in_shardings=(a_sh, o_sh, base_sh, b_sh, rep),
                     out_shardings=(a_sh, o_sh, rep), donate_argnums=(0, 1))  # fmt: skip
    args = (adapters, opt_state, base, _batch(b, batch), _key(b))
    return compile_program(jitted, args, "train (LoRA)", b)


def compile_train(b: WanBuilt, kind: str, full_depth: bool = False):
    """The "train" (full) or "lora" step on `config.train.batch_size` videos: a ProgramReport
    (model FLOPs 3 x forward per video, the usual 6ND-style count, for both)."""
    batch = int(b.config.train.batch_size)
    parallel.check_batch_size(batch, b.mesh)
    program = _full_program if kind == "train" else _lora_program
    fig = figures(b, functools.partial(program, batch=batch), full_depth)
    what = "full fine-tuning" if kind == "train" else (
        f"LoRA rank {int(b.config.optim.lora_rank) or DEFAULT_LORA_RANK}"
    )  # fmt: skip
    desc = (
        f"Wan flow-matching {what} step (stand-in, vdm.tools.aot.wan_train), batch {batch}, "
        f"cached latents + UMT5 states, remat {_remat(b)}"
    )
    f = forward_flops(b.arch, b.tokens, TEXT_LENGTH)
    extra = splash_flops(b, batch * TRAIN_PASSES)
    return report(kind, desc, fig, b, extra_flops=extra, model_flops=3.0 * batch * f)
