"""The whole stack on tiny sizes: train a VAE, train a denoiser on it, sample from the CLI.

One module-scoped run of both stages (a few steps each) serves every test here.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from ml_collections import ConfigDict

from vdm import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")
VAE_QUICKSTART = os.path.join(ROOT, "configs", "vae_quickstart.py")
VAE_DECODER = os.path.join(ROOT, "configs", "vae_quickstart_decoder.py")


def tiny(data_dir, **extra):
    """Overrides that shrink the quickstart configs to seconds on a CPU."""
    o = {
        "data.data_dir": data_dir,
        "data.num_frames": 9,
        "data.moving_digits.num_train": 48,
        "data.moving_digits.num_test": 16,
        "vae.variant": "mu",
        "vae.latent_channels": 4,
        "text_encoder.max_length": 12,
        "model.depth": 1,
        "model.width": 32,
        "model.num_heads": 2,
        "train.num_steps": 3,
        "train.batch_size": 8,
        "train.log_every_steps": 1,
        "train.eval_every_steps": 0,
        "train.eval_batches": 1,
        "checkpoint.every_steps": 2,
        "checkpoint.async_save": False,
        "mesh.shape": "{'data': -1, 'fsdp': 2, 'tensor': 1}",
        "optim.warmup_steps": 1,
        "sample.num_steps": 2,
        "eval.during_training": 0,
    }
    o.update(extra)
    return {k: v if isinstance(v, str) else repr(v) for k, v in o.items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from vdm.train import loop

    root = tmp_path_factory.mktemp("e2e")
    data_dir = str(root / "data")
    vae_dir, dit_dir = str(root / "vae"), str(root / "dit")
    vae_cfg = config_lib.load_config(
        VAE_QUICKSTART, tiny(data_dir, **{"vae.stats_num_examples": 8})
    )
    loop.train_and_evaluate(vae_cfg, vae_dir)
    dit_cfg = config_lib.load_config(QUICKSTART, tiny(data_dir, **{"vae.checkpoint": vae_dir}))
    loop.train_and_evaluate(dit_cfg, dit_dir)
    return {"root": root, "vae": vae_dir, "dit": dit_dir, "config": dit_cfg}


def _run(args, **kw):
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=600, **kw
    )


def test_sample_cli_writes_files_and_records(trained, tmp_path):
    out = tmp_path / "out"
    r = _run(
        [
            "sample.py",
            "--checkpoint",
            trained["dit"],
            "--prompt",
            "the digit 4 moving down",
            "--prompt",
            "a 7 moving left",
            "--num_samples",
            "2",
            "--num_steps",
            "2",
            "--seed",
            "3",
            "--output_dir",
            str(out),
            "--formats",
            "npy,gif,png",
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 2 * 3
    assert {r["file"].rsplit("/", 1)[1] for r in records} >= {"000_00.npy", "001_01.gif"}
    assert all(r["seed"] == 3 and r["num_steps"] == 2 for r in records)
    video = np.load(out / "001_01.npy")
    c = trained["config"].data
    assert video.dtype == np.uint8 and video.shape == (c.num_frames, c.height, c.width, 3)


def test_sample_is_independent_of_batch_and_reproducible(trained):
    from vdm.inference import pipeline

    pipe = pipeline.load_pipeline(trained["dit"])
    two = pipe.settings.override(num_steps=2)
    alone = pipe(["the digit 4 moving down"], seed=5, settings=two)
    batch = pipe(
        ["the digit 4 moving down", "a 7 moving left", "3 moving up"],
        seed=5,
        num_samples=2,
        settings=two,
        batch_size=4,
    )
    again = pipe(["the digit 4 moving down"], seed=5, settings=two)
    other = pipe(["the digit 4 moving down"], seed=6, settings=two)
    # Same noise whatever the batch: the same video up to float rounding (XLA's CPU kernels may
    # reduce in another order at another batch size; one 8-bit value off by one was seen).
    diff = np.abs(alone[0].astype(int) - batch[0].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
    np.testing.assert_array_equal(alone, again)  # the same call: bit-identical
    assert batch.shape[0] == 6
    assert not np.array_equal(alone, other)


def _two_steps(pipe, **settings):
    return pipe.settings.override(num_steps=2, **settings)


def test_export_roundtrip(trained, tmp_path):
    from vdm.errors import ConfigError, UserError
    from vdm.inference import pipeline
    from vdm.tools import export

    prompt = ["six moving to the right"]
    out = export.export(trained["dit"], str(tmp_path / "bundle"))
    run = pipeline.load_pipeline(trained["dit"])
    a = run(prompt, seed=0, settings=_two_steps(run))
    bundled = pipeline.load_pipeline(out)
    b = bundled(prompt, seed=0, settings=_two_steps(bundled))
    np.testing.assert_array_equal(a, b)
    # sampling defaults chosen after training are recorded in the bundle
    tuned = export.export(trained["dit"], str(tmp_path / "tuned"), sample={"guidance": "2.5"})
    assert pipeline.load_pipeline(tuned).config.sample.guidance == 2.5
    # ... including the flow sampling shift; the bundle then samples with it by default (the run
    # trained with diffusion.shift=1 and samples with configs/quickstart.py's sample.shift=3).
    shifted = export.export(trained["dit"], str(tmp_path / "shifted"), sample={"shift": "1.5"})
    c = pipeline.load_pipeline(shifted)
    assert c.config.sample.shift == 1.5 and c.config.diffusion.shift == 1.0
    c15 = c(prompt, seed=0, settings=_two_steps(c))
    assert not np.array_equal(a, c15)
    np.testing.assert_array_equal(c15, c(prompt, seed=0, settings=_two_steps(c, shift=1.5)))
    np.testing.assert_array_equal(a, c(prompt, seed=0, settings=_two_steps(c, shift=3)))
    with pytest.raises(
        ConfigError, match=r"config\.sample\.guidanse'.*Did you mean: config\.sample\.guidance"
    ):
        export.export(trained["dit"], str(tmp_path / "bad"), sample={"guidanse": 3})
    with pytest.raises(UserError, match="--num_steps must be >= 1"):
        export.export(trained["dit"], str(tmp_path / "bad"), sample={"num_steps": 0})


def test_decoder_fine_tune_replaces_the_vae_of_a_bundle(trained, tmp_path):
    """configs/vae_quickstart_decoder.py on the tiny VAE, then `export --vae`: the bundle decodes
    with the new decoder; a VAE whose encoder changed is refused (the denoiser's latents differ)."""
    from vdm.errors import UserError
    from vdm.inference import pipeline, vae_swap
    from vdm.io import checkpoint
    from vdm.tools import export
    from vdm.train import loop

    data_dir = str(trained["root"] / "data")
    ft_dir, full_dir = str(tmp_path / "vae_decoder"), str(tmp_path / "vae_full")
    over = {"vae.stats_num_examples": 8, "train.init_from": trained["vae"]}
    loop.train_and_evaluate(config_lib.load_config(VAE_DECODER, tiny(data_dir, **over)), ft_dir)
    full = tiny(data_dir, **over, **{"optim.freeze": ""})
    loop.train_and_evaluate(config_lib.load_config(VAE_DECODER, full), full_dir)

    out = export.export_with_logs(trained["dit"], str(tmp_path / "bundle"), vae=ft_dir)
    assert os.path.exists(out["vae_init_train_log"])  # the original VAE's log rides along
    old, new = checkpoint.load_params(trained["vae"]), pipeline.load_pipeline(out["bundle"])
    assert vae_swap.trees_equal(new.vae_params["encoder"], old["encoder"])
    assert not vae_swap.trees_equal(new.vae_params["decoder"], old["decoder"])
    video = new(["six moving to the right"], seed=0, settings=_two_steps(new))
    c = trained["config"].data
    assert video.shape == (1, c.num_frames, c.height, c.width, 3)
    with pytest.raises(UserError, match="its encoder weights differ"):
        pipeline.load_pipeline(trained["dit"], vae=full_dir)
    with pytest.raises(UserError, match="'.*dit' is a 'denoiser' checkpoint, not a VAE"):
        pipeline.load_pipeline(trained["dit"], vae=trained["dit"])


def test_a_new_run_starts_from_an_exported_model(trained, tmp_path):
    """An exported model's `vae/` and `denoiser/` load like checkpoints: a deeper denoiser grows
    from the bundle on the bundle's VAE and is re-exported over that same bundle, which keeps the
    record of every run in the chain."""
    from vdm.errors import UserError
    from vdm.inference import pipeline
    from vdm.io import checkpoint
    from vdm.tools import export
    from vdm.train import loop

    bundle = str(tmp_path / "bundle")
    export.export_with_logs(trained["dit"], bundle)
    before = pipeline.load_pipeline(bundle)
    grown_dir = str(tmp_path / "grown")
    over = {
        "vae.checkpoint": os.path.join(bundle, "vae"),
        "train.init_from": os.path.join(bundle, "denoiser"),
        "train.init_new_params": True,
        "model.depth": 2,
        "optim.learning_rate": 0.0,  # the grown model must then stay the bundle's function
        "optim.warmup_steps": 0,
    }
    cfg = config_lib.load_config(QUICKSTART, tiny(str(trained["root"] / "data"), **over))
    loop.train_and_evaluate(cfg, grown_dir)
    grown = pipeline.load_pipeline(grown_dir)
    assert set(grown.params) - set(before.params) == {"block_1"}
    prompt = ["six moving to the right"]
    np.testing.assert_allclose(
        grown(prompt, seed=0, settings=_two_steps(grown)),
        before(prompt, seed=0, settings=_two_steps(before)),
        atol=1,
    )

    out = export.export_with_logs(grown_dir, bundle)  # over the bundle its weights came from
    assert set(out) == {"bundle", "train_log", "init_train_log", "vae_train_log"}
    with open(out["init_train_log"]) as f, open(os.path.join(trained["dit"], "metrics.jsonl")) as g:
        assert f.read() == g.read()  # the bundle's denoiser log became the init run's log
    # a run started from this bundle in turn carries both logs one step further back
    assert export._logs_of(os.path.join(bundle, "denoiser"), "denoiser", hops=1) == {
        "init_train_log": os.path.join(bundle, "train_log.jsonl"),
        "init_init_train_log": os.path.join(bundle, "init_train_log.jsonl"),
    }

    # exported over itself again (the bundle now holds this very run): the same record, not the
    # bundle's own logs shifted one run back, and the same weight files (not renamed copies)
    def weight_files():  # {path: mtime} under denoiser/ and vae/
        return {
            os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
            for part in ("denoiser", "vae")
            for d, _, fs in os.walk(os.path.join(bundle, part))
            for f in fs
        }

    files = weight_files()
    assert export.export_with_logs(grown_dir, bundle) == out
    assert weight_files() == files
    with open(out["init_train_log"]) as f, open(os.path.join(trained["dit"], "metrics.jsonl")) as g:
        assert f.read() == g.read()
    assert not os.path.exists(os.path.join(bundle, "init_init_train_log.jsonl"))
    assert pipeline.load_pipeline(bundle).config.model.depth == 2
    assert checkpoint.load_metadata(os.path.join(bundle, "denoiser"))["vae_checkpoint"] == (
        os.path.join(bundle, "vae")
    )
    with pytest.raises(FileNotFoundError, match="give its 'denoiser/' or 'vae/' directory"):
        checkpoint.load_params(bundle)
    with pytest.raises(FileNotFoundError, match="EMA weights only"):
        checkpoint.load_params(os.path.join(bundle, "denoiser"), item="params")
    with pytest.raises(UserError, match="has no 'config' of its own"):
        pipeline.load_pipeline(trained["dit"], vae=os.path.join(bundle, "vae"))


def test_in_training_evaluation_scores_and_previews(trained, tmp_path):
    """The denoiser task's evaluation (what the loop runs every eval_every_steps) samples test
    prompts through the inference pipeline, scores them, and writes a preview contact sheet;
    without digit labels (eval.during_training = 0) it writes the fixed preview prompts only."""
    from vdm.io import checkpoint
    from vdm.tasks.denoiser import DenoiserTask

    cfg = config_lib.load_config(
        QUICKSTART,
        tiny(
            str(trained["root"] / "data"),
            **{"vae.checkpoint": trained["vae"], "eval.during_training": 4},
        ),
    )
    task = DenoiserTask(cfg)
    params = checkpoint.load_params(trained["dit"], item="ema")
    metrics = task.evaluate(params, task.frozen(), 3, str(tmp_path))
    assert {"eval/digit_acc", "eval/direction_acc", "eval/consistency"} <= set(metrics)
    assert all(np.isfinite(v) for v in metrics.values())
    assert os.path.getsize(tmp_path / "samples" / "step_0000003.png") > 0
    cfg.eval.during_training = 0
    assert DenoiserTask(cfg).evaluate(params, task.frozen(), 4, str(tmp_path)) == {}
    assert os.path.getsize(tmp_path / "samples" / "step_0000004.png") > 0


def test_resume_continues_from_checkpoint(trained):
    from vdm.io import manager
    from vdm.train import loop

    cfg = config_lib.load_config(
        QUICKSTART,
        tiny(
            str(trained["root"] / "data"),
            **{"vae.checkpoint": trained["vae"], "train.num_steps": 4},
        ),
    )
    state = loop.train_and_evaluate(cfg, trained["dit"])
    assert int(np.asarray(state.step).reshape(-1)[0]) == 4
    assert manager.CheckpointManager.for_workdir(trained["dit"], cfg.checkpoint).latest_step() == 4


def test_cli_errors_are_one_paragraph(tmp_path):
    r = _run(["sample.py", "--prompt", "x", "--checkpoint", str(tmp_path / "nope")])
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = _run(["sample.py", "--prompt", "x", "--sampler", "heun"])
    assert r.returncode != 0 and "heun" in r.stderr and "Traceback" not in r.stderr
    # Refused before the model loads, and nothing is written.
    (tmp_path / "a_file").write_text("")
    for args, named in (
        (["--formats="], "--formats is empty"),
        (["--batch_size", "0"], "--batch_size"),
        (["--guidance", "nan"], "--guidance"),
        (["--eta", "inf"], "--eta"),
        (["--output_dir", str(tmp_path / "a_file")], "is a file"),
        (["--output_dir", str(tmp_path / "a_file" / "sub")], "cannot be created"),
    ):
        out = ["--output_dir", str(tmp_path / "never")] if "--output_dir" not in args else []
        r = _run(["sample.py", "--prompt", "x", *out, *args])
        assert r.returncode == 2 and named in r.stderr and "Traceback" not in r.stderr, args
        assert "Loading model" not in r.stdout and not (tmp_path / "never").exists(), args
    r = _run(["train.py", f"--config={QUICKSTART}", f"--workdir={tmp_path}", "--config.stage=x"])
    assert r.returncode == 2 and "stage='x' is not one of" in r.stderr


def test_denoiser_lora_trains_exports_merged_and_samples(trained, tmp_path):
    """vdm's Denoiser through the real train loop: a LoRA run on a tiny trained base, exported
    as a normal bundle (adapters merged: the weights the LoRA checkpoint loads as) that samples."""
    import flax
    import jax
    import jax.numpy as jnp

    from vdm.inference import pipeline
    from vdm.io import checkpoint as ckpt_lib
    from vdm.models import lora
    from vdm.tools import export
    from vdm.train import loop

    base_dir, tune_dir = trained["dit"], str(tmp_path / "lora")
    extra = {
        "vae.checkpoint": trained["vae"],
        "train.init_from": base_dir,
        "optim.lora_rank": 2,
        "train.num_steps": 4,
    }
    config = config_lib.load_config(QUICKSTART, tiny(str(trained["root"] / "data"), **extra))
    state = jax.device_get(loop.train_and_evaluate(config, tune_dir))
    paths = {k.rsplit("/", 2)[0] for k in flax.traverse_util.flatten_dict(state.params, sep="/")}
    assert paths == {
        f"block_0/{a}/{p}"
        for a in ("attn", "cross_attn", "temporal_attn")
        for p in ("query", "key", "value", "out")
    } | {"block_0/mlp/fc1", "block_0/mlp/fc2"}
    b = state.ema_params["block_0"]["attn"]["query"]["kernel"]["lora_b"]
    assert np.abs(b).max() > 0  # the adapters trained
    prompt = ["six moving to the right"]
    run = pipeline.load_pipeline(tune_dir)  # the LoRA checkpoint, merged on load
    base = ckpt_lib.load_params(base_dir)
    want = lora.merge(base, state.ema_params, config.optim)
    jax.tree.map(np.testing.assert_array_equal, run.params, want)
    out = export.export_with_logs(tune_dir, str(tmp_path / "bundle"))  # what the CLI runs
    bundle_dir = out["bundle"]
    assert "init_train_log" in out  # the base run's log travels with the merged model
    bundled = pipeline.load_pipeline(bundle_dir)
    jax.tree.map(np.testing.assert_array_equal, bundled.params, want)
    # Unmerged (the train step's form: each Linear computes x W + (x A)(s B), lora.attach)
    # equals the exported merged weights' output to float rounding.
    z = jax.random.normal(jax.random.key(3), (1, *run.latent_shape))
    ctx, mask = jnp.ones((1, 12, run.text.dim)), jnp.ones((1, 12), jnp.int32)
    t = jnp.full((1,), 0.5)
    fwd = lambda p: run.model.apply({"params": p}, z, t, ctx, mask)  # noqa: E731
    init = lambda key: run.model.init(key, z, t, ctx, mask)["params"]  # noqa: E731
    _, linear = lora.linear_targets(init, config.optim.lora_targets, jax.random.key(0))
    assert {p.rsplit("/", 1)[0] for p in linear} == paths  # every adapted kernel is a Linear's
    factor = lora.scale(2, config.optim.lora_alpha)
    attach = lambda b, ad: fwd(lora.attach(b, ad, factor, linear))  # noqa: E731
    unmerged = jax.jit(attach)(base, state.ema_params)
    np.testing.assert_allclose(unmerged, jax.jit(fwd)(bundled.params), rtol=1e-5, atol=1e-5)
    assert not np.allclose(unmerged, jax.jit(fwd)(base), atol=1e-6)
    video = bundled(prompt, seed=0, settings=bundled.settings.override(num_steps=2))
    assert video.shape[:2] == (1, 9) and video.dtype == np.uint8


def _mp4_tags(path):
    """The container tags of a video, read back with the ffmpeg binary imageio-ffmpeg ships."""
    import re

    import imageio_ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"]
    text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    tags = {}
    for line in text.splitlines()[1:]:  # after ";FFMETADATA1"; values escape =;#\ with "\"
        key, _, value = line.partition("=")
        tags[key] = re.sub(r"\\(.)", r"\1", value)
    return tags


def test_provenance_travels_to_the_bundle_and_labels_its_videos(trained, tmp_path, capsys):
    from PIL import Image

    from vdm import provenance
    from vdm.inference import writer
    from vdm.io import checkpoint
    from vdm.tools import export

    trained_on = checkpoint.load_metadata(trained["dit"])["provenance"]
    assert trained_on["data"]["num_examples"] == 48 and trained_on["data"]["dropped"] == 0
    model = export.export(trained["dit"], str(tmp_path / "bundle"))
    recorded = provenance.of_model(model)
    assert recorded["denoiser"] == trained_on
    assert recorded["vae"] == checkpoint.load_metadata(trained["vae"])["provenance"]
    provenance.main([model])
    assert trained_on["data"]["manifest_hash"] in capsys.readouterr().out
    out = tmp_path / "out"
    prompt = "a 7 moving left"
    records = writer.run(
        [prompt], checkpoint=model, seed=5, sampling={"num_steps": 2}, output_dir=str(out),
        formats=["mp4", "png", "npy", "latent"],
    )  # fmt: skip
    by_ext = {r["file"].rsplit(".", 1)[1]: r for r in records}
    label = by_ext["npy"]["provenance"]  # the npy's companion record in samples.jsonl
    assert label["ai_generated"] is True and label["model"] == os.path.abspath(model)
    assert label["manifest_hash"] == trained_on["data"]["manifest_hash"]
    # the config of the checkpoint exported (test_resume_continues_from_checkpoint may have
    # trained on in trained["dit"] with another config when it ran first in this process)
    assert label["model_config_hash"] == provenance.config_hash(
        checkpoint.load_config(trained["dit"])
    )
    mp4 = _mp4_tags(out / "000_00.mp4")
    assert json.loads(mp4["comment"]) == by_ext["mp4"] and "AI-generated" in mp4["description"]
    png = Image.open(out / "000_00.png").text
    assert json.loads(png["Comment"]) == by_ext["png"] and prompt in png["Description"]
    for record in (by_ext["mp4"], by_ext["png"]):
        assert record["seed"] == 5 and record["num_steps"] == 2 and record["prompt"] == prompt
        assert record["provenance"] == label
    # The latent file: the compressed stream, decoded by the model's VAE (vdm.decode).
    from vdm import decode
    from vdm.inference import latents

    z, latent_label, shape, fps = latents.load(str(out / "000_00.npz"))
    assert latent_label == by_ext["npz"] and shape == np.load(out / "000_00.npy").shape
    frames, _, _ = decode.decode_file(str(out / "000_00.npz"))
    sampled = np.load(out / "000_00.npy")
    assert np.abs(frames.astype(int) - sampled).max() <= 3  # float16 latents: rounding only
    decode.main([str(out / "000_00.npz"), "--output", str(out / "decoded.mp4")])
    assert json.loads(_mp4_tags(out / "decoded.mp4")["comment"])["prompt"] == prompt


def test_export_bundles_an_alignment_model_checked_against_its_vae(trained, tmp_path):
    """`--alignment` bundles an alignment model with the export (from a workdir or another
    export, keeping its recorded figures); one trained on other VAE latents is refused before
    anything in the output is replaced."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from vdm.errors import UserError
    from vdm.inference import alignment as aligner_lib
    from vdm.inference import pipeline
    from vdm.io import bundle as bundle_lib
    from vdm.models import alignment as al
    from vdm.tools import export

    source = str(tmp_path / "source")
    export.export_with_logs(trained["dit"], source)
    meta = bundle_lib.read_meta(source)
    config = config_lib.upgrade(ConfigDict(meta["config"]))
    config.alignment.variant = "mu"
    pipe = pipeline.load_pipeline(source)
    z = jnp.zeros((1, 1, 2, 2, config.vae.latent_channels))  # the tower's params fit any t, h, w
    params = al.AlignmentModel.from_config(config.alignment).init(
        jax.random.key(0), z, jnp.zeros((1, 4, pipe.text.dim)), jnp.ones((1, 4), jnp.int32)
    )["params"]
    part = {
        "config": config_lib.to_dict(config),
        "text_encoder": meta["text_encoder"],
        "latent_stats": meta["latent_stats"],
        "retrieval": {"caption": {"t2v": 0.5}},
    }
    bundle_lib.write_alignment(source, nn.unbox(params), part)

    out = str(tmp_path / "out")
    export.export_with_logs(trained["dit"], out, alignment=source)
    got_meta, got = bundle_lib.read_alignment(out)
    jax.tree.map(np.testing.assert_array_equal, got, nn.unbox(params))
    assert got_meta["retrieval"] == part["retrieval"]
    aligner = aligner_lib.load_aligner(pipeline.load_pipeline(out), out)
    assert aligner.score_videos(np.zeros((1, 9, 32, 32, 3), np.uint8), ["a 3"]).shape == (1,)

    part["latent_stats"] = {
        k: (np.asarray(v) * 2).tolist() for k, v in meta["latent_stats"].items()
    }
    bundle_lib.write_alignment(source, nn.unbox(params), part)
    before = sorted(os.listdir(out))
    with pytest.raises(UserError, match="another VAE's latents"):
        export.export_with_logs(trained["dit"], out, alignment=source)
    assert sorted(os.listdir(out)) == before
    assert bundle_lib.read_alignment(out)[0]["latent_stats"] == meta["latent_stats"]
