"""The latent cache (vdm.data.cache) and its command (vdm.tools.cache): building, reading through
the pipeline, fidelity to the frozen encoders, compatibility checks and determinism. Tiny: 20
train / 8 test moving-digits videos of 9x32x32, the "mu" VAE randomly initialised, MiniLM with
max_length 8.

The VAE's random params are drawn with numpy from `eval_shape` shapes rather than by
`vdm.encoders.load_vae` (which the command loads the VAE with): with
jax_threefry_partitionable, XLA takes ~10 s to compile each 5-D random draw on CPU, a minute
for the VAE's init.
"""

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import base
from vdm import encoders as encoders_lib
from vdm.data import cache, sources
from vdm.data import loader as pipeline
from vdm.data.cache import build
from vdm.models import autoencoder as ae
from vdm.models.text import encoder as te
from vdm.tasks import denoiser as denoiser_task
from vdm.tools import cache as cache_tool

N_TRAIN, N_TEST, BATCH = 20, 8, 8  # 20 = two full batches and a padded partial one


def _tiny_config(data_dir: str):
    c = base.get_config()
    c.data.data_dir = data_dir
    c.data.num_frames = 9
    c.data.moving_digits.num_train = N_TRAIN
    c.data.moving_digits.num_test = N_TEST
    c.vae.variant = "mu"
    c.vae.base_channels = 8
    c.vae.channel_multipliers = (1, 2)
    c.vae.num_res_blocks = 1
    c.text_encoder.max_length = 8
    return c


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return _tiny_config(str(tmp_path_factory.mktemp("tfds")))


def _random_vae(config):
    """(module, params, identity stats) like `load_vae` without a checkpoint."""
    module = ae.VideoAutoencoder.from_config(config.vae)
    video = jnp.zeros((1, config.data.num_frames, config.data.height, config.data.width, 3))
    shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), video)["params"])
    rng = np.random.default_rng(0)

    def init(path, leaf):
        name = path[-1].key
        if name == "kernel":  # lecun normal
            std = 1.0 / np.sqrt(np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(0.0, std, leaf.shape), leaf.dtype)
        return (jnp.ones if name == "scale" else jnp.zeros)(leaf.shape, leaf.dtype)

    params = jax.tree_util.tree_map_with_path(init, shapes)
    c = config.vae.latent_channels
    return module, params, {"shift": [0.0] * c, "scale": [1.0] * c}


@pytest.fixture(scope="module")
def encoders(config):
    text = te.load_text_encoder("minilm", max_length=config.text_encoder.max_length)
    return _random_vae(config), text


def _injected(encoders):
    """What `build_cache` takes: the encoders object (`vdm.tools.cache` loads one)."""
    (module, params, stats), text = encoders
    return build.Encoders(text=text, vae=module, vae_params=params, latent_stats=stats)


