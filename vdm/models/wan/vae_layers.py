"""The layers of the Wan 2.1 VAE (diffusers `AutoencoderKLWan`), channels-last, streamable.

Each layer takes `x [B, T, H, W, C]` and `first`: True for the chunk that starts a video, False for
a chunk that continues it. Diffusers runs the VAE chunk by chunk (encoder: frame 0, then 4 frames
at a time; decoder: one latent frame at a time) and keeps, per causal conv, the last input frames
of the previous chunk (its `feat_cache`, CACHE_T = 2 frames). Here the caches live in the flax
collection "cache" (as in vdm.models.conv), always at full size so a `lax.scan` can carry them:

  * A 3-tap causal conv (torch padding 1) is padded with 2 *zero* frames in front at the start of
    a video (diffusers' F.pad; vdm's own VAE replicates the first frame instead) and caches the
    last 2 frames of its padded input. Diffusers keeps 1 real frame after a 1-frame first chunk
    and pads the next chunk with 1 zero frame; caching [zero, frame] is the same arithmetic.
  * `Resample` "upsample3d" skips its time conv on the first chunk (diffusers' "Rep" marker), so
    latent frame 0 becomes 1 frame, and zero-pads the time conv on the second chunk: its cache
    starts as 2 zero frames. Later chunks give 2 frames per input frame (1 + m -> 1 + 2m).
  * `Resample` "downsample3d" passes the first chunk through (frame 0 alone, no time conv) and
    caches its last frame; later chunks run the stride-2 time conv on [cached frame, chunk]
    (1 + 2m -> 1 + m).

With these rules the chunked result equals one causal pass over the whole clip (up to float
rounding), and every chunk after the first has the same shapes, so one traced step serves them all.
Parameter names follow diffusers' module names (`down_blocks.3` -> `down_blocks_3`), so the
weight conversion (vdm.models.wan.vae_weights) is a rule, not a table.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm.models.attention import attention

Dtype = Any

# Logical axis names (config.mesh.logical_axis_rules), as vdm.models.conv uses them.
KERNEL_3D = ("kernel_t", "kernel_h", "kernel_w", "conv_in", "conv_out")
KERNEL_2D = ("kernel_h", "kernel_w", "conv_in", "conv_out")
CACHE_T = 2  # frames a 3-tap causal conv keeps from the previous chunk (diffusers' CACHE_T).


def _conv(module: nn.Module, x, features, kernel_size, strides, padding) -> jnp.ndarray:
    """A 2-D (per frame) or 3-D convolution of [B, T, H, W, C] whose params `kernel`
    [(kt,) kh, kw, in, out] and `bias` [out] sit on `module` itself (torch's `weight`, `bias`)."""
    axes = KERNEL_3D if len(kernel_size) == 3 else KERNEL_2D
    kernel = module.param(
        "kernel",
        nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        (*kernel_size, x.shape[-1], features),
        module.param_dtype,
    )
    bias = module.param(
        "bias",
        nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
        (features,),
        module.param_dtype,
    )
    lead = x.shape[: x.ndim - len(kernel_size) - 1]  # [B] (3-D) or [B, T] (2-D).
    h = x.reshape(-1, *x.shape[len(lead) :]).astype(module.dtype)
    spec = "NDHWC" if len(kernel_size) == 3 else "NHWC"
    y = jax.lax.conv_general_dilated(
        h,
        kernel.astype(module.dtype),
        strides,
        padding,
        dimension_numbers=(spec, spec[1:-1] + "IO", spec),
    )
    y = y + bias.astype(module.dtype)
    return y.reshape(*lead, *y.shape[1:])


class Conv(nn.Module):
    """A per-frame 2-D convolution (torch `nn.Conv2d` applied to every frame)."""

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: tuple[tuple[int, int], ...] = ((1, 1), (1, 1))  # explicit (low, high) per dim.
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return _conv(self, x, self.features, self.kernel_size, self.strides, self.padding)


class CausalConv3d(nn.Module):
    """diffusers `WanCausalConv3d` as a plain conv: `2 * padding[0]` zero frames (or the cache) in
    front, none behind; symmetric zero padding in space. The params are the layer's own
    (`kernel` [kt, kh, kw, in, out], `bias`), with no wrapping module."""

    features: int
    kernel_size: tuple[int, int, int] = (3, 3, 3)
    padding: tuple[int, int, int] = (1, 1, 1)  # torch's padding (time padding goes in front, x2).
    strides: tuple[int, int, int] = (1, 1, 1)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, first: bool = True) -> jnp.ndarray:
        front = 2 * self.padding[0]
        if front:
            if first:
                pad = jnp.zeros((x.shape[0], front, *x.shape[2:]), x.dtype)
            else:
                pad = self.get_variable("cache", "frames")
                if pad is None:
                    raise ValueError(
                        f"{self.path}: a chunk with first=False needs the cache of the previous "
                        "chunk; start the video with first=True and mutable=['cache']."
                    )
            x = jnp.concatenate([pad.astype(x.dtype), x], axis=1)
            if self.is_mutable_collection("cache"):
                # diffusers caches CACHE_T = 2 frames whatever the kernel (it is 3 or 1 in Wan).
                self.put_variable("cache", "frames", x[:, x.shape[1] - CACHE_T :])
        _, ph, pw = self.padding
        pad = ((0, 0), (ph, ph), (pw, pw))
        return _conv(self, x, self.features, self.kernel_size, self.strides, pad)


