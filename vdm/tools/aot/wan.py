"""Wan 2.1 text-to-video (`vdm.models.wan`) on TPU topologies, ahead of time: its sampler and
its fine-tuning step (full and LoRA), with per-chip memory, analytic FLOPs and projections.

    python -m vdm.tools.aot.wan_cli --wan 14b --topology v5p:2x2x3 \
        --config.mesh.shape="{'data': 1, 'fsdp': 4, 'sequence': 3, 'tensor': 1}" \
        --programs sample,train,lora [--json report.json]

The architecture is a preset (`PRESETS`: the published transformer/config.json of
Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers, nothing downloaded); the video is Wan's default, 81 x 480
x 832 (latents 21 x 60 x 104, 32,760 tokens), with 512 UMT5 tokens per prompt. The vdm config
(`--config`, default configs/wan_finetune.py) gives the mesh, its logical-axis rules, the optimizer
and the batch.

  sample  `vdm.inference.wan.WanPipeline.generate`, what sample.py runs for a Wan checkpoint:
          the sampler's lax.scan of `num_steps` guided WanTransformer calls (cond + uncond in one
          batched call), then Wan's streaming VAE decode. The transformer in bfloat16 (params and
          compute, as `load_wan_pipeline(dtype="bfloat16")`), its params sharded by the rules,
          videos over (data, fsdp), the VAE (float32) replicated.
  step    one guided WanTransformer call (the sampler's loop body) and
  decode  the VAE decode on their own: the sampler is `num_steps` x step + decode, compiled as
          two small programs instead of one long one (`compile_step`, `compile_decode`).
  train   full fine-tuning (`wan_train`): stage "wan"'s own jitted train step
          (configs/wan_finetune.py, `vdm.tasks.wan.WanTask`).
  lora    LoRA fine-tuning (`wan_train`): the same step with `vdm.tasks.lora` adapters
          (configs/wan_finetune.py:lora).

Depth. WanTransformer's blocks are a Python loop (no scan), so the 30 / 40-block programs are
long, host-RAM-hungry compiles on a small machine (docs/aot.md, Finding 7). By default each program
is compiled with 1 and 2 blocks and every figure (memory fields, HLO FLOPs, cost-model time) is
extrapolated linearly to the real depth: f(n) = f(1) + (n - 1) (f(2) - f(1)) (the blocks are
identical; the description says so). `full_depth=True` compiles the real depth instead.
FLOP-counting compiles turn off windowed einsums (`programs.COUNTING_OPTIONS`), and the splash
kernels' FLOPs, which XLA does not see, are added analytically (`attention_flops`).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from vdm import parallel
from vdm.diffusion import samplers
from vdm.errors import ConfigError
from vdm.inference.wan import WanPipeline
from vdm.models import attention
from vdm.models.autoencoder import to_uint8
from vdm.models.layers import count_params
from vdm.models.text import architectures
from vdm.models.wan import pipeline as wan
from vdm.models.wan.transformer import WanTransformer
from vdm.models.wan.transformer_config import WanTransformerConfig
from vdm.models.wan.vae import WanVAE, init_shapes
from vdm.tools.aot.advice import DoesNotFit, is_out_of_memory
from vdm.tools.aot.chips import GiB, Topology, make_topology_mesh
from vdm.tools.aot.programs import COUNTING_OPTIONS, SPLASH_TIME
from vdm.tools.aot.report import ProgramReport, cost, memory

# transformer/config.json of the published Diffusers-format checkpoints (patch (1, 2, 2), 16 in /
# out channels, text_dim 4096, freq_dim 256, head dim 128: WanTransformerConfig's defaults, which
# are diffusers' WanTransformer3DModel defaults, i.e. the 14B).
PRESETS = {
    "1.3b": WanTransformerConfig(num_heads=12, ffn_dim=8960, num_layers=30),
    "14b": WanTransformerConfig(num_heads=40, ffn_dim=13824, num_layers=40),
}
TEXT_ENCODER = "google/umt5-xxl"  # Wan's; only its width (4096) and length matter here.
TEXT_LENGTH = 512


@dataclasses.dataclass(frozen=True)
class WanBuilt:
    """One Wan preset on one topology: the vdm config (mesh, rules, optim), the mesh, the video."""

    name: str
    arch: WanTransformerConfig
    config: ConfigDict
    topology: Topology
    mesh: jax.sharding.Mesh
    compiler_options: dict | None = None

    @property
    def rules(self):
        return self.config.mesh.logical_axis_rules

    @property
    def latent_shape(self) -> tuple[int, ...]:
        d = self.config.data
        return wan.latent_shape(WanVAE(), self.arch.patch_size, d.num_frames, d.height, d.width)

    @property
    def tokens(self) -> int:
        t, h, w, _ = self.latent_shape
        pt, ph, pw = self.arch.patch_size
        return (t // pt) * (h // ph) * (w // pw)

    def model(self, dtype, param_dtype, remat: str = "none", depth: int | None = None):
        arch = self.arch if depth is None else dataclasses.replace(self.arch, num_layers=depth)
        kernel = self.config.model.get("attention_kernel", "auto")
        seq = self.config.model.get("sequence_parallel", "ulysses")
        return WanTransformer(arch, attention_kernel=kernel, sequence_parallel=seq, remat=remat,
                              dtype=dtype, param_dtype=param_dtype)  # fmt: skip

    def with_depth(self, depth: int) -> WanBuilt:
        """The same build with `depth` blocks and the FLOP-counting compiler options."""
        arch = dataclasses.replace(self.arch, num_layers=depth)
        return dataclasses.replace(self, arch=arch, compiler_options=COUNTING_OPTIONS)


VIDEO = (wan.NUM_FRAMES, wan.HEIGHT, wan.WIDTH)  # Wan's default: 81 x 480 x 832


def wan_config(config: ConfigDict, video: tuple[int, int, int] = VIDEO) -> ConfigDict:
    """`config` with Wan's sampling defaults (`vdm.models.wan.pipeline.wan_config`'s for the
    published checkpoints: UniPC, flow shift 3.0 at 480p, 50 steps, guidance 5) and `video`
    (frames, height, width)."""
    c = config.copy_and_resolve_references()
    frames, height, width = video
    with c.unlocked():
        c.data.update(num_frames=frames, height=height, width=width, fps=wan.FPS)
        c.diffusion.update(objective="flow", shift=3.0, num_train_timesteps=1000)
        c.sample.update(sampler="unipc", num_steps=wan.NUM_STEPS, guidance=wan.GUIDANCE,
                        shift=3.0, time_grid="diffusers_unipc")  # fmt: skip
        c.text_encoder.max_length = TEXT_LENGTH
        c.family = "wan"
    return c


def build(name: str, config: ConfigDict, topology: Topology, video=VIDEO, arch=None) -> WanBuilt:
    """The Wan preset `name` ("1.3b" | "14b"; or any name with `arch`) with `config`'s mesh on
    `topology`, making `video` (frames, height, width)."""
    if arch is None and name not in PRESETS:
        raise ConfigError(f"--wan={name!r} is not one of {sorted(PRESETS)}.")
    mesh = make_topology_mesh(config, topology)
    return WanBuilt(name, arch or PRESETS[name], wan_config(config, video), topology, mesh)


def compile_program(fn, args, what: str, b: WanBuilt):
    """`fn.lower(*args).compile()`: (compiled, seconds); the compiler's out-of-memory error
    becomes DoesNotFit naming the program, the model and the topology."""
    start = time.perf_counter()
    try:
        lowered = fn.lower(*args)
        opts = b.compiler_options
        compiled = lowered.compile(compiler_options=opts) if opts else lowered.compile()
    except Exception as e:  # the TPU compiler's out-of-memory is a JaxRuntimeError.
        if is_out_of_memory(e):
            first = str(e).splitlines()[0]
            raise DoesNotFit(
                f"{what} of Wan {b.name} (depth {b.arch.num_layers}) does not fit on "
                f"{b.topology.name} with mesh {dict(b.mesh.shape)}: {first}"
            ) from None
        raise
    return compiled, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# Analytic FLOPs
# ---------------------------------------------------------------------------------------------
def attention_flops(arch: WanTransformerConfig, tokens: int, text_len: int) -> float:
    """Per video, one forward: the logits and weighted sums of the joint self-attention over
    `tokens` and of the cross-attention to `text_len` tokens (what a fused kernel computes)."""
    d = arch.dim
    return arch.num_layers * (4.0 * tokens * tokens * d + 4.0 * tokens * text_len * d)


def forward_flops(arch: WanTransformerConfig, tokens: int, text_len: int) -> float:
    """Per video, one forward: matmul FLOPs (2 per multiply-add) of WanTransformer."""
    d, f, n, L = arch.dim, arch.ffn_dim, tokens, text_len
    per_block = (
        2.0 * n * d * d * 4  # self-attention q, k, v, out
        + 2.0 * n * d * d * 2  # cross-attention q, out
        + 2.0 * L * d * d * 2  # cross-attention k, v (on the text tokens)
        + 2.0 * n * d * f * 2  # feed-forward
    )
    io = 2.0 * n * d * (arch.patch_dim + arch.patch_dim // arch.in_channels * arch.out_channels)
    text = 2.0 * L * (arch.text_dim * d + d * d)
    time_mlp = 2.0 * (arch.freq_dim * d + d * d + d * 6 * d)
    return arch.num_layers * per_block + attention_flops(arch, n, L) + io + text + time_mlp


def ring_self_attention(b: WanBuilt) -> bool:
    """Whether the self-attention runs as ring attention, whose blocks are XLA einsums
    (`vdm.parallel.sequence.ring_attention`), not the splash kernel: counted by XLA already."""
    ring = b.config.model.get("sequence_parallel", "ulysses") == "ring"
    return ring and int(dict(b.mesh.shape).get("sequence", 1)) > 1


def splash_flops(b: WanBuilt, passes: float) -> float:
    """Per-device FLOPs of the splash kernels in `passes` video-forward-passes (0 unless the
    attention runs on splash on TPU; with ring self-attention, the cross-attention's only)."""
    kernel = attention.select_kernel(b.config.model.get("attention_kernel", "auto"), "tpu",
                                     jnp.bfloat16)  # fmt: skip
    if kernel != "splash":
        return 0.0
    f = attention_flops(b.arch, b.tokens, TEXT_LENGTH)
    if ring_self_attention(b):
        f -= attention_flops(b.arch, b.tokens, 0)  # the self-attention part (text_len 0)
    return passes * f / len(b.topology.devices)


# ---------------------------------------------------------------------------------------------
# Abstract params
# ---------------------------------------------------------------------------------------------
def abstract_params(b: WanBuilt, module: WanTransformer, batch: int = 1):
    """The module's params as boxed ShapeDtypeStructs (`jax.eval_shape` of init: nothing is
    allocated)."""
    x = jax.ShapeDtypeStruct((batch, *b.latent_shape), jnp.float32)
    ctx = jax.ShapeDtypeStruct((batch, TEXT_LENGTH, b.arch.text_dim), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.float32)
    init = functools.partial(module.init, jax.random.key(0))
    return jax.eval_shape(lambda x, t, ctx: init(x, t, ctx)["params"], x, t, ctx)


def placed(b: WanBuilt, boxed):
    """(abstract unboxed tree with shardings, the shardings) of a boxed tree, by the rules."""
    shardings = parallel.logical_to_sharding(boxed, b.mesh, b.rules)
    values = parallel.unbox(boxed)
    tree = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), values, shardings
    )
    return tree, shardings


