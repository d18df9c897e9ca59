"""Samplers: noise -> data, each ONE `jax.lax.scan` over steps inside one jitted function.

Time grid (`schedules.sampling_times`): t_i = 1 - i / num_steps, i = 0..num_steps, uniform in t;
flow applies its resolution shift t' = shift t / (1 + (shift - 1) t) to every t_i; discrete
objectives round t_i to the training grid n / N. Step i goes from s = t_i to t = t_{i+1}; the last
step lands on t = 0 exactly.

Solvers (all work for every objective through the (x0, eps) predictions of `schedules`):
* "euler": Euler on the probability-flow ODE dx/dt = alpha'(t) x0_hat + sigma'(t) eps_hat in t.
  For flow that is the model's velocity itself, x_t = x_s + (t - s) v (and it coincides with
  DDIM algebraically). For the cosine VP path sigma'(t) ~ 1/sqrt(t) near 0, so Euler in t is a
  crude solver there; it is offered for comparison, DDIM / DPM-Solver++ are the ones to use.
* "ddim" (Song et al. 2021, eq. 12), for any path: x_t = alpha_t x0 + sqrt(sigma_t^2 - c^2) eps
  + c z with c = eta sigma_t sqrt(1 - e^{-2h}), h = lambda_t - lambda_s, lambda = log(alpha/sigma)
  (for VP this is exactly Song's sigma_t(eta); eta = 1 is ancestral DDPM-like sampling).
* "dpmpp2m": DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), data prediction, multistep:
  x_t = (sigma_t/sigma_s) x_s - alpha_t (e^{-h} - 1) D, D = (1 + 1/(2r)) x0_s - 1/(2r) x0_prev,
  r = h_prev / h. The first step is first-order (no previous x0). The last step lands on t = 0
  where sigma = 0 and h = inf, so it is necessarily first-order and returns x0_hat (this is
  diffusers' forced `lower_order_final` for a zero final sigma). For flow, lambda(1) = -inf, so
  the second step's r is infinite and its 1/(2r) = 0: it is first-order too, the exact limit.
  With eta > 0 it is the SDE solver DPM-Solver++(2M) SDE (Lu et al. 2022, sec. 4.2; k-diffusion's
  `sample_dpmpp_2m_sde`, midpoint form): x_t = (sigma_t/sigma_s) k x_s + alpha_t (1 - k e^{-h}) D
  + c z, with the same c as DDIM and k = sqrt(1 - c^2/sigma_t^2) (k-diffusion's e^{-eta' h}, its
  eta' chosen per step so the noise equals DDIM's). Its first-order step is DDIM with the same eta
  exactly, and eta = 1 is the reverse-time SDE for both.

* "unipc": UniPC (Zhao et al. 2023), diffusers' `UniPCMultistepScheduler` defaults (order 2,
  bh2, data prediction, a corrector on every step after the first; `vdm.diffusion.unipc`): Wan's
  default solver. Deterministic (eta does not apply).

Time grids (`schedules.TIME_GRIDS`, `time_grid=`): "uniform" above, or the grid of a diffusers
scheduler ("diffusers_euler", "diffusers_unipc"), which a pretrained model was tuned with; there
the model may see a rounded time (diffusers' integer timesteps) while the solver uses the exact one.

Stochastic sampling (eta > 0) re-injects fresh noise each step, so errors of earlier steps are
partly forgotten instead of carried along the ODE trajectory (Karras et al. 2022, sec. 4); it
needs more steps than the ODE to converge, and a key. "euler" is always the deterministic ODE.

Classifier-free guidance (Ho & Salimans 2022) is applied to the RAW model output:
out = uncond + g (cond - uncond), computed as cond + (g - 1)(cond - uncond) so g = 1 returns the
conditional output bit-for-bit. Because every conversion output -> (x0, eps, velocity) is affine
in the output with coefficients that depend only on (x_t, t) -- shared by both branches --
guiding the raw output is exactly guiding x0, eps or the velocity: one formula for every
objective, and no choice to get wrong. The cond and uncond branches run in ONE model call with
the batch concatenated [cond; uncond]. A negative prompt is simply passed as `null_cond`.

Reproducibility: `initial_noise` draws sample i of prompt p from fold_in(fold_in(key(seed), p), i)
per example; every solver step is per-example, and the eta-noise can use per-example keys, so
a sample does not depend on the rest of the batch or on the device count.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from vdm import rng
from vdm.diffusion import schedules, unipc
from vdm.diffusion.schedules import DiffusionSpec, _expand

PyTree = Any
SAMPLERS = ("euler", "ddim", "dpmpp2m", "unipc")
STOCHASTIC = ("ddim", "dpmpp2m")  # the samplers `eta` applies to ("euler" is always the ODE)


# -- single steps (pure; tests call them on fixed inputs) ----------------------------------------
def ode_velocity(output, x, t, spec: DiffusionSpec):
    """dx/dt of the probability-flow ODE at (x, t) from the raw model output."""
    if spec.is_flow:
        return output.astype(jnp.float32)  # the model predicts the velocity directly.
    x0, eps = schedules.predictions(output, x, t, spec)
    dalpha, dsigma = schedules.alpha_sigma_derivatives(_expand(t, x), spec)
    return dalpha * x0 + dsigma * eps


def euler_step(x, output, s, t, spec: DiffusionSpec):
    """One Euler step of the probability-flow ODE from time s to time t (< s).

    Args:
      x: x_s [B, ...].
      output: raw model output at (x_s, s) [B, ...].
      s: current time (scalar or [B]).
      t: next time.
      spec: the DiffusionSpec.

    Returns:
      x_t, float32.
    """
    x = x.astype(jnp.float32)
    dt = _expand(jnp.asarray(t, jnp.float32) - jnp.asarray(s, jnp.float32), x)
    return x + dt * ode_velocity(output, x, s, spec)


def _noise_split(eta, expm_h):
    """How one step splits sigma_t between fresh noise and the carried-over noise:
    (c / sigma_t = eta sqrt(1 - e^{-2h}), sqrt(1 - c^2 / sigma_t^2)); (0, 1) exactly at eta = 0."""
    eta = _expand(jnp.asarray(eta, jnp.float32), expm_h)
    ratio = eta * jnp.sqrt(jnp.maximum(1.0 - expm_h**2, 0.0))
    return ratio, jnp.sqrt(jnp.maximum(1.0 - ratio**2, 0.0))


def ddim_step(x, output, s, t, spec: DiffusionSpec, eta=0.0, noise=None):
    """One DDIM step (Song et al. 2021, eq. 12) from time s to time t (< s), any path.

    Args:
      x: x_s [B, ...].
      output: raw model output at (x_s, s).
      s: current time (scalar or [B]).
      t: next time.
      spec: the DiffusionSpec.
      eta: stochasticity (0 = deterministic DDIM); scalar or [B].
      noise: z ~ N(0, I) shaped like x; required for eta > 0 (ignored when None).

    Returns:
      x_t, float32.
    """
    x0, eps = schedules.predictions(output, x, s, spec)
    alpha_s, sigma_s = schedules.alpha_sigma(_expand(s, x0), spec)
    alpha_t, sigma_t = schedules.alpha_sigma(_expand(t, x0), spec)
    # e^{-h} = (alpha_s sigma_t) / (sigma_s alpha_t) in [0, 1): finite even where lambda is not.
    expm_h = (alpha_s * sigma_t) / (sigma_s * alpha_t)
    ratio, keep = _noise_split(eta, expm_h)
    x_t = alpha_t * x0 + sigma_t * keep * eps
    if noise is not None:
        x_t = x_t + sigma_t * ratio * noise.astype(jnp.float32)
    return x_t


def dpmpp2m_step(
    x, output, x0_prev, t_prev, s, t, spec: DiffusionSpec, first_order=False, eta=0.0, noise=None
):
    """One DPM-Solver++(2M) step (Lu et al. 2022, Algorithm 2) from time s to time t (< s); with
    eta > 0 one step of its SDE form (see the module docstring).

    Args:
      x: x_s [B, ...].
      output: raw model output at (x_s, s).
      x0_prev: the data prediction of the previous step (at t_prev); ignored if first-order.
      t_prev: the previous step's time (> s).
      s: current time.
      t: next time.
      spec: the DiffusionSpec.
      first_order: force the first-order update (DDIM); traced bool is fine.
      eta: stochasticity as in `ddim_step` (0 = the ODE solver); scalar or [B].
      noise: z ~ N(0, I) shaped like x; required for eta > 0 (ignored when None).

    Returns:
      (x_t, x0_hat at s): the new state and this step's data prediction (next step's x0_prev).
    """
    x0, _ = schedules.predictions(output, x, s, spec)
    alpha_s, sigma_s = schedules.alpha_sigma(_expand(s, x0), spec)
    alpha_t, sigma_t = schedules.alpha_sigma(_expand(t, x0), spec)
    alpha_p, sigma_p = schedules.alpha_sigma(_expand(t_prev, x0), spec)
    expm_h = (alpha_s * sigma_t) / (sigma_s * alpha_t)  # e^{-h}, finite where h is not
    h = -jnp.log(expm_h)
    h_prev = schedules.log_snr(alpha_s, sigma_s) - schedules.log_snr(alpha_p, sigma_p)
    # Second order needs finite, positive h and h_prev; otherwise the r -> inf limit (1/(2r) = 0)
    # or an undefined correction: fall back to first order.
    ok = jnp.logical_not(first_order) & jnp.isfinite(h) & jnp.isfinite(h_prev) & (h_prev > 0)
    half_inv_r = jnp.where(ok, h / (2.0 * jnp.where(ok, h_prev, 1.0)), 0.0)  # 1 / (2r)
    d = x0 if x0_prev is None else x0 + half_inv_r * (x0 - x0_prev.astype(jnp.float32))
    x = x.astype(jnp.float32)
    ratio, keep = _noise_split(eta, expm_h)  # the module docstring's c / sigma_t and k
    x_t = (sigma_t / sigma_s) * keep * x + alpha_t * (1.0 - keep * expm_h) * d
    if noise is not None:
        x_t = x_t + sigma_t * ratio * noise.astype(jnp.float32)
    return x_t, x0


# -- guidance --------------------------------------------------------------------------------------
def _batch_null(null_cond, cond):
    """Broadcasts null_cond leaves with batch 1 to cond's batch; checks the structures match."""
    if jax.tree.structure(cond) != jax.tree.structure(null_cond):
        raise ValueError(
            "null_cond must have the same pytree structure as cond (e.g. both (context, mask)); "
            f"got {jax.tree.structure(null_cond)} vs {jax.tree.structure(cond)}."
        )

    def bcast(c, n):
        n = jnp.asarray(n)
        if n.shape != c.shape:
            if n.shape[1:] != c.shape[1:] or n.shape[0] != 1:
                raise ValueError(
                    f"null_cond leaf of shape {n.shape} does not match cond leaf {c.shape}: it "
                    "must have the same shape or batch size 1."
                )
            n = jnp.broadcast_to(n, c.shape)
        return n.astype(c.dtype)

    return jax.tree.map(bcast, cond, null_cond)


