"""Transformer building blocks for the video denoiser: attention, MLP, adaLN, RoPE, embeddings.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) from the shared
vocabulary (`embed, heads, kv, mlp`, None = never sharded); `config.mesh.logical_axis_rules`
maps them to mesh axes. Activations are annotated with `nn.with_logical_constraint`, which is a
no-op unless a mesh and rules are active, so the same code runs on one CPU and on a pod.

Token layout inside the denoiser is 5-D, `[B, t, h, w, D]` (frames, height, width on separate
axes), so spatial, temporal and joint attention are only different regroupings of the same
tensor, and 3-D RoPE is applied once per attention in that layout before regrouping.

The attention math itself (and the choice of kernel: XLA, Pallas splash, cuDNN) lives in
`vdm.models.attention`; `Attention` here makes q, k, v and regroups tokens for it. With a
`sequence` mesh axis of size > 1 the token frames are split over it and attention runs through
`vdm.parallel.sequence.over_frames` (Ulysses or ring attention across the split, by
`model.sequence_parallel`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vdm.models.attention import attention, current_platform
from vdm.parallel import sequence

Dtype = Any
Names = tuple[str | None, ...]

# Logical names of a token activation in the 5-D layout; see the module docstring.
# "token_frames" is split over the `sequence` mesh axis (sequence parallelism).
ACT_5D: Names = ("batch", "token_frames", "height", "width", "embed")

# Initialisers (DiT/PixArt): Xavier-uniform for projections, N(0, 0.02) for the timestep MLP,
# zeros for biases and for every adaLN-Zero / output layer.
xavier = nn.initializers.xavier_uniform
zeros = nn.initializers.zeros_init()
ones = nn.initializers.ones_init()


def constrain(x: jax.Array, names: Names) -> jax.Array:
    """`nn.with_logical_constraint` (a no-op without an active mesh and axis rules)."""
    return nn.with_logical_constraint(x, names)


class Linear(nn.Module):
    """`y = x . kernel + bias`, contracting the last `n_in` axes of `x`, with logical axis names.

    Like `nn.DenseGeneral`, but the kernel is created at its true (multi-axis) shape. DenseGeneral
    initialises a flattened 2-D kernel and reshapes it, which breaks a 3-name logical annotation
    when a mesh is active (flax then constrains the 2-D intermediate with a 3-axis spec).
    Params: `kernel` (input axes..., output axes...) named `names`, `bias` (output axes...).
    LoRA training (`vdm.models.lora.attach`) adds `lora_a` [in..., r] and `lora_b` [r, out...]
    beside the kernel: y = x W + (x A) B, so no kernel-sized merge or gradient is ever formed.
    """

    features: tuple[int, ...]  # output feature axes.
    names: Names  # logical names of every kernel axis (inputs, then outputs); None = replicated.
    n_in: int = 1  # trailing input axes contracted.
    use_bias: bool = True
    zero_init: bool = False  # zero kernel (adaLN-Zero modulations, output projections).
    init_std: float | None = None  # N(0, std) kernel; None = Xavier-uniform (fans over the axes).
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_out = len(self.features)
        shape = tuple(x.shape[x.ndim - self.n_in :]) + tuple(self.features)
        if len(self.names) != len(shape):
            raise ValueError(f"{self.name}: {len(self.names)} axis names for kernel {shape}.")
        if self.zero_init:
            init = zeros
        elif self.init_std is not None:
            init = nn.initializers.normal(self.init_std)
        else:
            init = xavier(
                in_axis=tuple(range(self.n_in)),
                out_axis=tuple(range(self.n_in, self.n_in + n_out)),
            )
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(init, self.names), shape, self.param_dtype
        )
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        y = _contract(x, kernel, self.n_in)
        if self.has_variable("params", "lora_a"):
            a, b = (self.get_variable("params", n).astype(self.dtype) for n in ("lora_a", "lora_b"))
            y = y + _contract(_contract(x, a, self.n_in), b, 1)
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(zeros, self.names[self.n_in :]),
                tuple(self.features),
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y


def _contract(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
    """`x` contracted with `kernel` over `x`'s last `n_in` axes (the kernel's first `n_in`).

    On CPU every contraction is one 2-D matmul, `x [rows, prod(in)] @ kernel [prod(in),
    prod(out)]` (leading axes flattened into rows; bitcasts). Same sums; what changes is the
    backward: a dot_general's weight gradient makes XLA:CPU copy the whole activation transposed
    (2560 x 1024 float32: 16 ms on one core, as long as the matmul); the 2-D `x^T dy` goes to
    YNNPACK with the transpose folded in. Other platforms keep the multi-axis dot_general
    (their sharded layouts are planned on it; bench/README.md).
    """
    in_shape, out_shape = kernel.shape[:n_in], kernel.shape[n_in:]
    lead = x.shape[: x.ndim - n_in]
    if current_platform() == "cpu" and (n_in > 1 or len(out_shape) > 1 or len(lead) > 1):
        k2 = kernel.reshape(math.prod(in_shape), math.prod(out_shape))
        y = jnp.dot(x.reshape(math.prod(lead), math.prod(in_shape)), k2)
        return y.reshape(*lead, *out_shape)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    return jax.lax.dot_general(x, kernel, (contract, ((), ())))


def dense(
    features: int | Sequence[int],
    names: Names,
    *,
    name: str,
    dtype: Dtype,
    param_dtype: Dtype,
    n_in: int = 1,
    init_std: float | None = None,
    zero_init: bool = False,
    use_bias: bool = True,
) -> Linear:
    """A `Linear` layer (see there) from an int or tuple of output features.

    Args:
      features: output feature size(s).
      names: logical names of every kernel axis; the bias gets the output-axis names.
      name: the module's (stable) name.
      dtype: compute dtype.
      param_dtype: parameter storage dtype.
      n_in: trailing input axes contracted.
      init_std: N(0, std) kernel instead of Xavier-uniform.
      zero_init: zero kernel and bias.
      use_bias: add a bias.

    Returns:
      The (unbound) module.
    """
    features_t = (features,) if isinstance(features, int) else tuple(features)
    return Linear(
        features=features_t, names=tuple(names), n_in=n_in, use_bias=use_bias,
        zero_init=zero_init, init_std=init_std, dtype=dtype, param_dtype=param_dtype, name=name,
    )  # fmt: skip


def layer_norm(name: str, *, affine: bool, param_dtype: Dtype) -> nn.LayerNorm:
    """LayerNorm over the last axis, computed in float32 for stability under bfloat16.

    adaLN-modulated norms have no affine parameters (the modulation replaces them, as in DiT).
    """
    return nn.LayerNorm(
        epsilon=1e-6,
        use_scale=affine,
        use_bias=affine,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(zeros, ("embed",)),
        name=name,
    )


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN: `x * (1 + scale) + shift`, with per-example `shift, scale [B, D]` broadcast."""
    expand = (slice(None),) + (None,) * (x.ndim - 2) + (slice(None),)
    return x * (1 + scale[expand]) + shift[expand]


