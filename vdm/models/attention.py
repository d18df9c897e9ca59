"""The one attention function of the denoiser, with a choice of kernel (`model.attention_kernel`).

`attention(q, k, v, mask=..., kernel=...)` takes `q [B, Sq, H, D]`, `k, v [B, Sk, H, D]` and an
optional key mask `[B, Sk]` (True = a real token) and returns `[B, Sq, H, D]`. Every attention of
the denoiser (spatial, temporal, joint and cross attention to the text) goes through it, so the
kernel is one config field:

  * "xla": `jax.nn.dot_product_attention` (XLA; materialises the `[B, H, Sq, Sk]` logits; logits
    and softmax in float32 even for bfloat16 inputs). Runs everywhere.
  * "splash": Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`), a
    fused flash-style kernel for TPU: no `Sq x Sk` logits in HBM. q is pre-scaled by
    1/sqrt(D); sequences are padded to the kernel's block multiples and the padding (and the
    masked text keys) is excluded with segment ids. Mosaic kernels are not auto-partitioned, so
    under a mesh the kernel runs inside `jax.shard_map`, batch over the mesh axes of the logical
    name "batch" and heads over those of "heads" (config.mesh.logical_axis_rules).
  * "splash_interpret": the same splash kernel run by the Pallas interpreter (any platform, slow):
    for tests and for debugging splash on a CPU. Equals "xla" to ~1e-6 in float32.
  * "cudnn": cuDNN flash attention through `jax.nn.dot_product_attention(implementation="cudnn")`
    (GPU only; bfloat16 / float16 inputs; head dim a multiple of 8, at most 256 on Hopper).
  * "auto" (default): splash on TPU, cuDNN on GPU for bfloat16 / float16 models (cuDNN has no
    float32 flash kernel, so a float32 model on GPU uses XLA), XLA on CPU. On CPU "auto" is
    exactly the "xla" call, bit for bit.

The platform is `jax.default_backend()`, or the one set by `target_platform(...)` (what an
ahead-of-time compile for a TPU topology from a CPU host uses; vdm.tools.aot).

A query row whose keys are all masked (an all-padding caption) gets a zero output on every kernel.
A kernel that cannot serve a platform, dtype or shape raises `ConfigError` naming the kernel, the
shape and the fix. The function is also the per-shard attention a sequence-parallel wrapper calls.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vdm.errors import ConfigError
from vdm.parallel import mesh as mesh_lib

KERNELS = ("auto", "xla", "splash", "splash_interpret", "cudnn")
PLATFORMS = ("cpu", "gpu", "tpu")
SPLASH_BLOCKS = (512, 256, 128)  # candidate block sizes (the kernel needs multiples of 128).
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
# Head dims the splash kernel compiles for: 4 ... 2048 compile for TPU v5e (forward + backward,
# float32 and bfloat16, on this CPU host via libtpu); 4096 in bfloat16 runs out of VMEM.
SPLASH_MAX_HEAD_DIM = 2048

_platform_override: list[str] = []  # a stack; see `target_platform`.


@contextlib.contextmanager
def target_platform(platform: str) -> Iterator[None]:
    """Within this context "auto" and the kernel checks assume `platform` ("cpu" | "gpu" | "tpu")
    instead of `jax.default_backend()`; for tracing a program compiled for other devices (an AOT
    compile for a TPU topology on a CPU host)."""
    if platform not in PLATFORMS:
        raise ValueError(f"target_platform({platform!r}): valid platforms are {PLATFORMS}.")
    _platform_override.append(platform)
    try:
        yield
    finally:
        _platform_override.pop()


def current_platform() -> str:
    """The platform the attention kernels are chosen for (see `target_platform`)."""
    return _platform_override[-1] if _platform_override else jax.default_backend()


def select_kernel(kernel: str, platform: str, dtype=jnp.float32) -> str:
    """The concrete kernel ("xla" | "splash" | "splash_interpret" | "cudnn") for a configured
    `kernel` on `platform` ("cpu" | "gpu" | "tpu") with inputs of `dtype`.

    "auto" resolves to splash on TPU, cuDNN on GPU for bfloat16/float16 (else XLA), XLA on CPU
    (and on any other platform). An explicit kernel is returned unchanged if the platform can run
    it; otherwise ConfigError names the kernel, the platform and the fix.
    """
    if kernel not in KERNELS:
        raise ConfigError(
            f"model.attention_kernel={kernel!r} is not one of {KERNELS}; use 'auto' to pick the "
            "kernel for the platform."
        )
    is_half = jnp.dtype(dtype) in [jnp.dtype(d) for d in CUDNN_DTYPES]
    if kernel == "auto":
        if platform == "tpu":
            return "splash"
        return "cudnn" if platform == "gpu" and is_half else "xla"
    if kernel == "splash" and platform != "tpu":
        raise ConfigError(
            f"model.attention_kernel='splash' needs a TPU, but the platform is {platform!r}. Use "
            "'auto' or 'xla' here, or 'splash_interpret' to run the splash kernel in the Pallas "
            "interpreter (slow; for tests)."
        )
    if kernel == "cudnn" and platform != "gpu":
        raise ConfigError(
            f"model.attention_kernel='cudnn' needs an NVIDIA GPU (jax[cuda12], the `gpu` extra), "
            f"but the platform is {platform!r}. Use 'auto' (XLA on CPU, splash on TPU) or 'xla'."
        )
    return kernel


def check_shape(kernel: str, q_shape, k_shape, dtype) -> None:
    """Raises ConfigError if the concrete `kernel` cannot serve these shapes and dtype."""
    b, sq, h, d = q_shape
    if len(k_shape) != 4 or k_shape[0] != b or k_shape[2:] != (h, d):
        raise ValueError(f"attention: q {tuple(q_shape)} and k/v {tuple(k_shape)} do not match.")
    where = f"q [B, S, H, D] = {tuple(q_shape)}, k/v = {tuple(k_shape)}, dtype {jnp.dtype(dtype)}"
    if kernel == "cudnn":
        if jnp.dtype(dtype) not in [jnp.dtype(x) for x in CUDNN_DTYPES]:
            raise ConfigError(
                f"model.attention_kernel='cudnn' cannot serve {where}: cuDNN flash attention "
                "takes bfloat16 or float16 only. Set model.dtype='bfloat16', or "
                "model.attention_kernel='auto' (XLA for float32)."
            )
        if d % 8 or d > 256:
            raise ConfigError(
                f"model.attention_kernel='cudnn' cannot serve {where}: the head dim {d} must be a "
                "multiple of 8 and <= 256 (<= 128 before Hopper). Change model.width / "
                "model.num_heads, or use model.attention_kernel='xla'."
            )
    if kernel in ("splash", "splash_interpret") and d > SPLASH_MAX_HEAD_DIM:
        raise ConfigError(
            f"model.attention_kernel={kernel!r} cannot serve {where}: the splash kernel keeps a "
            f"[block, head dim] tile of q, k and v in VMEM, which holds head dims up to "
            f"{SPLASH_MAX_HEAD_DIM}, not {d}. Use more heads (model.num_heads), or "
            "model.attention_kernel='xla'."
        )


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    kernel: str = "auto",
) -> jax.Array:
    """Softmax attention `softmax(q k^T / sqrt(D)) v` per head, with the configured kernel.

    Args:
      q: queries `[B, Sq, H, D]`.
      k: keys `[B, Sk, H, D]`.
      v: values `[B, Sk, H, D]`.
      mask: optional key mask `[B, Sk]` (bool or int, nonzero = attend). Query rows with no
        valid key get a zero output (not an average over padding).
      kernel: a `KERNELS` name (`model.attention_kernel`); see the module docstring.

    Returns:
      `[B, Sq, H, D]` in q's dtype.
    """
    concrete = select_kernel(kernel, current_platform(), q.dtype)
    check_shape(concrete, q.shape, k.shape, q.dtype)
    if mask is not None:
        mask = mask.astype(bool)
    if concrete in ("splash", "splash_interpret"):
        y = _sharded(functools.partial(_splash, interpret=concrete == "splash_interpret"))(
            q, k, v, mask
        )
    else:
        impl = "cudnn" if concrete == "cudnn" else None
        full = None if mask is None else mask[:, None, None, :]  # [B, 1 (heads), 1 (q), Sk]
        y = jax.nn.dot_product_attention(q, k, v, mask=full, implementation=impl)
    if mask is not None:
        # XLA and splash mask with a large negative number, so a row with every key masked
        # would average the padding; zero it instead so padding never leaks.
        any_valid = mask.any(axis=-1)
        y = y * any_valid[:, None, None, None].astype(y.dtype)
    return y


# --------------------------------------------------------------------------------- splash


def splash_blocks(seq: int) -> tuple[int, int]:
    """(block size, padded length) for a sequence of `seq` tokens in the splash kernel.

    The kernel tiles sequences in blocks that are multiples of 128; the largest of
    `SPLASH_BLOCKS` whose padding stays within 1/16 of the sequence (or below 128 tokens) wins,
    else 128. E.g. 80 -> (128, 128), 1024 -> (512, 1024), 3600 -> (128, 3712).
    """
    for block in SPLASH_BLOCKS:
        padded = -(-seq // block) * block
        if padded - seq < max(128, seq // 16):
            return block, padded
    return 128, -(-seq // 128) * 128


def _splash_modules():
    """(splash_attention_kernel, splash_attention_mask), imported on first use: Pallas' TPU
    modules take a fifth of a second to import, which a CPU run (sample.py) never needs."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel,
        splash_attention_mask,
    )

    return splash_attention_kernel, splash_attention_mask