def sds(b: WanBuilt, shape, dtype, sharding=None):
    """A ShapeDtypeStruct split over the batch shards (or `sharding`)."""
    sharding = sharding or parallel.batch_sharding(b.mesh)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


# ---------------------------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------------------------
def _pipeline(b: WanBuilt, model: WanTransformer) -> WanPipeline:
    """A WanPipeline with abstract weights (only its programs are used: nothing is loaded)."""
    text = architectures.abstract_text_encoder(TEXT_ENCODER, TEXT_LENGTH, "bfloat16")
    z = WanVAE().z_dim
    stats = {"shift": [0.0] * z, "scale": [1.0] * z}  # inputs of the program, not shapes
    return WanPipeline(config=b.config, text=text, vae=WanVAE(), vae_params=None,
                       latent_stats=stats, model=model, params=None,
                       devices=jax.local_devices()[:1])  # fmt: skip


def _sample_jit(b: WanBuilt, batch: int):
    """(jitted `WanPipeline.generate` on `batch` videos, its abstract arguments)."""
    model = b.model(jnp.bfloat16, jnp.bfloat16)
    pipe = _pipeline(b, model)
    params, p_sh = placed(b, abstract_params(b, model))
    rep, bs = parallel.replicated(b.mesh), parallel.batch_sharding(b.mesh)
    vae_params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), init_shapes(WanVAE())
    )
    s = b.config.sample
    fn = functools.partial(pipe.generate, sampler=s.sampler, num_steps=int(s.num_steps),
                           time_grid=s.time_grid)  # fmt: skip
    fn = parallel.with_sharding_rules(fn, b.mesh, b.rules)
    vae_sh = jax.tree.map(lambda _: rep, vae_params)
    in_sh = (p_sh, vae_sh, bs, bs, bs, bs, bs, rep, rep, bs)
    jitted = jax.jit(fn, in_shardings=in_sh, out_shardings=bs)
    ctx = sds(b, (batch, TEXT_LENGTH, b.arch.text_dim), jnp.bfloat16)
    mask = sds(b, (batch, TEXT_LENGTH), jnp.int32)
    noise = sds(b, (batch, *b.latent_shape), jnp.float32)
    key = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), batch))
    keys = sds(b, key.shape, key.dtype)
    scalar = sds(b, (), jnp.float32, rep)
    return jitted, (params, vae_params, ctx, mask, ctx, mask, noise, scalar, scalar, keys)