def gate(x: jax.Array, g: jax.Array) -> jax.Array:
    """Per-example, per-channel residual gate `g [B, D]` (zero at init: adaLN-Zero)."""
    expand = (slice(None),) + (None,) * (x.ndim - 2) + (slice(None),)
    return x * g[expand]


# ---------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------
def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (already scaled) times `t [B]` -> `[B, dim]` float32 (DiT).

    Frequencies are geometric from 1 to 1/max_period; cos and sin halves are concatenated.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:  # Odd dims get a zero column so the output is exactly `dim` wide.
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class EmbedMLP(nn.Module):
    """Two-layer MLP `in -> width -> width` (SiLU or GELU) used for time, pooled-text and caption
    embeddings. Kernels: `fc1 (in, width)` named (None, "mlp"), `fc2 (width, width)` ("mlp",
    "embed")."""

    width: int  # Output (and hidden) size: the model width.
    activation: str = "silu"  # "silu" (DiT timestep MLP) | "gelu" (PixArt caption projection).
    init_std: float | None = None  # N(0, std) kernels (DiT: 0.02 for the timestep MLP).
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, init_std=self.init_std)
        x = dense(self.width, (None, "mlp"), name="fc1", **kw)(x)
        x = nn.silu(x) if self.activation == "silu" else nn.gelu(x, approximate=True)
        return dense(self.width, ("mlp", "embed"), name="fc2", **kw)(x)


