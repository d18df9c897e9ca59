"""Noise paths of every objective in ONE time convention, so losses and samplers share them.

Time is continuous, t in [0, 1], t = 0 data and t = 1 noise, and every objective is a Gaussian path

    x_t = alpha(t) * x0 + sigma(t) * eps,        eps ~ N(0, I).

* "flow" (rectified flow / flow matching, Liu et al. 2022; Lipman et al. 2022; SD3's recipe):
  alpha = 1 - t, sigma = t. The model predicts the velocity v = dx_t/dt = eps - x0.
* "eps" / "v" (discrete-time VP diffusion, Ho et al. 2020; v from Salimans & Ho 2022) on the
  cosine schedule of Nichol & Dhariwal 2021: alpha_bar(t) = f(t) / f(0) with
  f(t) = cos^2((t + s) / (1 + s) * pi / 2), s = 0.008, alpha = sqrt(alpha_bar),
  sigma = sqrt(1 - alpha_bar). Training uses the N = num_train_timesteps grid t_n = n / N,
  n = 1..N. Nichol & Dhariwal clip every beta_n = 1 - alpha_bar_n / alpha_bar_{n-1} at 0.999; on
  this schedule only the last one (n = N, where alpha_bar(1) = 0) is clipped, so
  alpha_bar_N = 0.001 * alpha_bar_{N-1}. We floor the continuous alpha_bar(t) at that value: the
  grid values then equal the clipped discrete table exactly (tests check it) and alpha(1) > 0,
  so log(alpha / sigma) stays finite for the solvers.

Conversions from the raw model output to (x0, eps) predictions are affine in the output with
coefficients that depend only on (x_t, t); `predictions` does them for every objective, so any
sampler works with any objective and classifier-free guidance can be applied to the raw output.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

OBJECTIVES = ("flow", "eps", "v")
TIME_SAMPLINGS = ("logit_normal", "uniform")
SCHEDULES = ("cosine",)

COSINE_S = 0.008  # Nichol & Dhariwal's offset, so beta at t = 0 is not vanishingly small.
MAX_BETA = 0.999  # Nichol & Dhariwal's clip on the last discrete beta.


@dataclasses.dataclass(frozen=True)
class DiffusionSpec:
    """The diffusion settings as a hashable value (usable as a static jit argument).

    Built from `config.diffusion` by `DiffusionSpec.from_config`; fields mirror that section.
    """

    objective: str = "flow"  # "flow" | "eps" | "v"
    time_sampling: str = "logit_normal"  # training-time distribution: "logit_normal" | "uniform"
    logit_mean: float = 0.0  # logit-normal: t = sigmoid(logit_mean + logit_std * n).
    logit_std: float = 1.0
    shift: float = 1.0  # flow only: t' = shift t / (1 + (shift - 1) t); 1 = none.
    num_train_timesteps: int = 1000  # discrete objectives: grid t_n = n / N.
    schedule: str = "cosine"  # discrete objectives: noise schedule.
    cfg_dropout: float = 0.0  # probability of training on the null condition.

    def __post_init__(self):
        problems = []
        if self.objective not in OBJECTIVES:
            problems.append(f"objective={self.objective!r} is not one of {OBJECTIVES}")
        if self.time_sampling not in TIME_SAMPLINGS:
            problems.append(f"time_sampling={self.time_sampling!r} is not one of {TIME_SAMPLINGS}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule={self.schedule!r} is not one of {SCHEDULES}")
        if not self.shift > 0:
            problems.append(f"shift={self.shift} must be > 0 (1 = no shift)")
        if self.shift != 1.0 and self.objective != "flow":
            problems.append(
                f"shift={self.shift} only applies to objective 'flow' (the cosine schedule of "
                f"'{self.objective}' has its own spacing); set diffusion.shift=1.0"
            )
        if self.num_train_timesteps < 2:
            problems.append(f"num_train_timesteps={self.num_train_timesteps} must be >= 2")
        if not 0.0 <= self.cfg_dropout <= 1.0:
            problems.append(f"cfg_dropout={self.cfg_dropout} must be in [0, 1]")
        if not self.logit_std > 0:
            problems.append(f"logit_std={self.logit_std} must be > 0")
        if problems:
            raise ValueError(
                "Invalid diffusion config: " + "; ".join(problems) + ". The fields are documented "
                "in configs/base.py (section _diffusion)."
            )

    @property
    def is_flow(self) -> bool:
        return self.objective == "flow"

    @classmethod
    def from_config(cls, config) -> DiffusionSpec:
        """From a `config.diffusion` ConfigDict (or dict, or an existing spec)."""
        if isinstance(config, DiffusionSpec):
            return config
        names = [f.name for f in dataclasses.fields(cls)]
        get = config.get if hasattr(config, "get") else lambda k, d: getattr(config, k, d)
        defaults = cls()
        kwargs = {n: get(n, getattr(defaults, n)) for n in names}
        kwargs["shift"] = float(kwargs["shift"])
        kwargs["logit_mean"] = float(kwargs["logit_mean"])
        kwargs["logit_std"] = float(kwargs["logit_std"])
        kwargs["cfg_dropout"] = float(kwargs["cfg_dropout"])
        kwargs["num_train_timesteps"] = int(kwargs["num_train_timesteps"])
        return cls(**kwargs)


def shift_time(t, shift: float):
    """Resolution shift t' = shift t / (1 + (shift - 1) t) (SD3, Esser et al. 2024, eq. 23).

    Monotone, fixes 0 and 1; shift > 1 moves time toward the noise end (more steps and training at
    high noise), which larger latents need because more pixels carry the same signal.
    """
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def _cosine_phi(t):
    return (t + COSINE_S) / (1.0 + COSINE_S) * (math.pi / 2)


_COS_PHI0 = math.cos(COSINE_S / (1.0 + COSINE_S) * math.pi / 2)


def cosine_alpha_bar_min(num_train_timesteps: int) -> float:
    """alpha_bar at t = 1: the clipped last step of the discrete table (module docstring)."""
    t = (num_train_timesteps - 1) / num_train_timesteps
    return (1.0 - MAX_BETA) * (math.cos(_cosine_phi(t)) / _COS_PHI0) ** 2


def discrete_alpha_bars(num_train_timesteps: int) -> np.ndarray:
    """Nichol & Dhariwal's discrete table alpha_bar_1..N (float64), from the clipped betas.

    Only used to check the continuous form against the paper's construction.
    """
    n = num_train_timesteps
    f = lambda t: np.cos((t + COSINE_S) / (1 + COSINE_S) * np.pi / 2) ** 2  # noqa: E731
    i = np.arange(n, dtype=np.float64)
    betas = np.minimum(1.0 - f((i + 1) / n) / f(i / n), MAX_BETA)
    return np.cumprod(1.0 - betas)


def alpha_sigma(t, spec: DiffusionSpec):
    """(alpha(t), sigma(t)) of the objective's path, elementwise in t (float32)."""
    t = jnp.asarray(t, jnp.float32)
    if spec.is_flow:
        return 1.0 - t, t
    alpha_bar = (jnp.cos(_cosine_phi(t)) / _COS_PHI0) ** 2
    alpha_bar = jnp.clip(alpha_bar, cosine_alpha_bar_min(spec.num_train_timesteps), 1.0)
    return jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar)


