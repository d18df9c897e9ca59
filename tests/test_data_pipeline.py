"""The grain pipeline (determinism, checkpointing, sharding), the folder data set and the generic
tfds-by-name source. Tiny data: 64 train / 32 test moving-digits videos of 9x32x32."""

import hashlib
import json
import logging

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs import base
from vdm.data import captions as cap
from vdm.data import folder, sources
from vdm.data import loader as pipeline
from vdm.io import video as video_io


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    c = base.get_config()
    c.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
    c.data.num_frames = 9
    c.data.moving_digits.num_train = 64
    c.data.moving_digits.num_test = 32
    return c


def _loader(config, **kw):
    args = dict(batch_size=8, shuffle=True, seed=0, process_index=0, process_count=1)
    args.update(kw)
    split = args.pop("split", "train")
    return pipeline.make_loader(config, split, **args)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _ids(batch):
    return [hashlib.md5(v.tobytes()).hexdigest() for v in batch["video"]]


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_batch_structure(config):
    batch = next(iter(_loader(config)))
    assert batch["video"].shape == (8, 9, 32, 32, 3) and batch["video"].dtype == np.uint8
    assert batch["caption"].shape == (8,) and all(isinstance(c, str) for c in batch["caption"])
    assert batch["digit"].dtype == np.int32 and batch["direction"].dtype == np.int32
    assert batch["speed"].dtype == np.float32
    for text, d, r in zip(batch["caption"], batch["digit"], batch["direction"], strict=True):
        assert cap.parse_caption(text) == {"digit": d, "direction": r}


def test_same_seed_same_batches_different_seed_different_order(config):
    a = _take(iter(_loader(config, seed=3)), 3)
    b = _take(iter(_loader(config, seed=3)), 3)
    c = _take(iter(_loader(config, seed=4)), 3)
    for x, y in zip(a, b, strict=True):
        _assert_same(x, y)
    assert [_ids(x) for x in a] != [_ids(x) for x in c]
    # Without shuffling the order is the stored order and ignores the seed.
    d = next(iter(_loader(config, shuffle=False, seed=1)))
    e = next(iter(_loader(config, shuffle=False, seed=2)))
    _assert_same(d, e)


def test_iterator_state_restores_exactly(config):
    loader = _loader(config, seed=5)
    it = iter(loader)
    _take(it, 7)  # 8 batches per epoch: the next ones cross the epoch boundary
    state = it.get_state()
    expected = _take(it, 3)
    restored = iter(_loader(config, seed=5))
    restored.set_state(state)
    for want, got in zip(expected, _take(restored, 3), strict=True):
        _assert_same(want, got)
    assert json.loads(state.decode())["worker_count"] == 0


def test_processes_get_disjoint_shards_of_local_batches(config):
    seen = []
    for index in range(2):
        loader = _loader(config, process_index=index, process_count=2, num_epochs=1, seed=0)
        batches = list(iter(loader))
        assert all(b["video"].shape[0] == 4 for b in batches)  # global 8 -> 4 per process
        seen.append({i for b in batches for i in _ids(b)})
    assert len(seen[0]) == len(seen[1]) == 32 and not seen[0] & seen[1]
    with pytest.raises(ValueError, match="multiple of the process count"):
        _loader(config, batch_size=9, process_count=2)


def test_eval_loader_one_epoch(config):
    loader = _loader(config, split="test", shuffle=False, num_epochs=1, batch_size=10)
    batches = list(iter(loader))
    assert len(batches) == 3  # 32 examples, remainder dropped
    assert all(b["caption_heldout"].shape == (10,) for b in batches)
    loader = _loader(
        config, split="test", shuffle=False, num_epochs=1, batch_size=10, drop_remainder=False
    )
    assert [len(b["caption"]) for b in iter(loader)] == [10, 10, 10, 2]


