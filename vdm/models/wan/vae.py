"""The Wan 2.1 causal video VAE (diffusers `AutoencoderKLWan`) as linen modules, channels-last.

    video [B, T, H, W, 3] in [-1, 1], T = 1 + 4k, H and W multiples of 8
      -> encode -> posterior (mean, logvar), each [B, 1 + k, H/8, W/8, 16]
    latents [B, t, h, w, 16] -> decode -> video [B, 1 + 4(t - 1), 8h, 8w, 3] clamped to [-1, 1]

(sizes for the published config: base_dim 96, dim_mult [1, 2, 4, 4], temperal_downsample
[False, True, True]; the spatial factor is 2^(len(dim_mult) - 1), the temporal factor 4.)

Like diffusers, `encode` runs frame 0 alone and then chunks of 4 frames, and `decode` one latent
frame at a time, carrying the causal convs' caches (vdm.models.wan.vae_layers). Here the chunks
after the first are one `lax.scan` step each (vdm.models.conv.stream), so a long video compiles
once and its activations take the memory of one chunk. The chunks are diffusers' own (frame 0,
then 4 frames / 1 latent frame), so the result equals diffusers' up to float rounding (~5e-7
relative, tests/test_wan_vae.py). The caches make any chunking equal to one causal pass over the
whole clip in exact arithmetic, but not bit for bit: in float32, diffusers' encoder with chunks of
4 vs 16 frames differs by ~3e-7 (torch CPU), so vdm keeps diffusers' chunk sizes.

Latents for the DiT are normalized per channel with the config's `latents_mean` / `latents_std`
(`normalize`); WanPipeline undoes that before decoding (`denormalize`).
Weights: `vdm.models.wan.vae_weights.load_vae(dir)`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm.models.autoencoder import check_video_shape
from vdm.models.conv import stream
from vdm.models.wan.vae_layers import CausalConv3d, MidBlock, Resample, ResidualBlock, RMSNorm
from vdm.parallel import unbox

Dtype = Any
PyTree = Any

TEMPORAL_FACTOR = 4  # diffusers chunks the encoder input by 4 frames, whatever the config says.


class Encoder3d(nn.Module):
    """diffusers `WanEncoder3d` (Wan 2.1: no attention in the levels): video -> 2*z channels."""

    dim: int  # base_dim.
    out_channels: int  # 2 * z_dim (mean and logvar).
    dim_mult: tuple[int, ...]
    num_res_blocks: int
    temperal_downsample: tuple[bool, ...]  # per level transition (diffusers' spelling).
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, first: bool = True) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dims = [self.dim * u for u in (1, *self.dim_mult)]
        x = CausalConv3d(dims[0], **kw, name="conv_in")(x.astype(self.dtype), first)
        j = 0  # diffusers' down_blocks is one flat list of residual blocks and resamples.
        for i, out_dim in enumerate(dims[1:]):
            for _ in range(self.num_res_blocks):
                x = ResidualBlock(out_dim, **kw, name=f"down_blocks_{j}")(x, first)
                j += 1
            if i != len(self.dim_mult) - 1:
                mode = "downsample3d" if self.temperal_downsample[i] else "downsample2d"
                x = Resample(mode, out_dim, **kw, name=f"down_blocks_{j}")(x, first)
                j += 1
        x = MidBlock(**kw, name="mid_block")(x, first)
        x = nn.silu(RMSNorm(**kw, name="norm_out")(x))
        return CausalConv3d(self.out_channels, **kw, name="conv_out")(x, first)


class UpBlock(nn.Module):
    """diffusers `WanUpBlock`: num_res_blocks + 1 residual blocks, then an optional upsampler to
    half the width (`upsamplers.0`)."""

    features: int
    num_res_blocks: int
    upsample_mode: str | None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, first: bool = True) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for k in range(self.num_res_blocks + 1):
            x = ResidualBlock(self.features, **kw, name=f"resnets_{k}")(x, first)
        if self.upsample_mode is not None:
            mode, out = self.upsample_mode, self.features // 2
            x = Resample(mode, out, **kw, name="upsamplers_0")(x, first)
        return x


class Decoder3d(nn.Module):
    """diffusers `WanDecoder3d` (Wan 2.1): z channels -> video channels (not clamped)."""

    dim: int  # decoder_base_dim.
    out_channels: int
    dim_mult: tuple[int, ...]
    num_res_blocks: int
    temperal_upsample: tuple[bool, ...]  # temperal_downsample reversed.
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jnp.ndarray, first: bool = True) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dims = [self.dim * u for u in (self.dim_mult[-1], *self.dim_mult[::-1])]
        x = CausalConv3d(dims[0], **kw, name="conv_in")(z.astype(self.dtype), first)
        x = MidBlock(**kw, name="mid_block")(x, first)
        for i, out_dim in enumerate(dims[1:]):
            mode = None
            if i != len(self.dim_mult) - 1:
                mode = "upsample3d" if self.temperal_upsample[i] else "upsample2d"
            up = UpBlock(out_dim, self.num_res_blocks, mode, **kw, name=f"up_blocks_{i}")
            x = up(x, first)
        x = nn.silu(RMSNorm(**kw, name="norm_out")(x))
        return CausalConv3d(self.out_channels, **kw, name="conv_out")(x, first)


class WanVAE(nn.Module):
    """diffusers `AutoencoderKLWan` (Wan 2.1). Param names follow diffusers' state dict."""

    base_dim: int = 96
    decoder_base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    in_channels: int = 3
    out_channels: int = 3
    # Per-channel latent statistics (config latents_mean / latents_std); () = not given.
    latents_mean: tuple[float, ...] = ()
    latents_std: tuple[float, ...] = ()
    dtype: Dtype = jnp.float32  # compute dtype (bfloat16 on accelerators).
    param_dtype: Dtype = jnp.float32

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return TEMPORAL_FACTOR

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        arch = dict(dim_mult=tuple(self.dim_mult), num_res_blocks=self.num_res_blocks, **kw)
        self.encoder = Encoder3d(
            self.base_dim,
            2 * self.z_dim,
            temperal_downsample=tuple(self.temperal_downsample),
            **arch,
        )
        self.quant_conv = CausalConv3d(2 * self.z_dim, (1, 1, 1), (0, 0, 0), **kw)
        self.post_quant_conv = CausalConv3d(self.z_dim, (1, 1, 1), (0, 0, 0), **kw)
        self.decoder = Decoder3d(
            self.decoder_base_dim,
            self.out_channels,
            temperal_upsample=tuple(self.temperal_downsample)[::-1],
            **arch,
        )

    def encode_chunk(self, video: jnp.ndarray, first: bool = True) -> jnp.ndarray:
        """Posterior moments [B, t, h, w, 2*z_dim] (mean, then logvar) of one chunk: frame 0
        (first=True) or 4 more frames (first=False, with the caches of the chunks before)."""
        return self.quant_conv(self.encoder(video, first))

    def decode_chunk(self, z: jnp.ndarray, first: bool = True) -> jnp.ndarray:
        """Video frames (not clamped) of one latent frame: 1 frame for latent frame 0
        (first=True), 4 for each later one (first=False, with the caches)."""
        return self.decoder(self.post_quant_conv(z), first)

    def __call__(self, video: jnp.ndarray) -> jnp.ndarray:
        """Frame 0 through the encoder and the decoder (creates every param at init)."""
        moments = self.encode_chunk(video[:, :1])
        return self.decode_chunk(moments[..., : self.z_dim])


