"""A causal 3D convolutional video VAE (the CogVideoX / Wan / MAGVIT-v2 family).

    video [B, T, H, W, 3] in [-1, 1], T = 1 + k*ft, H, W divisible by fs
      -> Encoder -> posterior N(mean, exp(logvar)), each [B, 1 + k, H/fs, W/fs, c]
      -> z (mean, or a sample) -> Decoder -> video [B, T, H, W, 3]

Causality: every temporal operation looks only backwards (vdm.models.conv), so latent frame i
depends on video frames <= i*ft, and decoded frame j on latent frames <= ceil(j/ft). The first frame
is encoded alone, like an image: frame 0 <-> latent 0, frames (i-1)*ft+1 .. i*ft <-> latent i.

Architecture. An optional space-to-depth of p x p patches (`patch_size`, as in LTX-Video and the
Wan 2.2 VAE) does a factor p of fs for free, so the full-resolution level runs at H/p x W/p. Then
one resolution level per channel multiplier; each level has `num_res_blocks` residual blocks
(per-frame GroupNorm + SiLU + causal conv3d, twice). Between levels the encoder halves H, W with a
strided causal conv at the first log2(fs/p) transitions, and halves T at the *deepest* log2(ft) of
the first max(log2(fs/p), log2(ft)) transitions (cheapest where the maps are small): a causal
stride-2 conv with kernel 3 in time maps 1 + 2m frames to 1 + m (output i sees frames 2i-2..2i;
output 0 sees frame 0 only). Two residual blocks at the bottom, then GroupNorm + SiLU + a causal
conv to (mean, logvar). The decoder mirrors it with `num_res_blocks + 1` blocks per level;
upsampling is nearest-neighbour (in time: every frame twice, minus the very first copy, so
1 + m -> 1 + 2m frames) followed by a causal conv to the finer level's width.

Sizes. `VARIANTS` names (base_channels, channel_multipliers, num_res_blocks, patch_size). The
rule: a config field left at None takes the variant's value, a set field overrides it (so
`--config.vae.variant=B` and `--config.vae.base_channels=48` both do what they say). If there are
fewer multipliers than transitions + 1 levels, the last multiplier is repeated; extra levels keep
their resolution.

Streaming. `decode(..., chunk=n)` decodes latent frame 0 (with `first=True`, which creates the conv
caches), then `lax.scan`s over chunks of n latent frames carrying the caches and writing into a
preallocated output (`vdm.models.conv.stream`), so activation memory is that of one chunk whatever
the video length, and the result equals decoding all frames at once (up to float rounding).
`encode(..., chunk=n)` does the same for the encoder with chunks of n*ft frames.

The residual and upsampling blocks live in vdm.models.conv; the latent statistics that normalize
latents for the denoiser in vdm.models.latent_stats.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vdm.models.conv import CausalConv3d, FrameGroupNorm, ResBlock, Upsample, stream

Dtype = Any
PyTree = Any

# The fields a variant sets (config.vae fields of the same names override them when not None).
_VARIANT_FIELDS = ("base_channels", "channel_multipliers", "num_res_blocks", "patch_size")

VARIANTS: dict[str, dict[str, Any]] = {
    # Tests only: few layers (compile time dominates tests), still every kind of layer.
    "mu": dict(base_channels=8, channel_multipliers=(1, 2), num_res_blocks=0, patch_size=1),
    # The quickstart (32x32 moving digits, fs=4, ft=4) on CPU.
    "S": dict(base_channels=32, channel_multipliers=(1, 2, 2), num_res_blocks=1, patch_size=2),
    # Real videos (e.g. 128-256 px, fs=8): 4x8x8 compression with 8-16 latent channels.
    "B": dict(base_channels=64, channel_multipliers=(1, 2, 4, 4), num_res_blocks=2, patch_size=1),
    "L": dict(base_channels=128, channel_multipliers=(1, 2, 4, 4), num_res_blocks=2, patch_size=1),
}

_LOG2 = {1: 0, 2: 1, 4: 2, 8: 3}
LOGVAR_OFFSET = -6.0  # added to the encoder's raw log-variance output (see Encoder).


def _dtype(name_or_dtype) -> Dtype:
    return jnp.dtype(name_or_dtype) if isinstance(name_or_dtype, str) else name_or_dtype


def resolve_vae_config(vae_config) -> dict[str, Any]:
    """The effective architecture of `config.vae`: variant values with explicit fields on top.

    Args:
      vae_config: `config.vae` (a ConfigDict or mapping).

    Returns:
      A JSON-able dict of the `VideoAutoencoder` constructor arguments.
    """

    def get(key, default=None):
        if hasattr(vae_config, "get"):
            return vae_config.get(key, default)
        return getattr(vae_config, key, default)

    name = get("variant", "S")
    if name not in VARIANTS:
        raise ValueError(
            f"config.vae.variant={name!r} is not a known VAE size; valid: {sorted(VARIANTS)}."
        )
    out = dict(VARIANTS[name])
    for k in _VARIANT_FIELDS:
        if get(k, None) is not None:
            out[k] = get(k)
    out["channel_multipliers"] = tuple(int(m) for m in out["channel_multipliers"])
    for k, default in (("latent_channels", 8), ("temporal_factor", 4), ("spatial_factor", 4)):
        out[k] = int(get(k, default))
    out["dtype"] = str(get("dtype", "float32"))
    out["param_dtype"] = str(get("param_dtype", "float32"))
    if out["temporal_factor"] not in (1, 2, 4):
        raise ValueError(f"config.vae.temporal_factor={out['temporal_factor']}; valid: 1, 2, 4.")
    if out["spatial_factor"] not in (4, 8):
        raise ValueError(f"config.vae.spatial_factor={out['spatial_factor']}; valid: 4, 8.")
    out["patch_size"] = int(out["patch_size"])
    if out["patch_size"] not in (1, 2, 4) or out["spatial_factor"] % out["patch_size"]:
        raise ValueError(
            f"config.vae.patch_size={out['patch_size']} must be 1, 2 or 4 and divide "
            f"spatial_factor={out['spatial_factor']}."
        )
    if out["base_channels"] < 1 or out["num_res_blocks"] < 0 or not out["channel_multipliers"]:
        raise ValueError(
            f"Invalid VAE size {out}: base_channels >= 1, num_res_blocks >= 0 and at least one "
            "channel multiplier are required."
        )
    return out


def from_uint8(video):
    """uint8 pixels [0, 255] -> float32 in [-1, 1], the VAE's input range (numpy or jax)."""
    return video.astype(np.float32) / 127.5 - 1.0