def test_tfds_source_by_name_generic_path(config, tmp_path):
    """A tiny tfds data set with other feature names and a ClassLabel "caption" (like ucf101)."""

    class TinyClips(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "clip": tfds.features.Tensor(
                            shape=(None, 24, 40, 3), dtype=np.uint8, encoding="zlib"
                        ),
                        "label": tfds.features.ClassLabel(names=["ApplyEyeMakeup", "jump_rope"]),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(6)}

        def _generate_examples(self, n):
            for i in range(n):  # clips of 5..10 frames; frame value = 20 * clip + frame
                v = (20 * i + np.arange(5 + i, dtype=np.uint8))[:, None, None, None]
                yield i, {"clip": np.broadcast_to(v, (5 + i, 24, 40, 3)).copy(), "label": i % 2}

    data_dir = str(tmp_path / "tfds")
    TinyClips(data_dir=data_dir, file_format="array_record").download_and_prepare()
    c = base.get_config()
    c.data.source, c.data.data_dir = "tfds:tiny_clips", data_dir
    c.data.video_key, c.data.caption_key = "clip", "label"
    c.data.num_frames = 9
    loader = pipeline.make_loader(
        c,
        "train",
        batch_size=6,
        shuffle=False,
        seed=0,
        num_epochs=1,
        process_index=0,
        process_count=1,
    )
    (batch,) = list(iter(loader))
    assert batch["video"].shape == (6, 9, 32, 32, 3)  # 24x40 -> cover 32x53 -> center crop
    assert set(batch["caption"]) == {"apply eye makeup", "jump rope"}
    for v in batch["video"]:
        t = v[:, 0, 0, 0].astype(int)
        assert (np.diff(t) >= 0).all()  # frames in order; short clips freeze on the last frame
    c.data.caption_key = "nope"
    with pytest.raises(ValueError, match="no feature 'nope'"):
        sources.get_source(c.data, "train")
    c.data.source = "tfds:not_prepared_anywhere"
    with pytest.raises(FileNotFoundError, match="not prepared"):
        sources.get_source(c.data, "train")


def test_moving_digits_through_generic_tfds_path(config):
    from vdm.data import moving_digits

    name = moving_digits.config_from_data(config.data).name
    c = base.get_config()
    c.data.update(dict(config.data))
    c.data.source = f"tfds:moving_digits/{name}"
    direct = sources.get_source(config.data, "test")  # prepares the data set if needed
    generic = sources.get_source(c.data, "test")
    assert len(generic) == len(direct) == 32
    _assert_same(generic[3], direct[3])


def test_unknown_source_errors(config):
    c = base.get_config()
    c.data.source = "s3://bucket"
    with pytest.raises(ValueError, match="folder:"):
        sources.get_source(c.data, "train")


# ----------------------------------------------------------------------------------------------
# Folder data set
# ----------------------------------------------------------------------------------------------


def _ramp(t, h=48, w=64):
    """Frame i has value 10 * i, so frames identify themselves after lossy coding."""
    return np.broadcast_to(
        (10 * np.arange(t, dtype=np.uint8))[:, None, None, None], (t, h, w, 3)
    ).copy()


@pytest.fixture()
def clip_folder(tmp_path):
    root = tmp_path / "clips"
    root.mkdir()
    video_io.write_video(str(root / "long.mp4"), _ramp(20), fps=16)  # stride 2 at 8 fps
    video_io.write_video(str(root / "short.gif"), _ramp(4), fps=8)  # too short: padded
    video_io.write_video(str(root / "sub_array.npy"), _ramp(12, 32, 32), fps=8)
    (root / "frames").mkdir()
    for i in range(10):
        Image.fromarray(_ramp(10, 40, 40)[i]).save(root / "frames" / f"{i}.png")
    (root / "broken.mp4").write_bytes(b"\x00\x01 not an mp4" * 50)
    entries = [
        {"file": "long.mp4", "caption": "a long clip"},
        {"file": "short.gif", "caption": "a short clip"},
        {"file": "sub_array.npy", "caption": "an array", "split": "train"},
        {"file": "frames", "caption": "frame folder"},
        {"file": "broken.mp4", "caption": "corrupt"},
        {"file": "gone.mp4", "caption": "missing on disk"},
        {"file": "test_only.gif", "caption": "other split", "split": "test"},
    ]
    (root / "captions.jsonl").write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    return root


def _folder_config(root):
    c = base.get_config()
    c.data.source = f"folder:{root}"
    c.data.num_frames = 9
    return c


def test_folder_source_reads_skips_and_pads(clip_folder, caplog):
    c = _folder_config(clip_folder)
    source = sources.get_source(c.data, "train")
    assert isinstance(source, folder.FolderSource)
    assert len(source) == 5 and source.missing == 1  # gone.mp4 missing, test_only not in train
    loader = pipeline.make_loader(
        c,
        "train",
        batch_size=1,
        shuffle=False,
        seed=0,
        num_epochs=1,
        process_index=0,
        process_count=1,
        source=source,
    )
    with caplog.at_level(logging.WARNING):
        batches = {b["caption"][0]: b["video"][0] for b in iter(loader)}
    assert source.skipped == 1 and "broken.mp4" in caplog.text
    assert set(batches) == {"a long clip", "a short clip", "an array", "frame folder"}
    for video in batches.values():
        assert video.shape == (9, 32, 32, 3)
    level = lambda v: v[:, 16, 16, 0].astype(int)  # noqa: E731
    # fps-aware: the 16 fps mp4 is read every 2nd frame; eval takes the middle 9 of 10.
    np.testing.assert_allclose(level(batches["a long clip"]), 10 * np.arange(0, 18, 2), atol=6)
    # Too short: 4 frames, then the last one repeated.
    np.testing.assert_allclose(
        level(batches["a short clip"]), [0, 10, 20, 30, 30, 30, 30, 30, 30], atol=2
    )
    np.testing.assert_array_equal(level(batches["frame folder"]), 10 * np.arange(9))
    np.testing.assert_array_equal(level(batches["an array"]), 10 * np.arange(1, 10))