@pytest.fixture(scope="module")
def built(config, encoders, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cache"))
    for split in ("train", "test"):
        build.build_cache(
            config, split, out, encoders=_injected(encoders), batch_size=BATCH, progress=False
        )
    return out


def _cached_config(config, path):
    c = copy.deepcopy(config)
    c.data.source = f"cache:{path}"
    return c


def _first_batch(config, split, n, shuffle=False):
    loader = pipeline.make_loader(
        config, split, batch_size=n, shuffle=shuffle, seed=0, process_index=0, process_count=1
    )
    return next(iter(loader))


def test_manifest(config, built):
    m = cache.read_manifest(built)
    assert m["format"] == cache.FORMAT and m["version"] == cache.VERSION
    assert m["latent_shape"] == list(ae.latent_shape(config.vae, 9, 32, 32)) == [3, 8, 8, 8]
    assert m["splits"]["train"]["num_examples"] == N_TRAIN
    assert m["splits"]["test"]["num_examples"] == N_TEST
    assert m["text_encoder"] == {"name": "minilm", "max_length": 8, "dtype": "float32", "dim": 384}
    assert m["vae"]["checkpoint"] == "" and m["vae"]["random_init_seed"] == config.seed
    assert m["vae"]["architecture"] == json.loads(json.dumps(ae.resolve_vae_config(config.vae)))
    assert m["latent_stats"] == {"shift": [0.0] * 8, "scale": [1.0] * 8}
    assert m["data"]["num_frames"] == 9 and m["data"]["source"] == "moving_digits"
    features = m["splits"]["test"]["features"]
    assert features["digit"] == {"dtype": "int32", "shape": []}
    assert features["speed"] == {"dtype": "float32", "shape": []}
    assert features["caption_heldout"]["dtype"] == "str"
    assert "trajectory" not in features  # only scalar labels are copied
    cache.check_compatible(m, config, split="test")  # the building config is compatible


def test_loader_batches_from_cache(config, built):
    cfg = _cached_config(config, built)
    batch = _first_batch(cfg, "train", BATCH, shuffle=True)
    assert "video" not in batch
    assert batch["latent_mean"].shape == (BATCH, 3, 8, 8, 8)
    assert batch["latent_mean"].dtype == batch["latent_logvar"].dtype == np.float16
    assert batch["context"].shape == (BATCH, 8, 384) and batch["context"].dtype == np.float16
    assert batch["context_mask"].shape == (BATCH, 8) and batch["context_mask"].dtype == np.int32
    assert batch["caption"].shape == (BATCH,) and all(isinstance(c, str) for c in batch["caption"])
    assert batch["digit"].dtype == np.int32 and batch["speed"].dtype == np.float32
    # The iterator state restores exactly, as for video sources.
    loader = pipeline.make_loader(
        cfg, "train", batch_size=4, shuffle=True, seed=1, process_index=0, process_count=1
    )
    it = iter(loader)
    next(it)
    state = it.get_state()
    expected = next(it)
    again = iter(loader)
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["latent_mean"], expected["latent_mean"])


