"""The moving-digits tfds builder: generation, read-back, captions, splits, determinism, motion."""

import os
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import base
from vdm.data import captions as cap
from vdm.data import digit_videos
from vdm.data import moving_digits as md
from vdm.tools import moving_digits as md_tool

TINY = dict(num_frames=9, height=32, width=32, num_train=64, num_test=32)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The tiny data set, prepared once, read back by NAME through tfds.data_source."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    cfg = md.MovingDigitsConfig(**TINY)
    builder = md.prepare(cfg, data_dir=data_dir)
    sources = tfds.data_source(f"moving_digits/{cfg.name}", data_dir=data_dir, download=False)
    examples = {s: [sources[s][i] for i in range(len(sources[s]))] for s in md.SPLITS}
    return cfg, builder, data_dir, examples


def _text(x):
    return x.decode() if isinstance(x, bytes) else str(x)


def test_generates_and_reads_back(prepared):
    cfg, builder, _, examples = prepared
    assert len(examples["train"]) == 64 and len(examples["test"]) == 32
    for e in examples["train"][:8] + examples["test"][:8]:
        v = e["video"]
        assert v.shape == (9, 32, 32, 1) and v.dtype == np.uint8  # grey sets store 1 channel
        assert md.as_rgb(v).shape == (9, 32, 32, 3)
        assert v.max() > 150  # a light digit ...
        assert np.median(v) == 0  # ... on a dark background
        assert e["trajectory"].shape == (9, 2)
        np.testing.assert_allclose(e["start"], e["trajectory"][0])
    assert cfg.name in builder.data_dir  # shapes / sizes / seed are in the directory name


def test_captions_mention_digit_and_direction(prepared):
    _, _, _, examples = prepared
    for split in md.SPLITS:
        for e in examples[split]:
            digit, direction = int(e["digit"]), int(e["direction"])
            assert _text(e["direction_name"]) == cap.DIRECTIONS[direction]
            texts = [_text(e["caption"])]
            if split == "test":
                texts.append(_text(e["caption_heldout"]))
            for text in texts:
                parsed = cap.parse_caption(text)
                assert parsed == {"digit": digit, "direction": direction}, text
                assert re.search(rf"\b({digit}|{cap.DIGIT_WORDS[digit]})\b", text), text


def _template_regex(template):
    """Matches exactly the captions a template can produce (slots = their vocabularies)."""
    digits = {
        cap._digit_phrase(f, d, c)
        for f in range(len(cap.DIGIT_PHRASES))
        for d in range(10)
        for c in (None, *cap.COLOUR_NAMES)
    }
    digits |= {cap._AN.sub("an ", x) for x in digits}  # "a 8" -> "an 8"
    slots = {
        "{d}": digits,
        "{ving}": {v for v, _ in cap.VERBS},
        "{vs}": {v for _, v in cap.VERBS},
        "{dir}": {p for ps in cap.DIRECTION_PHRASES for p in ps},
    }
    parts = re.split(r"(\{\w+\})", template)
    body = "".join(
        "(?:" + "|".join(map(re.escape, sorted(slots[p], key=len, reverse=True))) + ")"
        if p in slots
        else re.escape(p)
        for p in parts
    )
    return re.compile(body)


def test_heldout_templates_never_in_train(prepared):
    _, _, _, examples = prepared
    heldout = [_template_regex(t) for t in cap.HELDOUT_TEMPLATES]
    train_t = [_template_regex(t) for t in cap.TRAIN_TEMPLATES]
    for e in examples["train"]:
        assert _text(e["caption_heldout"]) == "" and e["template_heldout"] == -1
        assert not any(r.fullmatch(_text(e["caption"])) for r in heldout), _text(e["caption"])
    for e in examples["test"]:  # the patterns do tell the two sets apart
        assert any(r.fullmatch(_text(e["caption_heldout"])) for r in heldout)
        assert not any(r.fullmatch(_text(e["caption_heldout"])) for r in train_t)
    # Many more train captions (labels only, no rendering) still never use a held-out frame.
    labels = md.sample_labels(md.MovingDigitsConfig(num_train=3000, num_test=10), "train")
    assert set(labels["template"]) == set(range(len(cap.TRAIN_TEMPLATES)))
    for text in labels["caption"]:
        assert not any(r.fullmatch(text) for r in heldout), text


