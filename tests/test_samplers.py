"""Samplers: reproducibility, batch invariance, exactness on a Gaussian target, agreement with the
published update equations, classifier-free guidance, and the flow time shift."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm import rng
from vdm.diffusion import samplers, schedules
from vdm.diffusion.schedules import DiffusionSpec

FLOW = DiffusionSpec(objective="flow")
EPS = DiffusionSpec(objective="eps")
V = DiffusionSpec(objective="v")
SPECS = {"flow": FLOW, "eps": EPS, "v": V}

# A tiny deterministic conditional "model": each example's output depends only on its own
# (x, t, cond) row. Written as broadcast-multiply-sum rather than `@`: XLA's CPU dot kernels can
# change the last bit of a row with the batch size (measured: 6e-8 after 6 guided steps), which
# is the model's property, not the sampler's; these tests isolate the sampler.
_rs = np.random.RandomState(0)
W = jnp.asarray(_rs.randn(4, 4) * 0.5, jnp.float32)
U = jnp.asarray(_rs.randn(3, 4) * 0.5, jnp.float32)


def _rowdot(a, m):
    return (a[:, :, None] * m[None]).sum(1)


def toy_model(x, t, cond):
    return jnp.tanh(_rowdot(x, W) + _rowdot(cond, U) + t[:, None]) + 0.1 * x


def _cond(prompts):
    """A distinct embedding per prompt index, [B, 3]."""
    p = np.asarray(prompts, np.float32)[:, None]
    return jnp.asarray(np.concatenate([np.sin(p + 1), np.cos(2 * p), p / 3], axis=1))


NULL = jnp.zeros((1, 3), jnp.float32)
SETTINGS = [("euler", 0.0), ("ddim", 0.0), ("ddim", 0.7), ("dpmpp2m", 0.0), ("dpmpp2m", 0.7)]


def _run(seed, prompts, samples, sampler, eta, spec=FLOW, guidance=4.0, num_steps=6):
    prompts, samples = np.asarray(prompts), np.asarray(samples)
    noise = samplers.initial_noise(seed, prompts, samples, (4,))
    keys = rng.example_keys(seed + 1000, prompts, samples)
    return samplers.sample(
        toy_model,
        noise,
        _cond(prompts),
        NULL,
        sampler=sampler,
        num_steps=num_steps,
        guidance=guidance,
        diffusion_config=spec,
        eta=eta,
        key=keys,
    )


# -- reproducibility -------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler,eta", SETTINGS)
def test_same_seed_same_bytes_different_seed_differs(sampler, eta):
    a = np.asarray(_run(0, [0, 1], [0, 0], sampler, eta))
    b = np.asarray(_run(0, [0, 1], [0, 0], sampler, eta))
    c = np.asarray(_run(1, [0, 1], [0, 0], sampler, eta))
    assert a.tobytes() == b.tobytes()
    assert np.all(np.isfinite(a))
    assert np.abs(a - c).min() > 1e-4


@pytest.mark.parametrize("sampler,eta", SETTINGS)
def test_sample_independent_of_batch(sampler, eta):
    alone = np.asarray(_run(0, [0], [0], sampler, eta))
    # 3 prompts x 2 samples, with (prompt 0, sample 0) in the middle of the batch.
    prompts = [2, 1, 0, 0, 1, 2]
    samples = [1, 0, 0, 1, 1, 0]
    batch = np.asarray(_run(0, prompts, samples, sampler, eta))
    assert alone[0].tobytes() == batch[2].tobytes()
    # The other members are genuinely different samples.
    assert np.abs(batch[3] - batch[2]).max() > 1e-3


def test_initial_noise_independent_of_batch_and_devices():
    p = np.array([0, 0, 1, 1, 2, 2, 3, 3], np.int32)
    i = np.array([0, 1, 0, 1, 0, 1, 0, 1], np.int32)
    full = np.asarray(samplers.initial_noise(7, p, i, (2, 3)))
    one = np.asarray(samplers.initial_noise(7, p[5:6], i[5:6], (2, 3)))
    assert full[5].tobytes() == one[0].tobytes()
    ref = jax.random.normal(jax.random.fold_in(jax.random.fold_in(jax.random.key(7), 2), 1), (2, 3))
    assert np.asarray(ref).tobytes() == full[5].tobytes()  # (p, i) = (2, 1)
    # Sharded over 8 devices: the same bits.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    keys = jax.device_put(rng.example_keys(7, p, i), sharding)
    sharded = samplers._noise_from_keys(keys, (2, 3), jnp.dtype(jnp.float32))
    assert len(sharded.sharding.device_set) == 8
    assert np.asarray(sharded).tobytes() == full.tobytes()


# -- exactness on a Gaussian target ----------------------------------------------------------------
MU, S = 1.5, 0.5


def gaussian_model(spec, sign=1.0):
    """The EXACT minimiser of the training loss for 1-D data x0 ~ N(MU, S^2).

    x_t = alpha x0 + sigma eps is Gaussian, N(alpha MU, var) with var = alpha^2 S^2 + sigma^2, and
    (x0, x_t) and (eps, x_t) are jointly Gaussian, so the conditional means are linear:
      E[x0 | x_t]  = MU + alpha S^2 (x_t - alpha MU) / var
      E[eps | x_t] = sigma (x_t - alpha MU) / var
    Flow's exact velocity is E[eps - x0 | x_t]; eps-prediction is E[eps | x_t]; v-prediction is
    alpha E[eps | x_t] - sigma E[x0 | x_t]. `sign=-1` is a deliberately broken model.
    """

    def fn(x, t, cond):
        del cond
        a, s = schedules.alpha_sigma(t[:, None], spec)
        var = a**2 * S**2 + s**2
        x0 = MU + a * S**2 * (x - a * MU) / var
        eps = s * (x - a * MU) / var
        if spec.objective == "flow":
            out = eps - x0
        elif spec.objective == "eps":
            out = eps
        else:
            out = a * eps - s * x0
        return sign * out

    return fn


# (sampler, eta, steps, tolerance on |mean - MU| and |std - S|, tolerance on the per-sample
# distance to the exact ODE transport MU + S * noise, or None for stochastic samplers).
GAUSS_CASES = [
    ("euler", 0.0, 50, 0.03, 0.07),
    ("ddim", 0.0, 50, 0.03, 0.07),
    ("ddim", 1.0, 100, 0.03, None),
    ("dpmpp2m", 0.0, 20, 0.03, 0.03),
    ("dpmpp2m", 1.0, 50, 0.03, None),
]


def _gaussian_errors(objective, sampler, eta, steps, sign=1.0):
    spec = SPECS[objective]
    n = 4096
    noise = samplers.initial_noise(0, np.zeros(n, np.int32), np.arange(n, dtype=np.int32), (1,))
    x = samplers.sample(
        gaussian_model(spec, sign),
        noise,
        None,
        None,
        sampler=sampler,
        num_steps=steps,
        guidance=1.0,
        diffusion_config=spec,
        eta=eta,
        key=jax.random.key(5),
    )
    x, z = np.asarray(x)[:, 0], np.asarray(noise)[:, 0]
    # The probability-flow ODE between two 1-D Gaussians is the monotone affine map.
    transport = np.abs(x - (MU + S * z)).max()
    return abs(x.mean() - MU), abs(x.std() - S), transport


@pytest.mark.parametrize("objective", ["flow", "eps", "v"])
@pytest.mark.parametrize("sampler,eta,steps,tol,transport_tol", GAUSS_CASES)
def test_lands_on_gaussian_target(objective, sampler, eta, steps, tol, transport_tol):
    mean_err, std_err, transport = _gaussian_errors(objective, sampler, eta, steps)
    assert mean_err < tol and std_err < tol, (mean_err, std_err)
    if transport_tol is not None:
        assert transport < transport_tol, transport


@pytest.mark.parametrize("sampler,eta", [("dpmpp2m", 0.0), ("ddim", 1.0), ("dpmpp2m", 1.0)])
def test_gaussian_check_catches_a_broken_model(sampler, eta):
    # The same check with the model's sign flipped must fail, so the test above can fail.
    mean_err, std_err, _ = _gaussian_errors("flow", sampler, eta, 20, sign=-1.0)
    assert max(mean_err, std_err) > 0.3


# -- single steps against the papers' equations (plain numpy, float64) ----------------------------
N_TRAIN = 1000


def _nichol_alpha_bars(n):
    """Nichol & Dhariwal 2021, eq. 17 + beta clipping at 0.999: alpha_bar_1..alpha_bar_N."""
    f = lambda t: np.cos((t / n + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    betas = np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(n)])
    return np.cumprod(1 - betas)


AB = _nichol_alpha_bars(N_TRAIN)


def _vp(t):
    """(alpha, sigma) of the discrete VP table at grid time t = n / N."""
    a = AB[int(round(t * N_TRAIN)) - 1]
    return np.sqrt(a), np.sqrt(1 - a)


def _ref_predictions(objective, out, x, t):
    if objective == "flow":
        return x - t * out, x + (1 - t) * out
    a, s = _vp(t)
    if objective == "eps":
        return (x - s * out) / a, out
    return a * x - s * out, s * x + a * out  # v = a eps - s x0


def _ref_ddim(objective, x, out, s_time, t_time, eta, z):
    """Song et al. 2021, eq. 12, with alpha_bar as `a` (their alpha_t)."""
    a_s, a_t = AB[round(s_time * N_TRAIN) - 1], AB[round(t_time * N_TRAIN) - 1]
    x0, eps = _ref_predictions(objective, out, x, s_time)
    sig = eta * np.sqrt((1 - a_t) / (1 - a_s)) * np.sqrt(1 - a_s / a_t)
    return np.sqrt(a_t) * x0 + np.sqrt(1 - a_t - sig**2) * eps + sig * z


def _alpha_sigma_ref(objective, t):
    return (1 - t, t) if objective == "flow" else _vp(t)


def _ref_dpmpp2m(objective, x, out, x0_prev, t_prev, s_time, t_time, first_order):
    """Lu et al. 2022, Algorithm 2 (DPM-Solver++(2M)), one step from s to t."""

    def lam(a, s):
        with np.errstate(divide="ignore"):  # flow: lambda(1) = log(0) = -inf, so e^{-h} = 0.
            return np.log(a / s)

    a_p, s_p = _alpha_sigma_ref(objective, t_prev)
    a_s, s_s = _alpha_sigma_ref(objective, s_time)
    a_t, s_t = _alpha_sigma_ref(objective, t_time)
    x0, _ = _ref_predictions(objective, out, x, s_time)
    h = lam(a_t, s_t) - lam(a_s, s_s)
    if first_order:
        d = x0
    else:
        r = (lam(a_s, s_s) - lam(a_p, s_p)) / h
        d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
    return s_t / s_s * x - a_t * (np.exp(-h) - 1) * d


def _ref_dpmpp2m_sde(objective, x, out, x0_prev, t_prev, s_time, t_time, eta, z):
    """k-diffusion's `sample_dpmpp_2m_sde` step (midpoint), alpha-scaled for VP / flow paths, in
    its own noise parametrisation: noise sigma_t sqrt(1 - e^{-2 eta' h}). Its eta' is the one whose
    noise equals DDIM's with `eta` (Song's): 1 - e^{-2 eta' h} = eta^2 (1 - e^{-2h})."""
    a_p, s_p = _alpha_sigma_ref(objective, t_prev)
    a_s, s_s = _alpha_sigma_ref(objective, s_time)
    a_t, s_t = _alpha_sigma_ref(objective, t_time)
    x0, _ = _ref_predictions(objective, out, x, s_time)
    lam = lambda a, s: np.log(a / s)  # noqa: E731
    h = lam(a_t, s_t) - lam(a_s, s_s)
    h_last = lam(a_s, s_s) - lam(a_p, s_p)
    eta_k = -np.log(1 - eta**2 * (1 - np.exp(-2 * h))) / (2 * h)
    h_eta = h * (eta_k + 1)
    x_t = s_t / s_s * np.exp(-h * eta_k) * x + a_t * -np.expm1(-h_eta) * x0
    x_t += a_t * 0.5 * -np.expm1(-h_eta) * (h / h_last) * (x0 - x0_prev)
    return x_t + s_t * np.sqrt(-np.expm1(-2 * h * eta_k)) * z


def _fixed(n=5, seed=0):
    r = np.random.RandomState(seed)
    return r.randn(n, 3), r.randn(n, 3), r.randn(n, 3), r.randn(n, 3)


@pytest.mark.parametrize("objective", ["eps", "v"])
@pytest.mark.parametrize("eta", [0.0, 0.6, 1.0])
def test_ddim_step_matches_song_eq12(objective, eta):
    x, out, z, _ = _fixed()
    s, t = 0.6, 0.35
    got = samplers.ddim_step(
        jnp.asarray(x, jnp.float32),
        jnp.asarray(out, jnp.float32),
        s,
        t,
        SPECS[objective],
        eta=eta,
        noise=jnp.asarray(z, jnp.float32),
    )
    want = _ref_ddim(objective, x, out, s, t, eta, z)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
    if eta > 0:  # The noise really enters.
        assert np.abs(want - _ref_ddim(objective, x, out, s, t, 0.0, z)).max() > 1e-2


def test_ddim_on_flow_equals_euler():
    # For x_t = (1-t) x0 + t eps, deterministic DDIM is algebraically the Euler step x + (t-s) v.
    x, out, _, _ = _fixed()
    x, out = jnp.asarray(x, jnp.float32), jnp.asarray(out, jnp.float32)
    a = samplers.ddim_step(x, out, 0.7, 0.45, FLOW)
    b = samplers.euler_step(x, out, 0.7, 0.45, FLOW)
    np.testing.assert_allclose(np.asarray(a), np.asarray(x + (0.45 - 0.7) * out), atol=1e-6)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.parametrize("objective", ["flow", "eps", "v"])
@pytest.mark.parametrize("first_order", [False, True])
def test_dpmpp2m_step_matches_lu_algorithm2(objective, first_order):
    x, out, x0_prev, _ = _fixed(seed=1)
    tp, s, t = 0.8, 0.6, 0.35
    got, x0 = samplers.dpmpp2m_step(
        jnp.asarray(x, jnp.float32),
        jnp.asarray(out, jnp.float32),
        jnp.asarray(x0_prev, jnp.float32),
        tp,
        s,
        t,
        SPECS[objective],
        first_order=first_order,
    )
    want = _ref_dpmpp2m(objective, x, out, x0_prev, tp, s, t, first_order)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(x0), _ref_predictions(objective, out, x, s)[0], atol=2e-5)
    if not first_order:  # The second-order correction is really there.
        first = _ref_dpmpp2m(objective, x, out, x0_prev, tp, s, t, True)
        assert np.abs(want - first).max() > 1e-2


@pytest.mark.parametrize("objective", ["flow", "eps", "v"])
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_dpmpp2m_sde_step_matches_k_diffusion(objective, eta):
    x, out, x0_prev, z = _fixed(seed=2)
    tp, s, t = 0.8, 0.6, 0.35
    args = [jnp.asarray(a, jnp.float32) for a in (x, out, x0_prev)]
    zj = jnp.asarray(z, jnp.float32)
    got, _ = samplers.dpmpp2m_step(*args, tp, s, t, SPECS[objective], eta=eta, noise=zj)
    want = _ref_dpmpp2m_sde(objective, x, out, x0_prev, tp, s, t, eta, z)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
    # eta -> 0 is the ODE solver; the noise really enters.
    ode = _ref_dpmpp2m(objective, x, out, x0_prev, tp, s, t, False)
    np.testing.assert_allclose(
        _ref_dpmpp2m_sde(objective, x, out, x0_prev, tp, s, t, 1e-8, z), ode, atol=1e-6
    )
    assert np.abs(want - ode).max() > 1e-2
    # Its first-order step is DDIM with the same eta and noise.
    first, _ = samplers.dpmpp2m_step(
        *args, tp, s, t, SPECS[objective], first_order=True, eta=eta, noise=zj
    )
    ddim = samplers.ddim_step(*args[:2], s, t, SPECS[objective], eta=eta, noise=zj)
    np.testing.assert_allclose(np.asarray(first), np.asarray(ddim), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("objective", ["flow", "v"])
def test_dpmpp2m_full_scan_matches_reference_loop(objective):
    """The whole scan (time grid, solver state, first-order first/last steps) against a numpy
    loop over Algorithm 2."""
    spec, steps = SPECS[objective], 5
    ts = [1 - i / steps for i in range(steps + 1)]  # uniform grid, here exactly on n / 1000.
    x = np.random.RandomState(3).randn(2, 4)
    cond = np.asarray(_cond([0, 1]))

    def toy64(x, t):  # toy_model in float64
        w, u = np.asarray(W, np.float64), np.asarray(U, np.float64)
        return np.tanh(x @ w + cond @ u + t) + 0.1 * x

    got = samplers.sample(
        toy_model,
        jnp.asarray(x, jnp.float32),
        jnp.asarray(cond),
        None,
        sampler="dpmpp2m",
        num_steps=steps,
        guidance=1.0,
        diffusion_config=spec,
    )

    x0_prev = None
    for i in range(steps):
        s, t = ts[i], ts[i + 1]
        out = toy64(x, s)
        if i == steps - 1:  # t = 0: sigma_t = 0, the step returns the data prediction.
            x = _ref_predictions(objective, out, x, s)[0]
            break
        # First step, and for flow also the second (lambda(1) = -inf, so r = inf): first order.
        first = i == 0 or (objective == "flow" and i == 1)
        x_next = _ref_dpmpp2m(objective, x, out, x0_prev, ts[i - 1] if i else s, s, t, first)
        x0_prev = _ref_predictions(objective, out, x, s)[0]
        x = x_next
    np.testing.assert_allclose(np.asarray(got), x, rtol=1e-4, atol=1e-4)


# -- classifier-free guidance ----------------------------------------------------------------------
def test_guidance_one_equals_cond_only_and_guidance_changes_output():
    noise = samplers.initial_noise(0, np.array([0, 1, 2]), np.array([0, 0, 0]), (4,))
    cond = _cond([0, 1, 2])
    kw = dict(sampler="dpmpp2m", num_steps=5, diffusion_config=FLOW)
    cond_only = samplers.sample(toy_model, noise, cond, None, guidance=7.0, **kw)
    g1 = samplers.sample(toy_model, noise, cond, NULL, guidance=1.0, **kw)
    g3 = samplers.sample(toy_model, noise, cond, NULL, guidance=3.0, **kw)
    np.testing.assert_array_equal(np.asarray(g1), np.asarray(cond_only))
    assert np.abs(np.asarray(g3) - np.asarray(g1)).max() > 1e-2
    # Per-example guidance: row b equals a run with that scalar.
    mixed = samplers.sample(toy_model, noise, cond, NULL, guidance=jnp.array([1.0, 3.0, 1.0]), **kw)
    np.testing.assert_array_equal(np.asarray(mixed)[1], np.asarray(g3)[1])
    np.testing.assert_array_equal(np.asarray(mixed)[0], np.asarray(g1)[0])


def test_guided_output_formula_and_negative_prompt():
    x = jnp.asarray(np.random.RandomState(0).randn(2, 4), jnp.float32)
    cond, neg = _cond([0, 1]), _cond([5])  # a "negative prompt" embedding, batch 1
    c = toy_model(x, jnp.full((2,), 0.3), cond)
    u = toy_model(x, jnp.full((2,), 0.3), jnp.broadcast_to(neg, (2, 3)))
    got = samplers.guided_output(toy_model, x, 0.3, cond, neg, 2.5)
    np.testing.assert_allclose(np.asarray(got), np.asarray(u + 2.5 * (c - u)), atol=1e-5)


def test_guidance_is_traced_no_recompile():
    noise = samplers.initial_noise(0, np.array([0, 1]), np.array([0, 0]), (4,))
    cond = _cond([0, 1])

    def run(g):
        return samplers.sample(
            toy_model,
            noise,
            cond,
            NULL,
            sampler="euler",
            num_steps=3,
            guidance=g,
            diffusion_config=FLOW,
        )

    run(1.5)
    size = samplers._sample_jit._cache_size()
    outs = [np.asarray(run(g)) for g in (2.0, 7.5, 12)]
    assert samplers._sample_jit._cache_size() == size
    assert np.abs(outs[0] - outs[1]).max() > 1e-3


def test_sample_inside_outer_jit_with_traced_params():
    """The pipeline's pattern: model closes over traced params inside its own jit."""
    noise = samplers.initial_noise(0, np.array([0, 1]), np.array([0, 0]), (4,))
    cond = _cond([0, 1])
    keys = rng.example_keys(9, np.array([0, 1]), np.array([0, 0]))

    @jax.jit
    def generate(w, guidance, eta, keys):
        def model(x, t, c):
            return jnp.tanh(_rowdot(x, w) + _rowdot(c, U) + t[:, None]) + 0.1 * x

        return samplers.sample(
            model,
            noise,
            cond,
            NULL,
            sampler="ddim",
            num_steps=4,
            guidance=guidance,
            diffusion_config=FLOW,
            eta=eta,
            key=keys,
        )

    inner = np.asarray(generate(W, jnp.float32(4.0), jnp.float32(0.7), keys))
    eager = samplers.sample(
        toy_model,
        noise,
        cond,
        NULL,
        sampler="ddim",
        num_steps=4,
        guidance=4.0,
        diffusion_config=FLOW,
        eta=0.7,
        key=keys,
    )
    np.testing.assert_allclose(inner, np.asarray(eager), rtol=1e-5, atol=1e-5)


def test_bad_arguments_raise_clear_errors():
    noise = jnp.zeros((2, 4))
    cond = _cond([0, 1])
    with pytest.raises(ValueError, match="Unknown sampler"):
        samplers.sample(
            toy_model,
            noise,
            cond,
            NULL,
            sampler="heun",
            num_steps=3,
            guidance=1.0,
            diffusion_config=FLOW,
        )
    for sampler in ("ddim", "dpmpp2m"):
        with pytest.raises(ValueError, match=f"{sampler} with eta > 0 .* needs `key`"):
            samplers.sample(
                toy_model,
                noise,
                cond,
                NULL,
                sampler=sampler,
                num_steps=3,
                guidance=1.0,
                diffusion_config=FLOW,
                eta=0.5,
            )
    with pytest.raises(ValueError, match="exceeds"):
        samplers.sample(
            toy_model,
            noise,
            cond,
            NULL,
            sampler="ddim",
            num_steps=2000,
            guidance=1.0,
            diffusion_config=V,
        )
    with pytest.raises(ValueError, match="structure"):
        samplers.sample(
            toy_model,
            noise,
            cond,
            (NULL, NULL),
            sampler="euler",
            num_steps=3,
            guidance=1.0,
            diffusion_config=FLOW,
        )


# -- time grid and flow shift ----------------------------------------------------------------------
def test_flow_shift_maps_time():
    t = np.linspace(0, 1, 11)
    np.testing.assert_allclose(schedules.shift_time(t, 1.0), t)
    shifted = schedules.shift_time(t, 3.0)
    assert schedules.shift_time(0.5, 3.0) == pytest.approx(0.75)
    np.testing.assert_allclose(shifted[[0, -1]], [0.0, 1.0])
    assert np.all(np.diff(shifted) > 0) and np.all(shifted[1:-1] > t[1:-1])
    # Defining property: the noise-to-signal ratio sigma/alpha = t/(1-t) is multiplied by shift.
    inner = t[1:-1]
    np.testing.assert_allclose(
        shifted[1:-1] / (1 - shifted[1:-1]), 3.0 * inner / (1 - inner), rtol=1e-12
    )
    # Shifts compose multiplicatively: shift by 3 then by 1/3 is the identity.
    np.testing.assert_allclose(schedules.shift_time(shifted, 1 / 3), t, atol=1e-12)


def test_sampling_times_grid():
    spec = DiffusionSpec(objective="flow", shift=3.0)
    ts = schedules.sampling_times(4, spec)
    want = schedules.shift_time(np.array([1, 0.75, 0.5, 0.25, 0.0]), 3.0)
    np.testing.assert_allclose(ts, want, rtol=1e-6)
    vp = schedules.sampling_times(7, V)
    assert vp[0] == 1.0 and vp[-1] == 0.0 and np.all(np.diff(vp) < 0)
    np.testing.assert_allclose(vp * N_TRAIN, np.round(vp * N_TRAIN), atol=1e-3)  # on the grid
    with pytest.raises(ValueError):
        schedules.sampling_times(0, FLOW)
