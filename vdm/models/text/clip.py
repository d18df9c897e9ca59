"""CLIP text transformer (transformers' `CLIPTextModel` last hidden state, no pooling/projection).

Pre-LN transformer with token + absolute position embeddings, a *causal* attention mask (each token
sees itself and earlier tokens; CLIP was trained that way) combined with the padding mask, MLP
activation from the config ("quick_gelu" for OpenAI CLIP, "gelu" for some others), and a final
LayerNorm. The empty prompt tokenizes to `<|startoftext|> <|endoftext|>`, the null context.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from vdm.models.text import layers
from vdm.models.text import weights as W

Dtype = Any


class CLIPTextEncoder(nn.Module):
    """Token ids + mask -> final-LayerNorm hidden states `[B, L, hidden_size]`."""

    vocab_size: int = 49408
    hidden_size: int = 512
    num_layers: int = 12
    num_heads: int = 8
    mlp_dim: int = 2048
    max_positions: int = 77  # absolute position table; max_length may not exceed it.
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @classmethod
    def from_hf(cls, hf_config, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
        """The module of a `CLIPTextConfig`, or of a full `CLIPConfig`'s `text_config`."""
        c = getattr(hf_config, "text_config", None) or hf_config
        return cls(**layers.encoder_fields(c), dtype=dtype, param_dtype=param_dtype)

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Args: ids int `[B, L]`, mask int/bool `[B, L]` (1 = token). Returns `[B, L, D]`."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d, std, length = self.hidden_size, self.init_std, ids.shape[1]
        x = layers.embed(
            self.vocab_size, d, ("vocab", "embed"), std, name="token_embeddings", **kw
        )(ids)
        x = x + layers.embed(
            self.max_positions, d, (None, "embed"), 0.01, name="position_embeddings", **kw
        )(jnp.arange(length)[None])
        causal = jnp.tril(jnp.ones((length, length), bool))
        bias = layers.attention_bias(causal[None, None] & mask[:, None, None, :].astype(bool))
        args = (self.num_heads, self.mlp_dim, self.activation, self.layer_norm_eps, std)
        for i in range(self.num_layers):
            x = layers.EncoderLayer(*args, pre_norm=True, name=f"layer_{i}", **kw)(x, bias)
        return layers.layer_norm(self.layer_norm_eps, name="final_norm", **kw)(x)


def convert(weights: W.Weights, module: CLIPTextEncoder) -> dict:
    """Our params from a `CLIPTextModel(WithProjection)` or full `CLIPModel` checkpoint."""
    # transformers 4 checkpoints (and full CLIP models) prefix the text tower with "text_model.";
    # transformers 5 saves a CLIPTextModel without the prefix.
    token = W.first_present(
        weights, "text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight"
    )
    p = token[: -len("embeddings.token_embedding.weight")]
    params = {
        "token_embeddings": W.embedding(weights, token),
        "position_embeddings": W.embedding(weights, f"{p}embeddings.position_embedding.weight"),
    }
    for i in range(module.num_layers):
        t = f"{p}encoder.layers.{i}"
        a = f"{t}.self_attn"
        names = {
            "query": f"{a}.q_proj",
            "key": f"{a}.k_proj",
            "value": f"{a}.v_proj",
            "out": f"{a}.out_proj",
        }
        params[f"layer_{i}"] = {
            "attention_norm": W.norm(weights, f"{t}.layer_norm1"),
            "attention": W.attention(weights, names, module.num_heads),
            "mlp_norm": W.norm(weights, f"{t}.layer_norm2"),
            "mlp": {
                "wi": W.linear(weights, f"{t}.mlp.fc1"),
                "wo": W.linear(weights, f"{t}.mlp.fc2"),
            },
        }
    params["final_norm"] = W.norm(weights, f"{p}final_layer_norm")
    return params
