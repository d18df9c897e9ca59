"""Round trips and error handling of vdm.io.video (tiny videos, all offline)."""

import os

import numpy as np
import pytest
from PIL import Image

from vdm.io import video


def _video(t=9, h=32, w=32, seed=0):
    """A bright block moving over a dark background, with some colour and a repeated frame."""
    rng = np.random.default_rng(seed)
    v = np.full((t, h, w, 3), 10, np.uint8)
    for i in range(t):
        v[i, 4 + i : 14 + i, 3 + i : 15 + i] = (220, 180, 60)
    v[..., 2] += rng.integers(0, 5, v.shape[:3], dtype=np.uint8)
    if t > 3:
        v[3] = v[2]  # identical consecutive frames (GIF writers merge these)
    return v


def test_npy_round_trip_is_exact(tmp_path):
    v = _video()
    path = video.write_video(str(tmp_path / "a.npy"), v)
    np.testing.assert_array_equal(video.read_video(path), v)


def test_gif_round_trip_keeps_frame_count(tmp_path):
    v = _video()
    v[5:8] = v[4]  # a longer freeze: three merged frames
    path = video.write_video(str(tmp_path / "a.gif"), v, fps=8)
    out = video.read_video(path)
    assert out.shape == v.shape
    assert np.abs(out.astype(int) - v).mean() < 4.0
    fps, _ = video.iter_video(path)
    assert fps == pytest.approx(1000 / 120)  # 8 fps stored as 12 centiseconds per frame


@pytest.mark.parametrize("ext", ["mp4", "webm"])
def test_ffmpeg_round_trip(tmp_path, ext):
    v = _video(h=40, w=24)  # not multiples of 16: must not be resized
    path = video.write_video(str(tmp_path / f"a.{ext}"), v, fps=8)
    out = video.read_video(path)
    assert out.shape == v.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - v).mean() < 6.0
    fps, _ = video.iter_video(path)
    assert fps == pytest.approx(8.0)


def test_mp4_odd_size_is_padded_to_even(tmp_path):
    v = _video(t=3, h=33, w=31)
    out = video.read_video(video.write_video(str(tmp_path / "odd.mp4"), v))
    assert out.shape == (3, 34, 32, 3)
    assert np.abs(out[:, :33, :31].astype(int) - v).mean() < 6.0


def test_max_frames(tmp_path):
    path = video.write_video(str(tmp_path / "a.npy"), _video())
    assert video.read_video(path, max_frames=4).shape[0] == 4


def test_frame_folder_natural_order(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(12):  # frame_2 must come before frame_10
        Image.fromarray(np.full((8, 10, 3), i * 20, np.uint8)).save(folder / f"frame_{i}.png")
    out = video.read_video(str(folder))
    assert out.shape == (12, 8, 10, 3)
    np.testing.assert_array_equal(out[:, 0, 0, 0], np.arange(12) * 20)


def test_grey_npy_becomes_rgb(tmp_path):
    np.save(tmp_path / "g.npy", np.full((2, 4, 4), 7, np.uint8))
    out = video.read_video(str(tmp_path / "g.npy"))
    assert out.shape == (2, 4, 4, 3)


def test_unknown_extension_errors(tmp_path):
    with pytest.raises(ValueError, match=r"\.avx.*Valid"):
        video.write_video(str(tmp_path / "a.avx"), _video())
    (tmp_path / "b.txt").write_text("hi")
    with pytest.raises(ValueError, match="b.txt"):
        video.read_video(str(tmp_path / "b.txt"))
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        video.read_video(str(tmp_path / "nope.mp4"))


@pytest.mark.parametrize("ext", ["mp4", "gif", "npy", "webm"])
def test_corrupt_file_raises_named_error(tmp_path, ext):
    path = tmp_path / f"bad.{ext}"
    path.write_bytes(b"this is not a video" * 20)
    with pytest.raises(video.VideoReadError, match=f"bad.{ext}"):
        video.read_video(str(path))


def test_truncated_mp4_raises_or_reads_prefix(tmp_path):
    path = video.write_video(str(tmp_path / "t.mp4"), _video(t=9))
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 3])
    with pytest.raises(video.VideoReadError, match="t.mp4"):
        video.read_video(path)


def test_bad_frames_rejected(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        video.write_video(str(tmp_path / "a.npy"), np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        video.write_video(str(tmp_path / "a.npy"), np.zeros((4, 4, 3), np.uint8))


def test_contact_sheet_shape_and_png(tmp_path):
    videos = np.stack([_video(seed=i) for i in range(3)])  # [3, 9, 32, 32, 3]
    path = str(tmp_path / "sheet.png")
    sheet = video.contact_sheet(videos, ["one", "two", "three"], path=path, max_frames=5, gap=2)
    plain = video.contact_sheet(videos, None, max_frames=5, gap=2)
    assert plain.shape == (3 * (32 + 2) + 2, 5 * (32 + 2) + 2, 3)
    assert sheet.shape[1] == plain.shape[1] and sheet.shape[0] > plain.shape[0]  # caption rows
    assert np.asarray(Image.open(path)).shape == sheet.shape
    # Frames are evenly spaced including the last: the last column is the last frame.
    np.testing.assert_array_equal(plain[2:34, -34:-2], videos[0, -1])
    big = video.contact_sheet(videos[:1], None, max_frames=None, scale=2, gap=0)
    assert big.shape == (64, 9 * 64, 3)
    with pytest.raises(ValueError, match="captions"):
        video.contact_sheet(videos, ["only one"])
    assert os.path.getsize(path) > 0


def test_contact_sheet_caption_with_line_breaks(tmp_path):
    """A multi-line prompt is drawn on one line (PIL cannot measure multi-line text)."""
    videos = np.zeros((1, 3, 16, 16, 3), np.uint8)
    path = str(tmp_path / "sheet.png")
    video.contact_sheet(videos, captions=["a 4\nmoving\tdown"], path=path)
    assert os.path.getsize(path) > 0
