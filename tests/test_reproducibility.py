"""Same seed, same bits: a video depends only on (seed, prompt index, sample index, prompt,
settings), not on the other prompts, `num_samples`, `batch_size` or the number of devices.

A tiny random model (MiniLM, a random VAE and a random 2-block denoiser, every weight drawn, so
that every layer matters) sampled with DDIM at eta 1 and guidance, so the prompt and negative-prompt
encodings, the per-example noise keys and the eta-noise keys all reach the pixels. The suite runs
on 8 fake CPU devices (tests/conftest.py); one test compares with a separate one-device process.
"""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from vdm import encoders
from vdm.config import load_config
from vdm.inference import pipeline
from vdm.models import autoencoder as ae
from vdm.models import denoiser as dn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    "model.depth": 2,
    "model.width": 32,
    "model.num_heads": 2,
    "vae.variant": "mu",
    "vae.checkpoint": "",
    "data.num_frames": 5,
    "data.height": 16,
    "data.width": 16,
    "text_encoder.max_length": 8,
    "sample.sampler": "ddim",
    "sample.eta": 1.0,
    "sample.guidance": 3.0,
    "sample.num_steps": 3,
}
A, B, C = "the digit 4 moving down", "a handwritten one moving up", "7 moving left"


def _random(abstract, seed: int):
    """Random weights for an abstract params tree (no init program to compile): fan-in scaled
    kernels, small vectors, drawn from `seed` so every process gets the same."""
    rngs = np.random.default_rng(seed)

    def draw(x):
        fan_in = int(np.prod(x.shape[:-1])) if len(x.shape) > 1 else 100
        return (rngs.standard_normal(x.shape) / np.sqrt(fan_in)).astype(x.dtype)

    return jax.tree.map(draw, nn.unbox(abstract))


def tiny_pipeline(devices=None) -> pipeline.Pipeline:
    """The same tiny random pipeline in every process (weights drawn from fixed seeds)."""
    config = load_config(os.path.join(ROOT, "configs", "base.py"), TINY)
    d, key = config.data, jax.random.key(0)
    vae = ae.VideoAutoencoder.from_config(config.vae)
    video = jax.ShapeDtypeStruct((1, d.num_frames, d.height, d.width, 3), jnp.float32)
    text = encoders.load_text(config)
    model = dn.Denoiser.from_config(config.model, config.vae.latent_channels)
    z = jax.ShapeDtypeStruct((1, *ae.latent_shape(config.vae, d.num_frames, d.height, d.width)),
                             jnp.float32)  # fmt: skip
    ctx = jax.ShapeDtypeStruct((1, text.max_length, text.dim), jnp.float32)
    mask = jax.ShapeDtypeStruct((1, text.max_length), jnp.int32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    c = config.vae.latent_channels
    return pipeline.Pipeline(
        config=config,
        text=text,
        vae=vae,
        vae_params=_random(jax.eval_shape(vae.init, key, video)["params"], 1),
        latent_stats={"shift": [0.0] * c, "scale": [1.0] * c},
        model=model,
        params=_random(jax.eval_shape(model.init, key, z, t, ctx, mask)["params"], 2),
        devices=devices,
    )


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def test_the_other_prompts_do_not_change_a_video(pipe):
    alone = pipe([A], seed=5)
    together = pipe([A, B, C, B], seed=5)
    assert alone.std() > 0 and not np.array_equal(together[0], together[1])
    np.testing.assert_array_equal(alone[0], together[0])
    # The same prompt at another index is another video (its noise keys differ) ...
    assert not np.array_equal(together[1], together[3])
    # ... and prompt B at index 1 is the same video as in another call with B at index 1.
    np.testing.assert_array_equal(pipe([C, B], seed=5)[1], together[1])


def test_num_samples_and_batch_size_do_not_change_a_video(pipe):
    three = pipe([A, B], seed=2, num_samples=3, batch_size=8)  # [A0 A1 A2 B0 B1 B2]
    one = pipe([A, B], seed=2, num_samples=1, batch_size=8)
    np.testing.assert_array_equal(one, three[[0, 3]])
    for batch_size in (1, 3):
        np.testing.assert_array_equal(
            pipe([A, B], seed=2, num_samples=3, batch_size=batch_size), three
        )
    assert not np.array_equal(three[0], three[1])  # samples of one prompt differ


def test_one_device_and_eight_devices_give_the_same_bytes(pipe):
    assert pipe.num_devices == len(jax.devices()) == 8
    one = dataclasses.replace(pipe, devices=jax.devices()[:1])
    assert one.num_devices == 1
    prompts = [A, B, C]  # 6 videos: one call of 8 slots on 8 devices, 6 calls on 1
    np.testing.assert_array_equal(
        one(prompts, seed=9, num_samples=2), pipe(prompts, seed=9, num_samples=2)
    )


def test_a_one_device_process_gives_the_same_bytes(pipe, tmp_path):
    """A process with one CPU device (no fake devices at all) against the 8-device suite."""
    out = str(tmp_path / "videos.npy")
    code = (
        "import sys, numpy as np; sys.path.insert(0, sys.argv[1]); "
        "from tests.test_reproducibility import tiny_pipeline, A, B; "
        "p = tiny_pipeline(); assert p.num_devices == 1, p.num_devices; "
        "np.save(sys.argv[2], p([A, B], seed=4, num_samples=2))"
    )
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    proc = subprocess.run(
        [sys.executable, "-c", code, ROOT, out], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_array_equal(np.load(out), pipe([A, B], seed=4, num_samples=2))


def test_bundled_model_video_alone_on_one_device_equals_it_in_a_batch_on_eight():
    """The bundled model, where the old design (prompts encoded at the call's batch shape, the
    sampler at `batch_size`) measurably broke this (3 of 52,224 values off by 1/255 at 2 steps)."""
    eight = pipeline.load_pipeline()
    one = dataclasses.replace(eight, devices=jax.devices()[:1])
    two_steps = eight.settings.override(num_steps=2)
    alone = one([A], seed=5, settings=two_steps, batch_size=1)
    together = eight([A, B, C, B], seed=5, settings=two_steps, batch_size=8)
    np.testing.assert_array_equal(alone[0], together[0])
