"""The text–video alignment model: a video tower on VAE latents and a text head on a frozen
sentence embedding, trained contrastively (LiT: Zhai et al. 2022; CLIP's symmetric InfoNCE).

    latents z [B, t, h, w, c] (normalized, as the denoiser sees them)
        -> patches (1, 2, 2) -> Linear -> + sin-cos 3-D positions
        -> `depth` x (full space-time self-attention, MLP) -> LayerNorm -> mean over tokens
        -> Linear -> v [B, E], unit norm
    caption hidden states ctx [B, L, D] + mask (the frozen text encoder; never trained)
        -> masked mean over tokens (the sentence embedding of sentence-transformers) -> unit norm
        -> MLP -> s [B, E], unit norm
    score = cos(v, s) in [-1, 1]; training logits = exp(logit_scale) * v . s^T

The video tower works on latents, not pixels, so the sampler can steer by the score's gradient
with respect to its predicted clean latents without running the decoder (alignment guidance);
pixel videos are scored by encoding them with the VAE first. The text encoder is frozen (LiT's
"locked text"): only the head learns, so the score can only use distinctions the frozen sentence
embedding already makes. Parameters carry the shared logical axis names (`embed`, `heads`, `kv`,
`mlp`), so `config.mesh.logical_axis_rules` shards them like the denoiser's.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm.models import layers

Dtype = Any

# Named sizes: "mu" for tests; "S" is the bundled model's (about 0.3 M parameters).
VARIANTS = {
    "mu": dict(width=32, depth=1, num_heads=2, embed_dim=16, text_hidden=32),
    "S": dict(width=96, depth=2, num_heads=4, embed_dim=128, text_hidden=256),
}
# exp(logit_scale) starts at 10 (CLIP: 1 / 0.07) and is capped at 100, as in CLIP.
LOGIT_SCALE_INIT = 2.302585
LOGIT_SCALE_MAX = 4.605170


def sentence_embedding(ctx: jax.Array, mask: jax.Array) -> jax.Array:
    """The masked mean of token hidden states `[B, L, D]` -> `[B, D]`, unit norm (the pooling of
    sentence-transformers' all-MiniLM-L6-v2). An all-padding row gives zeros."""
    m = mask.astype(jnp.float32)[..., None]
    mean = (ctx.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
    return l2_normalize(mean)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class VideoTower(nn.Module):
    """Latents `[B, t, h, w, c]` -> unit embeddings `[B, embed_dim]` (see the module docstring)."""

    width: int = 96  # token width D.
    depth: int = 2  # transformer blocks (joint space-time attention + MLP).
    num_heads: int = 4
    embed_dim: int = 128  # E, the shared embedding size.
    patch: int = 2  # spatial latent patch per token (time is not patched).
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        b, t, h, w, c = z.shape
        p = self.patch
        if h % p or w % p:
            raise ValueError(f"latent {h}x{w} is not divisible by the tower's patch {p}.")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = z.reshape(b, t, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 3, 5, 6)
        x = x.reshape(b, t, h // p, w // p, p * p * c)
        x = layers.dense(self.width, (None, "embed"), name="patch_embed", **kw)(x)
        x = x + layers.sincos_3d((t, h // p, w // p), self.width).astype(x.dtype)
        head_dim = self.width // self.num_heads
        for i in range(self.depth):
            y = layers.layer_norm(f"norm_attn_{i}", affine=True, param_dtype=self.param_dtype)(x)
            attn = layers.Attention(self.num_heads, head_dim, qk_norm=False, name=f"attn_{i}", **kw)
            x = x + attn(y.astype(self.dtype), mode="full")
            y = layers.layer_norm(f"norm_mlp_{i}", affine=True, param_dtype=self.param_dtype)(x)
            x = x + layers.Mlp(4 * self.width, name=f"mlp_{i}", **kw)(y.astype(self.dtype))
        x = layers.layer_norm("norm_out", affine=True, param_dtype=self.param_dtype)(x)
        pooled = x.astype(jnp.float32).mean(axis=(1, 2, 3))
        out = layers.dense(self.embed_dim, ("embed", None), name="proj", **kw)(pooled)
        return l2_normalize(out.astype(jnp.float32))


class TextHead(nn.Module):
    """Frozen sentence embedding `[B, D]` -> unit embeddings `[B, embed_dim]` (a 2-layer MLP)."""

    hidden: int = 256
    embed_dim: int = 128
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, sentence: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = layers.dense(self.hidden, (None, "mlp"), name="fc1", **kw)(sentence)
        y = layers.dense(self.embed_dim, ("mlp", None), name="fc2", **kw)(nn.gelu(y))
        return l2_normalize(y.astype(jnp.float32))


class AlignmentModel(nn.Module):
    """The two towers and the learnable temperature. Params: `video/...`, `text/...`,
    `logit_scale` (a scalar, log of the inverse temperature)."""

    width: int = 96
    depth: int = 2
    num_heads: int = 4
    embed_dim: int = 128
    text_hidden: int = 256
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @classmethod
    def from_config(cls, config) -> AlignmentModel:
        """The model `config.alignment` describes: its `variant`, then any size set there."""
        sizes = dict(VARIANTS[config.variant])
        for k in sizes:
            if config.get(k) is not None:
                sizes[k] = int(config[k])
        return cls(**sizes, dtype=jnp.dtype(config.dtype))

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.video = VideoTower(
            self.width, self.depth, self.num_heads, self.embed_dim, name="video", **kw
        )
        self.text = TextHead(self.text_hidden, self.embed_dim, name="text", **kw)
        init = nn.initializers.constant(LOGIT_SCALE_INIT)
        self.logit_scale = self.param("logit_scale", nn.with_logical_partitioning(init, ()), ())

    def encode_video(self, z: jax.Array) -> jax.Array:
        return self.video(z)

    def encode_text(self, ctx: jax.Array, mask: jax.Array) -> jax.Array:
        return self.text(sentence_embedding(ctx, mask))

    def __call__(self, z, ctx, mask):
        """(video embeddings [B, E], text embeddings [B, E], inverse temperature, a scalar)."""
        scale = jnp.exp(jnp.minimum(self.logit_scale, LOGIT_SCALE_MAX))
        return self.encode_video(z), self.encode_text(ctx, mask), scale


def contrastive_loss(v: jax.Array, s: jax.Array, scale: jax.Array) -> tuple[jax.Array, dict]:
    """Symmetric InfoNCE (CLIP): cross-entropy of each video against the batch's captions and of
    each caption against the batch's videos, the matching pair being the target.

    Pairs in one batch may share a description (moving digits has 80 digit x direction classes):
    those are false negatives the loss pushes apart a little; with batches much smaller than the
    number of distinct captions it stays a small bias (CLIP has the same one).

    Returns:
      (per-example loss [B], metrics: in-batch top-1 accuracy both ways).
    """
    logits = scale * v @ s.T
    labels = jnp.arange(v.shape[0])
    v2t = -jax.nn.log_softmax(logits, axis=1)[labels, labels]
    t2v = -jax.nn.log_softmax(logits, axis=0)[labels, labels]
    metrics = {
        "acc_v2t": (logits.argmax(1) == labels).mean(),
        "acc_t2v": (logits.argmax(0) == labels).mean(),
        "temperature": 1.0 / scale,
    }
    return 0.5 * (v2t + t2v), metrics
