"""Wan 2.1's DiT (`WanTransformer3DModel` of diffusers 0.42.1), text-to-video, as a linen module.

```
x [B,t,h,w,c] --patchify (pt,ph,pw)--> [B,t',h',w',pt*ph*pw*c] --patch_embedding--> [B,t',h',w',D]
timestep [B] --sinusoid(freq_dim, cos|sin)--> time_embedder (Linear, SiLU, Linear) --> temb [B, D]
             --SiLU, time_proj--> [B, 6, D]  (shift, scale, gate of self-attn; of the FFN)
context [B,L,text_dim] --text_embedder (Linear, GELU-tanh, Linear)--> [B, L, D]
num_layers x block_i (mod = scale_shift_table [6, D] + time_proj):
   x += gate1 * attn1(LN(x) * (1 + scale1) + shift1)   joint self-attention over t'*h'*w' tokens,
                                                      RMSNorm on q, k (across heads), 3-D RoPE
   x += attn2(norm2(x), context)                      cross-attention (norm2 affine LN, or none)
   x += gate2 * ffn(LN(x) * (1 + scale2) + shift2)     Linear, GELU-tanh, Linear
final: (shift, scale) = scale_shift_table [2, D] + temb; LN, modulate, proj_out, unpatchify
```

Layout: latents are vdm's channels-last `[B, t, h, w, c]` (diffusers takes `[B, c, t, h, w]`),
tokens stay 5-D `[B, t', h', w', D]` as in vdm's Denoiser, so the same logical axis names, mesh
rules and sequence parallelism (`vdm.parallel.sequence.over_frames`) apply. `timestep` is in the
scheduler's units (0 ... 1000, what WanPipeline passes), not vdm's t in [0, 1].

Mirrored from diffusers (each checked against its source, not the Wan paper):
  * Text positions are not masked: WanPipeline pads the T5 output with zeros to 512 tokens and
    passes no attention mask, so padded positions (the text MLP of a zero vector) are attended.
  * `norm_q` / `norm_k` are RMSNorms over all heads (`H * K` channels), eps = config.eps, in
    every attention (diffusers builds them whatever `qk_norm` says).
  * RoPE pairs are interleaved (channels 2i, 2i+1), not rotate-half; the head dim is split as
    t = K - 4 (K // 6), h = w = 2 (K // 6), each axis with frequencies theta^(-2i / d_axis),
    theta = 10000, computed in float64 and rounded to float32 (as diffusers' buffers).
  * Float32 islands: the time embedder runs in float32 and its output is cast to the compute
    dtype; modulations (`scale_shift_table + time_proj`) and every LayerNorm are float32; the
    gated residual sums are formed in float32 and cast back. `time_embedder`, the
    `scale_shift_table`s and `norm2` keep float32 params whatever `param_dtype` is (diffusers'
    `_keep_in_fp32_modules`).
  * The final modulation adds `temb` (before SiLU), not `time_proj`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vdm.errors import ConfigError
from vdm.models import layers as L
from vdm.models.attention import KERNELS, attention
from vdm.models.patches import patchify, token_grid, unpatchify
from vdm.models.wan.transformer_config import WanTransformerConfig
from vdm.parallel import sequence

Dtype = Any
REMAT_MODES = ("none", "block", "dots")
LATENTS = ("batch", None, None, None, None)
CONTEXT = ("batch", "tokens", "embed")
HEADS_6D = ("batch", "token_frames", "height", "width", "heads", "kv")


# ---------------------------------------------------------------------------------------------
# 3-D RoPE, interleaved pairs (diffusers' WanRotaryPosEmbed + apply_rotary_emb)
# ---------------------------------------------------------------------------------------------
def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channels of the head dim for (t, h, w): h = w = 2 (K // 6), t the rest (diffusers)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_tables(grid: tuple[int, int, int], head_dim: int, theta: float, max_len: int):
    """cos / signed-sin tables `[t', h', w', 1, K]` (float32) for interleaved RoPE on a grid.

    Per axis (float64, as diffusers' buffers): angles `pos * theta^(-2i / d)`, each repeated
    for the pair (2i, 2i+1); sin carries the pair's signs `(-sin, +sin)` so that
    `apply_rope(x) = x * cos + swap_pairs(x) * sin`. Axis tables are concatenated t, h, w.
    """
    too_long = [n for n in grid if n > max_len]
    if too_long:
        raise ValueError(
            f"Token grid (t', h', w') = {grid} exceeds the model's rope_max_seq_len={max_len} "
            "positions per axis (diffusers tabulates that many); use fewer frames or a smaller "
            "size."
        )
    cos_parts, sin_parts = [], []
    for ax, (n, d) in enumerate(zip(grid, rope_split(head_dim), strict=True)):
        freqs = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
        angles = np.outer(np.arange(n, dtype=np.float64), freqs)  # [n, d/2]
        cos = np.repeat(np.cos(angles), 2, axis=1)
        sin = np.stack([-np.sin(angles), np.sin(angles)], axis=-1).reshape(n, d)
        shape = [1, 1, 1, 1, d]
        shape[ax] = n
        for parts, table in ((cos_parts, cos), (sin_parts, sin)):
            table = jnp.asarray(table.astype(np.float32)).reshape(shape)
            parts.append(jnp.broadcast_to(table, (*grid, 1, d)))
    return jnp.concatenate(cos_parts, axis=-1), jnp.concatenate(sin_parts, axis=-1)


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotates pairs (2i, 2i+1) of `x [B, t', h', w', H, K]` in float32 (cast back to x's
    dtype, as diffusers' `out.type_as(hidden_states)`).

    The pair swap is a reshape + flip, the form `layers.apply_rope` uses for rotate-half.
    """
    cos, sin = rope
    shape = x.shape
    xf = x.astype(jnp.float32)
    swapped = jnp.flip(xf.reshape(*shape[:-1], shape[-1] // 2, 2), axis=-1).reshape(shape)
    return (xf * cos + swapped * sin).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------
def _attend_tokens(q, k, v, mask, attend):
    """`attend` on `q [B, t, h, w, H, K]` as one sequence of t*h*w tokens; k, v are 6-D like q
    (self-attention) or `[B, L, H, K]` (text)."""
    b, t, h, w, nh, kd = q.shape
    flat = lambda a: a.reshape(b, -1, nh, kd) if a.ndim == 6 else a  # noqa: E731
    return attend(flat(q), flat(k), flat(v), mask).reshape(q.shape)


class HeadsRMSNorm(nn.Module):
    """RMSNorm over all heads' channels of `[..., H, K]` (diffusers' RMSNorm of `H * K`), in
    float32. Param `scale [H, K]` named ("heads", "kv")."""

    eps: float
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = x.shape[-2:]
        init = nn.with_logical_partitioning(L.ones, ("heads", "kv"))
        scale = self.param("scale", init, shape, self.param_dtype)
        xf = x.astype(jnp.float32)
        ms = jnp.mean(jnp.square(xf), axis=(-2, -1), keepdims=True)
        return (xf * jax.lax.rsqrt(ms + self.eps) * scale.astype(jnp.float32)).astype(x.dtype)


class WanAttention(nn.Module):
    """WanAttention (text-to-video): q, k, v, out projections with biases and RMSNorm on q and
    k across heads; self-attention with RoPE over all tokens, or cross-attention to `context`.

    Params: `to_q`, `to_k`, `to_v` kernels `[D, H, K]` ("embed", "heads", "kv"), `to_out`
    `[H, K, D]`, `norm_q`, `norm_k` scales `[H, K]`.
    """

    num_heads: int
    head_dim: int
    eps: float = 1e-6
    kernel: str = "auto"  # vdm.models.attention.KERNELS.
    sequence_parallel: str = "ulysses"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _dense(self, name, features, names, n_in=1):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        return L.dense(features, names, name=name, n_in=n_in, **kw)

    @nn.compact
    def __call__(self, x, *, rope=None, context=None) -> jax.Array:
        """`x [B, t', h', w', D]`; `rope` tables (self-attention) or `context [B, L, D]`."""
        hk = (self.num_heads, self.head_dim)
        proj = ("embed", "heads", "kv")
        norm = dict(eps=self.eps, param_dtype=self.param_dtype)
        kv_in = x if context is None else context
        q = HeadsRMSNorm(name="norm_q", **norm)(self._dense("to_q", hk, proj)(x))
        k = HeadsRMSNorm(name="norm_k", **norm)(self._dense("to_k", hk, proj)(kv_in))
        v = self._dense("to_v", hk, proj)(kv_in)
        if context is None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
            k, v = L.constrain(k, HEADS_6D), L.constrain(v, HEADS_6D)
        q = L.constrain(q, HEADS_6D)
        y = sequence.over_frames(
            _attend_tokens,
            *(q, k, v, None),
            method=self.sequence_parallel,
            spans_frames=context is None,
            attend=lambda q, k, v, mask: attention(q, k, v, mask=mask, kernel=self.kernel),
        )
        y = L.constrain(y, HEADS_6D)
        return L.constrain(
            self._dense("to_out", x.shape[-1], ("heads", "kv", "embed"), 2)(y), L.ACT_5D
        )


def _fp32_layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """diffusers' FP32LayerNorm without affine params, on float32 `x`."""
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


class WanBlock(nn.Module):
    """WanTransformerBlock (see the module docstring). Params: `attn1`, `attn2`, `norm2`
    (if cross_attn_norm; float32), `ffn_proj` `[D, ffn_dim]` ("embed", "mlp"), `ffn_out`,
    `scale_shift_table [6, D]` (float32; diffusers' `[1, 6, D]`)."""

    config: WanTransformerConfig
    attention_kernel: str = "auto"
    sequence_parallel: str = "ulysses"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, time_proj, context, rope) -> jax.Array:
        """`x [B,t',h',w',D]` (dtype), `time_proj [B, 6, D]`, `context [B, L, D]`, RoPE tables."""
        cfg, dt = self.config, self.dtype
        table = self.param(
            "scale_shift_table",
            nn.with_logical_partitioning(nn.initializers.normal(cfg.dim**-0.5), (None, "embed")),
            (6, cfg.dim),
            jnp.float32,
        )
        mod = table[None] + time_proj.astype(jnp.float32)  # [B, 6, D] float32
        expand = lambda a: a[:, None, None, None, :]  # noqa: E731
        shift1, scale1, gate1, shift2, scale2, gate2 = (expand(mod[:, i]) for i in range(6))
        attn_kw = dict(
            num_heads=cfg.num_heads,
            head_dim=cfg.head_dim,
            eps=cfg.eps,
            kernel=self.attention_kernel,
            sequence_parallel=self.sequence_parallel,
            dtype=dt,
            param_dtype=self.param_dtype,
        )
        h = (_fp32_layer_norm(x.astype(jnp.float32), cfg.eps) * (1 + scale1) + shift1).astype(dt)
        y = WanAttention(name="attn1", **attn_kw)(h, rope=rope)
        x = L.constrain((x.astype(jnp.float32) + y * gate1).astype(dt), L.ACT_5D)

        h = x
        if cfg.cross_attn_norm:
            h = nn.LayerNorm(
                epsilon=cfg.eps,
                use_fast_variance=False,  # two-pass variance, as torch
                dtype=jnp.float32,
                param_dtype=jnp.float32,
                scale_init=nn.with_logical_partitioning(L.ones, ("embed",)),
                bias_init=nn.with_logical_partitioning(L.zeros, ("embed",)),
                name="norm2",
            )(x.astype(jnp.float32)).astype(dt)
        x = x + WanAttention(name="attn2", **attn_kw)(h, context=context)

        h = (_fp32_layer_norm(x.astype(jnp.float32), cfg.eps) * (1 + scale2) + shift2).astype(dt)
        kw = dict(dtype=dt, param_dtype=self.param_dtype)
        y = L.dense(cfg.ffn_dim, ("embed", "mlp"), name="ffn_proj", **kw)(h)
        y = L.constrain(nn.gelu(y, approximate=True), L.ACT_5D[:-1] + ("mlp",))
        y = L.dense(cfg.dim, ("mlp", "embed"), name="ffn_out", **kw)(y)
        x = (x.astype(jnp.float32) + y.astype(jnp.float32) * gate2).astype(dt)
        return L.constrain(x, L.ACT_5D)


def _block_class(remat: str):
    if remat == "block":
        return nn.remat(WanBlock)
    if remat == "dots":
        return nn.remat(WanBlock, policy=jax.checkpoint_policies.checkpoint_dots)
    return WanBlock


class WanTransformer(nn.Module):
    """WanTransformer3DModel (text-to-video) on channels-last latents; see the module docstring.

    Load published weights with `vdm.models.wan.transformer_weights.load_transformer`.
    """

    config: WanTransformerConfig
    # Kernel of every attention (vdm.models.attention.KERNELS); numerics only.
    attention_kernel: str = "auto"
    # Joint self-attention across a `sequence` mesh axis > 1: "ulysses" | "ring".
    sequence_parallel: str = "ulysses"
    remat: str = "none"  # "none" | "block" (recompute each block) | "dots" (save matmul outputs).
    dtype: Dtype = jnp.float32  # compute dtype; the output is float32.
    param_dtype: Dtype = jnp.float32  # except the float32 islands (module docstring).

    def check(self) -> None:
        """Raises ConfigError for an invalid option (the config checks itself)."""
        self.config.check()
        if self.remat not in REMAT_MODES:
            raise ConfigError(f"remat={self.remat!r} is not one of {REMAT_MODES}.")
        if self.attention_kernel not in KERNELS:
            raise ConfigError(
                f"attention_kernel={self.attention_kernel!r} is not one of {KERNELS}."
            )
        if self.sequence_parallel not in sequence.METHODS:
            raise ConfigError(
                f"sequence_parallel={self.sequence_parallel!r} is not one of {sequence.METHODS}."
            )

    def _check_inputs(self, x, timestep, context) -> None:
        cfg = self.config
        if x.ndim != 5 or x.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"WanTransformer expects latents [B, t, h, w, {cfg.in_channels}] (channels last), "
                f"got shape {tuple(x.shape)}."
            )
        b = x.shape[0]
        if timestep.ndim > 1 or (timestep.ndim == 1 and timestep.shape[0] != b):
            raise ValueError(f"timestep must have shape [B={b}] or [], got {timestep.shape}.")
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.text_dim:
            raise ValueError(
                f"context must be [B={b}, L, text_dim={cfg.text_dim}], got {tuple(context.shape)}."
            )

    @nn.compact
    def __call__(self, x: jax.Array, timestep: jax.Array, context: jax.Array) -> jax.Array:
        """The model output (Wan: flow velocity) for latents at `timestep`.

        Args:
          x: latents `[B, t, h, w, in_channels]`; t, h, w divisible by the patch size.
          timestep: `[B]` or `[]`, in the scheduler's units (0 ... 1000).
          context: T5 hidden states `[B, L, text_dim]`, padded with zeros (no mask; WanPipeline).

        Returns:
          `[B, t, h, w, out_channels]` float32.
        """
        self.check()
        cfg, dt = self.config, self.dtype
        timestep = jnp.asarray(timestep)
        self._check_inputs(x, timestep, context)
        b = x.shape[0]
        kw = dict(dtype=dt, param_dtype=self.param_dtype)
        grid = token_grid(x.shape[1:4], cfg.patch_size)
        rope = rope_tables(grid, cfg.head_dim, cfg.rope_theta, cfg.rope_max_seq_len)
        x = L.constrain(x, LATENTS)
        h = L.dense(cfg.dim, (None, "embed"), name="patch_embedding", **kw)(
            patchify(x.astype(dt), cfg.patch_size)
        )
        h = L.constrain(h, L.ACT_5D)
        temb, time_proj = self._time(jnp.broadcast_to(timestep, (b,)))
        ctx = self._text(context)
        block_cls = _block_class(self.remat)
        for i in range(cfg.num_layers):
            h = block_cls(
                cfg,
                attention_kernel=self.attention_kernel,
                sequence_parallel=self.sequence_parallel,
                name=f"blocks_{i}",
                **kw,
            )(h, time_proj, ctx, rope)
        return self._output(h, temb)

    def _time(self, timestep: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(temb [B, D] in dtype, time_proj [B, 6, D] in dtype); see the module docstring."""
        cfg = self.config
        # diffusers' Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0): [cos, sin] of
        # t * exp(-ln(10000) i / half), exactly `layers.timestep_embedding`.
        feat = L.timestep_embedding(timestep.astype(jnp.float32), cfg.freq_dim)
        f32 = dict(dtype=jnp.float32, param_dtype=jnp.float32)  # _keep_in_fp32_modules
        temb = L.dense(cfg.dim, (None, "mlp"), name="time_embedder_1", **f32)(feat)
        temb = L.dense(cfg.dim, ("mlp", "embed"), name="time_embedder_2", **f32)(nn.silu(temb))
        temb = temb.astype(self.dtype)  # diffusers: `.type_as(encoder_hidden_states)`
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        proj = L.dense(6 * cfg.dim, ("embed", "mlp"), name="time_proj", **kw)(nn.silu(temb))
        return temb, proj.reshape(timestep.shape[0], 6, cfg.dim)

    def _text(self, context: jax.Array) -> jax.Array:
        """PixArtAlphaTextProjection: Linear, GELU-tanh, Linear -> `[B, L, D]`."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ctx = L.constrain(context.astype(self.dtype), CONTEXT[:2] + (None,))
        ctx = L.dense(self.config.dim, (None, "mlp"), name="text_embedder_1", **kw)(ctx)
        ctx = nn.gelu(ctx, approximate=True)
        ctx = L.dense(self.config.dim, ("mlp", "embed"), name="text_embedder_2", **kw)(ctx)
        return L.constrain(ctx, CONTEXT)

    def _output(self, h: jax.Array, temb: jax.Array) -> jax.Array:
        """norm_out + (scale_shift_table + temb) modulation + proj_out, unpatchified."""
        cfg = self.config
        table = self.param(
            "scale_shift_table",
            nn.with_logical_partitioning(nn.initializers.normal(cfg.dim**-0.5), (None, "embed")),
            (2, cfg.dim),
            jnp.float32,
        )
        mod = table[None] + temb.astype(jnp.float32)[:, None]  # [B, 2, D]
        shift, scale = mod[:, 0, None, None, None], mod[:, 1, None, None, None]
        h = _fp32_layer_norm(h.astype(jnp.float32), cfg.eps) * (1 + scale) + shift
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        out_dim = math.prod(cfg.patch_size) * cfg.out_channels
        out = L.dense(out_dim, ("embed", None), name="proj_out", **kw)(h.astype(self.dtype))
        out = unpatchify(out, cfg.patch_size, cfg.out_channels)
        return L.constrain(out.astype(jnp.float32), LATENTS)
