"""The latent video denoiser: a space-time DiT on VAE latents `[B, t, h, w, c]`.

```
x [B,t,h,w,c] --patchify (pt,ph,pw)--> [B,t',h',w',P] --patch_embed--> tokens [B,t',h',w',D]
t [B] --x1000, sinusoid(256), MLP--> c ;  (+ MLP(masked mean of context) if pooled_text)
context [B,L,Dtxt] --text_embed MLP--> [B,L,D]  (keys/values of every cross-attention)
depth x block_i:
   x += gate * attn(modulate(LN(x)))            spatial (within a frame), or joint over t'h'w'
   x += gate * temporal_attn(modulate(LN(x)))   across frames, per position ("factorized" only)
   x += cross_attn(LN(x), context, mask)        ungated, output zero-initialised (PixArt-alpha)
   x += gate * mlp(modulate(LN(x)))
final: modulate(LN(x)) -> final_linear (zero-init) -> unpatchify -> [B,t,h,w,c]
```
(shift, scale, gate) are per-block zero-initialised projections of SiLU(c) (adaLN-Zero, DiT), so
every gated branch starts as the identity and the output is exactly 0 at init.

`model.attention` (ablation switch) and the parameter trees it gives:
  * "spatial_only": `attn` is spatial; no temporal mixing at all (a per-frame image model).
  * "full": `attn` is one joint attention over all t'*h'*w' tokens.
  * "factorized": `attn` is spatial, and each block also has `temporal_attn` + `temporal_mod`.
  "full" and "spatial_only" have IDENTICAL param trees; "factorized" has exactly that tree plus
  `block_i/temporal_attn` and `block_i/temporal_mod`. Every shared path has the same shape in all
  three modes, so checkpoints can be compared (or a spatial model warm-started) across modes.

`model.pos_encoding`: "rope3d" rotates q/k of self-attention by 3-D RoPE (head dim split over
t, h, w by `layers.axis_split`); "sincos" adds a factorized 3-D sin-cos embedding to the tokens.
Both use integer grid positions, so any frame count / size works after training. Note that with
"rope3d", "spatial_only" has no frame-index information (RoPE's t rotation cancels within a
frame); with "sincos" each frame knows its index.

Pooled text (`model.pooled_text`, default on): the masked mean of the context is embedded and
added to the timestep embedding, so caption content also modulates every block through adaLN
(SD3-style global conditioning), on top of token-level cross-attention. It is cheap (once per
example) and helps a small model pick up global attributes (digit identity, direction) early.

Attention math: `vdm.models.attention.attention`, one function for every attention, with the
kernel chosen by `model.attention_kernel` ("auto": splash on TPU, cuDNN on GPU, XLA on CPU).
Sequence parallelism (`config.mesh.shape["sequence"] > 1`) splits the token frames over devices
and attends across the split by `model.sequence_parallel` (vdm.parallel.sequence).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm.models import denoiser_accounting as accounting
from vdm.models import layers as L
from vdm.models.attention import KERNELS
from vdm.models.patches import patchify, token_grid, unpatchify
from vdm.parallel import sequence

Dtype = Any

ATTENTION_MODES = ("factorized", "full", "spatial_only")
POS_ENCODINGS = ("rope3d", "sincos")
REMAT_MODES = ("none", "block", "dots")
ATTENTION_KERNELS = KERNELS  # model.attention_kernel; see vdm.models.attention.
# Latents in and out are split over the batch only: the token frames are split over `sequence`
# inside the denoiser (sequence parallelism is internal to it; the small latents cost a gather),
# so the samplers' carries and the VAE keep the layout they always had. (A streamed VAE decode
# of frame-split latents is wrong on XLA CPU today: see the issue #24 report.)
LATENTS = ("batch", None, None, None, None)

# Named sizes. `apply_variant(config.model, name)` writes these numbers into a config; the config
# fields stay the truth (so `--config.model.depth=4` works on top of any variant).
# Our block (spatial + temporal + cross attention + MLP, each with per-block adaLN) has ~29 w^2
# params against DiT's 18 w^2, so B/L/XL keep DiT's widths and head counts and take fewer blocks
# to land near DiT's sizes. Params with "factorized" attention and a 384-wide text encoder:
# mu 0.10M, S 2.14M, B 124M, L 463M, XL 663M ("full" / "spatial_only": 15-24% fewer).
VARIANTS: dict[str, dict[str, Any]] = {
    "mu": dict(depth=2, width=32, num_heads=2, mlp_ratio=4.0, qk_norm=True),  # tests only.
    # The 2-core CPU quickstart (5x8x8x8 latents at patch 1x2x2: 80 tokens). No qk-norm: on CPU
    # XLA materialises its broadcast scales (timings: docs/experiments.md), and a float32 model
    # this small is stable without it.
    "S": dict(depth=4, width=128, num_heads=4, mlp_ratio=4.0, qk_norm=False),
    "B": dict(depth=7, width=768, num_heads=12, mlp_ratio=4.0, qk_norm=True),
    "L": dict(depth=15, width=1024, num_heads=16, mlp_ratio=4.0, qk_norm=True),
    "XL": dict(depth=17, width=1152, num_heads=16, mlp_ratio=4.0, qk_norm=True),
}


def apply_variant(model_config, name: str):
    """Writes variant `name` (depth, width, num_heads, mlp_ratio, qk_norm) into a config.

    Args:
      model_config: `config.model` (a ConfigDict, may be locked: only existing fields are set).
      name: a key of `VARIANTS`.

    Returns:
      `model_config`, modified in place.
    """
    if name not in VARIANTS:
        raise ValueError(
            f"Unknown denoiser variant {name!r}; valid: {', '.join(VARIANTS)} "
            "(see vdm.models.denoiser.VARIANTS)."
        )
    for key, value in VARIANTS[name].items():
        model_config[key] = value
    return model_config


def model_fn(model: Denoiser, params: Any) -> Callable:
    """`f(x, t, cond)` for the samplers and the loss: `model` applied with `params`, where
    `cond = (context [B, L, D], mask [B, L])`."""

    def f(x, t, cond):
        return model.apply({"params": params}, x, t, cond[0], cond[1])

    return f


class DiTBlock(nn.Module):
    """One space-time block; see the module docstring for its four residual branches."""

    width: int  # D.
    num_heads: int
    mlp_ratio: float = 4.0
    attention: str = "factorized"  # see ATTENTION_MODES.
    qk_norm: bool = False
    dropout: float = 0.0  # on every residual branch output.
    attention_kernel: str = "auto"  # see vdm.models.attention.
    sequence_parallel: str = "ulysses"  # see Denoiser.sequence_parallel.
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        c_act: jax.Array,
        context: jax.Array,
        context_mask: jax.Array,
        rope: tuple[jax.Array, jax.Array] | None,
        deterministic: bool = True,
    ) -> jax.Array:
        """`x [B,t,h,w,D]`, `c_act = SiLU(c) [B,D]`, `context [B,L,D]`, `context_mask [B,L]`."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn_kw = dict(
            num_heads=self.num_heads,
            head_dim=self.width // self.num_heads,
            qk_norm=self.qk_norm,
            kernel=self.attention_kernel,
            sequence_parallel=self.sequence_parallel,
        )

        def drop(y):
            return nn.Dropout(self.dropout)(y, deterministic=deterministic)

        def adaln_branch(name: str, fn, x):
            shift, scale, g = L.AdaLNModulation(3, self.width, name=f"{name}_mod", **kw)(c_act)
            h = L.layer_norm(f"{name}_norm", affine=False, param_dtype=self.param_dtype)(x)
            h = L.modulate(h, shift, scale).astype(self.dtype)
            return x + L.gate(drop(fn(h)), g)

        self_mode = "full" if self.attention == "full" else "spatial"
        attn = L.Attention(name="attn", **attn_kw, **kw)
        x = adaln_branch("attn", lambda h: attn(h, mode=self_mode, rope=rope), x)
        if self.attention == "factorized":
            tattn = L.Attention(name="temporal_attn", **attn_kw, **kw)
            x = adaln_branch("temporal", lambda h: tattn(h, mode="temporal", rope=rope), x)
        x = L.constrain(x, L.ACT_5D)

        h = L.layer_norm("cross_norm", affine=True, param_dtype=self.param_dtype)(x)
        cross = L.Attention(name="cross_attn", zero_out=True, **attn_kw, **kw)
        y = cross(h.astype(self.dtype), mode="cross", context=context, context_mask=context_mask)
        x = x + drop(y)

        mlp = L.Mlp(int(self.width * self.mlp_ratio), name="mlp", **kw)
        x = adaln_branch("mlp", mlp, x)
        return L.constrain(x, L.ACT_5D)