def alpha_sigma_derivatives(t, spec: DiffusionSpec):
    """(d alpha / dt, d sigma / dt), for the probability-flow ODE (Euler sampler).

    For the cosine path these are the derivatives of the unfloored formula: the floor only pins
    the single endpoint t = 1, and differentiating it would freeze the first Euler step.
    sigma' = -alpha alpha' / sigma because alpha^2 + sigma^2 = 1 (singular only at t = 0, where no
    step starts).
    """
    t = jnp.asarray(t, jnp.float32)
    if spec.is_flow:
        return -jnp.ones_like(t), jnp.ones_like(t)
    alpha, sigma = alpha_sigma(t, spec)
    dphi = (math.pi / 2) / (1.0 + COSINE_S)
    dalpha = -jnp.sin(_cosine_phi(t)) * dphi / _COS_PHI0
    return dalpha, -alpha * dalpha / sigma


def log_snr(alpha, sigma):
    """lambda = log(alpha / sigma); -inf at the flow's t = 1 (alpha = 0), +inf at t = 0."""
    return jnp.log(alpha) - jnp.log(sigma)


def _expand(a, x):
    """[B] (or scalar) -> broadcastable against x [B, ...]."""
    a = jnp.asarray(a)
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def predictions(output, x, t, spec: DiffusionSpec):
    """Raw model output at (x_t, t) -> (x0_hat, eps_hat).

    flow: v = eps - x0 and x_t = (1-t) x0 + t eps give x0 = x_t - t v, eps = x_t + (1-t) v.
    eps:  x0 = (x_t - sigma eps) / alpha (ill-conditioned where alpha -> 0, i.e. t -> 1; with
          float32 and the cosine schedule x0_hat at t = 1 is pure round-off, so prefer "v").
    v:    v = alpha eps - sigma x0 and alpha^2 + sigma^2 = 1 give x0 = alpha x_t - sigma v,
          eps = sigma x_t + alpha v.

    Args:
      output: model output [B, ...] (any float dtype; computed in float32).
      x: x_t [B, ...].
      t: time, scalar or [B].
      spec: the DiffusionSpec.

    Returns:
      (x0_hat, eps_hat), float32, shaped like x.
    """
    output = output.astype(jnp.float32)
    x = x.astype(jnp.float32)
    t = _expand(jnp.asarray(t, jnp.float32), x)
    if spec.is_flow:
        return x - t * output, x + (1.0 - t) * output
    alpha, sigma = alpha_sigma(t, spec)
    if spec.objective == "eps":
        return (x - sigma * output) / alpha, output
    return alpha * x - sigma * output, sigma * x + alpha * output


