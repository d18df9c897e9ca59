"""Diffusion objectives, losses and samplers in one time convention (t = 0 data, t = 1 noise).

* `schedules`: `DiffusionSpec` (hashable view of `config.diffusion`), alpha(t) / sigma(t) of each
  path, the flow shift, training-time sampling, sampler time grids, output -> (x0, eps).
* `losses`: `diffusion_loss(model_fn, x0, cond, key, diffusion_config, null_cond=None) -> [B]`.
* `samplers`: `sample(...)` (Euler, DDIM, DPM-Solver++(2M); one `lax.scan`; classifier-free
  guidance), per-sampler step functions, `initial_noise(seed, prompt_indices, sample_indices,
  shape)`.
"""

from vdm.diffusion import losses, samplers, schedules
from vdm.diffusion.losses import diffusion_loss
from vdm.diffusion.samplers import SAMPLERS, initial_noise, sample
from vdm.diffusion.schedules import DiffusionSpec

__all__ = [
    "SAMPLERS",
    "DiffusionSpec",
    "diffusion_loss",
    "initial_noise",
    "losses",
    "sample",
    "samplers",
    "schedules",
]
