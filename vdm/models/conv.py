"""The causal building blocks of the video VAE and the streaming that their caches allow.

Layers: `CausalConv3d`, `FrameGroupNorm`, and the `ResBlock` / `Upsample` built from them.
`stream` runs a module over a long video chunk by chunk (see "Streaming" below).

Causality here means: output frame t depends only on input frames <= t. A convolution with a
temporal kernel of size `kt` gets `kt - 1` frames of padding in *front* only (never behind); the
padding replicates the first frame, so the first frame is processed exactly like a frame of a still
video (the "first frame is an image" rule of CogVideoX / MAGVIT-v2).

Streaming (decoding or encoding a long video chunk by chunk) needs, for each layer, the last few
input frames of the previous chunk. They live in the flax variable collection "cache":

  * `first=True`   the chunk starts the video: pad by replicating its first frame. If "cache" is
                   mutable, store the frames the next chunk needs.
  * `first=False`  the chunk continues a video: prepend the stored frames instead of padding, and
                   (if mutable) replace them.

A layer with temporal kernel `kt` and temporal stride `st` carries `kt - st` frames: the next output
window starts `st` frames after the last one, i.e. `kt - st` frames before the end of the padded
input, provided every non-first chunk has a multiple of `st` frames (the autoencoder guarantees it).
Normalization is per frame (statistics over height, width and channel groups, never over time),
because statistics over time would let later frames change earlier outputs.

`stream(module, params, x, method, t_in, t_out, out_shape)` is that chunked call: frame 0 alone
with `first=True` (creating the caches), then a `lax.scan` over chunks of `t_in` frames carrying
them, so activation memory is that of one chunk whatever the video length.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Logical axis names (see config.mesh.logical_axis_rules).
KERNEL_AXES = ("kernel_t", "kernel_h", "kernel_w", "conv_in", "conv_out")


def constrain(x: jnp.ndarray) -> jnp.ndarray:
    """Annotates a [B, T, H, W, C] activation for sharding (a no-op without a mesh and rules)."""
    return nn.with_logical_constraint(x, ("batch", "frames", "height", "width", None))


class CausalConv3d(nn.Module):
    """A 3D convolution over [B, T, H, W, C] that is causal in time and can stream.

    Spatial padding is symmetric zero padding of `kernel // 2` (so stride 1 keeps H, W and stride 2
    halves an even H, W). Temporal padding is `kt - 1` replicated first frames, or the cache.
    """

    features: int  # output channels.
    kernel_size: tuple[int, int, int] = (3, 3, 3)  # (time, height, width).
    strides: tuple[int, int, int] = (1, 1, 1)  # (time, height, width).
    dtype: Dtype = jnp.float32  # compute dtype.
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, first: bool = True) -> jnp.ndarray:
        kt, kh, kw = self.kernel_size
        st = self.strides[0]
        keep = kt - st  # frames the next chunk needs from this one.
        if first:
            x = jnp.concatenate([jnp.repeat(x[:, :1], kt - 1, axis=1), x], axis=1)
        elif keep > 0:
            if not self.has_variable("cache", "frames"):
                raise ValueError(
                    f"{self.path}: a streaming call with first=False needs the conv cache of the "
                    "previous chunk; start the video with first=True and mutable=['cache']."
                )
            x = jnp.concatenate([self.get_variable("cache", "frames").astype(x.dtype), x], axis=1)
        if keep > 0 and self.is_mutable_collection("cache"):
            self.put_variable("cache", "frames", x[:, x.shape[1] - keep :])
        # The conv's input whole in time (never split over a mesh axis), whatever the rule for
        # "frames": XLA's SPMD partitioner (jax 0.10.2) computes a time-valid conv over an input
        # split in time wrongly in some shapes (e.g. 4 frames over 4 devices, kernel 3: errors
        # of order 1; `lax.conv_general_dilated` alone, no flax), which made a streaming decode
        # of frame-split latents wrong. A no-op without a mesh and logical rules.
        x = nn.with_logical_constraint(x, ("batch", None, "height", "width", None))
        y = nn.Conv(
            self.features,
            self.kernel_size,
            strides=self.strides,
            padding=((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), KERNEL_AXES),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
            name="conv",
        )(x)
        return y


class FrameGroupNorm(nn.Module):
    """GroupNorm with statistics per frame (over H, W and the channels of a group), never over T."""

    num_groups: int = 32  # upper bound; the largest divisor of the channel count <= this is used.
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        channels = x.shape[-1]
        groups = max(g for g in range(1, min(self.num_groups, channels) + 1) if channels % g == 0)
        return nn.GroupNorm(
            num_groups=groups,
            epsilon=self.epsilon,
            reduction_axes=(-3, -2, -1),  # H, W, C (grouped): one set of statistics per frame.
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            # Norm parameters scale the channels that enter the next conv.
            scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("conv_in",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_in",)),
            name="norm",
        )(x)


class ResBlock(nn.Module):
    """norm -> SiLU -> causal conv -> norm -> SiLU -> causal conv, plus a (1x1x1 projected) skip."""

    features: int
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, first: bool = True) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(FrameGroupNorm(self.norm_groups, **kw, name="norm1")(x))
        h = CausalConv3d(self.features, **kw, name="conv1")(h, first)
        h = nn.silu(FrameGroupNorm(self.norm_groups, **kw, name="norm2")(h))
        h = CausalConv3d(self.features, **kw, name="conv2")(h, first)
        if x.shape[-1] != self.features:
            x = CausalConv3d(self.features, (1, 1, 1), **kw, name="skip")(x, first)
        return constrain(x + h)


class Upsample(nn.Module):
    """Nearest-neighbour x2 in space and/or time, then a causal conv. In time every frame is
    repeated twice and, at the start of a video, the very first copy dropped (1 + m -> 1 + 2m)."""

    features: int
    spatial: bool = True
    temporal: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, first: bool = True) -> jnp.ndarray:
        if self.temporal:
            x = jnp.repeat(x, 2, axis=1)
            if first:  # Latent frame 0 stands for video frame 0 alone.
                x = x[:, 1:]
        if self.spatial:
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
        return CausalConv3d(
            self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="conv"
        )(x, first)


def stream(module, params, x, method, t_in: int, t_out: int, out_shape) -> jnp.ndarray:
    """`module.apply(..., method=method)` over the frames (axis 1) of `x`, chunk by chunk.

    Runs `method` on frame 0 (first=True, which creates the conv caches), then lax.scans over
    chunks of `t_in` input frames (each giving `t_out` output frames) carrying the caches, writing
    every result into one preallocated output so no per-chunk results are stacked and copied.

    Args:
      module, params: a flax module built from these layers and its "params".
      x: the input [B, T, ...]; T - 1 need not be a multiple of `t_in` (a shorter last chunk is
        traced on its own).
      method: the module method to run; it takes `(x, first)`.
      t_in, t_out: input and output frames per chunk.
      out_shape: the whole output's shape (float32).

    Returns:
      The output, float32 `out_shape`, equal to one call on all frames up to float rounding.
    """
    n_frames = x.shape[1]
    head, variables = module.apply(
        {"params": params}, x[:, :1], first=True, method=method, mutable=["cache"]
    )
    out = jnp.zeros(out_shape, jnp.float32)
    out = jax.lax.dynamic_update_slice_in_dim(out, head.astype(jnp.float32), 0, axis=1)
    cache = variables["cache"]

    def run(cache, xc):
        y, upd = module.apply(
            {"params": params, "cache": cache}, xc, first=False, method=method, mutable=["cache"]
        )
        return y.astype(jnp.float32), upd["cache"]

    n_full = (n_frames - 1) // t_in
    if n_full:

        def body(carry, i):
            cache, out = carry
            xc = jax.lax.dynamic_slice_in_dim(x, 1 + i * t_in, t_in, axis=1)
            y, cache = run(cache, xc)
            out = jax.lax.dynamic_update_slice_in_dim(out, y, head.shape[1] + i * t_out, axis=1)
            return (cache, out), None

        (cache, out), _ = jax.lax.scan(body, (cache, out), jnp.arange(n_full))
    rest = (n_frames - 1) - n_full * t_in
    if rest:  # A shorter last chunk: its own trace, still continuing from the carried caches.
        y, _ = run(cache, x[:, n_frames - rest :])
        out = jax.lax.dynamic_update_slice_in_dim(out, y, out_shape[1] - y.shape[1], axis=1)
    return out