def guided_output(model_fn, x, t, cond, null_cond, guidance):
    """The classifier-free-guided raw model output at (x, t) (see the module docstring).

    Args:
      model_fn: `model_fn(x [B', ...], t [B'], cond) -> output [B', ...]`.
      x: [B, ...].
      t: scalar time (broadcast to [B]) or [B].
      cond: condition pytree, batch B.
      null_cond: None (no guidance: one conditional call) or the uncond / negative condition,
        same structure as `cond`, batch B or 1.
      guidance: g, scalar or [B]; g = 1 returns the conditional output exactly.

    Returns:
      float32 [B, ...].
    """
    b = x.shape[0]
    tt = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
    if null_cond is None:
        return model_fn(x, tt, cond).astype(jnp.float32)
    null_cond = _batch_null(null_cond, cond)
    both = jax.tree.map(lambda c, n: jnp.concatenate([c, n], axis=0), cond, null_cond)
    out = model_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([tt, tt]), both)
    out = out.astype(jnp.float32)
    out_c, out_u = out[:b], out[b:]
    g = _expand(jnp.asarray(guidance, jnp.float32), out_c)
    return out_c + (g - 1.0) * (out_c - out_u)


# -- the sampler -----------------------------------------------------------------------------------
def _step_noise(key, step, shape):
    """The eta-noise for one step: from one key ([]) or per-example keys ([B])."""
    if key.ndim == 0:
        return jax.random.normal(jax.random.fold_in(key, step), shape, jnp.float32)
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step), shape[1:]))(key)