def test_folder_training_loader_random_crops_deterministic(clip_folder):
    c = _folder_config(clip_folder)
    make = lambda seed: pipeline.make_loader(  # noqa: E731
        c, "train", batch_size=2, shuffle=True, seed=seed, process_index=0, process_count=1
    )
    a = _take(iter(make(0)), 4)
    b = _take(iter(make(0)), 4)
    for x, y in zip(a, b, strict=True):
        _assert_same(x, y)
        assert x["video"].shape == (2, 9, 32, 32, 3)


def test_folder_csv_and_errors(tmp_path):
    root = tmp_path / "csv"
    root.mkdir()
    video_io.write_video(str(root / "a.npy"), _ramp(9, 32, 32))
    (root / "captions.csv").write_text('file,caption\na.npy,"a clip, with a comma"\n')
    source = folder.FolderSource(str(root), split="train", height=32, width=32)
    assert len(source) == 1 and source[0]["caption"] == "a clip, with a comma"

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="captions.jsonl or captions.csv"):
        folder.FolderSource(str(empty), split="train", height=32, width=32)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        folder.FolderSource(str(tmp_path / "nowhere"), split="train", height=32, width=32)
    (empty / "captions.jsonl").write_text('{"file": "x.mp4", "caption": "x"}\n')
    with pytest.raises(ValueError, match="no usable clips"):
        folder.FolderSource(str(empty), split="train", height=32, width=32)
    (empty / "captions.jsonl").write_text('{"file": "x.mp4"}\n')
    with pytest.raises(ValueError, match="captions.jsonl:1"):
        folder.FolderSource(str(empty), split="train", height=32, width=32)


def test_captions_cannot_name_files_outside_their_folder(tmp_path):
    """A captions file is data, possibly from elsewhere: its paths stay inside the clip folder."""
    root = tmp_path / "clips"
    (root / "sub").mkdir(parents=True)
    video_io.write_video(str(root / "sub" / "a.npy"), _ramp(9, 32, 32))
    video_io.write_video(str(tmp_path / "outside.npy"), _ramp(9, 32, 32))
    captions = root / "captions.jsonl"
    captions.write_text('{"file": "sub/../sub/a.npy", "caption": "inside"}\n')
    assert len(folder.FolderSource(str(root), split="train", height=32, width=32)) == 1
    for name in ("../outside.npy", "sub/../../outside.npy", str(tmp_path / "outside.npy")):
        captions.write_text(
            '{"file": "sub/a.npy", "caption": "ok"}\n' + json.dumps({"file": name, "caption": "x"})
        )
        with pytest.raises(ValueError, match=r"captions.jsonl:2: .* not inside the clip folder"):
            folder.FolderSource(str(root), split="train", height=32, width=32)


def test_all_clips_unreadable_is_an_error_not_a_hang(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "a.mp4").write_bytes(b"junk" * 100)
    (root / "captions.jsonl").write_text('{"file": "a.mp4", "caption": "x"}\n')
    source = folder.FolderSource(str(root), split="train", height=32, width=32)
    with pytest.raises(ValueError, match="Every clip"):
        source[0]


def test_resize_center_crop_and_temporal_crops():
    video = np.zeros((3, 48, 96, 3), np.uint8)
    video[:, :, 40:56] = 255  # a bright vertical band in the middle
    out = pipeline.ResizeCenterCrop(32, 32).map({"video": video})["video"]
    assert out.shape == (3, 32, 32, 3)
    assert out[:, :, 16].min() == 255 and out[:, :, 0].max() == 0  # center kept, sides cropped
    clip = np.arange(12, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    mid = pipeline.CenterTemporalCrop(8).map({"video": clip})["video"]
    np.testing.assert_array_equal(mid[:, 0, 0, 0], np.arange(2, 10))
    starts = {
        int(
            pipeline.RandomTemporalCrop(8).random_map({"video": clip}, np.random.default_rng(s))[
                "video"
            ][0, 0, 0, 0]
        )
        for s in range(40)
    }
    assert starts == set(range(5))
