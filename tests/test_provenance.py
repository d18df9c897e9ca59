"""Data provenance and opt-out (vdm.data.provenance): stable content hashes and manifests for every
source, exclusion lists honoured by every source (a latent cache built before the list too), and
consent: false clips left out by default. Tiny: 24 train / 8 test moving-digits videos of 9x32x32,
a folder of four .npy clips, a "mu" VAE with random weights for the cache."""

import copy
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import base
from vdm.data import loader as pipeline
from vdm.data import provenance, sources
from vdm.data.cache import build
from vdm.errors import ConfigError
from vdm.models import autoencoder as ae
from vdm.models.text import encoder as te


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    c = base.get_config()
    c.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
    c.data.num_frames = 9
    c.data.moving_digits.num_train = 24
    c.data.moving_digits.num_test = 8
    c.vae.variant = "mu"
    c.vae.base_channels = 8
    c.vae.channel_multipliers = (1, 2)
    c.vae.num_res_blocks = 1
    c.text_encoder.max_length = 8
    return c


def _all_hashes(config, split="train", source=None):
    """Every content hash one epoch of the loader yields (batches of 4, remainder kept)."""
    loader = pipeline.make_loader(
        config, split, batch_size=4, shuffle=True, seed=0, num_epochs=1, process_index=0,
        process_count=1, drop_remainder=False, source=source,
    )  # fmt: skip
    return [str(h) for b in loader for h in b[provenance.HASH_FIELD]]


def _exclude_file(tmp_path, lines, name="optout.txt"):
    path = tmp_path / name
    path.write_text("# opt-out requests\n" + "\n".join(lines) + "\n")
    return str(path)


def test_tfds_hashes_are_content_hashes_and_manifest_is_written_once(config):
    source = sources.get_source(config.data, "train")
    manifest = source.selection.manifest
    assert manifest["num_examples"] == len(source) == 24
    raw = source._source[5]  # the stored record: grey video [T, H, W, 1] and its caption
    record = source[5]
    want = provenance.example_hash(provenance.array_digest(raw["video"]), record["caption"])
    assert record[provenance.HASH_FIELD] == want
    assert record[provenance.ID_FIELD].endswith(":train:5")
    assert manifest["manifest_hash"] == provenance.manifest_hash(
        manifest["dataset"], manifest["examples"]
    )
    files = [f for f in os.listdir(source_dir(config)) if f.startswith("vdm_manifest")]
    assert files == ["vdm_manifest_train.json"]
    # A second source reads the manifest instead of hashing again (same hash, no rebuild).
    again = sources.get_source(config.data, "train")
    assert again.selection.manifest["manifest_hash"] == manifest["manifest_hash"]


def source_dir(config):
    from vdm.data import moving_digits

    return str(moving_digits.prepare(config.data).data_dir)


def test_excluded_examples_never_reach_a_batch_tfds(config, tmp_path, caplog):
    manifest = sources.get_source(config.data, "train").selection.manifest
    examples = manifest["examples"]
    by_hash = [examples[i]["hash"] for i in (0, 7)]
    by_id = [examples[11]["id"]]
    c = copy.deepcopy(config)
    c.data.exclude = _exclude_file(tmp_path, by_hash + by_id)
    with caplog.at_level(logging.INFO, logger="vdm.data"):
        seen = _all_hashes(c)
    assert "dropped 3 of 24" in caplog.text
    assert len(seen) == 21 and not set(seen) & {*by_hash, examples[11]["hash"]}
    assert set(seen) == {e["hash"] for e in examples} - {*by_hash, examples[11]["hash"]}
    summary = sources.get_source(c.data, "train").selection.summary()
    assert summary["dropped"] == summary["dropped_excluded"] == 3 and summary["used"] == 21
    assert summary["manifest_hash"] == manifest["manifest_hash"] != summary["used_hash"]
    assert summary["exclude_lists"][0]["entries"] == 3


