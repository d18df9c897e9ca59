"""Blocks shared by the text encoder families: attention, MLP, norms, activations.

Every param carries logical axis names (`nn.with_logical_partitioning`) so a large encoder
(T5-XXL) can be sharded with the config's `mesh.logical_axis_rules`; by default the frozen encoder
is replicated and the names are unused. Attention projections keep a separate heads axis
(kernels `[embed, heads, kv]` and `[heads, kv, embed]`) so "heads" can be sharded on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from vdm.models.layers import Linear

Dtype = Any

# HF `hidden_act` / `dense_act_fn` name -> jax function, numerically matching transformers'
# ACT2FN: "gelu" is the exact erf form; "gelu_new", "gelu_fast" and "gelu_pytorch_tanh" are the
# tanh approximation (T5 v1.1's gated-gelu uses "gelu_new"); "quick_gelu" is CLIP's
# x * sigmoid(1.702 x).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}

# Added to the scores of masked keys. The float32 minimum (as transformers uses) rather than -inf,
# so a row with every key masked gives uniform weights instead of NaN.
MASK_VALUE = float(np.finfo(np.float32).min)


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function for a Hugging Face activation name.

    Args:
      name: e.g. "gelu", "gelu_new", "quick_gelu", "relu".

    Returns:
      An elementwise jax function.
    """
    if name not in ACTIVATIONS:
        raise ValueError(
            f"Activation {name!r} is not supported by vdm's text encoders; supported: "
            f"{sorted(ACTIVATIONS)}."
        )
    return ACTIVATIONS[name]


def partitioned(init: Callable, axes: tuple[str | None, ...]) -> Callable:
    """`init` whose params are boxed with logical axis names (unboxed by `nn.unbox`)."""
    return nn.with_logical_partitioning(init, axes)


def encoder_fields(hf_config) -> dict[str, Any]:
    """The fields BERT-like encoders (BERT, CLIP text) read from their transformers config."""
    c = hf_config
    return dict(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        mlp_dim=c.intermediate_size,
        max_positions=c.max_position_embeddings,
        activation=c.hidden_act,
        layer_norm_eps=c.layer_norm_eps,
        init_std=c.initializer_range,
    )


def attention_bias(allowed: jax.Array) -> jax.Array:
    """Additive float32 attention bias: 0 where `allowed` is true, MASK_VALUE elsewhere."""
    return jnp.where(allowed, 0.0, MASK_VALUE).astype(jnp.float32)


def padding_bias(mask: jax.Array) -> jax.Array:
    """Bias `[B, 1, 1, L]` that hides padded keys, from a `[B, L]` int/bool token mask."""
    return attention_bias(mask[:, None, None, :].astype(bool))


