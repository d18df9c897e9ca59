"""Fine-tuning Wan 2.1 with train.py (stage "wan", vdm.tasks.wan, configs/wan_finetune.py) on a
tiny random pipeline (tests/wan_tiny.py) and a folder of four tiny clips: the latent cache is
built with the pipeline's VAE and UMT5 and refuses another model; a full fine-tune starts from
the pipeline's weights, lowers the loss, resumes bit-exactly, samples through `load_pipeline` and
exports as a Diffusers-format pipeline; LoRA starts as the base, trains and checkpoints adapters
only, and its merged weights compute what the adapters on the base compute."""

import dataclasses
import json
import os
import shutil

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import wan_tiny

import vdm
from vdm import parallel
from vdm.config import load_config
from vdm.data import cache
from vdm.data.cache import build
from vdm.errors import ConfigError
from vdm.io import checkpoint as ckpt_lib
from vdm.models import lora
from vdm.models.layers import count_params
from vdm.models.wan.transformer_weights import load_transformer
from vdm.tasks import get_task
from vdm.tasks import lora as lora_task
from vdm.tools import cache as cache_tool
from vdm.tools import export
from vdm.train import loop

CAPTIONS = ["a cat walks on the grass", "a dog runs in the park", "waves crash", "a red car"]
TRAIN = {
    "train.num_steps": 8,
    "train.batch_size": 2,
    "train.log_every_steps": 1,
    "checkpoint.every_steps": 4,
    "checkpoint.async_save": False,
    "optim.learning_rate": 1e-3,
    "optim.warmup_steps": 0,
}


def _clips(path):
    """Four 5-frame 32x32 clips (shifted gradients, one speed each) with captions."""
    os.makedirs(path)
    ramp = np.linspace(0, 1, 32, dtype=np.float32)
    with open(os.path.join(path, "captions.jsonl"), "w") as f:
        for i, caption in enumerate(CAPTIONS):
            frames = [
                np.roll(np.outer(ramp, ramp[::-1]), 3 * t * (i + 1), axis=1) for t in range(5)
            ]
            video = np.repeat((np.stack(frames) * 255).astype(np.uint8)[..., None], 3, -1)
            np.save(os.path.join(path, f"c{i}.npy"), video)
            f.write(json.dumps({"file": f"c{i}.npy", "caption": caption}) + "\n")


