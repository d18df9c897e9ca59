"""vdm's lax.scan samplers on diffusers' time grids equal diffusers' schedulers (the reference
implementation Wan's pipeline uses): FlowMatchEulerDiscreteScheduler and UniPCMultistepScheduler
with flow sigmas, stepped by their own loops in PyTorch on an analytic "model" with guidance."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from vdm.diffusion import samplers, schedules

SHAPE = (2, 3, 4, 4, 5)  # [B, t, h, w, c]
RNG = np.random.default_rng(0)
NOISE = RNG.standard_normal(SHAPE).astype(np.float32)
C_COND = RNG.standard_normal(SHAPE).astype(np.float32)
C_UNCOND = RNG.standard_normal(SHAPE).astype(np.float32)


def _velocity(lib, x, tm, c):
    """A smooth, nonlinear stand-in for a flow model: v(x, t) for time tm in [0, 1]."""
    return x * (0.3 + 0.5 * tm) + lib.sin(3.0 * tm + c) - 0.2 * lib.tanh(x)


def _reference(scheduler, num_steps, guidance):
    scheduler.set_timesteps(num_steps)
    x = torch.from_numpy(NOISE.copy())
    c, u = torch.from_numpy(C_COND), torch.from_numpy(C_UNCOND)
    for t in scheduler.timesteps:
        tm = torch.as_tensor(t, dtype=torch.float32) / 1000.0
        cond, uncond = _velocity(torch, x, tm, c), _velocity(torch, x, tm, u)
        v = uncond + guidance * (cond - uncond)  # WanPipeline's guidance
        x = scheduler.step(v, t, x, return_dict=False)[0]
    return x.numpy(), scheduler


def _vdm(sampler, grid, num_steps, guidance, shift):
    def model_fn(x, t, cond):
        return _velocity(jnp, x, t.reshape(-1, 1, 1, 1, 1), cond)

    spec = schedules.DiffusionSpec(shift=shift)
    cond = jnp.asarray(np.concatenate([C_COND]))
    null = jnp.asarray(C_UNCOND)
    return np.asarray(
        samplers.sample(
            model_fn,
            jnp.asarray(NOISE),
            cond,
            null,
            sampler=sampler,
            num_steps=num_steps,
            guidance=guidance,
            diffusion_config=spec,
            time_grid=grid,
        )
    )


def _unipc(shift):
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift
    )


@pytest.mark.parametrize("num_steps", [1, 2, 5, 20])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_grids_equal_diffusers(num_steps, shift):
    spec = schedules.DiffusionSpec(shift=shift)
    euler = FlowMatchEulerDiscreteScheduler(shift=shift)
    euler.set_timesteps(num_steps)
    times, model_times = schedules.sampling_grid(num_steps, spec, "diffusers_euler")
    np.testing.assert_array_equal(times, euler.sigmas.numpy())
    np.testing.assert_array_equal(model_times * 1000, euler.timesteps.numpy())
    uni = _unipc(shift)
    uni.set_timesteps(num_steps)
    times, model_times = schedules.sampling_grid(num_steps, spec, "diffusers_unipc")
    np.testing.assert_array_equal(times, uni.sigmas.numpy())
    np.testing.assert_array_equal(np.round(model_times * 1000), uni.timesteps.numpy())


@pytest.mark.parametrize(
    "sampler,grid,make",
    [
        ("euler", "diffusers_euler", lambda s: FlowMatchEulerDiscreteScheduler(shift=s)),
        ("unipc", "diffusers_unipc", _unipc),
    ],
)
@pytest.mark.parametrize("num_steps,shift,guidance", [(1, 3.0, 5.0), (3, 1.0, 1.0), (12, 3.0, 5.0)])
def test_sampling_equals_diffusers(sampler, grid, make, num_steps, shift, guidance):
    want, _ = _reference(make(shift), num_steps, guidance)
    got = _vdm(sampler, grid, num_steps, guidance, shift)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 1e-5, f"{sampler} on {grid}, {num_steps} steps: relative error {err:.2e}"


def test_unipc_is_second_order_on_vdm_grid():
    """On vdm's own uniform grid (t = 1 and t = 0 included, where lambda is infinite) UniPC is
    finite and second order: doubling the steps divides its error by ~4 (Euler's by ~2)."""
    fine = _vdm("unipc", "uniform", 1000, 1.0, 3.0)
    err = {
        (s, n): np.abs(_vdm(s, "uniform", n, 1.0, 3.0) - fine).max()
        for s in ("euler", "unipc")
        for n in (8, 16)
    }
    assert np.isfinite(list(err.values())).all()
    assert err["unipc", 8] / err["unipc", 16] > 3.5
    assert err["euler", 8] / err["euler", 16] < 2.5
    assert err["unipc", 16] < 0.5 * err["euler", 16]


def test_bad_grid_named():
    with pytest.raises(ValueError, match="diffusers_unipc.*flow"):
        schedules.sampling_grid(4, schedules.DiffusionSpec(objective="v"), "diffusers_unipc")
    with pytest.raises(ValueError, match="Unknown time grid"):
        schedules.sampling_grid(4, schedules.DiffusionSpec(), "karras")