def _splash_kernel(heads: int, sq: int, sk: int, bq: int, bkv: int, interpret: bool):
    """A splash MHA kernel for `[heads, sq, D]` x `[heads, sk, D]` (full mask, padded lengths).

    Built per trace (not cached): the kernel holds its block-mask tables as arrays, which inside
    a trace are that trace's values.
    """
    splash, splash_mask = _splash_modules()
    full = splash_mask.MultiHeadMask([splash_mask.FullMask((sq, sk))] * heads)
    blocks = splash.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )
    # Under shard_map each shard sees its own heads, so no head/sequence sharding in the kernel.
    return splash.make_splash_mha(
        full, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret
    )


def _splash(q, k, v, mask, *, interpret: bool) -> jax.Array:
    """Splash attention for `[B, S, H, D]` inputs (one shard); see `attention`."""
    _, sq, h, d = q.shape
    sk = k.shape[1]
    (bq, sq_pad), (bkv, sk_pad) = splash_blocks(sq), splash_blocks(sk)
    q = q * jnp.asarray(1.0 / math.sqrt(d), q.dtype)  # splash does not scale the logits.

    def heads_major(x, pad):  # [B, S, H, D] -> [B, H, S + pad, D]
        return jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, pad), (0, 0)))

    qh, kh, vh = (
        heads_major(q, sq_pad - sq),
        heads_major(k, sk_pad - sk),
        heads_major(v, sk_pad - sk),
    )
    kernel = _splash_kernel(h, sq_pad, sk_pad, bq, bkv, interpret)
    if mask is None and sq == sq_pad and sk == sk_pad:
        y = jax.vmap(kernel)(qh, kh, vh)
    else:
        # Segment ids: real queries 1, padded queries 0; real keys 1, padding and masked keys 0.
        # Padded query rows attend to padded keys only (never empty: both are padded or there
        # is no query padding) and are sliced off below.
        b = q.shape[0]
        q_ids = jnp.broadcast_to((jnp.arange(sq_pad) < sq).astype(jnp.int32), (b, sq_pad))
        kv_ok = jnp.ones((b, sk), bool) if mask is None else mask
        kv_ids = jnp.pad(kv_ok, ((0, 0), (0, sk_pad - sk))).astype(jnp.int32)
        segment_ids = _splash_modules()[0].SegmentIds(q=q_ids, kv=kv_ids)
        y = jax.vmap(kernel)(qh, kh, vh, segment_ids)
    return y[:, :, :sq].transpose(0, 2, 1, 3)