def training_target(x0, eps, t, spec: DiffusionSpec):
    """What the model output regresses onto: v = eps - x0 (flow), eps, or alpha eps - sigma x0."""
    if spec.is_flow:
        return eps - x0
    if spec.objective == "eps":
        return eps
    alpha, sigma = alpha_sigma(_expand(t, x0), spec)
    return alpha * eps - sigma * x0


def sample_training_time(key: jax.Array, batch_size: int, spec: DiffusionSpec) -> jax.Array:
    """Per-example training times t [B] (float32).

    logit_normal: t = sigmoid(m + s n), n ~ N(0, 1) (SD3: more weight on the middle of the path,
    where the velocity is hardest to predict); uniform: t ~ U(0, 1). Flow then applies the shift.
    Discrete objectives snap the draw u to the training grid, t = ceil(u N) / N in {1/N, ..., 1},
    so uniform sampling is exactly uniform over the N timesteps.
    """
    if spec.time_sampling == "uniform":
        u = jax.random.uniform(key, (batch_size,), jnp.float32)
    else:
        n = jax.random.normal(key, (batch_size,), jnp.float32)
        u = jax.nn.sigmoid(spec.logit_mean + spec.logit_std * n)
    if spec.is_flow:
        return shift_time(u, spec.shift)
    n_train = spec.num_train_timesteps
    step = jnp.clip(jnp.ceil(u * n_train), 1, n_train)
    return step / n_train


def sampling_spec(diffusion_config, shift: float | None = None) -> DiffusionSpec:
    """The spec a sampler uses: the training one, with the flow time shift replaced by `shift`.

    Only which times the sampler visits depends on the shift (flow's alpha = 1 - t, sigma = t do
    not), so a model trained with one shift can be sampled with another.

    Args:
      diffusion_config: `config.diffusion` (or a DiffusionSpec), the model's training settings.
      shift: the sampling shift (`config.sample.shift`); None keeps `diffusion.shift`.

    Returns:
      a DiffusionSpec.

    Raises:
      ValueError: the shift is not > 0, or the objective is not flow.
    """
    spec = DiffusionSpec.from_config(diffusion_config)
    if shift is None or float(shift) == spec.shift:
        return spec
    if not spec.is_flow:
        raise ValueError(
            f"sample.shift={shift} only applies to objective 'flow', not {spec.objective!r}; "
            "leave sample.shift unset."
        )
    if not float(shift) > 0:
        raise ValueError(f"sample.shift={shift} must be > 0 (1 = no shift).")
    return dataclasses.replace(spec, shift=float(shift))