class RMSNorm(nn.Module):
    """diffusers `WanRMS_norm` (no bias in Wan 2.1): x / max(||x||_2 over channels, 1e-12) *
    sqrt(C) * gamma. Normalized in float32, as diffusers does for half-precision inputs."""

    epsilon: float = 1e-12  # F.normalize's eps (a floor on the norm, not added to it).
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        channels = x.shape[-1]
        gamma = self.param(
            "gamma",
            nn.with_logical_partitioning(nn.initializers.ones_init(), ("conv_in",)),
            (channels,),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
        # sqrt(C) applied in float32: a bfloat16 sqrt(384) would be 0.15% off on every channel.
        y = (x32 / jnp.maximum(norm, self.epsilon) * channels**0.5).astype(self.dtype)
        return y * gamma.astype(self.dtype)


class ResidualBlock(nn.Module):
    """diffusers `WanResidualBlock`: RMSNorm -> SiLU -> causal conv, twice, plus a 1x1x1 conv
    shortcut when the width changes (dropout is the identity at inference)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, first: bool = True) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = x
        if x.shape[-1] != self.features:
            h = CausalConv3d(self.features, (1, 1, 1), (0, 0, 0), **kw, name="conv_shortcut")(x)
        x = nn.silu(RMSNorm(**kw, name="norm1")(x))
        x = CausalConv3d(self.features, **kw, name="conv1")(x, first)
        x = nn.silu(RMSNorm(**kw, name="norm2")(x))
        x = CausalConv3d(self.features, **kw, name="conv2")(x, first)
        return x + h


class AttentionBlock(nn.Module):
    """diffusers `WanAttentionBlock`: single-head self-attention within each frame (over its
    H*W positions), 1x1 convs for q, k, v and the output, residual."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        B, T, H, W, C = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(**kw, name="norm")(x)
        qkv = Conv(3 * C, (1, 1), (1, 1), ((0, 0), (0, 0)), **kw, name="to_qkv")(h)
        # torch chunks the 3C channels in order q, k, v; one head of dim C per frame.
        q, k, v = (a.reshape(B * T, H * W, 1, C) for a in jnp.split(qkv, 3, axis=-1))
        # Head dim C (384 in Wan 2.1) is over cuDNN's 256: always the XLA kernel.
        h = attention(q, k, v, kernel="xla").reshape(B, T, H, W, C)
        return x + Conv(C, (1, 1), (1, 1), ((0, 0), (0, 0)), **kw, name="proj")(h)


class MidBlock(nn.Module):
    """diffusers `WanMidBlock` (num_layers=1): residual block, attention, residual block."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, first: bool = True) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ResidualBlock(x.shape[-1], **kw, name="resnets_0")(x, first)
        x = AttentionBlock(**kw, name="attentions_0")(x)
        return ResidualBlock(x.shape[-1], **kw, name="resnets_1")(x, first)


class Resample(nn.Module):
    """diffusers `WanResample`: "upsample2d" / "upsample3d" (x2 nearest in space, 3x3 conv to
    `features`; 3d first doubles the frames with a causal time conv to 2C channels, frame 2i + k
    from channels [kC, (k+1)C)) or "downsample2d" / "downsample3d" (zero pad right/bottom, 3x3
    stride-2 conv; 3d then a stride-2 3-tap time conv). See the module docstring for the caches."""

    mode: str
    features: int  # output channels of the spatial conv (upsampling); downsampling keeps C.
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, first: bool = True) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        C = x.shape[-1]
        if self.mode == "upsample3d":
            x = self._time_up(x, first)
        if self.mode.startswith("upsample"):
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest-exact x2 == repeat.
            pad = ((1, 1), (1, 1))
            return Conv(self.features, (3, 3), (1, 1), pad, **kw, name="resample_1")(x)
        if not self.mode.startswith("downsample"):
            raise ValueError(f"Resample mode {self.mode!r}: valid are up/downsample2d/3d.")
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1), (0, 0)))  # ZeroPad2d((0, 1, 0, 1)).
        x = Conv(C, (3, 3), (2, 2), ((0, 0), (0, 0)), **kw, name="resample_1")(x)
        return self._time_down(x, first) if self.mode == "downsample3d" else x

    def _time_up(self, x: jnp.ndarray, first: bool) -> jnp.ndarray:
        B, T, H, W, C = x.shape
        conv = CausalConv3d(
            2 * C, (3, 1, 1), (1, 0, 0), dtype=self.dtype, param_dtype=self.param_dtype,
            name="time_conv",
        )  # fmt: skip
        if first:
            # diffusers skips the conv here ("Rep") and zero-pads it on the next chunk. The conv
            # on one zero frame (output dropped) leaves exactly that cache, two zero frames, and
            # creates the params at init.
            conv(jnp.zeros_like(x[:, :1]), first=True)
            return x
        y = conv(x, first=False).reshape(B, T, H, W, 2, C)
        return y.transpose(0, 1, 4, 2, 3, 5).reshape(B, 2 * T, H, W, C)

    def _time_down(self, x: jnp.ndarray, first: bool) -> jnp.ndarray:
        conv = CausalConv3d(
            x.shape[-1], (3, 1, 1), (0, 0, 0), (2, 1, 1), dtype=self.dtype,
            param_dtype=self.param_dtype, name="time_conv",
        )  # fmt: skip
        if first:
            if self.is_initializing():  # create the params (diffusers runs no conv here).
                conv(jnp.concatenate([x[:, -1:]] * 3, axis=1))
            out = x
        else:
            last = self.get_variable("cache", "last")
            if last is None:
                raise ValueError(f"{self.path}: first=False needs the cache of the previous chunk.")
            out = conv(jnp.concatenate([last.astype(x.dtype), x], axis=1))
        if self.is_mutable_collection("cache"):
            self.put_variable("cache", "last", x[:, -1:])
        return out
