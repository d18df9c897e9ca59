"""T5 encoder: T5 v1.0 / v1.1, mT5 and UMT5 (the text encoders of large video models).

Pre-RMSNorm transformer without biases or absolute positions: attention logits get a learned
*relative position bias* (log-spaced distance buckets, one value per bucket and head), and are
not scaled by 1/sqrt(Dh) (the scale is folded into T5's init). T5 / mT5 learn that bias in the
first layer and reuse it in every layer; UMT5 learns one per layer (`per_layer_bias`). v1.1, mT5
and UMT5 use a gated-GELU MLP (`wo(gelu_tanh(wi_0 x) * wi_1 x)`); v1.0 uses `wo(relu(wi x))`.
A final RMSNorm ends the stack. The empty prompt tokenizes to `</s>`, the null context.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from vdm.models.text import layers
from vdm.models.text import weights as W

Dtype = Any


def relative_position_buckets(
    length: int, num_buckets: int = 32, max_distance: int = 128
) -> np.ndarray:
    """Bucket `[L, L]` of key position minus query position, bidirectional (as T5's encoder).

    Half the buckets are for keys after the query; within a half, distances below
    `num_buckets // 4` get a bucket each and the rest are log-spaced up to `max_distance`, beyond
    which all share the last bucket. Computed with numpy in float32 at trace time (L is static)
    with transformers' exact operation order, so the truncation to int lands in the same bucket.

    Args:
      length: sequence length L.
      num_buckets: config.relative_attention_num_buckets.
      max_distance: config.relative_attention_max_distance.

    Returns:
      int32 `[L, L]` bucket indices in `[0, num_buckets)`.
    """
    pos = np.arange(length)
    rel = pos[None, :] - pos[:, None]  # memory_position - query_position
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    rel = np.abs(rel)
    max_exact = half // 2
    with np.errstate(divide="ignore"):  # log(0) on the diagonal; those use the exact branch.
        large = (
            np.log(rel.astype(np.float32) / max_exact)
            / np.float32(math.log(max_distance / max_exact))
            * np.float32(half - max_exact)
        )
    large = max_exact + np.where(rel < max_exact, 0, large).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (buckets + np.where(rel < max_exact, rel, large)).astype(np.int32)


class RelativePositionBias(nn.Module):
    """Learned bias `[1, H, L, L]` added to the attention logits, one scalar per bucket and head."""

    num_heads: int
    num_buckets: int = 32
    max_distance: int = 128
    init_std: float = 0.02
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, length: int) -> jax.Array:
        table = self.param(
            "embedding",
            layers.partitioned(nn.initializers.normal(self.init_std), (None, "heads")),
            (self.num_buckets, self.num_heads),
            self.param_dtype,
        )
        buckets = relative_position_buckets(length, self.num_buckets, self.max_distance)
        return jnp.transpose(table[buckets], (2, 0, 1))[None].astype(jnp.float32)


class T5Layer(nn.Module):
    """One pre-RMSNorm block; computes the position bias if it owns one, else reuses `pos_bias`."""

    num_heads: int
    head_dim: int
    mlp_dim: int
    activation: str = "gelu_new"
    gated: bool = True
    has_position_bias: bool = False
    num_buckets: int = 32
    max_distance: int = 128
    layer_norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask_bias, pos_bias):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.has_position_bias:
            pos_bias = RelativePositionBias(
                self.num_heads,
                self.num_buckets,
                self.max_distance,
                self.init_std,
                self.param_dtype,
                name="relative_attention_bias",
            )(x.shape[1])
        h = layers.RMSNorm(self.layer_norm_eps, name="attention_norm", **kw)(x)
        x = x + layers.Attention(
            self.num_heads,
            self.head_dim,
            use_bias=False,
            scale=1.0,
            init_std=self.init_std,
            name="attention",
            **kw,
        )(h, pos_bias + mask_bias)
        h = layers.RMSNorm(self.layer_norm_eps, name="mlp_norm", **kw)(x)
        x = x + layers.Mlp(
            self.mlp_dim,
            self.activation,
            self.gated,
            use_bias=False,
            init_std=self.init_std,
            name="mlp",
            **kw,
        )(h)
        return x, pos_bias


class T5Encoder(nn.Module):
    """Token ids + mask -> final-RMSNorm hidden states `[B, L, hidden_size]`."""

    vocab_size: int = 32128
    hidden_size: int = 512  # d_model.
    num_layers: int = 6
    num_heads: int = 8
    head_dim: int = 64  # d_kv.
    mlp_dim: int = 2048  # d_ff.
    activation: str = "gelu_new"  # dense_act_fn.
    gated: bool = True  # is_gated_act (v1.1, mT5, UMT5); False for v1.0.
    per_layer_bias: bool = False  # UMT5: every layer has its own relative position bias.
    num_buckets: int = 32
    max_distance: int = 128
    layer_norm_eps: float = 1e-6
    init_std: float = 0.02
    max_positions: int | None = None  # relative positions: no length limit.
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @classmethod
    def from_hf(
        cls,
        hf_config,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        per_layer_bias: bool = False,
    ):
        """The module described by a transformers `T5Config` / `MT5Config` / `UMT5Config`."""
        return cls(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.d_model,
            num_layers=hf_config.num_layers,
            num_heads=hf_config.num_heads,
            head_dim=hf_config.d_kv,
            mlp_dim=hf_config.d_ff,
            activation=hf_config.dense_act_fn,
            gated=hf_config.is_gated_act,
            per_layer_bias=per_layer_bias,
            num_buckets=hf_config.relative_attention_num_buckets,
            max_distance=hf_config.relative_attention_max_distance,
            layer_norm_eps=hf_config.layer_norm_epsilon,
            dtype=dtype,
            param_dtype=param_dtype,
        )

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Args: ids int `[B, L]`, mask int/bool `[B, L]` (1 = token). Returns `[B, L, D]`."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = layers.embed(
            self.vocab_size,
            self.hidden_size,
            ("vocab", "embed"),
            1.0,
            name="token_embeddings",
            **kw,
        )(ids)
        mask_bias = layers.padding_bias(mask)
        pos_bias = None
        for i in range(self.num_layers):
            x, pos_bias = T5Layer(
                self.num_heads,
                self.head_dim,
                self.mlp_dim,
                self.activation,
                self.gated,
                has_position_bias=self.per_layer_bias or i == 0,
                num_buckets=self.num_buckets,
                max_distance=self.max_distance,
                layer_norm_eps=self.layer_norm_eps,
                init_std=self.init_std,
                name=f"layer_{i}",
                **kw,
            )(x, mask_bias, pos_bias)
        return layers.RMSNorm(self.layer_norm_eps, name="final_norm", **kw)(x)


def convert(weights: W.Weights, module: T5Encoder) -> dict:
    """Our params from a `T5EncoderModel` / `UMT5EncoderModel` / full T5 checkpoint."""
    # The input embedding is tied to `shared.weight`; save_pretrained keeps only one of the names.
    emb = W.first_present(weights, "encoder.embed_tokens.weight", "shared.weight")
    params = {"token_embeddings": W.embedding(weights, emb)}
    for i in range(module.num_layers):
        t = f"encoder.block.{i}.layer"
        a = f"{t}.0.SelfAttention"
        names = {"query": f"{a}.q", "key": f"{a}.k", "value": f"{a}.v", "out": f"{a}.o"}
        ff = f"{t}.1.DenseReluDense"
        if module.gated:
            mlp = {
                "wi_0": W.linear(weights, f"{ff}.wi_0", bias=False),
                "wi_1": W.linear(weights, f"{ff}.wi_1", bias=False),
            }
        else:
            mlp = {"wi": W.linear(weights, f"{ff}.wi", bias=False)}
        mlp["wo"] = W.linear(weights, f"{ff}.wo", bias=False)
        layer = {
            "attention_norm": W.norm(weights, f"{t}.0.layer_norm", bias=False),
            "attention": W.attention(weights, names, module.num_heads, bias=False),
            "mlp_norm": W.norm(weights, f"{t}.1.layer_norm", bias=False),
            "mlp": mlp,
        }
        if module.per_layer_bias or i == 0:
            layer["relative_attention_bias"] = W.embedding(
                weights, f"{a}.relative_attention_bias.weight"
            )
        params[f"layer_{i}"] = layer
    params["final_norm"] = W.norm(weights, "encoder.final_layer_norm", bias=False)
    return params