def lower_sample(b: WanBuilt, batch: int):
    """The sampler program lowered (traced for the mesh), not compiled."""
    jitted, args = _sample_jit(b, batch)
    return jitted.lower(*args)


def _sample_program(b: WanBuilt, batch: int):
    """`WanPipeline.generate` on `batch` videos: (compiled, seconds)."""
    jitted, args = _sample_jit(b, batch)
    return compile_program(jitted, args, "sample", b)


def _guided_call_program(b: WanBuilt, batch: int):
    """One guided WanTransformer call (cond + uncond batched), for the FLOP count."""
    model = b.model(jnp.bfloat16, jnp.bfloat16)
    pipe = _pipeline(b, model)
    params, p_sh = placed(b, abstract_params(b, model))
    rep, bs = parallel.replicated(b.mesh), parallel.batch_sharding(b.mesh)

    def one_step(params, x, ctx, null_ctx, guidance):
        f = pipe.model_fn(params, b.config.sample.time_grid)
        return samplers.guided_output(f, x, jnp.float32(0.5), (ctx, None), (null_ctx, None),
                                      guidance)  # fmt: skip

    fn = parallel.with_sharding_rules(one_step, b.mesh, b.rules)
    jitted = jax.jit(fn, in_shardings=(p_sh, bs, bs, bs, rep), out_shardings=bs)
    ctx = sds(b, (batch, TEXT_LENGTH, b.arch.text_dim), jnp.bfloat16)
    x = sds(b, (batch, *b.latent_shape), jnp.float32)
    args = (params, x, ctx, ctx, sds(b, (), jnp.float32, rep))
    return compile_program(jitted, args, "sample (one guided call)", b)