def _vocab_markers() -> list[str]:
    """Every phrase of the held-out vocabulary, and the literal words of its digit phrases and
    frames (the parts around {d}, {ving}, {vs}, {dir}, {c}, {n}, {w})."""
    markers = [p for ps in cap.VOCAB_DIRECTION_PHRASES for p in ps]
    markers += [v for pair in cap.VOCAB_VERBS for v in pair]
    for t in cap.VOCAB_DIGIT_PHRASES + cap.VOCAB_TEMPLATES:
        markers += [
            w.strip(" ,") for w in re.split(r"\{\w+\}", t) if w.strip(" ,") not in ("", "a", "the")
        ]
    return markers


def test_heldout_vocabulary_never_in_training_captions():
    """No training caption (5000 drawn, every template and synonym) contains any held-out
    vocabulary phrase, and every held-out vocabulary caption contains at least three of them
    (its verb, direction phrase and a digit-phrase or frame word) while still naming the digit."""
    markers = _vocab_markers()
    pattern = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, markers)) + r")(?![\w-])")
    labels = md.sample_labels(md.MovingDigitsConfig(num_train=5000, num_test=10), "train")
    hits = [t for t in labels["caption"] if pattern.search(t)]
    assert not hits, hits[:5]
    digits, directions = np.arange(400) % 10, np.arange(400) % 8
    texts = cap.heldout_vocabulary_captions(digits, directions)
    assert texts == cap.heldout_vocabulary_captions(digits, directions)  # fixed, reproducible
    for text, d in zip(texts, digits, strict=True):
        assert len(pattern.findall(text)) >= 3, text
        assert str(d) in text or cap.DIGIT_WORDS[d] in text, text


def test_splits_use_disjoint_source_digits(prepared):
    _, _, _, examples = prepared
    train = {int(e["source_index"]) for e in examples["train"]}
    test = {int(e["source_index"]) for e in examples["test"]}
    assert train and test and not train & test
    pools = md.source_pools(1234)
    all_train = set(np.concatenate(pools["train"]).tolist())
    all_test = set(np.concatenate(pools["test"]).tolist())
    assert not all_train & all_test and len(all_train | all_test) == 1797
    _, targets = digit_videos._load_digits()
    for e in examples["test"]:
        assert targets[int(e["source_index"])] == int(e["digit"])


def test_same_seed_same_bytes_different_seed_differs(prepared, tmp_path):
    cfg, builder, _, examples = prepared
    again = md.prepare(md.MovingDigitsConfig(**TINY), data_dir=str(tmp_path / "again"))
    files = sorted(os.listdir(builder.data_dir))
    records = [f for f in files if ".array_record-" in f]
    assert len(records) == 2 and sorted(os.listdir(again.data_dir)) == files
    for f in records:  # byte-identical files
        with (
            open(os.path.join(builder.data_dir, f), "rb") as a,
            open(os.path.join(again.data_dir, f), "rb") as b,
        ):
            assert a.read() == b.read(), f
    for split in md.SPLITS:
        a = builder.as_data_source(split)
        b = again.as_data_source(split)
        for i in range(len(a)):
            ea, eb = a[i], b[i]
            assert ea.keys() == eb.keys()
            for k in ea:
                np.testing.assert_array_equal(ea[k], eb[k])
    other = md.sample_labels(md.MovingDigitsConfig(**{**TINY, "seed": 7}), "test")
    same = md.sample_labels(md.MovingDigitsConfig(**TINY), "test")
    assert other["caption"] != same["caption"]
    videos_other = md.render(cfg, other["source_index"][:4], other["top_left"][:4])
    videos_same = md.render(cfg, same["source_index"][:4], same["top_left"][:4])
    assert not np.array_equal(videos_other, videos_same)
    # The generator reproduces the stored videos exactly.
    stored = {_text(e["caption"]): e["video"] for e in examples["test"]}
    for ex in md.generate(cfg, "test"):
        np.testing.assert_array_equal(stored[ex["caption"]], ex["video"])
        assert ex["video"].shape == (9, 32, 32, 1)