def _unipc_impl(model_fn, noise, cond, null_cond, guidance, ts, model_ts, spec):
    """UniPC (`vdm.diffusion.unipc`) as one scan: carry (x, corrected x of the last step,
    m_{i-1}, m_{i-2}); each step is one guided model call and two linear combinations."""
    co = unipc.coefficients(ts, spec)
    first = jnp.arange(len(model_ts)) == 0  # no corrector on the first step
    xs = (first, jnp.asarray(ts[:-1]), jnp.asarray(model_ts), jax.tree.map(jnp.asarray, co))

    def body(carry, inp):
        x, x_last, m1, m2 = carry
        is_first, s, ms, c = inp
        out = guided_output(model_fn, x, ms, cond, null_cond, guidance)
        m = schedules.predictions(out, x, s, spec)[0]
        corrected = c["c_x"] * x_last + c["c_m"] * m1 + c["c_d"] * (m2 - m1) + c["c_t"] * (m - m1)
        x = jnp.where(is_first, x, corrected)
        x_next = c["p_x"] * x + c["p_m"] * m + c["p_d"] * (m1 - m)
        return (x_next, x, m, m1), None

    x = noise.astype(jnp.float32)
    zeros = jnp.zeros_like(x)
    (x, *_), _ = jax.lax.scan(body, (x, zeros, zeros, zeros), xs)
    return x