def _mesh_spec(mesh, names, shape) -> P:
    """PartitionSpec of `shape` from logical `names` by the active rules, over the mesh's
    non-manual axes, replicating a dim that does not divide over its axes."""
    rules = nn.get_logical_axis_rules()
    spec = mesh_lib.logical_to_mesh_spec(names, rules) if rules else P()
    manual = set(mesh.manual_axes)
    entries = []
    for size, entry in zip(shape, list(spec) + [None] * (len(shape) - len(spec)), strict=True):
        axes = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
        axes = tuple(a for a in axes if a in mesh.shape and a not in manual)
        n = math.prod(mesh.shape[a] for a in axes)
        entries.append(axes if axes and size % n == 0 and n > 1 else None)
    return P(*entries)


def _sharded(fn):
    """`fn(q, k, v, mask)` run per shard under the active mesh (`jax.shard_map`): batch over
    the logical "batch" axes, heads over "heads" (a dim that does not divide is replicated); a
    plain call without a mesh of more than one device. Inside an enclosing shard_map (e.g. a
    sequence-parallel wrapper) only the mesh axes it left automatic are split here.

    Without an active mesh (`jax.set_mesh`, or vdm.parallel.with_sharding_rules) a jit over
    several devices cannot place the kernel: JAX then asks for a shard_map."""

    def run(q, k, v, mask):
        mesh = jax.sharding.get_abstract_mesh()
        manual = set(() if mesh.empty else mesh.manual_axes)
        free = frozenset(() if mesh.empty else (a for a in mesh.axis_names if a not in manual))
        if not free or math.prod(mesh.shape[a] for a in free) == 1:
            return fn(q, k, v, mask)
        # Even when nothing divides (specs replicated), a multi-device program must call the
        # Mosaic kernel inside shard_map.
        q_spec = _mesh_spec(mesh, ("batch", None, "heads", None), q.shape)
        mask_spec = P(q_spec[0], None)
        args = (q, k, v) if mask is None else (q, k, v, mask)
        specs = (q_spec,) * 3 + (() if mask is None else (mask_spec,))
        inner = (lambda q, k, v: fn(q, k, v, None)) if mask is None else fn
        return jax.shard_map(
            inner, mesh=mesh, in_specs=specs, out_specs=q_spec, axis_names=free, check_vma=False
        )(*args)

    return run


__all__ = [
    "KERNELS",
    "attention",
    "check_shape",
    "current_platform",
    "select_kernel",
    "splash_blocks",
    "target_platform",
]