def test_direction_is_unambiguous_from_pixels():
    cfg = md.MovingDigitsConfig(num_frames=17, num_train=10, num_test=240)
    labels = md.sample_labels(cfg, "test")
    # No bounce in the first (T - 1) // 2 steps, for every speed and direction.
    assert labels["first_bounce"].min() >= (cfg.num_frames - 1) // 2 + 1
    videos = md.render(cfg, labels["source_index"], labels["top_left"])
    estimated = md.estimate_direction(videos)
    np.testing.assert_array_equal(estimated, labels["direction"])
    # The digit really travels: >= 8 px (speed 1 at 32x32) over the bounce-free frames.
    centres = md.digit_centres(videos)
    travel = np.linalg.norm(centres[:, 8] - centres[:, 0], axis=-1)
    assert travel.min() > 7.0


def test_trajectory_label_matches_pixels():
    cfg = md.MovingDigitsConfig(num_frames=17, num_train=10, num_test=64)
    labels = md.sample_labels(cfg, "test")
    videos = md.render(cfg, labels["source_index"], labels["top_left"])
    centres = md.digit_centres(videos)
    # Ink centre = box centre + a per-digit offset, so displacements agree (up to edge effects).
    moved = centres - centres[:, :1]
    labelled = labels["trajectory"] - labels["trajectory"][:, :1]
    assert np.abs(moved - labelled)[:, :9].max() < 0.75


def test_64x64_and_colour():
    cfg = md.MovingDigitsConfig(height=64, width=64, num_train=10, num_test=40, colour=True)
    assert cfg.sprite_size() == 32
    labels = md.sample_labels(cfg, "test")
    videos = md.render(cfg, labels["source_index"], labels["top_left"], labels["colour"])
    assert videos.shape == (40, 17, 64, 64, 3)
    np.testing.assert_array_equal(md.estimate_direction(videos), labels["direction"])
    for text, colour, v in zip(labels["caption"], labels["colour"], videos, strict=True):
        assert str(colour) in text
        brightest = v.reshape(-1, 3)[v.reshape(-1, 3).sum(-1).argmax()].astype(float)
        want = np.array(cap.COLOURS[str(colour)], float)
        assert np.abs(brightest / brightest.max() - want / want.max()).max() < 0.1


def test_config_name_encodes_fields_and_mirrors_base_config():
    names = {
        md.MovingDigitsConfig(**kw).name
        for kw in [
            {},
            {"num_frames": 9},
            {"height": 64, "width": 64},
            {"num_train": 10},
            {"num_test": 10},
            {"colour": True},
            {"speeds": (1.0,)},
            {"seed": 1},
            {"digit_size": 12},
        ]
    }
    assert len(names) == 9
    assert md.config_from_data(base.get_config().data).name == md.MovingDigitsConfig().name


def test_default_config_builder(tmp_path):
    """The default shape is also the class's BUILDER_CONFIGS entry (built, not prepared, here)."""
    builder = md.builder_for(md.config_from_data(base.get_config().data), str(tmp_path))
    assert builder.builder_config.name == md.MovingDigitsConfig().name
    assert not builder.is_prepared()
    assert builder.info.features["video"].shape == (17, 32, 32, 1)
    with pytest.raises(ValueError, match="digit_size"):
        md.MovingDigitsConfig(height=16, width=16, digit_size=40)
    with pytest.raises(ValueError, match="speeds"):
        md.MovingDigitsConfig(speeds=(0.0,))


def test_parse_caption_handles_user_prompts():
    assert cap.parse_caption("a 7 moving left") == {"digit": 7, "direction": 4}
    assert cap.parse_caption("A handwritten Three drifting up and to the right") == {
        "digit": 3,
        "direction": 1,
    }
    assert cap.parse_caption("8 bouncing downward") == {"digit": 8, "direction": 6}
    assert cap.parse_caption("a cat") == {"digit": None, "direction": None}
    assert (
        cap.make_caption("{d} {ving} {dir}", 8, 0, digit_form=5, verb=0, direction_form=0)
        == "an 8 moving to the right"
    )


def test_preview_command(prepared, tmp_path):
    _, _, data_dir, _ = prepared
    out = tmp_path / "preview.png"
    md_tool.main(
        [
            "--preview",
            str(out),
            "--num",
            "4",
            "--frames",
            "9",
            "--num_train",
            "64",
            "--num_test",
            "32",
            "--data_dir",
            data_dir,
        ]
    )
    from PIL import Image

    sheet = np.asarray(Image.open(out))
    # 4 rows of 9 frames, upscaled x2 (64 px) with 2 px gaps, plus caption lines.
    assert sheet.shape[1] == 9 * (64 + 2) + 2 and sheet.shape[0] > 4 * (64 + 2)