def steer_output(out, x, t, spec: DiffusionSpec, x0_guide):
    """The raw output whose x0 prediction is `x0_guide(x0_hat, t)` at the same x_t (alignment
    guidance). x_t = alpha x0 + sigma eps is held fixed, so moving x0 by d moves eps by
    -alpha / sigma d, which moves the raw output by: flow (v = eps - x0) -d / t; eps
    -alpha / sigma d; v (= alpha eps - sigma x0) -d / sigma (alpha^2 + sigma^2 = 1)."""
    x0 = schedules.predictions(out, x, t, spec)[0]
    d = x0_guide(x0, t) - x0
    alpha, sigma = schedules.alpha_sigma(_expand(jnp.asarray(t, jnp.float32), x0), spec)
    if spec.is_flow or spec.objective == "v":
        return out - d / sigma
    return out - alpha / sigma * d


def _sample_impl(
    model_fn, noise, cond, null_cond, guidance, eta, key, *, sampler, num_steps, spec, time_grid,
    x0_guide=None,
):  # fmt: skip
    ts, model_ts = schedules.sampling_grid(num_steps, spec, time_grid)
    if null_cond is not None:
        null_cond = _batch_null(null_cond, cond)
    if sampler == "unipc":
        if x0_guide is not None:
            raise ValueError("alignment guidance (x0_guide) is not implemented for unipc.")
        return _unipc_impl(model_fn, noise, cond, null_cond, guidance, ts, model_ts, spec)
    t_prev = np.concatenate([ts[:1], ts[:-2]])  # step i's previous time (step 0: itself, unused)
    xs = (jnp.arange(num_steps), jnp.asarray(t_prev), jnp.asarray(ts[:-1]), jnp.asarray(ts[1:]))
    xs = xs + ((jnp.asarray(model_ts),) if time_grid != "uniform" else ())
    if key is not None:
        # Never the same bits as the caller's other draws with this key.
        stream = functools.partial(rng.stream, name="ddim_noise")
        key = stream(key) if key.ndim == 0 else jax.vmap(stream)(key)

    def body(carry, inp):
        x, x0_prev = carry
        i, tp, s, t = inp[:4]
        ms = inp[4] if len(inp) > 4 else s  # the time the model sees (diffusers grids)
        out = guided_output(model_fn, x, ms, cond, null_cond, guidance)
        if x0_guide is not None:
            out = steer_output(out, x, s, spec, x0_guide)
        z = None if key is None else _step_noise(key, i, x.shape)
        if sampler == "euler":
            x_new, x0 = euler_step(x, out, s, t, spec), x0_prev
        elif sampler == "ddim":
            x_new, x0 = ddim_step(x, out, s, t, spec, eta=eta, noise=z), x0_prev
        else:
            x_new, x0 = dpmpp2m_step(
                x, out, x0_prev, tp, s, t, spec, first_order=i == 0, eta=eta, noise=z
            )
        return (x_new, x0), None

    x = noise.astype(jnp.float32)
    (x, _), _ = jax.lax.scan(body, (x, jnp.zeros_like(x)), xs)
    return x


