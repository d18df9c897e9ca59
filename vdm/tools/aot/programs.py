"""The programs AOT compiles (the same code training and sampling run, not copies), each turned
into a ProgramReport.

  train_step   the jitted step of `vdm.train.setup.build(task, config, mesh)` for the config's
               stage, on its abstract state, `abstract_batch` and the task's frozen inputs.
  sample       `vdm.inference.pipeline.Pipeline.generate`: the sampler's `lax.scan` over
               `sample.num_steps` guided denoiser calls + the streaming VAE decode, with the
               denoiser params sharded like training and the batch over (data, fsdp).
  text_encode  the frozen text encoder (`TextEncoder.encode`) on a batch of prompts, its params
               sharded by the logical-axis rules (how prompts are encoded for sampling and for
               the latent/embedding cache).

`jax.jit(...).lower(...).compile()` runs the real TPU compiler, which fails if the program does
not fit in a chip's HBM (`DoesNotFit`) and otherwise reports `memory_analysis()` and
`cost_analysis()`.

XLA counts a while-loop body once, so the sampler's FLOPs are `num_steps` x those of one guided
denoiser call, compiled on its own (the VAE decode is not counted). With `model.scan_layers` the
blocks are one while loop too, so a program's HLO FLOPs and cost-model time are extrapolated from
two small UNROLLED compiles of the same program on the same mesh (depth 1 and 2):
c(depth) = c(1) + (depth - 1) * (c(2) - c(1)) (the blocks are identical). Memory is always that
of the real (scanned) program. Those two compiles turn off XLA's windowed einsums
(`COUNTING_OPTIONS`): a collective matmul is a loop too, counted once.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
import time

import jax
import jax.numpy as jnp

from vdm import parallel
from vdm.diffusion import samplers
from vdm.errors import ConfigError
from vdm.inference.pipeline import Pipeline
from vdm.models import attention
from vdm.models import denoiser as dn
from vdm.rng import base_key
from vdm.tasks.denoiser import DenoiserTask
from vdm.tools.aot.abstract import Built, build
from vdm.tools.aot.advice import DoesNotFit, is_out_of_memory, oom_message
from vdm.tools.aot.report import cost, program_report
from vdm.train import setup as train_setup

# For the FLOP-counting compiles only (`unrolled_cost`). When a dot's operand is sharded, XLA's
# TPU SPMD partitioner may turn it into a "windowed einsum" (collective matmul): a while loop that
# overlaps a ring of collective-permutes with one slice of the dot per iteration. cost_analysis()
# counts a loop body once, so those dots lose all but 1/trip_count of their FLOPs (docs/aot.md
# has the measured gap). Without windowed einsums the dots are plain (an all-gather /
# reduce-scatter, then the whole dot) and counted in full.
COUNTING_OPTIONS = {
    "xla_tpu_enable_windowed_einsum_for_all_gather": False,
    "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False,
}


def compile_program(fn, args, what: str, b: Built, options: dict | None = None):
    """`fn.lower(*args).compile()`: (compiled, seconds); the compiler's out-of-memory error
    becomes `DoesNotFit` naming the program and the knobs."""
    start = time.perf_counter()
    try:
        lowered = fn.lower(*args)
        compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
    except Exception as e:  # the TPU compiler's out-of-memory is a JaxRuntimeError.
        if is_out_of_memory(e):
            raise DoesNotFit(
                oom_message(b.config, what, b.topology, e, dict(b.mesh.shape))
            ) from None
        raise
    return compiled, time.perf_counter() - start


def _windowed_einsums(compiled) -> int:
    """How many windowed-einsum loops (whose dots cost_analysis undercounts) a program has."""
    try:
        text = compiled.as_text()
    except Exception:  # not every backend / version gives the optimised HLO text.
        return 0
    return len(re.findall(r"body=%?[\w.]*windowed_dot_general_body", text))


def _undercount_note(compiled) -> str:
    """A description suffix when cost_analysis undercounts this program's FLOPs."""
    n = _windowed_einsums(compiled)
    if not n:
        return ""
    return (
        f"; HLO FLOPs UNDERCOUNTED: {n} windowed-einsum loop(s) counted once (set "
        "model.scan_layers for FLOPs from compiles without them)"
    )