# ---------------------------------------------------------------------------------------------
# Depth extrapolation and the reports
# ---------------------------------------------------------------------------------------------
MEMORY_FIELDS = ("arguments", "outputs", "alias", "temporaries", "code")


@dataclasses.dataclass
class Figures:
    """What one program's compile(s) say, at the model's depth (measured or extrapolated)."""

    memory: dict
    hlo_flops: float
    optimal: float | None
    seconds: float
    note: str = ""


def figures(b: WanBuilt, compile_fn, full_depth: bool) -> Figures:
    """`compile_fn(built) -> (compiled, seconds)` at the real depth, or at depth 1 and 2 with
    every figure extrapolated linearly to it (module docstring)."""
    if full_depth:
        compiled, seconds = compile_fn(b)
        flops, optimal = cost(compiled)
        return Figures(memory(compiled), flops, optimal, seconds, "")
    got, seconds = [], 0.0
    for depth in (1, 2):
        compiled, secs = compile_fn(b.with_depth(depth))
        got.append((memory(compiled), *cost(compiled)))
        seconds += secs
    (m1, f1, t1), (m2, f2, t2) = got
    n = b.arch.num_layers - 1
    mem = {k: int(m1[k] + n * (m2[k] - m1[k])) for k in MEMORY_FIELDS}
    optimal = t1 + n * (t2 - t1) if t1 is not None and t2 is not None else None
    note = (
        f"; EXTRAPOLATED to {b.arch.num_layers} blocks from compiles with 1 and 2 blocks "
        f"(temporaries {m1['temporaries'] / GiB:.2f} / {m2['temporaries'] / GiB:.2f} GiB)"
    )
    fell = [k for k in MEMORY_FIELDS if m2[k] < m1[k]]
    if fell:  # the compiler scheduled depth 2 differently: a line through them means nothing
        note += f"; {', '.join(fell)} FELL from 1 to 2 blocks: their extrapolation is not usable"
    return Figures(mem, f1 + n * (f2 - f1), optimal, seconds, note)  # fmt: skip


