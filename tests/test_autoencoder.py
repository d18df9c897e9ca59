"""Tests of the causal video VAE, its training task, streaming and the PSNR/SSIM metrics.

All models are the tiny "mu" variant on 8x8 or 16x16 frames; shapes are checked with
`jax.eval_shape` (tracing only), everything else shares a few compiled functions.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from scipy import ndimage

from vdm import parallel
from vdm.config import load_config
from vdm.errors import ConfigError
from vdm.eval import metrics
from vdm.models import autoencoder as ae
from vdm.models import latent_stats
from vdm.parallel import unbox
from vdm.tasks import autoencoder as ae_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "configs", "base.py")


def _mu(ft=4, fs=4, c=4, **kw):
    vae = dict(variant="mu", temporal_factor=ft, spatial_factor=fs, latent_channels=c, **kw)
    return ae.VideoAutoencoder.from_config(vae)


def _params(module, H=8, W=8, seed=0):
    """Random parameters of the right shapes, drawn with numpy.

    `module.init` would compile one threefry kernel per parameter (~30 s on 2 CPU cores for the
    tiny model); the tests only need *some* weights of the right scale (LeCun: 1/sqrt(fan_in)),
    and `test_task_init_has_logical_axes` covers the real init.
    """
    x = jax.ShapeDtypeStruct((1, 1, H, W, 3), jnp.float32)
    shapes = unbox(jax.eval_shape(module.init, jax.random.key(0), x)["params"])
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        if name == "scale":
            return 1.0 + 0.1 * rng.standard_normal(leaf.shape)
        return 0.1 * rng.standard_normal(leaf.shape)  # biases: non-zero, so they are exercised.

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)


def _video(key, T, H=8, W=8, B=1):
    return jax.random.uniform(jax.random.key(key), (B, T, H, W, 3), minval=-1.0, maxval=1.0)


@pytest.fixture(scope="module")
def model():
    """mu VAE with ft=4, fs=4, its params and jitted full encode / decode (compiled once)."""
    m = _mu()
    params = _params(m)
    enc = jax.jit(lambda p, v: ae.encode(m, p, v))
    dec = jax.jit(lambda p, z: ae.decode(m, p, z, chunk=0))
    return m, params, enc, dec


# ---- shapes and configuration -------------------------------------------------------------------


@pytest.mark.parametrize(
    "ft,fs,patch,T,H,W",
    [
        (1, 4, 1, 3, 8, 8),
        (2, 4, 1, 5, 8, 16),
        (4, 4, 2, 17, 32, 32),
        (2, 8, 1, 7, 16, 16),
        (4, 8, 4, 13, 8, 24),
    ],
)
def test_shapes(ft, fs, patch, T, H, W):
    m = _mu(ft, fs, c=6, patch_size=patch)
    x = jax.ShapeDtypeStruct((2, T, H, W, 3), jnp.float32)
    variables = jax.eval_shape(m.init, jax.random.key(0), x)
    t, h, w, c = ae.latent_shape(m, T, H, W)
    assert (t, h, w, c) == (1 + (T - 1) // ft, H // fs, W // fs, 6)
    recon, mean, logvar = jax.eval_shape(m.apply, variables, x)
    assert mean.shape == logvar.shape == (2, t, h, w, c)
    assert recon.shape == (2, T, H, W, 3) and recon.dtype == jnp.float32
    if ft == 4:  # The streaming paths trace the network 2-3 times; check them once per fs.
        params = variables["params"]
        z = jax.eval_shape(lambda p, v: ae.encode(m, p, v, chunk=1), params, x)
        assert z.shape == (2, t, h, w, c)
        y = jax.eval_shape(lambda p, z: ae.decode(m, p, z, chunk=2), params, z)
        assert y.shape == (2, T, H, W, 3)


def test_task_init_has_logical_axes(task_config):
    task = ae_task.AutoencoderTask(task_config)
    batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), task.dummy_batch(2))
    boxed = jax.eval_shape(task.init, jax.random.key(0), batch)
    flat = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: hasattr(x, "names"))[0]
    names = {jax.tree_util.keystr(p): leaf.names for p, leaf in flat}
    kernels = [n for k, n in names.items() if k.endswith("['kernel']")]
    assert kernels and all(
        n == ("kernel_t", "kernel_h", "kernel_w", "conv_in", "conv_out") for n in kernels
    )
    assert all(hasattr(leaf, "names") for _, leaf in flat)  # every param is annotated.
    # The numpy-drawn test parameters have exactly the real structure and shapes.
    real = jax.tree.map(lambda a: a.shape, unbox(boxed))
    assert jax.tree.map(lambda a: a.shape, _params(task.module, 16, 16)) == real


def test_variant_rule_and_config_defaults():
    config = load_config(BASE)
    r = ae.resolve_vae_config(config.vae)
    v = ae.VARIANTS[config.vae.variant]
    assert {k: r[k] for k in v} == v  # None fields take the variant's values...
    config = load_config(BASE, ["vae.variant=B", "vae.base_channels=48"])
    r = ae.resolve_vae_config(config.vae)  # ...and set fields override them.
    assert r["base_channels"] == 48
    assert r["channel_multipliers"] == ae.VARIANTS["B"]["channel_multipliers"]
    with pytest.raises(ValueError, match="valid: .*'mu'"):
        ae.resolve_vae_config({"variant": "XXL"})
    with pytest.raises(ValueError, match="patch_size=8 must be 1, 2 or 4 and divide"):
        ae.resolve_vae_config({"variant": "mu", "spatial_factor": 4, "patch_size": 8})
    m = ae.VideoAutoencoder.from_config(config.vae)
    assert m.base_channels == 48 and m.latent_channels == config.vae.latent_channels


def test_bad_shapes_raise_clear_errors(model):
    m, params, _, _ = model
    with pytest.raises(ValueError, match=r"T=6 frames is not 1 \+ k\*4.*valid: 1, 5, 9"):
        ae.encode(m, params, jnp.zeros((1, 6, 8, 8, 3)))
    with pytest.raises(
        ValueError, match=r"H=10 is not a multiple of spatial_factor=4; valid: 4, 8"
    ):
        ae.latent_shape(m, 5, 10, 8)
    with pytest.raises(ValueError, match=r"W=6"):
        m.apply({"params": params}, jnp.zeros((1, 5, 8, 6, 3)))
    with pytest.raises(ValueError, match=r"\[B, t, h, w, 4\]"):
        ae.decode(m, params, jnp.zeros((1, 2, 2, 2, 3)))
    config = load_config(BASE, ["stage=autoencoder", "data.num_frames=9", "vae.train_frames=4"])
    with pytest.raises(ConfigError, match="train_frames=4 must be 0"):
        ae_task.AutoencoderTask(config)


@pytest.mark.parametrize("field", ["perceptual_weight", "adversarial_weight"])
def test_unimplemented_loss_weights_raise(field):
    config = load_config(BASE, ["stage=autoencoder", "vae.variant=mu", f"vae.{field}=0.1"])
    with pytest.raises(ConfigError, match=f"vae.{field}=0.1 but this loss is not implemented"):
        ae_task.AutoencoderTask(config)


# ---- causality and streaming -----------------------------------------------------------------


def test_encoder_and_decoder_are_causal(model):
    m, params, enc, dec = model
    ft = m.temporal_factor
    x = _video(1, 13)  # 4 latent frames: frame 0 | 1-4 | 5-8 | 9-12.
    z = enc(params, x)
    for j in (1, 5, 6, 12):  # perturb frames >= j.
        x2 = x.at[:, j:].set(_video(2, 13 - j))
        z2 = enc(params, x2)
        kept = (j - 1) // ft + 1  # latents i with i*ft < j see only unchanged frames.
        np.testing.assert_array_equal(np.asarray(z2[:, :kept]), np.asarray(z[:, :kept]))
        assert not np.allclose(z2[:, kept], z[:, kept])  # and the next latent does change.
    y = dec(params, z)
    for i in (1, 2, 3):  # perturb latents >= i.
        z2 = z.at[:, i:].add(1.0)
        y2 = dec(params, z2)
        kept = 1 + (i - 1) * ft  # frames j with ceil(j/ft) < i.
        np.testing.assert_array_equal(np.asarray(y2[:, :kept]), np.asarray(y[:, :kept]))
        assert not np.allclose(y2[:, kept], y[:, kept])


def test_streaming_decode_and_encode_match_full(model):
    m, params, enc, dec = model
    x = _video(3, 13)  # 4 latent frames.
    z_full = enc(params, x)
    y_full = dec(params, z_full)
    # chunk=2: frame 0, one scanned chunk of 2 latent frames, then a shorter last chunk of 1.
    y = jax.jit(lambda p, z: ae.decode(m, p, z, chunk=2))(params, z_full)
    np.testing.assert_allclose(y, y_full, atol=1e-5 * float(jnp.abs(y_full).max()), rtol=0)
    z = jax.jit(lambda p, v: ae.encode(m, p, v, chunk=2))(params, x)  # 8 frames, then 4.
    np.testing.assert_allclose(z, z_full, atol=1e-5 * float(jnp.abs(z_full).max()), rtol=0)


def test_streaming_decode_of_frame_split_latents_under_a_mesh(model):
    """Latents split over their frames (as the denoiser's output is under sequence parallelism),
    decoded in chunks of 2 under the mesh rules with tensor = 2: the 1-device video. (XLA's SPMD
    partitioner gets a causal conv over a time dim split 4 ways wrong; vdm.models.conv keeps the
    conv inputs whole in time.)"""
    m, params, _, dec = model
    z = jax.random.normal(jax.random.key(4), (2, 4, 2, 2, 4))
    y_full = dec(params, z)
    mesh = parallel.make_mesh({"sequence": 4, "tensor": 2})
    rules = load_config(BASE).mesh.logical_axis_rules
    fn = jax.jit(
        parallel.with_sharding_rules(lambda p, z: ae.decode(m, p, z, chunk=2), mesh, rules)
    )
    split = jax.device_put(z, NamedSharding(mesh, P(None, "sequence")))
    y = fn(jax.device_put(params, parallel.replicated(mesh)), split)
    np.testing.assert_allclose(y, y_full, atol=1e-5 * float(jnp.abs(y_full).max()), rtol=0)


def test_streaming_with_ft2_fs8():
    # ft=2 with fs=8: spatial-only transitions, then one that also halves time.
    m = _mu(ft=2, fs=8)
    params = _params(m)
    z = jax.random.normal(jax.random.key(2), (1, 6, 1, 1, 4))
    y_full = jax.jit(lambda p, z: ae.decode(m, p, z, chunk=0))(params, z)
    y = jax.jit(lambda p, z: ae.decode(m, p, z, chunk=4))(params, z)
    assert y.shape == (1, 11, 8, 8, 3)
    np.testing.assert_allclose(y, y_full, atol=1e-5 * float(jnp.abs(y_full).max()), rtol=0)


def test_posterior_sample_uses_key(model):
    m, params, enc, _ = model
    x = _video(4, 13)
    sample = jax.jit(lambda p, v, k: ae.encode(m, p, v, key=k))
    mean = enc(params, x)
    a, b = sample(params, x, jax.random.key(0)), sample(params, x, jax.random.key(0))
    c = sample(params, x, jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, mean)
    np.testing.assert_allclose(np.mean(a - mean), 0.0, atol=0.5)


# ---- latent statistics ------------------------------------------------------------------------


def test_latent_stats_normalize_to_unit_variance():
    rng = np.random.default_rng(0)
    shift, scale = np.array([3.0, -1.0, 0.5]), np.array([2.0, 0.1, 7.0])
    z = rng.standard_normal((16, 3, 4, 4, 3)) * scale + shift
    stats = latent_stats.compute_latent_stats([z[:5], z[5:]])  # accumulated over batches...
    whole = latent_stats.compute_latent_stats(z)  # ...equals one pass.
    np.testing.assert_allclose(stats["shift"], whole["shift"], rtol=1e-10)
    np.testing.assert_allclose(stats["scale"], whole["scale"], rtol=1e-10)
    assert stats["count"] == 16 * 3 * 4 * 4
    json.dumps(stats)  # stored in checkpoint metadata.
    n = np.asarray(latent_stats.normalize_latents(jnp.asarray(z, jnp.float32), stats))
    np.testing.assert_allclose(n.reshape(-1, 3).mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(n.reshape(-1, 3).std(0), 1.0, atol=1e-5)
    back = latent_stats.denormalize_latents(jnp.asarray(n), stats)
    np.testing.assert_allclose(back, z, rtol=1e-5, atol=1e-5)
    assert np.all(np.abs(np.asarray(stats["shift"]) - shift) < 0.2 * scale)
    with pytest.raises(ValueError, match="latents have 4 channels"):
        latent_stats.normalize_latents(jnp.zeros((1, 1, 1, 1, 4)), stats)


# ---- the training task --------------------------------------------------------------------------


def _moving_squares(n, T=5, H=16, W=16, seed=0):
    """uint8 videos of a bright square moving on black (like light digits on dark)."""
    rng = np.random.default_rng(seed)
    v = np.zeros((n, T, H, W, 3), np.uint8)
    for i in range(n):
        y, x = rng.integers(0, H - 6, 2)
        dy, dx = rng.integers(-1, 2, 2)
        for t in range(T):
            yy, xx = np.clip(y + dy * t, 0, H - 6), np.clip(x + dx * t, 0, W - 6)
            v[i, t, yy : yy + 6, xx : xx + 6] = 220
    return v


@pytest.fixture(scope="module")
def task_config():
    return load_config(
        BASE,
        [
            "stage=autoencoder",
            "vae.variant=mu",
            "data.num_frames=5",
            "data.height=16",
            "data.width=16",
            "train.batch_size=4",
            "train.eval_batches=2",
            "train.num_preview_samples=3",
            "vae.stats_num_examples=6",
            "vae.kl_weight=1e-4",
        ],
    )


def test_device_batch():
    task = ae_task.AutoencoderTask(load_config(BASE, ["stage=autoencoder", "vae.variant=mu"]))
    host = {"video": _moving_squares(2), "caption": np.array(["a", "b"])}
    batch = task.device_batch(host)
    assert set(batch) == {"video"} and batch["video"].dtype == np.float32
    assert batch["video"].min() == -1.0 and np.isclose(batch["video"].max(), 220 / 127.5 - 1)
    assert task.dummy_batch(3)["video"].shape == (3, 17, 32, 32, 3)
    with pytest.raises(ValueError, match="uint8"):
        task.device_batch({"video": batch["video"]})


def test_reconstruction_losses():
    x = jnp.zeros((2, 3, 4))
    d = jnp.stack([jnp.full((3, 4), 0.5), jnp.full((3, 4), -0.002)])
    np.testing.assert_allclose(
        ae_task.reconstruction_loss(x + d, x, "l1+l2"), [0.75, 0.002004], rtol=1e-6
    )
    eps = ae_task.CHARBONNIER_EPS
    want = [np.sqrt(0.25 + eps**2) - eps, np.sqrt(0.002**2 + eps**2) - eps]
    np.testing.assert_allclose(
        ae_task.reconstruction_loss(x + d, x, "charbonnier"), want, rtol=1e-5
    )
    with pytest.raises(ValueError, match="valid"):
        ae_task.reconstruction_loss(x, x, "l3")


def test_loss_finite_and_training_steps_reduce_it(task_config):
    task = ae_task.AutoencoderTask(task_config)
    params = _params(task.module, 16, 16)
    opt = optax.adam(3e-3)

    @jax.jit
    def step(params, state, batch, key):
        (loss, m), grads = jax.value_and_grad(task.loss, has_aux=True)(params, {}, batch, key)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss, m

    state = opt.init(params)
    noise = {"video": np.random.default_rng(0).uniform(-1, 1, (4, 5, 16, 16, 3)).astype("f4")}
    _, _, loss, m = step(params, state, noise, jax.random.key(1))
    assert np.isfinite(loss) and all(np.isfinite(v) for v in m.values())
    assert m["kl"] > 0
    np.testing.assert_allclose(loss, m["recon"] + 1e-4 * m["kl"], rtol=1e-5)
    batch = task.device_batch({"video": _moving_squares(4)})
    losses = []
    for i in range(12):
        params, state, loss, _ = step(params, state, batch, jax.random.key(i))
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


def test_evaluate_and_metadata_with_fake_loader(task_config, tmp_path, monkeypatch):
    videos = _moving_squares(12, seed=1)
    calls = []

    def fake_loader(config, split, *, batch_size, shuffle, seed, num_epochs, **kw):
        calls.append((split, batch_size, shuffle, kw.get("process_count")))
        return (
            {"video": videos[i : i + batch_size], "caption": np.array(["x"] * batch_size)}
            for i in range(0, len(videos) - batch_size + 1, batch_size)
        )

    monkeypatch.setattr(ae_task, "_make_loader", fake_loader)
    task = ae_task.AutoencoderTask(task_config)
    params = _params(task.module, 16, 16)
    out = task.evaluate(params, {}, 7, str(tmp_path))
    assert calls[0] == ("test", 4, False, 1)
    # Independent check of the PSNR over the 2 eval batches.
    reconstruct = task._jit("reconstruct", task._reconstruct)  # compiled by evaluate.
    recon = np.concatenate(
        [
            ae.to_uint8(np.asarray(reconstruct(params, ae.from_uint8(videos[i : i + 4]))))
            for i in (0, 4)
        ]
    )
    mse = np.mean((videos[:8].astype(float) - recon) ** 2, axis=(1, 2, 3, 4))
    np.testing.assert_allclose(out["psnr"], np.mean(10 * np.log10(255.0**2 / mse)), rtol=1e-4)
    assert -1 <= out["ssim"] <= 1
    sheet = os.path.join(tmp_path, "previews", "reconstructions_00000007.png")
    assert os.path.getsize(sheet) > 0
    meta = task.metadata(params, {})
    json.dumps(meta)
    c = task_config.vae.latent_channels
    assert calls[-1][0] == "train" and len(meta["latent_stats"]["shift"]) == c
    assert meta["latent_stats"]["count"] == 8 * 2 * 4 * 4  # 2 batches of 4 -> >= 6 examples.
    assert meta["vae"]["base_channels"] == ae.VARIANTS["mu"]["base_channels"]
    # The denoiser stage rebuilds the same module from the checkpoint's metadata alone.
    rebuilt = ae.VideoAutoencoder.from_config(json.loads(json.dumps(meta["vae"])))
    fields = ("latent_channels", "base_channels", "channel_multipliers", "num_res_blocks")
    fields += ("temporal_factor", "spatial_factor", "patch_size", "dtype", "param_dtype")
    assert [getattr(rebuilt, f) for f in fields] == [getattr(task.module, f) for f in fields]


# ---- metrics ---------------------------------------------------------------------------------


def _ssim_reference(a, b, data_range):
    """SSIM via scipy's Gaussian filter (skimage's algorithm), per image and channel."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    out = []
    for x, y in zip(a.reshape(-1, *a.shape[-3:]), b.reshape(-1, *b.shape[-3:]), strict=True):
        for ch in range(x.shape[-1]):
            f = functools.partial(ndimage.gaussian_filter, sigma=1.5, truncate=3.5)
            x_, y_ = x[..., ch].astype(np.float64), y[..., ch].astype(np.float64)
            mx, my = f(x_), f(y_)
            vx, vy, cxy = f(x_ * x_) - mx * mx, f(y_ * y_) - my * my, f(x_ * y_) - mx * my
            s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
            out.append(s[5:-5, 5:-5].mean())  # skimage crops (win_size - 1) // 2 borders.
    return np.asarray(out).reshape(a.shape[0], -1).mean(-1)