def _scanned(config) -> bool:
    return config.stage == "denoiser" and bool(config.model.get("scan_layers", False))


# The description of a scanned program whose FLOPs were not counted (`Built.count_flops`).
NOT_COUNTED = "; FLOPs NOT COUNTED (--nocount_flops): the scanned block's counted once"


def unrolled_cost(b: Built, compile_fn) -> tuple[float, float | None, float]:
    """(HLO FLOPs, cost-model seconds, compile seconds) of `b`'s program as if unrolled.

    For `model.scan_layers`, whose cost_analysis counts the scanned block once (see the module
    docstring): compiles `compile_fn(built) -> (compiled, seconds)` at depth 1 and 2 without
    scan and extrapolates linearly to `model.depth`. These compiles use COUNTING_OPTIONS (no
    windowed einsums, whose loops cost_analysis would also count once); so does the cost-model
    time taken from them.
    """
    costs, seconds = [], 0.0
    for depth in (1, 2):
        config = copy.deepcopy(b.config)
        config.model.depth = depth
        config.model.scan_layers = False
        built = dataclasses.replace(build(config, b.topology), compiler_options=COUNTING_OPTIONS)
        compiled, secs = compile_fn(built)
        costs.append(cost(compiled))
        seconds += secs
    (f1, t1), (f2, t2) = costs
    extra = int(b.config.model.depth) - 1
    optimal = t1 + extra * (t2 - t1) if t1 is not None and t2 is not None else None
    return f1 + extra * (f2 - f1), optimal, seconds


def splash_flops(b: Built, passes: float) -> float:
    """Per-device FLOPs of the splash attention kernels in `passes` example-forward-passes
    (0 unless the denoiser's attention runs on splash).

    XLA's cost analysis does not count FLOPs inside a Mosaic kernel, so the reports add the
    analytic attention FLOPs (`Denoiser.attention_flops_per_example`) to the compiler's count.
    """
    task = b.task
    if not isinstance(task, DenoiserTask):
        return 0.0
    model = task.model
    if attention.select_kernel(model.attention_kernel, "tpu", model.dtype) != "splash":
        return 0.0
    f = model.attention_flops_per_example(task.latent_shape, task.text.max_length)
    return passes * f / len(b.topology.devices)


# The splash kernels are as opaque to XLA's TPU cost model as to its FLOP count: one splash
# attention of [4, 8192, 4, 128] over 4 v5p chips gets 0.23 ms of "optimal_seconds" where its
# 137 GFLOP per chip take 0.30 ms at peak (the XLA attention: 1.42 ms; docs/aot.md).
SPLASH_TIME = " (cost-model time + those FLOPs at peak)"


def with_splash_time(optimal: float | None, extra: float, b: Built) -> float | None:
    """The cost-model seconds plus the analytic splash FLOPs `extra` at the chip's peak (the
    cost model does not see inside the kernel); None stays None (no cost-model estimate)."""
    return None if optimal is None else optimal + extra / b.topology.peak_per_device


def train_passes(config) -> float:
    """Attention passes of a train step per example: forward 1 + backward 2.5 (the flash
    backward recomputes the logits: 5 matmuls against the forward's 2), + 1 forward with remat."""
    return 3.5 + (0.0 if config.model.get("remat", "none") == "none" else 1.0)


def _train_step_program(b: Built):
    """The train step on abstract (state, batch, key, frozen): (compiled, seconds)."""
    config, mesh = b.config, b.mesh
    parallel.check_batch_size(int(config.train.batch_size), mesh)
    batch = train_setup.abstract_batch(b.train)
    key = jax.eval_shape(lambda: base_key(config.seed))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=parallel.replicated(mesh))
    args = (b.train.abstract_state, batch, key, b.frozen)
    return compile_program(b.train.train_step, args, "train_step", b, b.compiler_options)