def test_excluded_examples_never_reach_a_batch_tfds_by_name(config, tmp_path):
    from vdm.data import moving_digits

    name = moving_digits.config_from_data(config.data).name
    c = copy.deepcopy(config)
    c.data.source = f"tfds:moving_digits/{name}"  # the generic tfds path, by name
    sources.get_source(config.data, "test")  # prepares the data set if needed
    examples = sources.get_source(c.data, "test").selection.manifest["examples"]
    c.data.exclude = _exclude_file(tmp_path, [examples[2]["id"], examples[5]["hash"]])
    seen = _all_hashes(c, "test")
    assert sorted(seen) == sorted(e["hash"] for i, e in enumerate(examples) if i not in (2, 5))


def test_missing_exclude_file_is_a_config_error(config, tmp_path):
    c = copy.deepcopy(config)
    c.data.exclude = str(tmp_path / "nope.txt")
    with pytest.raises(ConfigError, match="nope.txt"):
        sources.get_source(c.data, "train")


def _clip_folder(root, rows):
    root.mkdir()
    for i, row in enumerate(rows):
        frames = np.full((10, 16, 16, 3), 20 * i, np.uint8)
        np.save(root / row["file"], frames)
    (root / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


FOLDER_ROWS = [
    {"file": "a.npy", "caption": "a", "license": "CC-BY-4.0", "source_url": "https://x/a"},
    {"file": "b.npy", "caption": "b", "consent": False},
    {"file": "c.npy", "caption": "c", "consent": True},
    {"file": "d.npy", "caption": "d"},
]


def _folder_config(root, **data):
    c = base.get_config()
    c.data.source = f"folder:{root}"
    c.data.num_frames = 9
    c.data.height = c.data.width = 16
    for k, v in data.items():
        c.data[k] = v
    return c


def test_folder_provenance_consent_and_exclusion(tmp_path):
    root = _clip_folder(tmp_path / "clips", FOLDER_ROWS)
    source = sources.get_source(_folder_config(root).data, "train")
    # consent: false is left out by default; the others carry their origin in the manifest.
    assert [e["file"] for e in source.entries] == ["a.npy", "c.npy", "d.npy"]
    assert source.selection.no_consent == 1
    manifest = json.loads((root / "vdm_manifest_train.json").read_text())
    a = manifest["examples"][0]
    assert (a["id"], a["license"], a["source_url"]) == ("a.npy", "CC-BY-4.0", "https://x/a")
    assert manifest["examples"][1]["consent"] is False
    # The hash is of the file's bytes and the caption: the same under another path.
    digest = provenance.file_digest(str(root / "a.npy"))
    assert source[0][provenance.HASH_FIELD] == provenance.example_hash(digest, "a") == a["hash"]
    moved = shutil.copytree(root, tmp_path / "elsewhere")
    os.remove(moved / "vdm_manifest_train.json")
    other = sources.get_source(_folder_config(moved).data, "train")
    assert other.selection.manifest["manifest_hash"] == manifest["manifest_hash"]
    # By absolute path, and consent allowed: b is back, c and d are excluded.
    c = _folder_config(root, allow_no_consent=True)
    c.data.exclude = _exclude_file(tmp_path, [str(root / "c.npy"), "d.npy"])
    assert {h for h in _all_hashes(c)} == {e["hash"] for e in manifest["examples"][:2]}


@pytest.fixture(scope="module")
def encoders(config):
    """A "mu" VAE with numpy-drawn weights (fast: no 5-D random draws to compile) and MiniLM."""
    module = ae.VideoAutoencoder.from_config(config.vae)
    video = jnp.zeros((1, 9, 32, 32, 3))
    shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), video)["params"])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.05, s.shape), s.dtype), shapes)
    text = te.load_text_encoder("minilm", max_length=config.text_encoder.max_length)
    stats = {"shift": [0.0] * 8, "scale": [1.0] * 8}
    return build.Encoders(text=text, vae=module, vae_params=params, latent_stats=stats)


def test_cache_built_before_an_exclusion_never_serves_it(config, encoders, tmp_path):
    out = str(tmp_path / "cache")
    build.build_cache(config, "train", out, encoders=encoders, batch_size=8, progress=False)
    cached = copy.deepcopy(config)
    cached.data.source = f"cache:{out}"
    everything = _all_hashes(cached)
    assert sorted(everything) == sorted(_all_hashes(config))  # the cache holds them all
    cached.data.exclude = _exclude_file(tmp_path, everything[:5])  # a newer opt-out list
    kept = _all_hashes(cached)
    assert len(kept) == 19 and not set(kept) & set(everything[:5])
    assert sources.get_source(cached.data, "train").selection.dropped == 5
    # A cache without a data manifest cannot honour a list: refused, not served.
    os.remove(os.path.join(out, "train.provenance.json"))
    with pytest.raises(ConfigError, match="Rebuild the cache"):
        sources.get_source(cached.data, "train")


