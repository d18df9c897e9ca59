"""The text-video alignment model (vdm.models.alignment), its stage (vdm.tasks.alignment), the
retrieval figures (vdm.eval.alignment) and the bundle part (vdm.io.bundle). Tiny: the "mu" sizes,
a randomly initialised "mu" VAE on 9x32x32 videos, MiniLM with max_length 8."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from ml_collections import ConfigDict

from configs import base
from tests.test_cache import _random_vae, _tiny_config
from vdm import config as config_lib
from vdm import encoders as encoders_lib
from vdm.errors import UserError
from vdm.eval import alignment as align_eval
from vdm.inference import alignment as aligner_lib
from vdm.io import bundle
from vdm.models import alignment as al
from vdm.models.layers import count_params
from vdm.models.text import encoder as te
from vdm.tasks import get_task
from vdm.tasks.alignment import AlignmentTask


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    c = _tiny_config(str(tmp_path_factory.mktemp("tfds")))
    c.stage = "alignment"
    c.alignment.variant = "mu"
    c.alignment.eval_pairs = 8
    return c


@pytest.fixture(scope="module")
def task(config):
    vae, vae_params, stats = _random_vae(config)
    text = te.load_text_encoder("minilm", max_length=config.text_encoder.max_length)
    ids, mask = text.tokenize([""])
    null = np.asarray(text.encode(text.params, ids, mask)), np.asarray(mask)
    enc = encoders_lib.FrozenEncoders(text, vae, vae_params, stats, *null)
    return AlignmentTask(config, enc)


def test_model_shapes_unit_norm_and_variant_sizes():
    model = al.AlignmentModel(**al.VARIANTS["mu"])
    z, ctx = jnp.ones((3, 3, 8, 8, 8)), jnp.ones((3, 5, 384))
    mask = jnp.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    params = model.init(jax.random.key(0), z, ctx, mask)["params"]
    v, s, scale = model.apply({"params": params}, z, ctx, mask)
    assert v.shape == s.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(v, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(s[:2], axis=-1), 1.0, rtol=1e-5)
    assert float(scale) == pytest.approx(10.0, rel=1e-4)
    assert set(params) == {"video", "text", "logit_scale"}
    cfg = base.get_config().alignment
    s_model = al.AlignmentModel.from_config(cfg)
    assert (s_model.width, s_model.embed_dim) == (96, 128)
    cfg.width = 64  # a size set in the config wins over the variant
    assert al.AlignmentModel.from_config(cfg).width == 64
    assert 1e5 < count_params(s_model.init(jax.random.key(0), z, ctx, mask)["params"]) < 1e6


def test_sentence_embedding_is_the_masked_mean():
    ctx = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    got = al.sentence_embedding(ctx, mask)
    want = np.stack([ctx[0, :2].mean(0), ctx[1, 0]])
    want = want / np.linalg.norm(want, axis=-1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_contrastive_loss_prefers_matching_pairs():
    e = np.eye(4, dtype=np.float32)
    matched, m = al.contrastive_loss(jnp.asarray(e), jnp.asarray(e), jnp.float32(10.0))
    shuffled, m2 = al.contrastive_loss(jnp.asarray(e), jnp.asarray(e[::-1]), jnp.float32(10.0))
    assert float(matched.mean()) < 0.01 < float(shuffled.mean())
    assert float(m["acc_v2t"]) == float(m["acc_t2v"]) == 1.0
    assert float(m2["acc_v2t"]) == 0.0


def test_retrieval_matches_labels_not_indices():
    # Videos 0 and 1 share the labels (digit 3, right): retrieving either is correct.
    v = np.eye(3, dtype=np.float32)
    t = np.array([[0, 1, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    r = align_eval.retrieval(v, t, digit=np.array([3, 3, 5]), direction=np.array([0, 0, 2]))
    assert r["t2v"] == r["v2t"] == 1.0
    r = align_eval.retrieval(v, t, digit=np.array([3, 4, 5]), direction=np.array([0, 0, 2]))
    assert r["t2v"] == pytest.approx(2 / 3) and r["t2v_direction"] == 1.0


def test_stage_is_registered_and_training_reduces_the_loss(config, task):
    assert type(get_task.__globals__["_STAGES"]["alignment"]) is type(AlignmentTask)
    rng = np.random.default_rng(0)
    batch = task.dummy_batch(8)
    batch["video"] = rng.integers(0, 255, batch["video"].shape, dtype=np.uint8)
    batch = task.device_batch({"video": batch["video"], "caption": [f"{i} up" for i in range(8)]})
    params = task.init(jax.random.key(0), jax.tree.map(jnp.asarray, batch))
    params = nn.unbox(params)
    frozen = nn.unbox(task.frozen())
    opt = optax.adam(3e-3)
    state = opt.init(params)
    key = jax.random.key(1)  # the same posterior sample every step: a fixed problem

    @jax.jit
    def step(params, state):
        (loss, _), grads = jax.value_and_grad(task.loss, has_aux=True)(params, frozen, batch, key)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(15):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    metrics = task.evaluate(params, task.frozen(), 0, "/nonexistent")
    assert {"eval/caption_vocab/t2v_direction", "eval/caption/v2t"} <= set(metrics)


def test_config_upgrade_adds_the_alignment_section():
    old = config_lib.to_dict(base.get_config())
    old.pop("alignment")
    old["version"] = 4
    up = config_lib.upgrade(ConfigDict(old))
    assert up.version == config_lib.CONFIG_VERSION and up.alignment.variant == "S"
    assert up.alignment.checkpoint == "" and up.alignment.width is None


def test_bundle_part_round_trip_and_aligner_checks(config, task, tmp_path):
    params = task.init(jax.random.key(0), jax.tree.map(jnp.asarray, task.dummy_batch(1)))
    params = nn.unbox(params)
    model_dir = str(tmp_path / "model")
    (tmp_path / "model").mkdir()
    assert not bundle.has_alignment(model_dir)
    meta = {
        "config": config_lib.to_dict(config),
        "text_encoder": "minilm",
        "latent_stats": task.latent_stats,
    }
    bundle.write_alignment(model_dir, params, meta)
    (tmp_path / "model" / bundle.MODEL_JSON).write_text('{"config": {}, "latent_stats": {}}')
    got_meta, got = bundle.read_alignment(model_dir)
    jax.tree.map(np.testing.assert_array_equal, got, params)
    pipe = task.pipeline(None, task.frozen())
    aligner = aligner_lib.load_aligner(pipe, model_dir)
    videos = np.zeros((2, 9, 32, 32, 3), np.uint8)
    scores = aligner.score_videos(videos, ["3 moving up", "a 4 moving left"])
    assert scores.shape == (2,) and np.all(np.abs(scores) <= 1.0 + 1e-5)
    meta["text_encoder"] = "t5-small"
    bundle.write_alignment(model_dir, params, meta)
    with pytest.raises(UserError, match="text encoder"):
        aligner_lib.load_aligner(pipe, model_dir)
    with pytest.raises(UserError, match="No alignment model"):
        aligner_lib.load_aligner(pipe, str(tmp_path / "missing"))


def test_sharded_train_steps_equal_one_device(config, task):
    """The alignment stage trains through the shared train step, sharded by the same rules as
    every stage: 3 steps on 8 fake devices equal 3 steps on one (losses, params, EMA)."""
    from vdm import parallel
    from vdm.rng import base_key
    from vdm.train import setup as train_setup

    rng = np.random.default_rng(0)
    videos = rng.integers(0, 255, task.dummy_batch(8)["video"].shape, dtype=np.uint8)
    captions = [f"the digit {i} moving {'up' if i % 2 else 'down'}" for i in range(8)]

    def run(mesh_shape, devices):
        c = config.copy_and_resolve_references()
        c.mesh.shape = mesh_shape
        setup = train_setup.build(task, c, parallel.make_mesh(c.mesh, devices))
        state = setup.layout.put_state(train_setup.init_state(setup))
        frozen = train_setup.place_frozen(setup)
        batch = setup.layout.put_batch(task.device_batch({"video": videos, "caption": captions}))
        losses = []
        for _ in range(3):
            state, metrics = setup.train_step(state, batch, base_key(c.seed), frozen)
            losses.append(setup.layout.fetch(metrics)["loss"])
        return np.array(losses), jax.device_get(setup.layout.global_view(state))

    ref_losses, ref = run({"data": 1}, jax.devices()[:1])
    assert ref_losses[-1] != ref_losses[0]  # the steps did update the model
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # noqa: E731
    for shape in ({"data": 4, "fsdp": 2}, {"data": 2, "fsdp": 2, "tensor": 2}):
        losses, state = run(shape, None)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=str(shape))
        jax.tree.map(close, nn.unbox(state.params), nn.unbox(ref.params))
        jax.tree.map(close, nn.unbox(state.ema_params), nn.unbox(ref.ema_params))