def report(name: str, description: str, fig: Figures, b: WanBuilt, *, extra_flops: float,
           model_flops: float) -> ProgramReport:  # fmt: skip
    """A ProgramReport of `fig` with the analytic splash FLOPs `extra_flops` (per device) added
    to the HLO count and, at peak, to the cost-model time (programs.with_splash_time)."""
    t = b.topology
    optimal = fig.optimal
    if extra_flops:
        description += f"; + {extra_flops:.3g} analytic splash-attention FLOPs per device"
        description += SPLASH_TIME
        optimal = None if optimal is None else optimal + extra_flops / t.peak_per_device
    return ProgramReport(
        name=name,
        description=description + fig.note,
        **fig.memory,
        hlo_flops=fig.hlo_flops + extra_flops,
        model_flops=model_flops,
        optimal_seconds=optimal,
        compile_seconds=fig.seconds,
        hbm_per_device=t.hbm_per_device,
        peak_per_device=t.peak_per_device,
        num_devices=len(t.devices),
    )


def compile_sample(b: WanBuilt, batch: int, full_depth: bool = False) -> ProgramReport:
    """The sampler (`WanPipeline.generate`) on `batch` videos: memory of that program, FLOPs
    and cost-model time `num_steps` x those of one guided call (XLA counts a loop body once;
    the VAE decode is not counted)."""
    if batch % parallel.batch_divisor(b.mesh):
        raise ConfigError(
            f"--sample_batch={batch} does not divide over data x fsdp = "
            f"{parallel.batch_divisor(b.mesh)}; use a multiple of it."
        )
    sample = figures(b, functools.partial(_sample_program, batch=batch), full_depth)
    call = figures(b, functools.partial(_guided_call_program, batch=batch), full_depth)
    s = b.config.sample
    steps, guided = int(s.num_steps), (2 if float(s.guidance) != 1.0 else 1)
    fig = Figures(
        sample.memory,
        steps * call.hlo_flops,
        None if call.optimal is None else steps * call.optimal,
        sample.seconds + call.seconds,
        sample.note,
    )
    d = b.config.data
    desc = (
        f"WanPipeline.generate: {s.sampler} x {steps} steps (guidance {s.guidance}, batch "
        f"{batch} x {guided}) + VAE decode of {d.num_frames}x{d.height}x{d.width}; bfloat16 "
        f"transformer; FLOPs = {steps} x one guided call (decode not counted)"
    )
    f = forward_flops(b.arch, b.tokens, TEXT_LENGTH)
    extra = splash_flops(b, steps * guided * batch)
    return report("sample", desc, fig, b, extra_flops=extra,
                  model_flops=steps * guided * batch * f)  # fmt: skip


