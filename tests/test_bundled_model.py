"""The bundled default model (vdm/assets/default_model): it loads, generates, and still scores.

These run on the committed weights, so a change that breaks loading or sampling of the shipped
model (or silently degrades it) fails here, not on a user's machine.
"""

import json
import os

import numpy as np
import pytest

from vdm.eval import digits
from vdm.inference import pipeline

ASSET = pipeline.DEFAULT_MODEL


@pytest.fixture(scope="module")
def pipe():
    return pipeline.load_pipeline()


def test_bundle_is_compact_and_documented():
    total = sum(
        os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(ASSET) for f in files
    )
    assert total <= 40 * 2**20, f"bundled model is {total / 2**20:.1f} MB (limit 40 MB)"
    for name in (
        "model.json",
        "README.md",
        "train_log.jsonl",
        "init_train_log.jsonl",  # grown from depth 8 ...
        "init_init_train_log.jsonl",  # ... grown from depth 4
        "vae_train_log.jsonl",
        "vae_init_train_log.jsonl",
    ):
        assert os.path.exists(os.path.join(ASSET, name)), name
    with open(os.path.join(ASSET, "model.json")) as f:
        meta = json.load(f)
    assert meta["text_encoder"] == "minilm"  # referenced, not copied
    assert meta["config"]["data"]["source"] == "moving_digits"  # no trainer-local cache path
    assert not os.path.exists(os.path.join(ASSET, "text_encoder"))


def test_bundled_model_generates_right_shape_and_reproducibly(pipe):
    d = pipe.config.data
    four = pipe.settings.override(num_steps=4)
    a = pipe(["the digit 4 moving down"], seed=3, settings=four, batch_size=1)
    b = pipe(["the digit 4 moving down"], seed=3, settings=four, batch_size=1)
    assert a.shape == (1, d.num_frames, d.height, d.width, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)


def test_bundled_model_draws_the_prompted_digit_moving_the_prompted_way(pipe):
    """Sixteen test prompts at 10 steps: the prompted digit, moving in the prompted direction,
    keeping its identity from frame to frame.

    The thresholds sit well below the measured figures with the bundle's sampler, DDIM at eta 1
    (README's table: 1.0 digit, 1.0 direction, ~0.99 consistency at 10 steps on 100 prompts;
    these 16: 1.0 / 1.0 / 1.0; deterministic dpmpp2m: 1.0 / 1.0 / 0.94) and far
    above chance (10% digit, 12.5% direction, ~0.38 consistency with random weights), so this
    catches a broken bundle, sampler, guidance or VAE without being a benchmark. (A bundle that
    drew the digits without moving them, direction 0.26, would fail here.)
    """
    m, _, _ = digits.evaluate_pipeline(
        pipe, 16, settings=pipe.settings.override(num_steps=10), seed=0
    )
    assert m["digit_acc"] >= 0.75, m
    assert m["direction_acc"] >= 0.75, m
    assert m["consistency"] >= 0.85, m


def test_eval_cli_writes_metrics_table_and_contact_sheets(tmp_path, capsys):
    """eval.py's engine end to end on 4 test prompts, 2 steps of Euler and of DDIM at two etas:
    the JSON has every setting (eta only where the sampler takes one) and both ceilings (real
    videos, and real videos through the VAE), the table prints them, and one contact sheet per
    setting is written."""
    from vdm.eval import runner

    out = str(tmp_path / "eval")
    res = runner.run(
        num_videos=4, samplers=["euler", "ddim"], num_steps=[2], etas=[0, 1], output_dir=out
    )
    with open(os.path.join(out, "metrics.json")) as f:
        assert json.load(f) == json.loads(json.dumps(res))
    rows = [(r["captions"], r["sampler"], r["eta"], r["num_steps"]) for r in res["settings"]]
    assert rows == [
        (captions, sampler, eta, 2)
        for captions in ("caption", "caption_heldout", "caption_vocab")
        for sampler, eta in (("euler", None), ("ddim", 0.0), ("ddim", 1.0))
    ]
    for key in ("real", "real_through_vae"):  # the bundle's alignment model scores them too
        assert set(res[key]) == {
            "digit_acc",
            "direction_acc",
            "consistency",
            "frechet",
            "alignment",
        }
    assert res["real"]["alignment"] > 0.5  # real clips match their captions
    assert all(-1.0 <= r["alignment"] <= 1.0 for r in res["settings"])
    assert res["real"]["consistency"] >= res["real_through_vae"]["consistency"] - 0.05
    assert 15.0 < res["vae_psnr"] < 60.0 and 0.5 < res["vae_ssim"] <= 1.0
    table = capsys.readouterr().out
    assert "| real test videos |" in table and "| real test videos through the VAE |" in table
    assert "| caption | ddim | 1 | 2 |" in table and "| caption | euler | - | 2 |" in table
    assert sorted(os.listdir(out)) == [
        "caption_ddim_eta0_2.png",
        "caption_ddim_eta1_2.png",
        "caption_euler_2.png",
        "caption_heldout_ddim_eta0_2.png",
        "caption_heldout_ddim_eta1_2.png",
        "caption_heldout_euler_2.png",
        "caption_vocab_ddim_eta0_2.png",
        "caption_vocab_ddim_eta1_2.png",
        "caption_vocab_euler_2.png",
        "metrics.json",
    ]