def axis_split(dim: int) -> tuple[int, int, int]:
    """How `dim` channels are split over the (t, h, w) axes for RoPE / sin-cos encodings.

    h and w get `2 * (dim // 6)` each (even, so they can be rotated in pairs) and t gets the
    rest (also even when `dim` is even): 16 -> (8, 4, 4), 32 -> (12, 10, 10), 64 -> (24, 20, 20),
    72 -> (24, 24, 24). The same rule as Wan 2.1's 3-D RoPE.
    """
    hw = 2 * (dim // 6)
    return dim - 2 * hw, hw, hw


def check_axis_split(dim: int, what: str) -> None:
    """Raises ValueError unless `dim` can be split over (t, h, w) in even non-empty parts."""
    if dim % 2 or dim < 6:
        raise ValueError(
            f"{what}={dim} cannot be split into even, non-empty parts for the t, h and w axes; "
            "it must be even and >= 6 (e.g. 16, 32, 64, 72). Change model.width/model.num_heads "
            "or model.pos_encoding."
        )


def _axis_angles(positions: jax.Array, dim: int, theta: float) -> jax.Array:
    """`positions [n] -> [n, dim // 2]` angles `pos * theta^(-2i/dim)`."""
    inv_freq = theta ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    return positions.astype(jnp.float32)[:, None] * inv_freq[None]


def grid_angles(grid: tuple[int, int, int], dim: int, theta: float = 10000.0) -> jax.Array:
    """Per-token angles `[t, h, w, dim // 2]` for a (t, h, w) token grid (integer positions).

    Positions are plain indices, so any frame count or size works (no table to outgrow).
    """
    dims = axis_split(dim)
    parts = []
    for ax, (n, d) in enumerate(zip(grid, dims, strict=True)):
        a = _axis_angles(jnp.arange(n), d, theta)  # [n, d/2]
        shape = [1, 1, 1, d // 2]
        shape[ax] = n
        parts.append(jnp.broadcast_to(a.reshape(shape), (*grid, d // 2)))
    return jnp.concatenate(parts, axis=-1)


def rope_3d(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0):
    """cos/sin tables `[t, h, w, 1, head_dim]` of 3-D rotary embeddings for a token grid.

    The head dim is split over (t, h, w) by `axis_split`. Because RoPE is relative, in spatial
    attention (one frame) the t rotation cancels, and in temporal attention the h, w rotations
    cancel: the same tables serve every attention mode. The tables are laid out for `apply_rope`
    (rotate-half convention): cos is `[cos, cos]`, sin carries the signs, `[-sin, sin]`.
    """
    angles = grid_angles(grid, head_dim, theta)[..., None, :]  # broadcast over heads
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    return jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([-sin, sin], axis=-1)


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotates `x [B, t, h, w, H, K]` by `rope` tables from `rope_3d` (in float32).

    `(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)` written as `x * cos + swap(x) * sin` with a
    reshape + flip for the half swap: slicing and concatenating halves is much slower on CPU
    (slices turn into zero pads in the backward pass; docs/experiments.md); this form costs about
    as much as adding sin-cos embeddings.
    """
    cos, sin = rope
    shape = x.shape
    xf = x.astype(jnp.float32)
    swapped = jnp.flip(xf.reshape(*shape[:-1], 2, shape[-1] // 2), axis=-2).reshape(shape)
    return (xf * cos + swapped * sin).astype(x.dtype)


def sincos_3d(grid: tuple[int, int, int], dim: int, theta: float = 10000.0) -> jax.Array:
    """Factorized absolute sin-cos position embedding `[t, h, w, dim]` (float32).

    Each of t, h, w gets its share of channels (`axis_split`) holding `[sin, cos]` of its index,
    so the embedding extends to any frame count or size.
    """
    dims = axis_split(dim)
    parts = []
    for ax, (n, d) in enumerate(zip(grid, dims, strict=True)):
        a = _axis_angles(jnp.arange(n), d, theta)
        e = jnp.concatenate([jnp.sin(a), jnp.cos(a)], axis=-1)  # [n, d]
        shape = [1, 1, 1, d]
        shape[ax] = n
        parts.append(jnp.broadcast_to(e.reshape(shape), (*grid, d)))
    return jnp.concatenate(parts, axis=-1)


# ---------------------------------------------------------------------------------------------
# Attention and MLP
# ---------------------------------------------------------------------------------------------
def _regroup(x: jax.Array, mode: str) -> tuple[jax.Array, tuple[int, ...]]:
    """`[B, t, h, w, H, K]` -> `[batch', seq, H, K]` for an attention `mode`; also the 6-D shape
    needed to undo it (`_ungroup`)."""
    b, t, h, w, nh, k = x.shape
    if mode == "spatial":  # within a frame: sequences of h*w tokens, one per (example, frame)
        return x.reshape(b * t, h * w, nh, k), (b, t, h, w, nh, k)
    if mode == "temporal":  # across frames at each spatial position: sequences of t tokens
        y = x.transpose(0, 2, 3, 1, 4, 5)
        return y.reshape(b * h * w, t, nh, k), (b, h, w, t, nh, k)
    if mode == "full":  # all t*h*w tokens of an example
        return x.reshape(b, t * h * w, nh, k), (b, t, h, w, nh, k)
    raise ValueError(f"attention mode {mode!r} is not one of 'spatial', 'temporal', 'full'")


def _ungroup(y: jax.Array, mode: str, shape6: tuple[int, ...]) -> jax.Array:
    y = y.reshape(shape6)
    if mode == "temporal":
        y = y.transpose(0, 3, 1, 2, 4, 5)
    return y


def _attend_6d(q, k, v, mask, attend, *, mode: str) -> jax.Array:
    """Attention of `q [B, t, h, w, H, K]` in `mode` through `attend(q, k, v, key_mask)`:
    self-attention regroups q, k, v (6-D) by mode; "cross" attends to `k, v [B, L, H, K]`."""
    if mode != "cross":
        (qg, shape6), (kg, _), (vg, _) = (_regroup(a, mode) for a in (q, k, v))
        return _ungroup(attend(qg, kg, vg, None), mode, shape6)
    b, t, h, w, nh, kd = q.shape
    return attend(q.reshape(b, t * h * w, nh, kd), k, v, mask).reshape(q.shape)


class Attention(nn.Module):
    """Multi-head attention on 5-D tokens: self-attention (spatial / temporal / full) or
    cross-attention to a context sequence.

    Params: `query`, `key`, `value` kernels `(in, heads, kv)` named ("embed", "heads", "kv"),
    `out` kernel `(heads, kv, embed)`; with `qk_norm`, RMSNorm scales `q_norm`, `k_norm` `(kv,)`.
    The parameter shapes do not depend on the mode, so a spatial, temporal or joint attention
    module are interchangeable in a param tree.
    """

    num_heads: int  # H.
    head_dim: int  # K; width = H * K.
    qk_norm: bool = True  # RMSNorm on q and k per head (stabilises attention logits).
    zero_out: bool = False  # zero-init the output projection (PixArt does this for cross-attn).
    kernel: str = "auto"  # model.attention_kernel (vdm.models.attention.KERNELS).
    sequence_parallel: str = "ulysses"  # across a `sequence` mesh axis: "ulysses" | "ring".
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _proj(self, name: str, x: jax.Array) -> jax.Array:
        return dense(
            (self.num_heads, self.head_dim),
            ("embed", "heads", "kv"),
            name=name,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )(x)

    def _norm(self, name: str, x: jax.Array) -> jax.Array:
        if not self.qk_norm:
            return x
        norm = nn.RMSNorm(
            epsilon=1e-6,
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            scale_init=nn.with_logical_partitioning(ones, ("kv",)),
            name=name,
        )
        return norm(x).astype(x.dtype)

    def _out(self, y: jax.Array) -> jax.Array:
        width = self.num_heads * self.head_dim
        return dense(
            width,
            ("heads", "kv", "embed"),
            n_in=2,
            name="out",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            zero_init=self.zero_out,
        )(y)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        mode: str,
        rope: tuple[jax.Array, jax.Array] | None = None,
        context: jax.Array | None = None,
        context_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Attends from tokens `x [B, t, h, w, D]`.

        Args:
          x: queries (and keys/values for self-attention), 5-D token layout.
          mode: "spatial" | "temporal" | "full" (self-attention) or "cross" (to `context`).
          rope: cos/sin tables from `rope_3d` (self-attention only), or None.
          context: `[B, L, D]` keys/values for mode "cross".
          context_mask: `[B, L]` bool, True = a real token. Rows with no real token get a zero
            attention output (not a uniform average over padding).

        Returns:
          `[B, t, h, w, D]`.
        """
        head_names = ("batch", "token_frames", "height", "width", "heads", "kv")
        q = constrain(self._norm("q_norm", self._proj("query", x)), head_names)
        mask = None
        if mode == "cross":
            if context is None:
                raise ValueError("Attention(mode='cross') needs `context`.")
            k = self._norm("k_norm", self._proj("key", context))
            v = self._proj("value", context)
            if context_mask is not None:
                mask = context_mask.astype(bool)  # [B, L]; rows with no real key give zeros
        else:
            k = self._norm("k_norm", self._proj("key", x))
            v = self._proj("value", x)
            if rope is not None:
                q, k = apply_rope(q, rope), apply_rope(k, rope)
            k = constrain(k, head_names)
            v = constrain(v, head_names)
        y = sequence.over_frames(
            functools.partial(_attend_6d, mode=mode),
            *(q, k, v, mask),
            method=self.sequence_parallel,
            spans_frames=mode in ("temporal", "full"),
            attend=lambda q, k, v, mask: attention(q, k, v, mask=mask, kernel=self.kernel),
            platform=current_platform(),
        )
        y = constrain(y, head_names)
        return constrain(self._out(y), ACT_5D)


class Mlp(nn.Module):
    """Transformer MLP `D -> hidden -> D` with tanh-GELU (DiT). Kernels `fc1 (embed, mlp)`,
    `fc2 (mlp, embed)`."""

    hidden: int  # Hidden size (width * mlp_ratio).
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = dense(self.hidden, ("embed", "mlp"), name="fc1", **kw)(x)
        y = constrain(nn.gelu(y, approximate=True), ACT_5D[:-1] + ("mlp",))
        return constrain(dense(width, ("mlp", "embed"), name="fc2", **kw)(y), ACT_5D)


class AdaLNModulation(nn.Module):
    """`n` per-example vectors `[B, D]` (shift, scale, gate, ...) from the conditioning `c`.

    A zero-initialised Dense on SiLU(c) (adaLN-Zero): at init every shift/scale/gate is 0, so each
    gated residual branch is the identity. Kernel `(embed, n * width)` named ("embed", "mlp").
    """

    n: int  # number of modulation vectors.
    width: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, c_act: jax.Array) -> tuple[jax.Array, ...]:
        """`c_act` is SiLU(c), computed once per forward and shared by all modulations."""
        y = dense(
            self.n * self.width,
            ("embed", "mlp"),
            name="linear",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            zero_init=True,
        )(c_act)
        return tuple(jnp.split(y, self.n, axis=-1))


def count_params(params: Any) -> int:
    """Number of scalars in a param tree (arrays, `nn.Partitioned` boxes or ShapeDtypeStructs)."""
    return int(sum(math.prod(np.shape(x)) for x in jax.tree.leaves(nn.meta.unbox(params))))