def test_psnr_known_values():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.2, 0.8, (3, 4, 8, 8, 3))
    assert np.all(np.isinf(metrics.psnr(a, a, 1.0)))
    signs = rng.choice([-1.0, 1.0], a.shape)
    sigmas = np.array([0.1, 0.01, 0.05])
    b = a + sigmas[:, None, None, None, None] * signs  # MSE = sigma^2 exactly.
    np.testing.assert_allclose(metrics.psnr(a, b, 1.0), -20 * np.log10(sigmas), rtol=1e-6)
    jax_psnr = metrics.psnr(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), 1.0)
    assert isinstance(jax_psnr, jax.Array)
    np.testing.assert_allclose(jax_psnr, -20 * np.log10(sigmas), rtol=1e-4)
    u8 = (a * 255).astype(np.uint8)  # uint8 inputs must not wrap around when subtracted.
    np.testing.assert_allclose(
        metrics.psnr(u8, 255 - u8, 255.0)[0], metrics.psnr(u8.astype(float), 255.0 - u8, 255.0)[0]
    )


def test_ssim_known_values():
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 255, (2, 3, 16, 16, 3))
    np.testing.assert_allclose(metrics.ssim(a, a, 255.0), 1.0, rtol=1e-12)
    # Constant images: variances vanish, SSIM is the luminance term.
    x, y = np.full((1, 12, 12, 1), 100.0), np.full((1, 12, 12, 1), 150.0)
    c1 = (0.01 * 255) ** 2
    np.testing.assert_allclose(
        metrics.ssim(x, y, 255.0), (2 * 100 * 150 + c1) / (100**2 + 150**2 + c1), rtol=1e-10
    )
    b = np.clip(a + rng.normal(0, 30, a.shape), 0, 255)
    ref = _ssim_reference(a, b, 255.0)
    ours = metrics.ssim(a, b, 255.0)
    assert ours.shape == (2,) and 0.2 < ours.min() < ours.max() < 0.95
    np.testing.assert_allclose(ours, ref, rtol=1e-9)
    ours_jax = metrics.ssim(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), 255.0)
    np.testing.assert_allclose(ours_jax, ref, rtol=1e-4)
    with pytest.raises(ValueError, match="smaller than the 11x11 window"):
        metrics.ssim(a[:, :, :8, :8], b[:, :, :8, :8], 255.0)
    with pytest.raises(ValueError, match="same shape"):
        metrics.ssim(a, b[:1], 255.0)
