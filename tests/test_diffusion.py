"""Diffusion objectives: schedules in the shared time convention, output conversions, training-time
sampling, classifier-free-guidance dropout, and that every objective's loss trains a tiny model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base
from vdm import rng
from vdm.diffusion import losses, schedules
from vdm.diffusion.schedules import DiffusionSpec

OBJECTIVES = ("flow", "eps", "v")


# -- spec ------------------------------------------------------------------------------------------
def test_spec_from_base_config_and_errors():
    spec = DiffusionSpec.from_config(base.get_config().diffusion)
    assert spec.objective == "flow" and spec.num_train_timesteps == 1000
    hash(spec)  # static jit argument
    with pytest.raises(ValueError, match="objective"):
        DiffusionSpec(objective="x0")
    with pytest.raises(ValueError, match="only applies to objective 'flow'"):
        DiffusionSpec(objective="eps", shift=3.0)
    with pytest.raises(ValueError, match="cfg_dropout"):
        DiffusionSpec(cfg_dropout=1.5)


def test_sampling_spec_replaces_only_the_flow_shift():
    trained = DiffusionSpec(shift=2.0, cfg_dropout=0.1)
    assert schedules.sampling_spec(trained) is trained  # unset: the training shift
    spec = schedules.sampling_spec(trained, 3)
    assert spec == DiffusionSpec(shift=3.0, cfg_dropout=0.1)
    np.testing.assert_allclose(  # t' = 3t / (1 + 2t) on the uniform grid 1, 0.5, 0
        schedules.sampling_times(2, spec), [1.0, 0.75, 0.0], rtol=1e-6
    )
    with pytest.raises(ValueError, match=r"sample\.shift=0\.0 must be > 0"):
        schedules.sampling_spec(trained, 0.0)
    eps = DiffusionSpec(objective="eps")
    assert schedules.sampling_spec(eps, 1.0) == eps
    with pytest.raises(ValueError, match=r"sample\.shift=3\.0 only applies to objective 'flow'"):
        schedules.sampling_spec(eps, 3.0)


# -- schedules -------------------------------------------------------------------------------------
def test_flow_path():
    t = jnp.linspace(0, 1, 5)
    a, s = schedules.alpha_sigma(t, DiffusionSpec(objective="flow"))
    np.testing.assert_allclose(np.asarray(a), 1 - np.asarray(t))
    np.testing.assert_allclose(np.asarray(s), np.asarray(t))


def test_cosine_path_matches_nichol_dhariwal_table():
    n = 1000
    # Nichol & Dhariwal 2021 eq. 17 with betas clipped at 0.999, written out independently.
    f = lambda i: np.cos((i / n + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    betas = np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(n)])
    table = np.cumprod(1 - betas)
    spec = DiffusionSpec(objective="v", num_train_timesteps=n)
    grid = np.arange(1, n + 1) / n
    a, s = schedules.alpha_sigma(jnp.asarray(grid, jnp.float32), spec)
    a, s = np.asarray(a, np.float64), np.asarray(s, np.float64)
    np.testing.assert_allclose(a**2, table, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(a**2 + s**2, 1.0, atol=1e-6)
    assert a[-1] > 0 and np.isfinite(np.log(a[-1] / s[-1]))  # finite lambda at t = 1
    assert np.all(np.diff(a) < 0)
    np.testing.assert_allclose(schedules.discrete_alpha_bars(n), table, rtol=1e-12)
    a0, s0 = schedules.alpha_sigma(0.0, spec)
    assert float(a0) == pytest.approx(1.0) and float(s0) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_derivatives_match_finite_differences(objective):
    spec = DiffusionSpec(objective=objective)
    t = jnp.linspace(0.05, 0.95, 7)
    da, ds = schedules.alpha_sigma_derivatives(t, spec)
    d = 1e-3
    a1, s1 = schedules.alpha_sigma(t + d, spec)
    a0, s0 = schedules.alpha_sigma(t - d, spec)
    np.testing.assert_allclose(np.asarray(da), np.asarray((a1 - a0) / (2 * d)), rtol=1e-2)
    np.testing.assert_allclose(np.asarray(ds), np.asarray((s1 - s0) / (2 * d)), rtol=1e-2)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_predictions_invert_the_training_target(objective):
    spec = DiffusionSpec(objective=objective)
    r = np.random.RandomState(0)
    x0 = jnp.asarray(r.randn(6, 2, 3), jnp.float32)
    eps = jnp.asarray(r.randn(6, 2, 3), jnp.float32)
    t = jnp.asarray([0.05, 0.2, 0.4, 0.6, 0.8, 0.95], jnp.float32)
    a, s = schedules.alpha_sigma(t, spec)
    x_t = a[:, None, None] * x0 + s[:, None, None] * eps
    out = schedules.training_target(x0, eps, t, spec)
    x0_hat, eps_hat = schedules.predictions(out, x_t, t, spec)
    np.testing.assert_allclose(np.asarray(x0_hat), np.asarray(x0), atol=1e-4)
    np.testing.assert_allclose(np.asarray(eps_hat), np.asarray(eps), atol=1e-4)
    want = {"flow": eps - x0, "eps": eps, "v": a[:, None, None] * eps - s[:, None, None] * x0}
    np.testing.assert_allclose(np.asarray(out), np.asarray(want[objective]), atol=1e-6)


def test_training_time_sampling():
    key = jax.random.key(0)
    n = 20000
    uni = schedules.sample_training_time(key, n, DiffusionSpec(time_sampling="uniform"))
    assert float(uni.min()) >= 0.0 and float(uni.max()) <= 1.0
    assert abs(float(jnp.median(uni)) - 0.5) < 0.02
    # Shift 3 maps the median 0.5 to 3 * 0.5 / (1 + 2 * 0.5) = 0.75.
    shifted = schedules.sample_training_time(
        key, n, DiffusionSpec(time_sampling="uniform", shift=3.0)
    )
    assert abs(float(jnp.median(shifted)) - 0.75) < 0.02
    # Logit-normal: logit(t) ~ N(m, s).
    ln = schedules.sample_training_time(
        key, n, DiffusionSpec(time_sampling="logit_normal", logit_mean=0.5, logit_std=0.8)
    )
    logit = np.log(np.asarray(ln) / (1 - np.asarray(ln)))
    assert abs(logit.mean() - 0.5) < 0.03 and abs(logit.std() - 0.8) < 0.03
    # Discrete: on the grid {1/N, ..., 1}, all N timesteps used uniformly.
    disc = schedules.sample_training_time(
        key, n, DiffusionSpec(objective="eps", time_sampling="uniform", num_train_timesteps=10)
    )
    steps = np.asarray(disc) * 10
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-5)
    counts = np.bincount(np.round(steps).astype(int), minlength=11)
    assert counts[0] == 0 and counts[1:].min() > 0.08 * n


# -- classifier-free-guidance dropout --------------------------------------------------------------
def test_drop_condition_per_example_over_a_pytree():
    b = 4000
    ctx = jnp.ones((b, 3, 2))
    mask = jnp.ones((b, 3), jnp.int32)
    null = (jnp.zeros((1, 3, 2)), jnp.zeros((1, 3), jnp.int32))  # batch 1, broadcast
    key = rng.stream(jax.random.key(0), "cfg_dropout")
    kept = losses.drop_condition((ctx, mask), null, key, 0.0)
    np.testing.assert_array_equal(np.asarray(kept[0]), np.asarray(ctx))
    gone = losses.drop_condition((ctx, mask), null, key, 1.0)
    assert float(jnp.abs(gone[0]).max()) == 0 and int(gone[1].max()) == 0
    c, m = losses.drop_condition((ctx, mask), null, key, 0.25)
    dropped_ctx = np.asarray(c[:, 0, 0]) == 0
    np.testing.assert_array_equal(dropped_ctx, np.asarray(m[:, 0]) == 0)  # both leaves together
    assert np.all((np.asarray(c) == 0).all(axis=(1, 2)) == dropped_ctx)  # whole example
    assert abs(dropped_ctx.mean() - 0.25) < 0.03
    assert m.dtype == jnp.int32


def _cond_probe_model(x, t, cond):
    """Output depends on the condition only, so the loss reveals which cond the model saw."""
    ctx, _ = cond
    return jnp.broadcast_to(ctx[:, :1], x.shape) + 0 * x


def test_loss_applies_cfg_dropout_with_its_stream():
    b = 64
    x0 = jnp.zeros((b, 2))
    cond = (jnp.full((b, 1), 5.0), jnp.ones((b, 1), jnp.int32))
    null = (jnp.zeros((1, 1)), jnp.zeros((1, 1), jnp.int32))
    key = jax.random.key(3)

    def loss(p, null_cond=null, c=cond):
        cfg = DiffusionSpec(objective="eps", cfg_dropout=p)
        return np.asarray(losses.diffusion_loss(_cond_probe_model, x0, c, key, cfg, null_cond))

    all_null = loss(0.0, c=(jnp.zeros((b, 1)), jnp.zeros((b, 1), jnp.int32)))
    np.testing.assert_array_equal(loss(1.0), all_null)
    no_drop = loss(0.0)
    np.testing.assert_array_equal(loss(0.5, null_cond=None), no_drop)  # no null: no dropout
    mixed = loss(0.5)
    dropped = np.isclose(mixed, all_null) & ~np.isclose(mixed, no_drop)
    kept = np.isclose(mixed, no_drop)
    assert np.all(dropped | kept) and 10 < dropped.sum() < 54
    # The draw comes from the "cfg_dropout" stream of the key.
    want = np.asarray(jax.random.bernoulli(rng.stream(key, "cfg_dropout"), 0.5, (b,)))
    np.testing.assert_array_equal(dropped, want)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_loss_shape_and_determinism(objective):
    spec = DiffusionSpec(objective=objective)
    x0 = jnp.asarray(np.random.RandomState(0).randn(8, 2, 3, 3, 2), jnp.float32)

    def model(x, t, cond):
        return 0.5 * x + t[:, None, None, None, None]

    a = losses.diffusion_loss(model, x0, None, jax.random.key(0), spec)
    b = losses.diffusion_loss(model, x0, None, jax.random.key(0), spec)
    c = losses.diffusion_loss(model, x0, None, jax.random.key(1), spec)
    assert a.shape == (8,) and a.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3
    # Recompute by hand from the documented streams.
    t = schedules.sample_training_time(rng.stream(jax.random.key(0), "time"), 8, spec)
    eps = jax.random.normal(rng.stream(jax.random.key(0), "noise"), x0.shape)
    al, si = schedules.alpha_sigma(t, spec)
    e = lambda v: v[:, None, None, None, None]  # noqa: E731
    x_t = e(al) * x0 + e(si) * eps
    target = {"flow": eps - x0, "eps": eps, "v": e(al) * eps - e(si) * x0}[objective]
    want = jnp.mean((model(x_t, t, None) - target) ** 2, axis=(1, 2, 3, 4))
    np.testing.assert_allclose(np.asarray(a), np.asarray(want), rtol=1e-5)


# -- training a tiny model -------------------------------------------------------------------------
CENTERS = np.array([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]], np.float32)


def _gmm_batch(key, b):
    """2-D Gaussian mixture; the condition is the one-hot component."""
    kc, kn = jax.random.split(key)
    comp = jax.random.randint(kc, (b,), 0, 3)
    x0 = jnp.asarray(CENTERS)[comp] + 0.3 * jax.random.normal(kn, (b, 2))
    return x0, jax.nn.one_hot(comp, 4)  # slot 3 = the null condition


def _mlp_init(key, width=64):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (2 + 4 + 2, width)) / np.sqrt(8),
        "b1": jnp.zeros(width),
        "w2": jax.random.normal(k2, (width, 2)) / np.sqrt(width),
        "b2": jnp.zeros(2),
    }


def _mlp(params, x, t, cond):
    feats = jnp.concatenate([x, cond, jnp.sin(3 * t)[:, None], jnp.cos(3 * t)[:, None]], axis=1)
    return jax.nn.gelu(feats @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_loss_decreases_when_training(objective):
    spec = DiffusionSpec(objective=objective, time_sampling="uniform", cfg_dropout=0.1)
    null = jax.nn.one_hot(jnp.array([3]), 4)
    opt = optax.adam(1e-2)

    def mean_loss(params, key, b=256):
        x0, cond = _gmm_batch(rng.stream(key, "data"), b)
        fn = lambda x, t, c: _mlp(params, x, t, c)  # noqa: E731
        return losses.diffusion_loss(fn, x0, cond, key, spec, null_cond=null).mean()

    @jax.jit  # init, 60 Adam steps and both evaluations in one program: one compilation.
    def train(init_key):
        params = _mlp_init(init_key)

        def step(i, state):
            params, opt_state = state
            grads = jax.grad(mean_loss)(params, jax.random.fold_in(jax.random.key(1), i))
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        evaluate = lambda p: mean_loss(p, jax.random.key(12345), 1024)  # noqa: E731
        before = evaluate(params)
        params, _ = jax.lax.fori_loop(0, 60, step, (params, opt.init(params)))
        return before, evaluate(params)

    before, after = map(float, train(jax.random.key(0)))
    assert after < 0.5 * before, (before, after)