_sample_jit = jax.jit(_sample_impl, static_argnames=("sampler", "num_steps", "spec", "time_grid"))


def _is_traced(tree) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def _as_key(key):
    """None, a typed key ([] or [B]) or raw uint32 key data ([2] or [B, 2]) -> typed key or None."""
    if key is None:
        return None
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(key)


def _noise_key(sampler: str, eta, key, batch: int):
    """The checked eta-noise key of `sample`: None when the sampler draws no noise."""
    key = _as_key(key)
    stochastic = sampler in STOCHASTIC and (_is_traced(eta) or np.any(np.asarray(eta) != 0))
    if stochastic and key is None:
        raise ValueError(
            f"{sampler} with eta > 0 (or a traced eta) needs `key` for its per-step noise; pass "
            "key=... (one key or per-example keys), or eta=0.0."
        )
    if not stochastic:
        return None  # no noise drawn: keeps the program free of unused inputs.
    if key.shape not in ((), (batch,)):
        raise ValueError(f"key must be one key or [B={batch}] keys, got {key.shape}.")
    return key


def sample(
    model_fn: Callable[[jax.Array, jax.Array, PyTree], jax.Array],
    noise: jax.Array,
    cond: PyTree,
    null_cond: PyTree | None,
    *,
    sampler: str,
    num_steps: int,
    guidance,
    diffusion_config,
    eta=0.0,
    key: jax.Array | None = None,
    time_grid: str = "uniform",
    x0_guide: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """Integrates from `noise` (t = 1) to data (t = 0) with classifier-free guidance.

    Called eagerly it runs one jitted program (`sampler`, `num_steps` and the diffusion settings
    are static; `guidance` and `eta` are traced, so changing them does not recompile). Pass
    `model_fn` as a `jax.tree_util.Partial(apply_fn, params)` so new params are traced arguments
    rather than baked-in constants; a plain function is keyed by identity. Called inside an outer
    `jax.jit` it simply inlines (the outer jit owns compilation).

    Args:
      model_fn: `model_fn(x [B', ...], t [B'], cond) -> raw output` (velocity / eps / v, as
        trained); with guidance it is called once per step on the doubled batch [cond; uncond].
      noise: x at t = 1, [B, ...] (see `initial_noise`).
      cond: condition pytree with batch B (e.g. `(context, mask)`).
      null_cond: unconditional (empty or negative prompt) condition, same structure, batch B or 1;
        None samples without guidance (one call per step, cond only).
      sampler: "euler" | "ddim" | "dpmpp2m".
      num_steps: number of steps (= model evaluations).
      guidance: guidance scale g (scalar or [B]); 1 = conditional only.
      diffusion_config: `config.diffusion` or a `schedules.DiffusionSpec` (must match training).
      eta: stochasticity of "ddim" and "dpmpp2m" (scalar or [B]): 0 = the ODE solver, 1 = the
        reverse-time SDE; ignored by "euler".
      key: eta-noise key: one key, or per-example keys [B] so each sample is independent of
        the batch (the "ddim_noise" stream is folded in, then the step index). Required for
        "ddim" and "dpmpp2m" unless eta is a concrete 0.
      time_grid: the times visited (`schedules.TIME_GRIDS`): "uniform" (vdm's), or a
        diffusers scheduler's grid ("diffusers_euler", "diffusers_unipc") for pretrained models.
      x0_guide: `x0_guide(x0_hat, t) -> x0` applied to each step's guided prediction of the
        clean latents (`steer_output`; e.g. alignment guidance); None = none.

    Returns:
      x0, float32, shaped like `noise`.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"Unknown sampler {sampler!r}; choose one of {SAMPLERS}.")
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}.")
    spec = DiffusionSpec.from_config(diffusion_config)
    key = _noise_key(sampler, eta, key, noise.shape[0])
    guidance = jnp.asarray(guidance, jnp.float32)
    eta = jnp.asarray(eta, jnp.float32)
    kwargs = dict(sampler=sampler, num_steps=int(num_steps), spec=spec, time_grid=time_grid)
    schedules.sampling_grid(int(num_steps), spec, time_grid)  # checks the grid before tracing
    args = (noise, cond, null_cond, guidance, eta, key)
    return _dispatch(model_fn, args, kwargs, x0_guide)


def _dispatch(model_fn, args, kwargs, x0_guide):
    """`_sample_impl` inlined (inside an outer jit), else through the kept jitted program (a
    closure `x0_guide` cannot be its argument: then it is traced per call)."""
    traced = _is_traced(args) or _is_traced(model_fn)
    if x0_guide is not None:
        kwargs = {**kwargs, "x0_guide": x0_guide}
        if not traced:
            return jax.jit(functools.partial(_sample_impl, model_fn, **kwargs))(*args)
    if traced:
        return _sample_impl(model_fn, *args, **kwargs)
    if not isinstance(model_fn, Partial):
        model_fn = Partial(model_fn)
    return _sample_jit(model_fn, *args, **kwargs)


# -- per-example noise -----------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _noise_from_keys(keys, shape, dtype):
    return jax.vmap(lambda k: jax.random.normal(k, shape, dtype))(keys)


def initial_noise(seed, prompt_indices, sample_indices, shape, dtype=jnp.float32) -> jax.Array:
    """Starting noise: example b is N(0, I) drawn from its own key (`vdm.rng.example_keys`).

    Each example's noise depends only on (seed, p, i), never on the batch it sits in or on how many
    devices compute it (threefry is partitionable, `vdm/__init__.py`).

    Args:
      seed: int seed (or a typed base key).
      prompt_indices: int [B].
      sample_indices: int [B].
      shape: per-example shape, e.g. the latent shape (t, h, w, c).
      dtype: float dtype of the noise.

    Returns:
      [B, *shape] noise.
    """
    keys = rng.example_keys(seed, prompt_indices, sample_indices)
    return _noise_from_keys(keys, tuple(int(d) for d in shape), jnp.dtype(dtype))