def sampling_times(num_steps: int, spec: DiffusionSpec) -> np.ndarray:
    """The num_steps + 1 times a sampler visits, from t = 1 (noise) down to t = 0 (data).

    Uniform in t, t_i = 1 - i / num_steps; flow applies the resolution shift to each (so the
    spacing is uniform in the *unshifted* time, matching how training times were drawn). Discrete
    objectives round each t_i to the training grid n / N (the model only saw grid times); with
    num_steps <= N the rounded times stay distinct.

    Args:
      num_steps: number of solver steps (model evaluations), >= 1.
      spec: the DiffusionSpec.

    Returns:
      float32 numpy array [num_steps + 1], strictly decreasing, first 1.0, last 0.0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    u = 1.0 - np.arange(num_steps + 1, dtype=np.float64) / num_steps
    if spec.is_flow:
        t = shift_time(u, spec.shift)
    else:
        n_train = spec.num_train_timesteps
        if num_steps > n_train:
            raise ValueError(
                f"num_steps={num_steps} exceeds diffusion.num_train_timesteps={n_train}: a "
                f"'{spec.objective}' model only knows {n_train} timesteps; use fewer steps."
            )
        t = np.round(u * n_train) / n_train
    t[0], t[-1] = 1.0, 0.0
    return t.astype(np.float32)


# Time grids: "uniform" is vdm's own (above); the "diffusers_*" grids reproduce diffusers'
# schedulers exactly, so a pretrained model (e.g. Wan) samples as its reference pipeline does.
TIME_GRIDS = ("uniform", "diffusers_euler", "diffusers_unipc")


def sampling_grid(num_steps: int, spec: DiffusionSpec, grid: str = "uniform"):
    """The times a sampler visits and the time the model is shown at each step.

    * "uniform": `sampling_times`; the model sees each step's start time.
    * "diffusers_euler": diffusers' `FlowMatchEulerDiscreteScheduler(shift=spec.shift)`:
      sigmas = shift(linspace(1, shift(1/N), n)) then 0 (N = num_train_timesteps; the smallest
      sigma is shifted twice, as diffusers does), the model sees sigma (its timestep / N).
    * "diffusers_unipc": diffusers' `UniPCMultistepScheduler(use_flow_sigmas=True,
      flow_shift=spec.shift)`: sigmas = shift(linspace(1, 1/N, n + 1)[:-1]), the first lowered
      by 1e-6 when it is 1 (its solver takes log(alpha)), then 0; the model sees the integer
      timestep floor(sigma N) / N that diffusers passes it.

    Args:
      num_steps: number of solver steps n (model evaluations), >= 1.
      spec: the DiffusionSpec (its shift and num_train_timesteps).
      grid: one of TIME_GRIDS; the diffusers grids are for flow models only.

    Returns:
      (times float32 [n + 1] from ~1 down to 0, model_times float32 [n]).
    """
    if grid not in TIME_GRIDS:
        raise ValueError(f"Unknown time grid {grid!r}; choose one of {TIME_GRIDS}.")
    if grid == "uniform":
        times = sampling_times(num_steps, spec)
        return times, times[:-1]
    if not spec.is_flow:
        raise ValueError(f"Time grid {grid!r} is for flow models, not {spec.objective!r}.")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    n_train = spec.num_train_timesteps
    if grid == "diffusers_euler":
        # diffusers computes its smallest training sigma in float32 (torch), then reads it back.
        sigma_min = float(shift_time(np.float32(1.0) / np.float32(n_train), np.float32(spec.shift)))
        sigmas = shift_time(np.linspace(1.0, sigma_min, num_steps), spec.shift)
        model_times = sigmas.astype(np.float32)
    else:
        sigmas = shift_time(np.linspace(1.0, 1.0 / n_train, num_steps + 1)[:-1], spec.shift)
        if abs(sigmas[0] - 1.0) < 1e-6:
            sigmas[0] -= 1e-6
        model_times = (np.floor(sigmas * n_train) / n_train).astype(np.float32)
    times = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    return times, model_times