def compile_train_step(b: Built):
    """Compiles the config's train step for the topology; returns (compiled, ProgramReport)."""
    config, task = b.config, b.task
    batch_size = int(config.train.batch_size)
    compiled, seconds = _train_step_program(b)
    flops = {}
    if _scanned(config) and b.count_flops:
        hlo_flops, optimal, extra_seconds = unrolled_cost(b, _train_step_program)
        flops = dict(hlo_flops=hlo_flops, optimal=optimal)
        seconds += extra_seconds
    model_flops = None
    kind = "cached latents + embeddings" if getattr(task, "cached", False) else "raw videos"
    if isinstance(task, DenoiserTask):
        f = task.model.flops_per_example(task.latent_shape, task.text.max_length, task.text.dim)
        model_flops = 3.0 * batch_size * f
        if not task.cached:
            kind += " (VAE encode + text encode in the step)"
    desc = f"{config.stage} train step, batch {batch_size}, {kind}"
    if flops:
        desc += "; scanned blocks: FLOPs from unrolled depth 1 and 2 compiles"
    elif _scanned(config):
        desc += NOT_COUNTED
    else:
        desc += _undercount_note(compiled)
    extra = splash_flops(b, batch_size * train_passes(config))
    if extra:
        hlo, optimal = cost(compiled)
        hlo, optimal = flops.get("hlo_flops", hlo), flops.get("optimal", optimal)
        flops = dict(hlo_flops=hlo + extra, optimal=with_splash_time(optimal, extra, b))
        desc += f"; + {extra:.3g} analytic splash-attention FLOPs per device{SPLASH_TIME}"
    report = program_report(
        "train_step", desc, compiled, seconds, b.topology, model_flops=model_flops, **flops
    )
    return compiled, report


def default_sample_batch(mesh) -> int:
    """One video per batch shard (data x fsdp): the smallest batch every device works on."""
    return parallel.batch_divisor(mesh)


def _sample_inputs(b: Built, batch: int) -> dict:
    """Abstract sampler inputs for `batch` videos, sharded over the batch shards."""
    task, mesh = b.task, b.mesh
    bs = parallel.batch_sharding(mesh)
    L, D = task.text.max_length, task.text.dim
    ctx_dtype = jnp.dtype(task.text.dtype)

    def sds(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=bs)

    key = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), batch))
    return dict(
        ctx=sds((batch, L, D), ctx_dtype),
        mask=sds((batch, L), jnp.int32),
        null_ctx=sds((batch, L, D), ctx_dtype),
        null_mask=sds((batch, L), jnp.int32),
        noise=sds((batch, *task.latent_shape), jnp.float32),
        keys=jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=bs),
    )


def _scalar(b: Built) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((), jnp.float32, sharding=parallel.replicated(b.mesh))


def _guided_call_program(b: Built, batch: int):
    """One classifier-free-guided denoiser call (cond + uncond), compiled: (compiled, seconds)."""
    task, mesh, rules = b.task, b.mesh, b.config.mesh.logical_axis_rules
    inputs = _sample_inputs(b, batch)
    rep, bs = parallel.replicated(mesh), parallel.batch_sharding(mesh)

    def one_step(params, x, ctx, mask, null_ctx, null_mask, guidance):
        return samplers.guided_output(
            dn.model_fn(task.model, params),
            x,
            jnp.float32(0.5),
            (ctx, mask),
            (null_ctx, null_mask),
            guidance,
        )

    step_fn = jax.jit(
        parallel.with_sharding_rules(one_step, mesh, rules),
        in_shardings=(b.train.state_shardings.params, bs, bs, bs, bs, bs, rep),
        out_shardings=bs,
    )
    args = (b.train.abstract_state.params, inputs["noise"], inputs["ctx"], inputs["mask"],
            inputs["null_ctx"], inputs["null_mask"], _scalar(b))  # fmt: skip
    return compile_program(step_fn, args, "sample", b, b.compiler_options)


def _sampler_program(b: Built, batch: int):
    """`Pipeline.generate` with the config's sampler on `batch` videos: (compiled, seconds)."""
    config, task, mesh = b.config, b.task, b.mesh
    pipe = Pipeline(config=config, text=task.text, vae=task.vae, vae_params=None,
                    latent_stats=task.latent_stats, model=task.model, params=None)  # fmt: skip
    s = config.sample
    fn = parallel.with_sharding_rules(
        functools.partial(pipe.generate, sampler=s.sampler, num_steps=int(s.num_steps)),
        mesh,
        config.mesh.logical_axis_rules,
    )
    rep, bs = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    vae_sh = b.encoder_shardings["vae"]
    in_sh = (b.train.state_shardings.params, vae_sh, bs, bs, bs, bs, bs, rep, rep, bs)
    jitted = jax.jit(fn, in_shardings=in_sh, out_shardings=bs)
    x = _sample_inputs(b, batch)
    args = (b.train.abstract_state.params, b.encoders["vae"], x["ctx"], x["mask"], x["null_ctx"],
            x["null_mask"], x["noise"], _scalar(b), _scalar(b), x["keys"])  # fmt: skip
    return compile_program(jitted, args, "sample", b)


