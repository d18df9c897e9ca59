"""3-D patches of latent videos: the denoiser's token grid and the (un)patchify reshapes."""

from __future__ import annotations

from collections.abc import Sequence

import jax


def token_grid(latent_shape: Sequence[int], patch_size: Sequence[int]) -> tuple[int, int, int]:
    """The token grid `(t', h', w')` of latents `(t, h, w[, c])` patchified by `patch_size`.

    Raises:
      ValueError: a latent axis is not divisible by its patch size (the message says which).
    """
    t, h, w = (int(s) for s in latent_shape[:3])
    bad = [
        f"{axis}={size} % {p} = {size % p}"
        for axis, size, p in zip("thw", (t, h, w), patch_size, strict=True)
        if size % p
    ]
    if bad:
        raise ValueError(
            f"Latent shape (t, h, w) = {(t, h, w)} is not divisible by model.patch_size="
            f"{tuple(patch_size)} ({'; '.join(bad)}). Use a patch size that divides the latent "
            "grid (e.g. --config.model.patch_size='(1, 2, 2)' or (1, 1, 1)), or change "
            "data.num_frames / data.height / data.width so the VAE latents are divisible."
        )
    return t // patch_size[0], h // patch_size[1], w // patch_size[2]


def patchify(x: jax.Array, patch_size: Sequence[int]) -> jax.Array:
    """`[B, t, h, w, c]` -> `[B, t', h', w', pt*ph*pw*c]` (non-overlapping 3-D patches)."""
    b, t, h, w, c = x.shape
    pt, ph, pw = patch_size
    gt, gh, gw = token_grid((t, h, w), patch_size)
    x = x.reshape(b, gt, pt, gh, ph, gw, pw, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, gt, gh, gw, pt * ph * pw * c)


def unpatchify(x: jax.Array, patch_size: Sequence[int], channels: int) -> jax.Array:
    """Inverse of `patchify`: `[B, t', h', w', pt*ph*pw*c]` -> `[B, t, h, w, c]`."""
    b, gt, gh, gw, _ = x.shape
    pt, ph, pw = patch_size
    x = x.reshape(b, gt, gh, gw, pt, ph, pw, channels)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, gt * pt, gh * ph, gw * pw, channels)
