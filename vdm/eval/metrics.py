"""Metrics as plain functions over numpy or jax arrays.

Image quality (PSNR, SSIM) is per example: inputs are `[B, ...]` and results `[B]`, so callers can
average, take percentiles, or aggregate across hosts themselves. Each function computes with numpy
for numpy inputs (host-side evaluation, no device transfer) and with jax.numpy for jax arrays
(inside jit).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def _xp(*arrays):
    """numpy for host arrays, jax.numpy as soon as one input is a jax array or tracer."""
    return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def _check_pair(a, b, name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name}: the two inputs must have the same shape; got {a.shape} and {b.shape}."
        )
    if a.ndim < 2:
        raise ValueError(f"{name}: inputs are per example [B, ...]; got shape {a.shape}.")


def psnr(a, b, data_range: float):
    """Peak signal-to-noise ratio per example, 10 * log10(data_range^2 / MSE), in dB.

    Args:
      a, b: arrays [B, ...] of the same shape (e.g. videos [B, T, H, W, C]).
      data_range: max - min of the value range (255 for uint8, 2 for [-1, 1], 1 for [0, 1]).

    Returns:
      float [B]; +inf where an example is reproduced exactly.
    """
    xp = _xp(a, b)
    a, b = xp.asarray(a), xp.asarray(b)
    _check_pair(a, b, "psnr")
    diff = a.astype(xp.float32) - b.astype(xp.float32)
    mse = xp.mean(xp.square(diff).reshape(diff.shape[0], -1), axis=-1)
    with np.errstate(divide="ignore"):
        return 10.0 * xp.log10(data_range**2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """The normalised 1D Gaussian of Wang et al. (2004): `size` taps, std `sigma`."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-0.5 * np.square(x / sigma))
    return g / g.sum()


def _filter_valid(x, g, xp):
    """Separable 'valid' filtering of [N, H, W, C] with the 1D window g along H, then W."""
    n = len(g)
    h, w = x.shape[1] - n + 1, x.shape[2] - n + 1
    x = sum(float(g[k]) * x[:, k : k + h] for k in range(n))
    return sum(float(g[k]) * x[:, :, k : k + w] for k in range(n))


def ssim(
    a,
    b,
    data_range: float,
    *,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
):
    """Structural similarity per example (Wang et al. 2004, Gaussian window), mean over frames.

    The SSIM map is computed per frame and channel with an 11x11 Gaussian window (sigma 1.5) at
    every position where the window fits (no padding), using population (not sample) variances;
    this equals `skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=...)` averaged over channels and frames.

    Args:
      a, b: images [B, H, W, C] or videos [B, T, H, W, C] (channels last), same shape.
      data_range: max - min of the value range (255 for uint8, 2 for [-1, 1]).
      win_size: window side; H and W must be at least this.
      sigma: Gaussian std of the window.
      k1, k2: the stabilising constants, C1 = (k1 * L)^2, C2 = (k2 * L)^2.

    Returns:
      float [B] in [-1, 1]; 1 for identical inputs.
    """
    xp = _xp(a, b)
    a, b = xp.asarray(a), xp.asarray(b)
    _check_pair(a, b, "ssim")
    if a.ndim not in (4, 5):
        raise ValueError(f"ssim expects [B, H, W, C] or [B, T, H, W, C]; got shape {a.shape}.")
    H, W = a.shape[-3], a.shape[-2]
    if min(H, W) < win_size:
        raise ValueError(
            f"ssim: frames of {H}x{W} are smaller than the {win_size}x{win_size} window; pass a "
            "smaller win_size (odd) or compare larger frames."
        )
    B = a.shape[0]
    dtype = xp.float64 if xp is np else xp.float32
    a = a.astype(dtype).reshape(-1, H, W, a.shape[-1])
    b = b.astype(dtype).reshape(-1, H, W, b.shape[-1])
    g = gaussian_window(win_size, sigma)
    mu_a, mu_b = _filter_valid(a, g, xp), _filter_valid(b, g, xp)
    var_a = _filter_valid(a * a, g, xp) - mu_a * mu_a
    var_b = _filter_valid(b * b, g, xp) - mu_b * mu_b
    cov = _filter_valid(a * b, g, xp) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    )
    return xp.mean(s.reshape(B, -1), axis=-1)


def psnr_from_mse(mse: float, data_range: float) -> float:
    """PSNR in dB of a mean squared error (inf for 0)."""
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)