def _check_denoiser(b: Built, program: str) -> None:
    if not isinstance(b.task, DenoiserTask):
        raise ConfigError(f"The {program} program exists for stage 'denoiser' only.")


def compile_sample(b: Built, batch: int):
    """Compiles the sampling program (`Pipeline.generate`) and one guided denoiser call.

    Returns:
      (compiled sampler, ProgramReport); FLOPs are `num_steps` x the guided call's.
    """
    config, task, mesh = b.config, b.task, b.mesh
    _check_denoiser(b, "sample")
    if batch % parallel.batch_divisor(mesh):
        raise ConfigError(
            f"--sample_batch={batch} does not divide over data x fsdp = "
            f"{parallel.batch_divisor(mesh)}; use a multiple of it."
        )
    compiled, seconds = _sampler_program(b, batch)
    # One guided denoiser call as its own program: XLA counts the scan body once, so the
    # sampler's FLOPs are num_steps x this program's.
    guided_call = functools.partial(_guided_call_program, batch=batch)
    note = ""
    if _scanned(config):
        step_flops, step_opt, step_seconds = unrolled_cost(b, guided_call)
    else:
        step_compiled, step_seconds = guided_call(b)
        step_flops, step_opt = cost(step_compiled)
        note = _undercount_note(step_compiled)
    s = config.sample
    num_steps = int(s.num_steps)
    f = task.model.flops_per_example(task.latent_shape, task.text.max_length, task.text.dim)
    guided = 2 if float(s.guidance) != 1.0 else 1
    extra = splash_flops(b, num_steps * guided * batch)
    if extra:
        note += f"; + {extra:.3g} analytic splash-attention FLOPs per device{SPLASH_TIME}"
    desc = (
        f"{s.sampler} x {num_steps} steps (guidance {s.guidance}, batch {batch} x {guided}) + VAE "
        f"decode of {config.data.num_frames}x{config.data.height}x{config.data.width}; FLOPs = "
        f"{num_steps} x one guided call (decode not counted){note}"
    )
    report = program_report(
        "sample", desc, compiled, seconds + step_seconds, b.topology,
        hlo_flops=num_steps * step_flops + extra,
        model_flops=num_steps * 2.0 * batch * f,
        optimal=with_splash_time(num_steps * step_opt, extra, b) if step_opt else None,
    )  # fmt: skip
    return compiled, report


def compile_text_encode(b: Built, batch: int):
    """Compiles the frozen text encoder on `batch` prompts; returns (compiled, ProgramReport)."""
    config, task, mesh = b.config, b.task, b.mesh
    _check_denoiser(b, "text_encode")
    bs = parallel.batch_sharding(mesh)
    L = task.text.max_length
    ids = jax.ShapeDtypeStruct((batch, L), jnp.int32, sharding=bs)
    sh = b.encoder_shardings["text"]
    fn = parallel.with_sharding_rules(task.text.encode, mesh, config.mesh.logical_axis_rules)
    jitted = jax.jit(fn, in_shardings=(sh, bs, bs), out_shardings=bs)
    compiled, seconds = compile_program(jitted, (b.encoders["text"], ids, ids), "text_encode", b)
    desc = f"{task.text.name} ({task.text.module.__class__.__name__}) on {batch} x {L} tokens"
    desc += _undercount_note(compiled)
    return compiled, program_report("text_encode", desc, compiled, seconds, b.topology)


# What `run` compiles, by name.
COMPILERS = {
    "train_step": lambda b, batch: compile_train_step(b),
    "sample": compile_sample,
    "text_encode": compile_text_encode,
}
PROGRAMS = tuple(COMPILERS)