def _toy_factory(data_provenance):
    """The toy task's data iterator, carrying a real data set's provenance like grain's loader."""
    from tests.toy_task import iterator_factory

    make = iterator_factory()

    def factory(*args, **kw):
        it = make(*args, **kw)
        it.provenance = data_provenance
        return it

    return factory


def test_checkpoints_record_provenance_and_a_resume_on_other_data(config, tmp_path, capsys):
    from tests.toy_task import ToyTask, toy_config
    from vdm import provenance as run_provenance
    from vdm.io import checkpoint
    from vdm.train import loop

    full = sources.get_source(config.data, "train").selection
    c = copy.deepcopy(config)
    c.data.exclude = _exclude_file(tmp_path, [full.manifest["examples"][3]["hash"]])
    first = sources.get_source(c.data, "train").selection.summary()
    workdir = str(tmp_path / "run")
    toy = toy_config({"train.num_steps": 4, "seed": 7})
    loop.train_and_evaluate(toy, workdir, task=ToyTask(toy), make_iterator=_toy_factory(first))
    assert "1 of 24 examples dropped" in capsys.readouterr().out
    record = checkpoint.load_metadata(workdir)["provenance"]
    assert record["data"] == first and record["data"]["dropped"] == 1
    assert record["data"]["exclude_lists"][0]["sha256"] == first["exclude_lists"][0]["sha256"]
    assert record["seed"] == 7 and record["config_hash"] == run_provenance.config_hash(toy)
    assert record["code_version"].startswith(("git:", "vdm==")) and record["history"] == []
    # Resumed on the full data set: a warning, and both records kept.
    longer = toy_config({"train.num_steps": 8, "seed": 7})
    again = _toy_factory(full.summary())
    loop.train_and_evaluate(longer, workdir, task=ToyTask(longer), make_iterator=again)
    assert "different training data" in capsys.readouterr().out
    record = checkpoint.load_metadata(workdir)["provenance"]
    assert record["data"]["dropped"] == 0 and record["history"][0]["data"] == first
    assert record["history"][0]["until"] == 4
    run_provenance.main([workdir])
    out = capsys.readouterr().out
    assert full.manifest["manifest_hash"] in out and "until step 4 trained on other data" in out


def test_resume_after_a_new_optout_list_restarts_the_data_order(config, tmp_path, capsys):
    """grain refuses a saved position over another number of examples; a run resumed after an
    opt-out list was added restarts its data order instead of failing (and never serves them)."""
    from types import SimpleNamespace

    from vdm import provenance as run_provenance
    from vdm.train import loop

    def make(cfg, split, **kw):
        return pipeline.make_loader(cfg, split, **kw)

    before = make(config, "train", batch_size=4, shuffle=True, seed=0, process_index=0,
                  process_count=1)  # fmt: skip
    it = iter(before)
    next(it)
    meta = tmp_path / "checkpoints" / "3" / "metadata"
    meta.mkdir(parents=True)
    (meta.parent / "params").mkdir()  # what makes it a step directory
    previous = run_provenance.run_record(config, before.provenance)
    (meta / "metadata").write_text(json.dumps({"provenance": previous}))
    full = sources.get_source(config.data, "train")
    optout = [e["hash"] for e in full.selection.manifest["examples"][:6]]
    c = copy.deepcopy(config)
    c.data.exclude = _exclude_file(tmp_path, optout)
    c.train.batch_size = 4
    saver = SimpleNamespace(manager=SimpleNamespace(directory=str(meta.parent.parent)))
    setup = SimpleNamespace(config=c)
    resumed = loop._open_data(setup, make, it.get_state(), 3, saver)
    assert "data order restarts" in capsys.readouterr().out
    assert saver.provenance["history"][0]["data"] == before.provenance
    seen = {h for _ in range(10) for h in next(resumed)[provenance.HASH_FIELD]}
    assert not seen & set(optout)