def wan_config(root, source, overrides=None):
    return load_config(
        "configs/wan_finetune.py",
        {
            "model.pretrained": os.path.join(root, "pipe"),
            "data.source": source,
            "data.num_frames": 5,
            "data.height": 32,
            "data.width": 32,
            "data.fps": 8,
            "model.dtype": "float32",
            "model.remat": "none",
            "text_encoder.max_length": 64,  # Wan's 512 works too; 64 is faster on a CPU
            **(overrides or {}),
        },
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(root, the torch pipeline): root holds pipe/ (hub layout), clips/ and cache/."""
    root = str(tmp_path_factory.mktemp("wan_train"))
    torch_pipe = wan_tiny.save_pipeline(os.path.join(root, "pipe"))
    _clips(os.path.join(root, "clips"))
    config = wan_config(root, f"folder:{root}/clips")
    encoders = cache_tool.load_encoders(config)
    build.build_cache(config, "train", f"{root}/cache", encoders=encoders, progress=False)
    return root, torch_pipe


def train(config, workdir):
    state = loop.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
    return jax.device_get(state)


def cached_batch(task, root):
    """All four cached clips as one device batch."""
    source = cache.CacheSource(f"{root}/cache", "train")
    examples = [source[i] for i in range(len(source))]
    return {k: np.stack([e[k] for e in examples]) for k in task.dummy_batch(1)}


def heldout_loss(loss_fn, params, batch):
    """The loss of `params` on `batch` at fixed times, noise and dropout."""
    return float(np.mean([loss_fn(params, batch, jax.random.key(i)) for i in range(4)]))


def test_cache_holds_the_wan_vae_posterior_and_refuses_another_model(tiny):
    root, torch_pipe = tiny
    manifest = cache.read_manifest(f"{root}/cache")
    assert manifest["vae"]["checkpoint"] == os.path.realpath(f"{root}/pipe/vae")
    assert manifest["text_encoder"]["name"] == os.path.realpath(f"{root}/pipe")
    assert manifest["latent_shape"] == [2, 4, 4, 4] and manifest["splits"]["train"]["num_examples"]
    # Latent statistics are the VAE config's; the means are diffusers' encoding of the clip.
    assert manifest["latent_stats"]["shift"] == pytest.approx([0.1, -0.2, 0.3, 0.0])
    record = cache.CacheSource(f"{root}/cache", "train")[0]
    clip = np.load(f"{root}/clips/c0.npy").astype(np.float32) / 127.5 - 1.0
    with torch.no_grad():
        x = torch.from_numpy(clip).permute(3, 0, 1, 2)[None]  # [1, 3, T, H, W]
        mean = torch_pipe.vae.encode(x).latent_dist.mean[0].permute(1, 2, 3, 0).numpy()
    np.testing.assert_allclose(record["latent_mean"], mean, atol=2e-3, rtol=2e-3)
    assert 1 < record["context_mask"].sum() < 64
    shutil.copytree(f"{root}/pipe", f"{root}/other")
    other = wan_config(root, f"cache:{root}/cache", {"model.pretrained": f"{root}/other"})
    with pytest.raises(ConfigError, match="vae.checkpoint: cache has"):
        get_task(other)


@pytest.fixture(scope="module")
def full_run(tiny, tmp_path_factory):
    root, _ = tiny
    config = wan_config(root, f"cache:{root}/cache", TRAIN)
    workdir = str(tmp_path_factory.mktemp("wan_full") / "run")
    return config, workdir, train(config, workdir)


def test_full_finetune_starts_from_the_pipeline_lowers_the_loss_and_resumes_bit_exactly(
    tiny, full_run
):
    root, _ = tiny
    config, workdir, state = full_run
    task = get_task(config)
    frozen = task.frozen()
    _, base = load_transformer(f"{root}/pipe")
    loss_fn = jax.jit(lambda p, b, k: task.loss(p, frozen, b, k)[0])
    batch = cached_batch(task, root)
    before, after = heldout_loss(loss_fn, base, batch), heldout_loss(loss_fn, state.params, batch)
    assert after < 0.8 * before, (before, after)
    # Wan's padding: the DiT sees zeros past each prompt's tokens, whatever the cache holds there.
    noisy = dict(batch, context=np.where(batch["context_mask"][..., None] > 0, batch["context"], 7))
    assert heldout_loss(loss_fn, base, noisy) == before
    assert ckpt_lib.load_metadata(workdir)["wan"]["pretrained"] == os.path.abspath(f"{root}/pipe")
    # Resume: drop the last checkpoint; steps 5..8 again from step 4 give the same bits.
    shutil.rmtree(os.path.join(workdir, "checkpoints", "8"))
    again = train(config, workdir)
    jax.tree.map(np.testing.assert_array_equal, again.params, state.params)
    jax.tree.map(np.testing.assert_array_equal, again.opt_state, state.opt_state)


def test_finetuned_model_samples_and_exports_as_a_diffusers_pipeline(tiny, full_run, tmp_path):
    root, torch_pipe = tiny
    _, workdir, state = full_run
    pipe = vdm.load_pipeline(workdir, devices=jax.devices()[:1])
    jax.tree.map(np.testing.assert_array_equal, pipe.params, state.params)
    settings = dataclasses.replace(pipe.settings, num_steps=4)
    video = pipe(["a cat walks on the grass"], seed=0, settings=settings)
    assert video.shape == (1, 5, 32, 32, 3) and video.dtype == np.uint8 and video.std() > 0
    out = export.export_with_logs(workdir, str(tmp_path / "exported"))["bundle"]
    exported = vdm.load_pipeline(out, devices=jax.devices()[:1], num_frames=5, height=32, width=32)
    jax.tree.map(np.testing.assert_array_equal, exported.params, state.params)
    # diffusers' model takes the exported tensors (every name and shape, strictly): the
    # fine-tuned weights, not the base's.
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    part = os.path.join(out, "transformer")
    tuned = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(part))
    tuned.load_state_dict(load_file(os.path.join(part, "diffusion_pytorch_model.safetensors")))
    got = tuned.state_dict()["proj_out.weight"].numpy()
    np.testing.assert_array_equal(got, np.asarray(state.params["proj_out"]["kernel"]).T)
    assert not np.array_equal(got, torch_pipe.transformer.state_dict()["proj_out.weight"].numpy())


LORA = {**TRAIN, "optim.lora_rank": 4, "optim.learning_rate": 1e-2, "train.num_steps": 4}


def test_lora_starts_as_the_base_trains_adapters_only_and_merges(tiny, tmp_path):
    root, _ = tiny
    config = wan_config(root, f"cache:{root}/cache", LORA)
    task = lora_task.wrap(get_task(config), config)
    frozen = task.frozen()
    _, base = load_transformer(f"{root}/pipe")
    adapters = flax.core.meta.unbox(task.init(jax.random.key(0), task.dummy_batch(1)))
    # At init B = 0: the merged weights are the pipeline's, bit for bit.
    jax.tree.map(np.testing.assert_array_equal, task.merged(adapters, frozen), base)
    # Every adapted kernel is a Linear's: the train step computes x W + (x A)(s B), no merge.
    assert sorted(task.unmerged) == lora.targeted(base, "") and task.unmerged
    workdir = str(tmp_path / "lora")
    state = train(config, workdir)
    paths = set(flax.traverse_util.flatten_dict(state.params, sep="/"))
    assert paths and all(p.endswith(("/lora_a", "/lora_b")) for p in paths)
    assert any("attn1/to_q" in p for p in paths) and any("ffn_proj" in p for p in paths)
    step_dir = os.path.join(workdir, "checkpoints", "4")
    assert count_params(ckpt_lib.load_params(step_dir, item="params")) == count_params(state.params)
    assert ckpt_lib.load_metadata(workdir)["lora"]["base"] == os.path.abspath(f"{root}/pipe")
    # The merged weights (sampling's and the export's) are those the training step computed with.
    merged = lora.merge(base, state.params, config.optim)
    jax.tree.map(np.testing.assert_array_equal, task.merged(state.params, frozen), merged)
    # Merged equals unmerged: x W' = x W + (alpha / r) (x A) B, here for a query projection.
    w = np.asarray(base["blocks_0"]["attn1"]["to_q"]["kernel"])  # [D, heads, head_dim]
    pair = state.params["blocks_0"]["attn1"]["to_q"]["kernel"]
    a, b = np.asarray(pair["lora_a"]), np.asarray(pair["lora_b"])  # [D, r], [r, heads, head_dim]
    x = np.random.default_rng(0).normal(size=(3, w.shape[0])).astype(np.float32)
    unmerged = np.einsum("nd,dhk->nhk", x, w) + lora.scale(4, 0.0) * np.einsum(
        "nr,rhk->nhk", x @ a, b
    )
    tuned = np.einsum("nd,dhk->nhk", x, np.asarray(merged["blocks_0"]["attn1"]["to_q"]["kernel"]))
    np.testing.assert_allclose(tuned, unmerged, rtol=1e-5, atol=1e-6)
    assert np.abs(tuned - np.einsum("nd,dhk->nhk", x, w)).max() > 1e-4  # the adapters trained
    pipe = vdm.load_pipeline(workdir, devices=jax.devices()[:1])
    jax.tree.map(np.testing.assert_array_equal, pipe.params, merged)
    # The export holds the merged weights in diffusers' layout ([heads * head_dim, D] for to_q).
    out = export.export_with_logs(workdir, str(tmp_path / "exported"))["bundle"]
    part = os.path.join(out, "transformer", "diffusion_pytorch_model.safetensors")
    q = safetensors.numpy.load_file(part)["blocks.0.attn1.to_q.weight"]
    kernel = np.asarray(merged["blocks_0"]["attn1"]["to_q"]["kernel"])
    np.testing.assert_array_equal(q, kernel.reshape(kernel.shape[0], -1).T)


def test_lora_on_a_bfloat16_base_trains_float32_adapters(tiny, tmp_path):
    # configs/wan_finetune.py:lora keeps the frozen base in bfloat16 (tests/test_aot_wan.py).
    root, _ = tiny
    config = wan_config(root, f"cache:{root}/cache", {**LORA, "model.param_dtype": "bfloat16"})
    task = lora_task.wrap(get_task(config), config)
    frozen = task.frozen()
    base = parallel.unbox(frozen[lora_task.BASE])
    kernel = base["blocks_0"]["attn1"]["to_q"]["kernel"]
    _, pipe = load_transformer(f"{root}/pipe")
    want = pipe["blocks_0"]["attn1"]["to_q"]["kernel"].astype(jnp.bfloat16)
    assert kernel.dtype == jnp.bfloat16 and np.array_equal(kernel, want)
    batch = cached_batch(task, root)
    loss_fn = jax.jit(lambda p, b, k: task.loss(p, frozen, b, k)[0])
    before = heldout_loss(loss_fn, parallel.unbox(task.init(jax.random.key(0), batch)), batch)
    state = train(config, str(tmp_path / "lora_bf16"))
    leaves = jax.tree.leaves(state.params)
    assert leaves and all(x.dtype == jnp.float32 for x in leaves)
    assert heldout_loss(loss_fn, state.params, batch) < before


def test_bad_wan_configs_are_named(tiny):
    root, _ = tiny
    with pytest.raises(ConfigError, match="trains on a latent cache"):
        get_task(wan_config(root, f"folder:{root}/clips"))
    with pytest.raises(ConfigError, match="model.pretrained="):
        get_task(wan_config(root, f"cache:{root}/cache", {"model.pretrained": f"{root}/none"}))