def to_uint8(video):
    """The VAE's output range [-1, 1] -> uint8 pixels, clipped and rounded (numpy or jax)."""
    xp = np if isinstance(video, np.ndarray) else jnp
    return xp.round((xp.clip(video, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def latent_shape(vae_config, T: int, H: int, W: int) -> tuple[int, int, int, int]:
    """Latent shape (t, h, w, c) of a [T, H, W, 3] video; raises ValueError for invalid sizes.

    Args:
      vae_config: `config.vae`, or a `VideoAutoencoder` (anything with `temporal_factor`,
        `spatial_factor`, `latent_channels`).
      T, H, W: video frames, height, width.

    Returns:
      (1 + (T - 1) // ft, H // fs, W // fs, latent_channels).
    """
    ft, fs, c = (
        _field(vae_config, k) for k in ("temporal_factor", "spatial_factor", "latent_channels")
    )
    check_video_shape((T, H, W), ft, fs)
    return (1 + (T - 1) // ft, H // fs, W // fs, c)


def _field(cfg, key):
    return cfg[key] if isinstance(cfg, Mapping) else getattr(cfg, key)


def check_video_shape(thw: tuple[int, int, int], ft: int, fs: int, first: bool = True) -> None:
    """Raises a ValueError naming the valid sizes unless (T, H, W) fits factors (ft, fs).

    Args:
      thw: (T, H, W).
      ft, fs: temporal and spatial compression factors.
      first: the clip starts a video (T = 1 + k*ft) rather than continuing one (T = k*ft).
    """
    T, H, W = thw
    problems = []
    if first and (T < 1 or (T - 1) % ft):
        valid = ", ".join(str(1 + k * ft) for k in range(6))
        problems.append(
            f"T={T} frames is not 1 + k*{ft} (temporal_factor={ft}); valid: {valid}, ..."
        )
    if not first and (T < 1 or T % ft):
        problems.append(f"a continuation chunk of T={T} frames is not a multiple of {ft}")
    for name, size in (("H", H), ("W", W)):
        if size < fs or size % fs:
            problems.append(
                f"{name}={size} is not a multiple of spatial_factor={fs}; valid: {fs}, {2 * fs}, "
                f"{3 * fs}, ... (resize or crop the video)"
            )
    if problems:
        raise ValueError("Invalid video shape for the VAE: " + "; ".join(problems) + ".")


def _level_plan(
    multipliers: tuple[int, ...], ft: int, fs: int, patch: int
) -> tuple[tuple[int, ...], list[tuple[bool, bool]]]:
    """Multiplier per level, and (spatial, temporal) downsampling per transition i -> i+1.

    The patchify step does a factor `patch` of the spatial compression; strided convs do the rest
    at the first transitions; temporal halvings happen at the deepest of the first
    max(spatial, temporal) transitions, where the feature maps are smallest.
    """
    n_s, n_t = _LOG2[fs // patch], _LOG2[ft]
    n = max(n_s, n_t)
    mults = tuple(multipliers) + (multipliers[-1],) * max(0, n + 1 - len(multipliers))
    plan = [(i < n_s, n - n_t <= i < n) for i in range(len(mults) - 1)]
    return mults, plan


def space_to_depth(x: jnp.ndarray, p: int) -> jnp.ndarray:
    """[B, T, H, W, C] -> [B, T, H/p, W/p, p*p*C] (non-overlapping p x p patches onto channels)."""
    if p == 1:
        return x
    B, T, H, W, C = x.shape
    x = x.reshape(B, T, H // p, p, W // p, p, C).transpose(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(B, T, H // p, W // p, p * p * C)


def depth_to_space(x: jnp.ndarray, p: int) -> jnp.ndarray:
    """Inverse of `space_to_depth`: [B, T, h, w, p*p*C] -> [B, T, h*p, w*p, C]."""
    if p == 1:
        return x
    B, T, h, w, pc = x.shape
    x = x.reshape(B, T, h, w, p, p, pc // (p * p)).transpose(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(B, T, h * p, w * p, pc // (p * p))


class Encoder(nn.Module):
    """Video [B, T, H, W, 3] -> (mean, logvar), each [B, t, h, w, latent_channels]."""

    latent_channels: int
    base_channels: int
    channel_multipliers: tuple[int, ...]
    num_res_blocks: int
    temporal_factor: int
    spatial_factor: int
    patch_size: int = 1
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, first: bool = True):
        kw = dict(norm_groups=self.norm_groups, dtype=self.dtype, param_dtype=self.param_dtype)
        ckw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mults, plan = _level_plan(
            self.channel_multipliers, self.temporal_factor, self.spatial_factor, self.patch_size
        )
        h = space_to_depth(x.astype(self.dtype), self.patch_size)
        h = CausalConv3d(self.base_channels * mults[0], **ckw, name="conv_in")(h, first)
        for i, m in enumerate(mults):
            for j in range(self.num_res_blocks):
                h = ResBlock(self.base_channels * m, **kw, name=f"down_{i}_res_{j}")(h, first)
            if i < len(plan) and (plan[i][0] or plan[i][1]):
                s, t = (2 if plan[i][0] else 1), (2 if plan[i][1] else 1)
                h = CausalConv3d(
                    self.base_channels * m, strides=(t, s, s), **ckw, name=f"down_{i}_sample"
                )(h, first)
        ch = self.base_channels * mults[-1]
        h = ResBlock(ch, **kw, name="mid_res_0")(h, first)
        h = ResBlock(ch, **kw, name="mid_res_1")(h, first)
        h = nn.silu(FrameGroupNorm(self.norm_groups, **ckw, name="norm_out")(h))
        h = CausalConv3d(2 * self.latent_channels, **ckw, name="conv_out")(h, first)
        mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
        # Start near a deterministic autoencoder (posterior std e^-3 ~ 0.05 instead of 1), so the
        # decoder sees the signal rather than unit noise from the first step; the KL term raises
        # the variance where it pays. Bounded so exp(logvar) can never overflow.
        return mean, jnp.clip(logvar + LOGVAR_OFFSET, -30.0, 20.0)


class Decoder(nn.Module):
    """Latents [B, t, h, w, latent_channels] -> video [B, T, H, W, 3] (float32, unclipped)."""

    base_channels: int
    channel_multipliers: tuple[int, ...]
    num_res_blocks: int
    temporal_factor: int
    spatial_factor: int
    patch_size: int = 1
    out_channels: int = 3
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jnp.ndarray, first: bool = True) -> jnp.ndarray:
        kw = dict(norm_groups=self.norm_groups, dtype=self.dtype, param_dtype=self.param_dtype)
        ckw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mults, plan = _level_plan(
            self.channel_multipliers, self.temporal_factor, self.spatial_factor, self.patch_size
        )
        ch = self.base_channels * mults[-1]
        h = CausalConv3d(ch, **ckw, name="conv_in")(z.astype(self.dtype), first)
        h = ResBlock(ch, **kw, name="mid_res_0")(h, first)
        h = ResBlock(ch, **kw, name="mid_res_1")(h, first)
        for i in reversed(range(len(mults))):
            for j in range(self.num_res_blocks + 1):
                h = ResBlock(self.base_channels * mults[i], **kw, name=f"up_{i}_res_{j}")(h, first)
            if i > 0 and (plan[i - 1][0] or plan[i - 1][1]):  # Mirrors encoder transition i-1.
                h = Upsample(
                    self.base_channels * mults[i - 1],  # the next (finer) level's width.
                    spatial=plan[i - 1][0],
                    temporal=plan[i - 1][1],
                    **ckw,
                    name=f"up_{i}_sample",
                )(h, first)
        h = nn.silu(FrameGroupNorm(self.norm_groups, **ckw, name="norm_out")(h))
        p = self.patch_size
        h = CausalConv3d(self.out_channels * p * p, **ckw, name="conv_out")(h, first)
        return depth_to_space(h, p).astype(jnp.float32)


class VideoAutoencoder(nn.Module):
    """The causal video VAE. Build it from `config.vae` with `VideoAutoencoder.from_config`."""

    latent_channels: int = 8  # c of the latents the denoiser sees.
    base_channels: int = 32  # width of the first (full-resolution) level.
    channel_multipliers: tuple[int, ...] = (1, 2, 2)  # width of level i = base * mult[i].
    num_res_blocks: int = 1  # per encoder level (the decoder has one more).
    temporal_factor: int = 4  # ft: T = 1 + k*ft frames <-> 1 + k latent frames.
    spatial_factor: int = 4  # fs: H, W -> H/fs, W/fs.
    # Space-to-depth p x p patches before the first conv (and depth-to-space after the last), as in
    # LTX-Video / Wan 2.2: does a factor p of fs at almost no cost, so the full-resolution level
    # runs at (H/p, W/p); 1 (off), 2 or 4, dividing fs.
    patch_size: int = 1
    norm_groups: int = 32  # GroupNorm groups (the largest divisor of the width <= this).
    dtype: Dtype = jnp.float32  # compute dtype (bfloat16 on accelerators).
    param_dtype: Dtype = jnp.float32

    @classmethod
    def from_config(cls, vae_config) -> VideoAutoencoder:
        """The module for `config.vae` (variant sizes with explicit fields on top)."""
        r = resolve_vae_config(vae_config)
        return cls(
            latent_channels=r["latent_channels"],
            base_channels=r["base_channels"],
            channel_multipliers=r["channel_multipliers"],
            num_res_blocks=r["num_res_blocks"],
            temporal_factor=r["temporal_factor"],
            spatial_factor=r["spatial_factor"],
            patch_size=r["patch_size"],
            dtype=_dtype(r["dtype"]),
            param_dtype=_dtype(r["param_dtype"]),
        )

    def setup(self):
        arch = dict(
            base_channels=self.base_channels,
            channel_multipliers=tuple(self.channel_multipliers),
            num_res_blocks=self.num_res_blocks,
            temporal_factor=self.temporal_factor,
            spatial_factor=self.spatial_factor,
            patch_size=self.patch_size,
            norm_groups=self.norm_groups,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        self.encoder = Encoder(latent_channels=self.latent_channels, **arch)
        self.decoder = Decoder(**arch)

    def encode_moments(self, video: jnp.ndarray, first: bool = True):
        """Posterior (mean, logvar) [B, t, h, w, c] of video [B, T, H, W, 3] in [-1, 1]."""
        if video.ndim != 5 or video.shape[-1] != 3:
            raise ValueError(f"The VAE encodes videos [B, T, H, W, 3]; got shape {video.shape}.")
        check_video_shape(video.shape[1:4], self.temporal_factor, self.spatial_factor, first)
        return self.encoder(video, first)

    def decode_latents(self, z: jnp.ndarray, first: bool = True) -> jnp.ndarray:
        """Video [B, T, H, W, 3] (float32, not clipped) of latents [B, t, h, w, c]."""
        if z.ndim != 5 or z.shape[-1] != self.latent_channels:
            raise ValueError(
                f"The VAE decodes latents [B, t, h, w, {self.latent_channels}]; got {z.shape}."
            )
        return self.decoder(z, first)

    def __call__(self, video: jnp.ndarray, key: jax.Array | None = None):
        """Reconstruction of `video` through a posterior sample (its mean when key is None).

        Returns:
          (reconstruction [B, T, H, W, 3], mean, logvar), mean/logvar [B, t, h, w, c].
        """
        mean, logvar = self.encode_moments(video)
        z = mean if key is None else _sample(mean, logvar, key)
        return self.decode_latents(z), mean, logvar


def _sample(mean, logvar, key):
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


def kl_divergence(mean: jnp.ndarray, logvar: jnp.ndarray) -> jnp.ndarray:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over all but the batch axis -> [B]."""
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return kl.reshape(kl.shape[0], -1).sum(axis=-1)


def encode(
    module: VideoAutoencoder,
    params: PyTree,
    video: jnp.ndarray,
    key: jax.Array | None = None,
    chunk: int | None = None,
) -> jnp.ndarray:
    """Latents of a video: the posterior mean, or a posterior sample when `key` is given.

    Args:
      module: the VideoAutoencoder.
      params: its parameters (the "params" collection).
      video: float [B, T, H, W, 3] in [-1, 1], T = 1 + k*ft, H and W multiples of fs.
      key: PRNG key for a posterior sample; None for the mean.
      chunk: None encodes all frames at once; n streams chunks of n*ft frames through a lax.scan
        with the causal caches carried (same result, memory of one chunk).

    Returns:
      Latents [B, 1 + k, H/fs, W/fs, c] (float32, not normalized).
    """
    if video.ndim != 5:
        raise ValueError(f"encode expects a video batch [B, T, H, W, 3]; got shape {video.shape}.")
    B, T, H, W, _ = video.shape
    t, h, w, c = latent_shape(module, T, H, W)
    if chunk is None:
        mean, logvar = module.apply({"params": params}, video, method=module.encode_moments)
    else:
        if chunk < 1:
            raise ValueError(
                f"encode chunk must be a positive number of latent frames; got {chunk}."
            )
        moments = stream(
            module,
            params,
            video,
            _encode_both,
            chunk * module.temporal_factor,
            chunk,
            (B, t, h, w, 2 * c),
        )
        mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean if key is None else _sample(mean, logvar, key)


def _encode_both(module: VideoAutoencoder, video, first=True):
    # (mean, logvar) stacked on channels, so streaming has one output buffer.
    return jnp.concatenate(module.encode_moments(video, first), axis=-1)


def decode(
    module: VideoAutoencoder, params: PyTree, latents: jnp.ndarray, chunk: int = 4
) -> jnp.ndarray:
    """Video of latents, decoded in temporal chunks with the causal-conv caches carried.

    Args:
      module: the VideoAutoencoder.
      params: its parameters.
      latents: [B, t, h, w, c] (not normalized; see `latent_stats.denormalize_latents`).
      chunk: latent frames per streaming step; 0 or None decodes all frames in one call.

    Returns:
      Video float32 [B, 1 + (t-1)*ft, h*fs, w*fs, 3], roughly in [-1, 1] (not clipped).
    """
    if latents.ndim != 5 or latents.shape[-1] != module.latent_channels:
        raise ValueError(
            f"decode expects latents [B, t, h, w, {module.latent_channels}]; got {latents.shape}."
        )
    if not chunk:
        return module.apply({"params": params}, latents, method=module.decode_latents)
    B, t, h, w, _ = latents.shape
    ft, fs = module.temporal_factor, module.spatial_factor
    out_shape = (B, 1 + (t - 1) * ft, h * fs, w * fs, 3)
    return stream(
        module, params, latents, VideoAutoencoder.decode_latents, chunk, chunk * ft, out_shape
    )