def encode(module: WanVAE, params: PyTree, video: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Posterior of a video, encoded as diffusers does (frame 0, then chunks of 4, one scan).

    Args:
      module: the WanVAE.
      params: its "params".
      video: float [B, T, H, W, in_channels] in [-1, 1], T = 1 + 4k, H and W multiples of the
        spatial factor (8 for Wan 2.1).

    Returns:
      (mean, logvar), each float32 [B, 1 + k, H/8, W/8, z_dim]; logvar clipped to [-30, 20] as
      diffusers' DiagonalGaussianDistribution does. The mean is what WanPipeline-style code
      calls `latent_dist.mode()`; normalize it with `normalize` before the DiT.
    """
    if video.ndim != 5 or video.shape[-1] != module.in_channels:
        raise ValueError(
            f"Wan VAE encode expects a video [B, T, H, W, {module.in_channels}]; got "
            f"{tuple(video.shape)}."
        )
    B, T, H, W, _ = video.shape
    ft, fs = module.temporal_factor, module.spatial_factor
    check_video_shape((T, H, W), ft, fs)
    out_shape = (B, 1 + (T - 1) // ft, H // fs, W // fs, 2 * module.z_dim)
    moments = stream(module, params, video, WanVAE.encode_chunk, ft, 1, out_shape)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)


def decode(module: WanVAE, params: PyTree, latents: jnp.ndarray) -> jnp.ndarray:
    """Video of (denormalized) latents, one latent frame per `lax.scan` step, as diffusers does.

    Args:
      module: the WanVAE.
      params: its "params".
      latents: [B, t, h, w, z_dim], not normalized (apply `denormalize` to DiT latents first).

    Returns:
      Video float32 [B, 1 + 4(t - 1), 8h, 8w, out_channels], clamped to [-1, 1] (diffusers).
    """
    if latents.ndim != 5 or latents.shape[-1] != module.z_dim:
        raise ValueError(
            f"Wan VAE decode expects latents [B, t, h, w, {module.z_dim}]; got "
            f"{tuple(latents.shape)}."
        )
    B, t, h, w, _ = latents.shape
    ft, fs = module.temporal_factor, module.spatial_factor
    out_shape = (B, 1 + ft * (t - 1), h * fs, w * fs, module.out_channels)
    video = stream(module, params, latents, WanVAE.decode_chunk, 1, ft, out_shape)
    return jnp.clip(video, -1.0, 1.0)


def _stats(module: WanVAE, latents: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    if len(module.latents_mean) != module.z_dim or len(module.latents_std) != module.z_dim:
        raise ValueError(
            f"This Wan VAE has no per-channel latent statistics for its {module.z_dim} channels "
            f"(latents_mean has {len(module.latents_mean)}, latents_std "
            f"{len(module.latents_std)}); its config.json must give both."
        )
    mean = jnp.asarray(module.latents_mean, latents.dtype)
    std = jnp.asarray(module.latents_std, latents.dtype)
    return mean, std


def normalize(module: WanVAE, latents: jnp.ndarray) -> jnp.ndarray:
    """VAE latents -> the DiT's latent space: `(z - mean) * (1 / std)` per channel (the form
    diffusers' Wan pipelines use when they encode a conditioning video)."""
    mean, std = _stats(module, latents)
    return (latents - mean) * (1.0 / std)


def denormalize(module: WanVAE, latents: jnp.ndarray) -> jnp.ndarray:
    """DiT latents -> VAE latents: WanPipeline's `latents / (1 / std) + mean` (same rounding)."""
    mean, std = _stats(module, latents)
    return latents / (1.0 / std) + mean


def init_shapes(module: WanVAE) -> PyTree:
    """The params' shapes and dtypes (`jax.ShapeDtypeStruct`s, unboxed), traced without compute."""
    fs = module.spatial_factor
    video = jax.ShapeDtypeStruct((1, 1, fs, fs, module.in_channels), jnp.float32)
    return unbox(jax.eval_shape(module.init, jax.random.key(0), video)["params"])