def compile_step(b: WanBuilt, batch: int, full_depth: bool = False) -> ProgramReport:
    """One guided WanTransformer call (cond + uncond batched) on `batch` videos: the program
    the sampler's loop runs `num_steps` times (its memory, FLOPs and cost-model time)."""
    parallel.check_batch_size(batch, b.mesh)
    fig = figures(b, functools.partial(_guided_call_program, batch=batch), full_depth)
    s = b.config.sample
    guided = 2 if float(s.guidance) != 1.0 else 1
    desc = (
        f"one guided WanTransformer call (guidance {s.guidance}, batch {batch} x {guided}), "
        f"bfloat16: the sampler's loop body ({s.sampler} x {int(s.num_steps)} of it + decode)"
    )
    f = forward_flops(b.arch, b.tokens, TEXT_LENGTH)
    extra = splash_flops(b, guided * batch)
    return report("step", desc, fig, b, extra_flops=extra, model_flops=guided * batch * f)


def _decode_program(b: WanBuilt, batch: int, frames: int | None = None):
    """Wan's streaming VAE decode (`WanPipeline.decode`) of `batch` latents (`frames` latent
    frames, default all) to uint8 videos: (compiled, seconds)."""
    pipe = _pipeline(b, b.model(jnp.bfloat16, jnp.bfloat16))
    rep, bs = parallel.replicated(b.mesh), parallel.batch_sharding(b.mesh)
    vae_params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), init_shapes(WanVAE())
    )

    def decode(vae_params, z):
        return to_uint8(pipe.decode(vae_params, z))

    fn = parallel.with_sharding_rules(decode, b.mesh, b.rules)
    jitted = jax.jit(fn, in_shardings=(jax.tree.map(lambda _: rep, vae_params), bs),
                     out_shardings=bs)  # fmt: skip
    t, *rest = b.latent_shape
    z = sds(b, (batch, frames or t, *rest), jnp.float32)
    return compile_program(jitted, (vae_params, z), "decode", b)


def compile_decode(b: WanBuilt, batch: int) -> ProgramReport:
    """The sampler's VAE decode of `batch` videos on its own (no transformer: no depth).

    The decode is frame 0, then a lax.scan over the other latent frames (`conv.stream`), whose
    body XLA counts once: the whole program's FLOPs / cost-model time are frame 0 + one chunk.
    A second compile of frame 0 alone gives the chunk, so d(t) = d + (t - 2) (d - d(frame 0));
    memory is the whole program's."""
    parallel.check_batch_size(batch, b.mesh)
    b = dataclasses.replace(b, compiler_options=COUNTING_OPTIONS)
    compiled, seconds = _decode_program(b, batch)
    head, head_seconds = _decode_program(b, batch, frames=1)
    (f, opt), (f0, opt0) = cost(compiled), cost(head)
    n = b.latent_shape[0] - 2
    optimal = None if opt is None or opt0 is None else opt + n * (opt - opt0)
    fig = Figures(memory(compiled), f + n * (f - f0), optimal, seconds + head_seconds, "")
    d = b.config.data
    desc = (
        f"WanPipeline.decode: Wan's streaming VAE decode of {batch} x {d.num_frames}x{d.height}"
        f"x{d.width} (float32, replicated params), to uint8; FLOPs and cost-model time = the "
        f"program's (frame 0 + one chunk: the scan body counted once) + {n} x (it - frame 0 "
        "alone, a second compile)"
    )
    return report("decode", desc, fig, b, extra_flops=0.0, model_flops=0.0)


def num_params(b: WanBuilt) -> int:
    """The transformer's parameter count (abstract, nothing allocated)."""
    module = b.model(jnp.bfloat16, jnp.bfloat16)
    return count_params(parallel.unbox(abstract_params(b, module)))