def test_sampling_settings_default_to_the_bundle_and_name_bad_flags(pipe):
    """One `SamplingSettings` carries the six options: defaults from `config.sample`, None
    overrides keep them, and a bad value is refused with its flag named."""
    from vdm.errors import UserError
    from vdm.inference.settings import SamplingSettings

    s = pipe.settings
    assert s == SamplingSettings.from_config(pipe.config.sample)
    assert (s.sampler, s.num_steps, s.guidance, s.eta, s.shift) == ("ddim", 20, 3.0, 1.0, 3.0)
    assert s.override(sampler=None, guidance=None) == s
    assert s.override(num_steps=5).num_steps == 5 and s.num_steps == 20  # frozen: a new value
    for bad, flag in (
        ({"sampler": "heun"}, "--sampler"),
        ({"num_steps": 0}, "--num_steps"),
        ({"guidance": float("nan")}, "--guidance"),
        ({"guidance": float("inf")}, "--guidance"),
        ({"eta": -1.0}, "--eta"),
        ({"eta": float("inf")}, "--eta"),
        ({"shift": 0.0}, "--shift"),
        ({"shift": float("nan")}, "--shift"),
        ({"steps": 3}, "Unknown sampling setting"),
    ):
        with pytest.raises(UserError, match=flag):
            s.override(**bad)


def test_quickstart_trains_from_a_fresh_clone_with_the_bundled_vae(capsys):
    """configs/quickstart.py needs no VAE run of its own: its VAE is the bundle's, and says so."""
    import jax

    from vdm import encoders
    from vdm.config import load_config
    from vdm.io import bundle

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = load_config(os.path.join(root, "configs", "quickstart.py"))
    _, params, stats = encoders.load_vae(config)
    assert "VAE: the bundled model's" in capsys.readouterr().out
    shipped = bundle.read(ASSET)
    assert stats == shipped.meta["latent_stats"]
    same = jax.tree.map(np.array_equal, params, shipped.vae_params)
    assert all(jax.tree.leaves(same))


def test_plain_parts_are_read_without_orbax_as_orbax_reads_them(tmp_path):
    """`bundle.restore_tree` reads a plain part (the bundle's) with tensorstore directly: the same
    tree, dtypes and values as orbax's restore; a layout it does not cover goes through orbax."""
    import shutil

    import jax
    import orbax.checkpoint as ocp

    from vdm.io import bundle

    for part in bundle.PARTS:
        path = os.path.join(ASSET, part)
        direct = bundle._read_plain(path)
        assert direct is not None
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(path)
        assert jax.tree.structure(direct) == jax.tree.structure(restored)
        for a, b in zip(jax.tree.leaves(direct), jax.tree.leaves(restored), strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, np.asarray(b))
    copy = str(tmp_path / "vae")
    shutil.copytree(os.path.join(ASSET, "vae"), copy)
    with open(os.path.join(copy, "_METADATA")) as f:
        meta = json.load(f)
    with open(os.path.join(copy, "_METADATA"), "w") as f:
        json.dump({**meta, "use_zarr3": True}, f)  # not the layout it reads: orbax's turn
    assert bundle._read_plain(copy) is None
