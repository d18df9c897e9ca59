"""BERT encoder (transformers' `BertModel` without the pooler), e.g. all-MiniLM-L6-v2.

Post-LN transformer: `x = LN(x + attn(x))`, `x = LN(x + mlp(x))`, after word + absolute position
+ token-type embeddings and a LayerNorm. The output is the last hidden state `[B, L, D]` (no
pooling: the denoiser cross-attends to every token). Token types are all 0 (one segment).
The empty prompt tokenizes to `[CLS] [SEP]`, whose hidden states are the null (unconditional)
context for classifier-free guidance.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from vdm.models.text import layers
from vdm.models.text import weights as W

Dtype = Any


class BertEncoder(nn.Module):
    """Token ids + mask -> last hidden state `[B, L, hidden_size]`."""

    vocab_size: int = 30522
    hidden_size: int = 384  # D, the context width the denoiser sees.
    num_layers: int = 6
    num_heads: int = 12
    mlp_dim: int = 1536
    max_positions: int = 512  # absolute position table; max_length may not exceed it.
    type_vocab_size: int = 2
    activation: str = "gelu"  # exact erf GELU, as BERT's "gelu".
    layer_norm_eps: float = 1e-12
    init_std: float = 0.02  # random init only (tests, tiny configs); loading overwrites it.
    dtype: Dtype = jnp.float32  # compute dtype.
    param_dtype: Dtype = jnp.float32

    @classmethod
    def from_hf(cls, hf_config, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
        """The module described by a transformers `BertConfig`."""
        pos_type = getattr(hf_config, "position_embedding_type", "absolute")
        if pos_type != "absolute":
            raise ValueError(
                f"BERT position_embedding_type={pos_type!r} is not supported (only 'absolute')."
            )
        return cls(
            **layers.encoder_fields(hf_config),
            type_vocab_size=hf_config.type_vocab_size,
            dtype=dtype,
            param_dtype=param_dtype,
        )

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Args: ids int `[B, L]`, mask int/bool `[B, L]` (1 = token). Returns `[B, L, D]`."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d, std = self.hidden_size, self.init_std
        x = layers.embed(self.vocab_size, d, ("vocab", "embed"), std, name="word_embeddings", **kw)(
            ids
        )
        positions = jnp.arange(ids.shape[1])[None]
        x = x + layers.embed(
            self.max_positions, d, (None, "embed"), std, name="position_embeddings", **kw
        )(positions)
        x = x + layers.embed(
            self.type_vocab_size, d, (None, "embed"), std, name="token_type_embeddings", **kw
        )(jnp.zeros_like(positions))
        x = layers.layer_norm(self.layer_norm_eps, name="embeddings_norm", **kw)(x)
        bias = layers.padding_bias(mask)
        args = (self.num_heads, self.mlp_dim, self.activation, self.layer_norm_eps, std)
        for i in range(self.num_layers):
            x = layers.EncoderLayer(*args, pre_norm=False, name=f"layer_{i}", **kw)(x, bias)
        return x


def convert(weights: W.Weights, module: BertEncoder) -> dict:
    """Our params from a `BertModel` checkpoint (or a `Bert*` task model's `bert.` prefix)."""
    word = W.first_present(
        weights, "embeddings.word_embeddings.weight", "bert.embeddings.word_embeddings.weight"
    )
    p = word[: -len("embeddings.word_embeddings.weight")]  # "" or "bert."
    params = {
        "word_embeddings": W.embedding(weights, f"{p}embeddings.word_embeddings.weight"),
        "position_embeddings": W.embedding(weights, f"{p}embeddings.position_embeddings.weight"),
        "token_type_embeddings": W.embedding(
            weights, f"{p}embeddings.token_type_embeddings.weight"
        ),
        "embeddings_norm": W.norm(weights, f"{p}embeddings.LayerNorm"),
    }
    for i in range(module.num_layers):
        t = f"{p}encoder.layer.{i}"
        names = {
            "query": f"{t}.attention.self.query",
            "key": f"{t}.attention.self.key",
            "value": f"{t}.attention.self.value",
            "out": f"{t}.attention.output.dense",
        }
        params[f"layer_{i}"] = {
            "attention": W.attention(weights, names, module.num_heads),
            "attention_norm": W.norm(weights, f"{t}.attention.output.LayerNorm"),
            "mlp": {
                "wi": W.linear(weights, f"{t}.intermediate.dense"),
                "wo": W.linear(weights, f"{t}.output.dense"),
            },
            "mlp_norm": W.norm(weights, f"{t}.output.LayerNorm"),
        }
    return params