def test_cached_values_equal_the_encoders(config, built, encoders):
    (module, params, _), text = encoders
    ref = _first_batch(config, "test", N_TEST)  # videos in stored order (no shuffle)
    got = _first_batch(_cached_config(config, built), "test", N_TEST)
    video = jnp.asarray(ref["video"], jnp.float32) / 127.5 - 1.0

    @jax.jit
    def moments(params, video):
        logvar = module.apply({"params": params}, video, method=module.encode_moments)[1]
        return ae.encode(module, params, video), logvar

    mean, logvar = moments(params, video)
    np.testing.assert_allclose(got["latent_mean"].astype(np.float32), mean, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(
        got["latent_logvar"].astype(np.float32), np.asarray(logvar), rtol=1e-3, atol=1e-3
    )
    hidden, mask = text(list(ref["caption"]))
    np.testing.assert_allclose(
        got["context"].astype(np.float32), np.asarray(hidden), rtol=1e-3, atol=1e-3
    )
    np.testing.assert_array_equal(got["context_mask"], mask)
    for key in ("caption", "caption_heldout", "digit", "direction", "speed", "first_bounce"):
        np.testing.assert_array_equal(got[key], ref[key])
    null, null_mask = cache.load_null_context(built)
    want, want_mask = text([""])
    np.testing.assert_allclose(null.astype(np.float32), want[0], rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(null_mask, want_mask[0])


def test_mismatched_config_raises_clearly(config, built, encoders):
    manifest = cache.read_manifest(built)
    frames = copy.deepcopy(config)
    frames.data.num_frames = 13
    with pytest.raises(ValueError, match=r"data\.num_frames: cache has 9, config has 13"):
        cache.check_compatible(manifest, frames)
    with pytest.raises(ValueError, match="was built for videos"):
        sources.get_source(_cached_config(frames, built).data, "train")
    text = copy.deepcopy(config)
    text.text_encoder.max_length = 16
    text.text_encoder.name = "/elsewhere/t5"
    with pytest.raises(ValueError, match=r"text_encoder\.name.*text_encoder\.max_length"):
        cache.check_compatible(manifest, text)
    vae = copy.deepcopy(config)
    vae.vae.latent_channels = 4
    with pytest.raises(ValueError, match=r"latent_shape.*vae\.architecture"):
        cache.check_compatible(manifest, vae)
    with pytest.raises(ValueError, match="split 'validation' is not cached"):
        cache.check_compatible(manifest, config, split="validation")
    with pytest.raises(ValueError, match="has no split 'validation'"):
        sources.get_source(_cached_config(config, built).data, "validation")
    with pytest.raises(FileNotFoundError, match="No latent cache"):
        sources.get_source(_cached_config(config, built + "_missing").data, "train")
    # The same VAE checkpoint reached through a symlinked workdir is the same checkpoint.
    real = os.path.join(os.path.dirname(built), "vae_real")
    os.makedirs(os.path.join(real, "checkpoints", "5", "ema"), exist_ok=True)
    link = real + "_link"
    if not os.path.islink(link):
        os.symlink(real, link)
    via_link = copy.deepcopy(config)
    via_link.vae.checkpoint = link
    linked = copy.deepcopy(manifest)
    ckpt = os.path.join(os.path.realpath(real), "checkpoints", "5")
    linked["vae"]["checkpoint"], linked["vae"]["random_init_seed"] = ckpt, None
    cache.check_compatible(linked, via_link)
    # An exported model's vae/ weights are a VAE checkpoint of their own (`vdm.tools.export`).
    bundle = os.path.join(os.path.dirname(built), "bundle")
    os.makedirs(os.path.join(bundle, "vae"), exist_ok=True)
    with open(os.path.join(bundle, "model.json"), "w") as f:
        f.write("{}")
    exported = copy.deepcopy(config)
    exported.vae.checkpoint = os.path.join(bundle, "vae")
    from_bundle = copy.deepcopy(manifest)
    from_bundle["vae"]["checkpoint"] = os.path.realpath(os.path.join(bundle, "vae"))
    from_bundle["vae"]["random_init_seed"] = None
    cache.check_compatible(from_bundle, exported)
    with pytest.raises(ValueError, match=r"vae\.checkpoint"):
        cache.check_compatible(linked, exported)
    # Adding a split built with another config to an existing cache is refused.
    with pytest.raises(ValueError, match="already holds a latent cache built differently"):
        build.build_cache(text, "test", built, encoders=_injected(encoders), progress=False)
    with pytest.raises(ValueError, match="already holds a latent cache built differently"):
        build.check_output(text, built)  # what the command checks before loading encoders


def test_deterministic_bytes_and_limit(config, built, encoders, tmp_path):
    out = str(tmp_path / "again")
    build.build_cache(
        config, "test", out, encoders=_injected(encoders), batch_size=BATCH, progress=False
    )
    for name in ("test.array_record", cache.NULL_CONTEXT):
        with open(os.path.join(built, name), "rb") as a, open(os.path.join(out, name), "rb") as b:
            assert a.read() == b.read(), name
    mine, theirs = cache.read_manifest(out), cache.read_manifest(built)
    assert mine["splits"]["test"] == theirs["splits"]["test"]
    # limit + zero_padding: the first examples, zeros exactly where the mask is 0.
    small = str(tmp_path / "small")
    m = build.build_cache(
        config, "test", small, encoders=_injected(encoders), batch_size=BATCH, limit=5,
        zero_padding=True, progress=False,
    )  # fmt: skip
    assert m["splits"]["test"]["num_examples"] == 5 and m["zero_padding"]
    a, b = cache.CacheSource(small, "test"), cache.CacheSource(built, "test")
    assert len(a) == 5
    for i in range(5):
        x, y = a[i], b[i]
        np.testing.assert_array_equal(x["latent_mean"], y["latent_mean"])
        keep = y["context_mask"].astype(bool)
        np.testing.assert_array_equal(x["context"][keep], y["context"][keep])
        assert not x["context"][~keep].any()


def test_cli(config, encoders, tmp_path, monkeypatch, capsys):
    vae, text = encoders
    monkeypatch.setattr(te, "load_text_encoder", lambda *a, **k: text)  # skip a 2nd MiniLM load
    monkeypatch.setattr(encoders_lib, "load_vae", lambda config: vae)  # see docstring
    out = str(tmp_path / "cli")
    args = [
        "--config", os.path.join(os.path.dirname(base.__file__), "base.py"),
        "--output", out, "--split", "test", "--limit", "3", "--batch_size", str(BATCH),
        "--no_progress",
        f"--config.data.data_dir={config.data.data_dir}", "--config.data.num_frames=9",
        f"--config.data.moving_digits.num_train={N_TRAIN}",
        f"--config.data.moving_digits.num_test={N_TEST}", "--config.vae.variant=mu",
        "--config.vae.base_channels=8", "--config.vae.channel_multipliers=(1,2)",
        "--config.text_encoder.max_length=8",
    ]  # fmt: skip
    cache_tool.main(args)
    assert "Cached 3 examples of split 'test'" in capsys.readouterr().out
    with open(os.path.join(out, cache.MANIFEST)) as f:
        assert json.load(f)["splits"]["test"]["limit"] == 3
    with pytest.raises(SystemExit):
        cache_tool.main([*args, "--bogus"])
    with pytest.raises(SystemExit):
        cache_tool.main([*args, "--config.vae.depht=3"])
    assert "Unknown config key" in capsys.readouterr().err


def test_denoiser_task_frozen_inputs(config, built, encoders, monkeypatch):
    """Raw-video steps take the encoders sharded by the logical-axis rules (not replicated);
    steps on a cache do not take them at all (the loss never reads them)."""
    from vdm import parallel

    monkeypatch.setattr(encoders_lib, "load_vae", lambda c: encoders[0])
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    rules = config.mesh.logical_axis_rules

    raw = denoiser_task.DenoiserTask(config).frozen()
    assert {"vae", "text", "shift", "scale", "null_ctx", "null_mask"} == set(raw)
    placed = parallel.put_replicated(raw, mesh, rules)
    emb = placed["text"]["word_embeddings"]["embedding"]  # (vocab, embed): embed -> fsdp
    assert emb.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert emb.addressable_shards[0].data.shape[1] == emb.shape[1] // 4
    kernels = [x for x in jax.tree.leaves(placed["vae"]) if x.ndim == 5]
    assert kernels and any(k.sharding.spec != jax.sharding.PartitionSpec() for k in kernels)

    task = denoiser_task.DenoiserTask(_cached_config(config, built))
    frozen = task.frozen()
    assert set(frozen) == {"shift", "scale", "null_ctx", "null_mask"}
    # Training-time evaluation still decodes with the VAE (the host copy).
    pipe = task.pipeline(None, frozen)
    assert pipe.vae_params is task.vae_params


def test_manifest_file_names_cannot_leave_the_cache(built, tmp_path):
    """A manifest is data: the files it names must be plain names inside the cache directory."""
    import shutil

    cases = {
        "split": (
            ("splits", "test"),
            "../outside.array_record",
            lambda d: cache.CacheSource(d, "test"),
        ),
        "null": (("null_context",), "/etc/passwd", cache.load_null_context),
    }
    for case, (keys, name, read) in cases.items():
        copy = str(tmp_path / case)
        shutil.copytree(built, copy)
        read(copy)  # the untouched copy reads
        manifest = cache.read_manifest(copy)
        entry = manifest
        for k in keys:
            entry = entry[k]
        entry["file"] = name
        with open(cache.manifest_path(copy), "w") as f:
            json.dump(manifest, f)
        with pytest.raises(ValueError, match="not a file inside the cache directory"):
            read(copy)
