"""The denoiser's size on paper: parameters per group, matmul FLOPs per example, a summary.

Analytic, from the hyper-parameters alone (no init, no compile), so they work for models too big
to build here: `vdm.tools.aot` and bench/denoiser.py take the FLOPs for model-FLOPs utilisation,
and tests check the parameter count against `count_params` of a real init. The `Denoiser` methods
of the same names call these.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from vdm.models.layers import count_params
from vdm.models.patches import token_grid


def param_groups(model, context_dim: int) -> dict[str, int]:
    """Analytic parameter count per top-level group (must equal `count_params` of `init`).

    Args:
      model: a `vdm.models.denoiser.Denoiser`.
      context_dim: width of the text encoder's hidden states (384 for MiniLM).

    Returns:
      `{"patch_embed": n, "time_embed": n, ..., "block": n per block, "final": n}`.
    """
    w, m, p, d = model.width, model.mlp_hidden, model.patch_dim, context_dim
    attn = 4 * (w * w + w) + (2 * model.head_dim if model.qk_norm else 0)
    mod3 = w * 3 * w + 3 * w
    block = (attn + mod3) + (w * m + m + m * w + w + mod3) + (attn + 2 * w)
    if model.attention == "factorized":
        block += attn + mod3
    groups = {
        "patch_embed": p * w + w,
        "time_embed": model.freq_dim * w + w + w * w + w,
        "text_embed": d * w + w + w * w + w,
    }
    if model.pooled_text:
        groups["pooled_embed"] = d * w + w + w * w + w
    groups["block"] = block
    groups["final"] = w * 2 * w + 2 * w + w * p + p
    return groups


def num_params(model, context_dim: int) -> int:
    """Analytic total parameter count (see `param_groups`)."""
    g = param_groups(model, context_dim)
    return sum(g.values()) + (model.depth - 1) * g["block"]


def flops_per_example(
    model, latent_shape: Sequence[int], context_len: int, context_dim: int
) -> int:
    """Forward-pass matmul FLOPs (2 per multiply-add) for one example.

    Counts every Dense and the attention scores / weighted sums; ignores elementwise ops,
    norms and softmax (a few % at these widths). A training step costs about 3x this
    (forward + backward), more with remat.

    Args:
      model: a `vdm.models.denoiser.Denoiser`.
      latent_shape: `(t, h, w[, c])` of one example's latents.
      context_len: L, text tokens per caption.
      context_dim: width of the text encoder's hidden states.

    Returns:
      FLOPs as an int.
    """
    gt, gh, gw = token_grid(latent_shape, model.patch_size)
    n, s, ln = gt * gh * gw, gh * gw, context_len
    w, m, p = model.width, model.mlp_hidden, model.patch_dim
    proj = 2 * n * 4 * w * w  # q, k, v, out of one self-attention over n tokens
    self_ctx = n if model.attention == "full" else s  # keys each query sees
    block = proj + 4 * n * self_ctx * w
    if model.attention == "factorized":
        block += proj + 4 * n * gt * w
    block += 2 * n * 2 * w * w + 2 * ln * 2 * w * w + 4 * n * ln * w  # cross-attention
    block += 2 * n * 2 * w * m  # MLP
    block += 2 * w * 3 * w * (3 if model.attention == "factorized" else 2)  # adaLN
    total = 2 * n * p * w  # patch embed
    total += 2 * (model.freq_dim * w + w * w)  # time MLP
    total += 2 * ln * (context_dim * w + w * w)  # caption MLP
    if model.pooled_text:
        total += 2 * (context_dim * w + w * w)
    total += model.depth * block
    total += 2 * w * 2 * w + 2 * n * w * p  # final adaLN + linear
    return int(total)


def attention_flops_per_example(model, latent_shape: Sequence[int], context_len: int) -> int:
    """The attention part of `flops_per_example`: logits and weighted sums (`4 * Sq * Sk * D`
    per attention) of every self- and cross-attention of one example's forward pass.

    What a fused kernel (Pallas splash) computes; XLA's cost analysis cannot see inside a Mosaic
    kernel, so vdm.tools.aot adds these FLOPs to the compiler's count.
    """
    gt, gh, gw = token_grid(latent_shape, model.patch_size)
    n, s, w = gt * gh * gw, gh * gw, model.width
    block = 4 * n * (n if model.attention == "full" else s) * w + 4 * n * context_len * w
    if model.attention == "factorized":
        block += 4 * n * gt * w
    return int(model.depth * block)


def summary(
    model,
    params: Any = None,
    *,
    latent_shape: Sequence[int] | None = None,
    context_shape: tuple[int, int] = (32, 384),
) -> str:
    """A few human-readable lines: architecture, parameter counts, tokens and FLOPs.

    Args:
      model: a `vdm.models.denoiser.Denoiser`.
      params: the model's params (counted exactly); None = the analytic count.
      latent_shape: `(t, h, w[, c])` of one example, for token and FLOP counts.
      context_shape: `(L, D_txt)` of the text context.

    Returns:
      A multi-line string.
    """
    ln, d = context_shape
    groups = param_groups(model, d)
    total = count_params(params) if params is not None else num_params(model, d)
    arch = (
        f"Denoiser: {model.attention} attention, {model.pos_encoding}, depth {model.depth} x "
        f"width {model.width} ({model.num_heads} heads x {model.head_dim}), mlp {model.mlp_hidden}"
        f", patch {'x'.join(map(str, model.patch_size))}, qk_norm={model.qk_norm}, "
        f"pooled_text={model.pooled_text}, remat={model.remat}, dtype="
        f"{jnp.dtype(model.dtype).name}/{jnp.dtype(model.param_dtype).name}"
    )
    parts = [f"{k} {_human(v)}" for k, v in groups.items() if k != "block"]
    parts.insert(3 + model.pooled_text, f"blocks {model.depth} x {_human(groups['block'])}")
    lines = [arch, f"  params: {_human(total)} ({total:,}) = " + " + ".join(parts)]
    if latent_shape is not None:
        gt, gh, gw = token_grid(latent_shape, model.patch_size)
        f = flops_per_example(model, latent_shape, ln, d)
        lines.append(
            f"  latents {'x'.join(map(str, latent_shape))} -> {gt}x{gh}x{gw} = {gt * gh * gw}"
            f" tokens; forward {f / 1e9:.3f} GFLOP/example (train step ~{3 * f / 1e9:.2f})"
        )
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