class Attention(nn.Module):
    """Multi-head self-attention with an additive bias (padding/causal mask, position bias)."""

    num_heads: int  # H.
    head_dim: int  # Dh; H * Dh need not equal the model width (T5 has d_kv).
    use_bias: bool = True  # BERT and CLIP projections have biases, T5's have none.
    # Query scaling; None = 1/sqrt(Dh). T5 uses 1.0 (the scale is folded into its init).
    scale: float | None = None
    init_std: float = 0.02  # only for random init (tests, tiny configs).
    dtype: Dtype = jnp.float32  # compute dtype; scores and softmax are always float32.
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        """Self-attention of x `[B, L, D]` under an additive float32 bias `[B|1, H|1, L, L]`."""

        def proj(name):
            # Our Linear creates the kernel at its 3-axis shape; nn.DenseGeneral reshapes a flat
            # kernel, which breaks the 3-name logical annotation under an active mesh.
            return Linear(
                (self.num_heads, self.head_dim),
                ("embed", "heads", "kv"),
                use_bias=self.use_bias,
                init_std=self.init_std,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=name,
            )(x)

        q, k, v = proj("query"), proj("key"), proj("value")
        scale = self.head_dim**-0.5 if self.scale is None else self.scale
        # Scores in float32 even for bfloat16 activations: the softmax (and T5's unscaled logits)
        # need the range and precision.
        acc = jnp.promote_types(self.dtype, jnp.float32)  # float64 stays float64 (tests).
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=acc)
        weights = jax.nn.softmax(scores * scale + bias, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return Linear(
            (x.shape[-1],),
            ("heads", "kv", "embed"),
            n_in=2,
            use_bias=self.use_bias,
            init_std=self.init_std,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="out",
        )(out)


class Mlp(nn.Module):
    """Feed-forward block: `wo(act(wi(x)))`, or gated `wo(act(wi_0(x)) * wi_1(x))` (T5 v1.1)."""

    mlp_dim: int  # hidden width (HF intermediate_size / d_ff).
    activation: str = "gelu"  # a key of ACTIVATIONS.
    gated: bool = False  # T5 v1.1 / UMT5 "gated-gelu".
    use_bias: bool = True
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = get_activation(self.activation)
        init = nn.initializers.normal(self.init_std)

        def dense(features, axes, name):
            return nn.Dense(
                features,
                use_bias=self.use_bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=partitioned(init, axes),
                bias_init=partitioned(nn.initializers.zeros_init(), axes[-1:]),
                name=name,
            )

        if self.gated:
            h = act(dense(self.mlp_dim, ("embed", "mlp"), "wi_0")(x))
            h = h * dense(self.mlp_dim, ("embed", "mlp"), "wi_1")(x)
        else:
            h = act(dense(self.mlp_dim, ("embed", "mlp"), "wi")(x))
        return dense(x.shape[-1], ("mlp", "embed"), "wo")(h)


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, no mean subtraction, statistics in (at least) float32."""

    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            partitioned(nn.initializers.ones_init(), ("embed",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        acc = jnp.promote_types(x.dtype, jnp.float32)  # at least float32; float64 stays.
        xf = x.astype(acc)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.epsilon)
        return (y * scale.astype(acc)).astype(self.dtype)


class EncoderLayer(nn.Module):
    """One transformer block of BERT (post-LN: `LN(x + attn(x))`, then `LN(x + mlp(x))`) or of
    CLIP's text tower (`pre_norm`: `x + attn(LN(x))`, then `x + mlp(LN(x))`)."""

    num_heads: int
    mlp_dim: int
    activation: str
    layer_norm_eps: float
    init_std: float = 0.02
    pre_norm: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn_norm = layer_norm(self.layer_norm_eps, name="attention_norm", **kw)
        attn = Attention(
            self.num_heads,
            x.shape[-1] // self.num_heads,
            init_std=self.init_std,
            name="attention",
            **kw,
        )
        mlp_norm = layer_norm(self.layer_norm_eps, name="mlp_norm", **kw)
        mlp = Mlp(self.mlp_dim, self.activation, init_std=self.init_std, name="mlp", **kw)
        if self.pre_norm:
            x = x + attn(attn_norm(x), bias)
            return x + mlp(mlp_norm(x))
        x = attn_norm(x + attn(x, bias))
        return mlp_norm(x + mlp(x))


def layer_norm(epsilon: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
    """A LayerNorm with logical axes, statistics in float32 and the two-pass variance.

    `use_fast_variance=False`: E[x^2] - E[x]^2 cancels badly for hidden states with a large mean
    and would cost the 1e-4 parity with PyTorch.
    """
    return nn.LayerNorm(
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        scale_init=partitioned(nn.initializers.ones_init(), ("embed",)),
        bias_init=partitioned(nn.initializers.zeros_init(), ("embed",)),
        name=name,
    )


def embed(
    num: int,
    features: int,
    axes: tuple[str | None, str],
    init_std: float,
    dtype: Dtype,
    param_dtype: Dtype,
    name: str,
) -> nn.Embed:
    """An embedding table `[num, features]` with logical axes (e.g. ("vocab", "embed"))."""
    return nn.Embed(
        num,
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=partitioned(nn.initializers.normal(init_std), axes),
        name=name,
    )