def _block_class(remat: str):
    """DiTBlock, rematerialised per `model.remat` (argument 6 = `deterministic` is static)."""
    if remat == "block":
        return nn.remat(DiTBlock, static_argnums=(6,))
    if remat == "dots":
        return nn.remat(
            DiTBlock, static_argnums=(6,), policy=jax.checkpoint_policies.checkpoint_dots
        )
    return DiTBlock


class _ScanCell(DiTBlock):
    """A DiTBlock (of this module's fields) as an `nn.scan` cell: (x, inputs) -> (x, None)."""

    remat: str = "none"
    deterministic: bool = True  # a field, not an argument: the scan must not trace it.

    @nn.compact
    def __call__(self, x, c_act, context, context_mask, rope):
        fields = {f.name for f in dataclasses.fields(DiTBlock)} - {"parent", "name"}
        block = _block_class(self.remat)(**{f: getattr(self, f) for f in fields}, name="block")
        return block(x, c_act, context, context_mask, rope, self.deterministic), None


class Denoiser(nn.Module):
    """Space-time DiT denoiser on latents; see the module docstring for the architecture.

    Build it with `Denoiser.from_config(config.model, latent_channels)`.
    """

    latent_channels: int  # c of the VAE latents (input and output channels).
    depth: int = 4  # number of DiTBlocks.
    width: int = 128  # D, the token width.
    num_heads: int = 4  # head dim = width // num_heads.
    mlp_ratio: float = 4.0  # MLP hidden = int(width * mlp_ratio).
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (t, h, w) latent patch per token.
    attention: str = "factorized"  # "factorized" | "full" | "spatial_only" (ATTENTION_MODES).
    pos_encoding: str = "rope3d"  # "rope3d" | "sincos".
    qk_norm: bool = False  # RMSNorm on q, k per head in every self- and cross-attention.
    pooled_text: bool = True  # add an embedding of the masked-mean context to the time embedding.
    dropout: float = 0.0  # residual-branch dropout (needs a "dropout" rng when > 0 in training).
    # Kernel of every attention: "auto" | "xla" | "splash" | "splash_interpret" | "cudnn"
    # (vdm.models.attention). Numerics only; the parameters do not depend on it.
    attention_kernel: str = "auto"
    remat: str = "none"  # "none" | "block" (recompute each block) | "dots" (save matmul outputs).
    # One nn.scan over the blocks instead of `depth` copies: params "blocks/block/..." with a
    # leading [depth] axis (logical name "layers"); compile time and compiler memory stop growing
    # with depth (MaxText's scan_layers). Same math; checkpoints differ in layout from unrolled.
    scan_layers: bool = False
    # Attention across token frames split over a `sequence` mesh axis of size > 1
    # (vdm.parallel.sequence): "ulysses" (all-to-all, num_heads divisible by the axis) or "ring".
    # No parameters; without such an axis the model runs unsplit whatever this says.
    sequence_parallel: str = "ulysses"
    time_scale: float = 1000.0  # t in [0, 1] is scaled by this before the sinusoid (DiT scale).
    freq_dim: int = 256  # width of the sinusoidal timestep features.
    rope_theta: float = 10000.0  # base of RoPE / sin-cos frequencies.
    dtype: Dtype = jnp.float32  # compute dtype (bfloat16 on accelerators); output is float32.
    param_dtype: Dtype = jnp.float32

    @classmethod
    def from_config(cls, model_config: Mapping[str, Any], latent_channels: int) -> Denoiser:
        """The denoiser described by `config.model` for latents with `latent_channels` channels.

        Args:
          model_config: `config.model` (fields documented in configs/base.py).
          latent_channels: channels of the VAE latents (`config.vae.latent_channels`).

        Returns:
          An unbound `Denoiser`; raises ValueError for an invalid combination of fields.
        """
        get = model_config.get
        model = cls(
            latent_channels=int(latent_channels),
            depth=int(model_config["depth"]),
            width=int(model_config["width"]),
            num_heads=int(model_config["num_heads"]),
            mlp_ratio=float(model_config["mlp_ratio"]),
            patch_size=tuple(int(p) for p in model_config["patch_size"]),
            attention=str(model_config["attention"]),
            pos_encoding=str(model_config["pos_encoding"]),
            # Fields added after the first checkpoints: default so old config JSONs still load.
            qk_norm=bool(get("qk_norm", False)),
            pooled_text=bool(get("pooled_text", True)),
            dropout=float(get("dropout", 0.0)),
            remat=str(get("remat", "none")),
            attention_kernel=str(get("attention_kernel", "auto")),
            scan_layers=bool(get("scan_layers", False)),
            sequence_parallel=str(get("sequence_parallel", "ulysses")),
            dtype=jnp.dtype(get("dtype", "float32")),
            param_dtype=jnp.dtype(get("param_dtype", "float32")),
        )
        model.check()
        return model

    # -- validation ------------------------------------------------------------------------------
    def check(self) -> None:
        """Raises ValueError naming the config field if the hyper-parameters are inconsistent."""
        problems = []
        if self.attention not in ATTENTION_MODES:
            problems.append(f"model.attention={self.attention!r} is not one of {ATTENTION_MODES}")
        if self.pos_encoding not in POS_ENCODINGS:
            problems.append(
                f"model.pos_encoding={self.pos_encoding!r} is not one of {POS_ENCODINGS}"
            )
        if self.sequence_parallel not in sequence.METHODS:
            problems.append(
                f"model.sequence_parallel={self.sequence_parallel!r} is not one of "
                f"{sequence.METHODS}"
            )
        if self.remat not in REMAT_MODES:
            problems.append(f"model.remat={self.remat!r} is not one of {REMAT_MODES}")
        if self.attention_kernel not in ATTENTION_KERNELS:
            problems.append(
                f"model.attention_kernel={self.attention_kernel!r} is not one of "
                f"{ATTENTION_KERNELS}"
            )
        if self.depth < 1:
            problems.append(f"model.depth={self.depth} must be >= 1")
        if len(self.patch_size) != 3 or any(int(p) < 1 for p in self.patch_size):
            problems.append(f"model.patch_size={self.patch_size} must be 3 positive ints (t, h, w)")
        if self.width % self.num_heads:
            problems.append(
                f"model.width={self.width} is not divisible by model.num_heads={self.num_heads}"
            )
        if problems:
            raise ValueError("Invalid denoiser config: " + "; ".join(problems) + ".")
        if self.pos_encoding == "rope3d":
            L.check_axis_split(self.width // self.num_heads, "head dim (model.width/num_heads)")
        else:
            L.check_axis_split(self.width, "model.width (for sincos positions)")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        return math.prod(self.patch_size) * self.latent_channels

    def _check_inputs(self, x, t, context, context_mask) -> None:
        if x.ndim != 5 or x.shape[-1] != self.latent_channels:
            raise ValueError(
                f"Denoiser expects latents [B, t, h, w, {self.latent_channels}], got shape "
                f"{tuple(x.shape)}; check vae.latent_channels and that latents are channels-last."
            )
        b = x.shape[0]
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != b):
            raise ValueError(f"Diffusion times must have shape [B={b}] or [], got {t.shape}.")
        if context.ndim != 3 or context.shape[0] != b:
            raise ValueError(f"context must be [B={b}, L, D], got shape {tuple(context.shape)}.")
        if tuple(context_mask.shape) != tuple(context.shape[:2]):
            raise ValueError(
                f"context_mask must be [B, L] = {tuple(context.shape[:2])}, got "
                f"{tuple(context_mask.shape)}."
            )

    # -- forward ---------------------------------------------------------------------------------
    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        context: jax.Array,
        context_mask: jax.Array,
        *,
        deterministic: bool = True,
    ) -> jax.Array:
        """Predicts the diffusion target (velocity / eps / v) for noisy latents.

        Args:
          x: noisy normalized latents `[B, t, h, w, c]`.
          t: diffusion times in [0, 1], `[B]` (or a scalar, broadcast).
          context: text encoder hidden states `[B, L, D_txt]`.
          context_mask: `[B, L]` int/bool, nonzero = a real token (padding is ignored exactly).
          deterministic: disables dropout; training with `dropout > 0` passes False and a
            "dropout" rng.

        Returns:
          `[B, t, h, w, c]` float32, the same shape as `x`.
        """
        self.check()
        t = jnp.asarray(t)
        self._check_inputs(x, t, context, context_mask)
        mask = context_mask.astype(bool)
        h, rope = self._tokens(x)
        c_act, ctx = self._conditioning(t, context, mask, x.shape[0])
        h = self._blocks(h, c_act, ctx, mask, rope, deterministic)
        return self._output(h, c_act)

    # The parts of `__call__`, in order. They run inside it (its compact scope), so the
    # submodules they create are the Denoiser's own, named as written.
    def _tokens(self, x: jax.Array):
        """Patch tokens `[B, t', h', w', D]` (with sin-cos positions) and the RoPE tables."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        grid = token_grid(x.shape[1:4], self.patch_size)
        x = L.constrain(x, LATENTS)
        h = L.dense(self.width, (None, "embed"), name="patch_embed", **kw)(
            patchify(x.astype(self.dtype), self.patch_size)
        )
        if self.pos_encoding == "sincos":
            h = h + L.sincos_3d(grid, self.width, self.rope_theta).astype(self.dtype)
        h = L.constrain(h, L.ACT_5D)
        rope = (
            L.rope_3d(grid, self.head_dim, self.rope_theta)
            if self.pos_encoding == "rope3d"
            else None
        )
        return h, rope

    def _conditioning(self, t, context, mask, b: int):
        """(SiLU(c) [B, D] feeding every adaLN, the embedded context [B, L, D])."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # Conditioning vector c [B, D]: time (and pooled caption).
        t_feat = L.timestep_embedding(jnp.broadcast_to(t, (b,)) * self.time_scale, self.freq_dim)
        c = L.EmbedMLP(self.width, "silu", init_std=0.02, name="time_embed", **kw)(t_feat)
        ctx = L.EmbedMLP(self.width, "gelu", name="text_embed", **kw)(context.astype(self.dtype))
        ctx = L.constrain(ctx, ("batch", "tokens", "embed"))
        if self.pooled_text:
            m = mask.astype(jnp.float32)[..., None]
            # An all-padding caption pools to 0 (not NaN): max(count, 1).
            pooled = (context.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
            c = c + L.EmbedMLP(self.width, "silu", name="pooled_embed", **kw)(
                pooled.astype(self.dtype)
            )
        return nn.silu(c), ctx

    def _blocks(self, h, c_act, ctx, mask, rope, deterministic: bool):
        """The `depth` DiTBlocks: unrolled ("block_i") or one nn.scan ("blocks/block")."""
        block_kw = dict(
            width=self.width,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            attention=self.attention,
            qk_norm=self.qk_norm,
            dropout=self.dropout,
            attention_kernel=self.attention_kernel,
            sequence_parallel=self.sequence_parallel,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        if self.scan_layers:
            stack = nn.scan(
                _ScanCell,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast,) * 4,
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            h, _ = stack(**block_kw, remat=self.remat, deterministic=deterministic, name="blocks")(
                h, c_act, ctx, mask, rope
            )
            return h
        block_cls = _block_class(self.remat)
        for i in range(self.depth):
            h = block_cls(**block_kw, name=f"block_{i}")(h, c_act, ctx, mask, rope, deterministic)
        return h

    def _output(self, h, c_act):
        """Final adaLN + zero-initialised linear, unpatchified to `[B, t, h, w, c]` float32."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shift, scale = L.AdaLNModulation(2, self.width, name="final_mod", **kw)(c_act)
        h = L.layer_norm("final_norm", affine=False, param_dtype=self.param_dtype)(h)
        h = L.modulate(h, shift, scale).astype(self.dtype)
        out = L.dense(self.patch_dim, ("embed", None), name="final_linear", zero_init=True, **kw)(h)
        out = unpatchify(out, self.patch_size, self.latent_channels)
        return L.constrain(out.astype(jnp.float32), LATENTS)

    # -- accounting (analytic; vdm.models.denoiser_accounting) ---------------------------------
    def param_groups(self, context_dim: int) -> dict[str, int]:
        """Analytic parameter count per top-level group (equals `count_params` of `init`)."""
        return accounting.param_groups(self, context_dim)

    def num_params(self, context_dim: int) -> int:
        """Analytic total parameter count for a text context of width `context_dim`."""
        return accounting.num_params(self, context_dim)

    def flops_per_example(
        self, latent_shape: Sequence[int], context_len: int, context_dim: int
    ) -> int:
        """Forward-pass matmul FLOPs of one example (a train step costs about 3x this)."""
        return accounting.flops_per_example(self, latent_shape, context_len, context_dim)

    def attention_flops_per_example(self, latent_shape: Sequence[int], context_len: int) -> int:
        """The attention logits + weighted sums within `flops_per_example` (what a fused
        attention kernel computes; see `denoiser_accounting.attention_flops_per_example`)."""
        return accounting.attention_flops_per_example(self, latent_shape, context_len)

    def summary(self, params: Any = None, **kwargs) -> str:
        """Architecture, parameter counts, tokens and FLOPs in a few lines
        (`denoiser_accounting.summary`: latent_shape=, context_shape=)."""
        return accounting.summary(self, params, **kwargs)


def variant_model(name: str, latent_channels: int = 8, **overrides) -> Denoiser:
    """A `Denoiser` of variant `name` (with dataclass `overrides`), e.g. for tests and benches."""
    if name not in VARIANTS:
        raise ValueError(f"Unknown denoiser variant {name!r}; valid: {', '.join(VARIANTS)}.")
    fields = {f.name for f in dataclasses.fields(Denoiser)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"Unknown Denoiser fields {sorted(unknown)}.")
    model = Denoiser(latent_channels=latent_channels, **{**VARIANTS[name], **overrides})
    model.check()
    return model
