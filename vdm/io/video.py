"""Reading and writing videos (uint8 `[T, H, W, 3]`) as mp4 / webm / gif / npy / frame folders,
and PNG contact sheets (one row of frames per video, with optional captions).

Formats are chosen by file extension. Errors a user can cause name the file:
  * an unknown extension raises `ValueError` listing the valid ones;
  * a missing file raises `FileNotFoundError`;
  * a file that exists but cannot be decoded raises `VideoReadError` (a `ValueError`), which the
    folder data set (`vdm.data.folder`) catches to skip the clip instead of crashing a long run.

Notes on the lossy formats:
  * mp4 (H.264) and webm (VP9) use 4:2:0 chroma subsampling, which needs even sizes: odd heights
    or widths are padded by repeating the last row / column (so reading back gives the padded
    size). `macro_block_size=1` stops imageio from resizing sizes not divisible by 16.
  * GIF cannot store identical consecutive frames separately (Pillow merges them and adds their
    durations), so `write_video` stores the base frame duration in the GIF comment and
    `read_video` expands merged frames back; the frame count round-trips exactly.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

# imageio-ffmpeg starts ffmpeg with fork + exec; Python warns that forking a multithreaded (JAX)
# process may deadlock, which cannot happen when the child only execs. Users saw it on every mp4.
warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)

VIDEO_EXTENSIONS = (".mp4", ".webm", ".gif", ".npy", ".mov", ".avi", ".mkv")
WRITE_EXTENSIONS = (".mp4", ".webm", ".gif", ".npy")
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg")
_FFMPEG_EXTENSIONS = (".mp4", ".webm", ".mov", ".avi", ".mkv")
_GIF_COMMENT = re.compile(rb"vdm:frame_ms=(\d+)")


class VideoReadError(ValueError):
    """A video file exists but cannot be decoded (corrupt, truncated or not a video)."""


def _short(error: Exception) -> str:
    """The first line of an exception (ffmpeg appends its whole banner and log to its errors)."""
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


def _check_frames(frames: np.ndarray, what: str) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise ValueError(f"{what}: frames must be uint8, got {frames.dtype}.")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"{what}: frames must have shape [T>0, H, W, 3], got {frames.shape}.")
    return frames


def _extension(path: str) -> str:
    return os.path.splitext(str(path))[1].lower()


def write_video(
    path: str,
    frames: np.ndarray,
    fps: float = 8,
    *,
    quality: float = 8,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Writes uint8 `[T, H, W, 3]` frames to `path`; the format follows the extension.

    Args:
      path: output file ending in .mp4, .webm, .gif or .npy (parent directories are created).
      frames: uint8 array `[T, H, W, 3]`.
      fps: frames per second (mp4 / webm / gif; ignored for npy).
      quality: 0..10 for mp4 / webm (imageio's variable-bitrate scale; 10 is best).
      metadata: text tags for the container (mp4 / webm: ffmpeg `-metadata key=value`, e.g.
        comment, description; gif: appended to its comment; npy: none). Frames are unchanged.

    Returns:
      `path`, for chaining.
    """
    path = str(path)
    ext = _extension(path)
    if ext not in WRITE_EXTENSIONS:
        raise ValueError(
            f"Cannot write video '{path}': unknown extension '{ext}'. "
            f"Valid: {', '.join(WRITE_EXTENSIONS)}."
        )
    frames = _check_frames(frames, f"write_video('{path}')")
    if fps <= 0:
        raise ValueError(f"write_video('{path}'): fps must be positive, got {fps}.")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if ext == ".npy":
        np.save(path, frames)
    elif ext == ".gif":
        _write_gif(path, frames, fps, metadata or {})
    else:
        _write_ffmpeg(path, frames, fps, quality, metadata or {})
    return path


def _write_ffmpeg(path: str, frames: np.ndarray, fps: float, quality: float, metadata) -> None:
    import imageio.v2 as iio

    # 4:2:0 chroma subsampling needs even sizes: pad odd ones by repeating the edge.
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    codec = "libx264" if _extension(path) != ".webm" else "libvpx-vp9"
    writer = iio.get_writer(
        path,
        format="FFMPEG",
        mode="I",
        fps=fps,
        codec=codec,
        quality=quality,
        pixelformat="yuv420p",
        macro_block_size=1,  # do not let imageio resize sizes that are not multiples of 16
        ffmpeg_log_level="error",
        output_params=[a for k, v in metadata.items() for a in ("-metadata", f"{k}={v}")],
    )
    try:
        for frame in frames:
            writer.append_data(frame)
    finally:
        writer.close()


def _write_gif(path: str, frames: np.ndarray, fps: float, metadata) -> None:
    # GIF stores durations in centiseconds; use a whole number so merged frames (see the module
    # docstring) are exact multiples of the base duration.
    frame_ms = max(10, int(round(100.0 / fps)) * 10)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(
        path,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=frame_ms,
        loop=0,
        comment="\n".join(
            [f"vdm:frame_ms={frame_ms}", *(f"{k}={v}" for k, v in metadata.items())]
        ).encode(),
    )


def read_video(path: str, *, max_frames: int | None = None) -> np.ndarray:
    """Reads a video file or a folder of frames into uint8 `[T, H, W, 3]`.

    Args:
      path: a .mp4 / .webm / .mov / .avi / .mkv / .gif / .npy file, or a directory of .png / .jpg
        frames (sorted in natural order, so frame_2 comes before frame_10).
      max_frames: stop after this many frames (None = all).

    Returns:
      uint8 array `[T, H, W, 3]` (grey frames are repeated to 3 channels, alpha is dropped).

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: unknown extension.
      VideoReadError: the file cannot be decoded.
    """
    _, frames = iter_video(path)
    out = []
    try:
        for frame in frames:
            out.append(frame)
            if max_frames is not None and len(out) >= max_frames:
                break
    finally:
        frames.close()
    if not out:
        raise VideoReadError(f"Video '{path}' contains no frames.")
    return np.stack(out)


def iter_video(path: str) -> tuple[float | None, Iterator[np.ndarray]]:
    """Streams the frames of a video without holding them all in memory.

    Args:
      path: as for `read_video`.

    Returns:
      `(fps, frames)`: the frame rate stored in the file (None for npy / frame folders, where it
      is unknown) and a generator of uint8 `[H, W, 3]` frames. Decoding errors raised while
      iterating are `VideoReadError`s naming the file.
    """
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Video '{path}' does not exist.")
    if os.path.isdir(path):
        return None, _iter_frame_folder(path)
    ext = _extension(path)
    if ext == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - any numpy failure means an unreadable file
            raise VideoReadError(f"Cannot read video '{path}': {_short(e)}") from e
        if array.ndim == 3:  # a grey video [T, H, W]
            array = array[..., None]
        if array.ndim != 4 or array.dtype != np.uint8:
            raise VideoReadError(
                f"Video '{path}' must hold uint8 [T, H, W, 3]; got {array.dtype} {array.shape}."
            )
        return None, (_to_rgb(f, path) for f in array)
    if ext == ".gif":
        return _open_gif(path)
    if ext in _FFMPEG_EXTENSIONS:
        return _open_ffmpeg(path)
    raise ValueError(
        f"Cannot read video '{path}': unknown extension '{ext}'. Valid: "
        f"{', '.join(VIDEO_EXTENSIONS)}, or a directory of {'/'.join(FRAME_EXTENSIONS)} frames."
    )


def _to_rgb(frame: np.ndarray, path: str) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.dtype != np.uint8:
        if frame.dtype == np.uint16:  # 16-bit PNGs
            frame = (frame >> 8).astype(np.uint8)
        else:
            raise VideoReadError(f"Video '{path}' has {frame.dtype} frames; expected uint8.")
    if frame.ndim == 2:
        frame = frame[..., None]
    channels = frame.shape[-1]
    if channels == 1:
        frame = np.repeat(frame, 3, axis=-1)
    elif channels == 2:  # grey + alpha
        frame = np.repeat(frame[..., :1], 3, axis=-1)
    elif channels == 4:
        frame = frame[..., :3]
    elif channels != 3:
        raise VideoReadError(f"Video '{path}' has frames of shape {frame.shape}.")
    return np.ascontiguousarray(frame)


def _natural_key(name: str):
    return [int(s) if s.isdigit() else s.lower() for s in re.split(r"(\d+)", name)]


def frame_files(folder: str) -> list[str]:
    """The .png/.jpg files of a frame folder in natural order (frame_2 before frame_10)."""
    names = [n for n in os.listdir(folder) if _extension(n) in FRAME_EXTENSIONS]
    return [os.path.join(folder, n) for n in sorted(names, key=_natural_key)]


def _iter_frame_folder(folder: str) -> Iterator[np.ndarray]:
    files = frame_files(folder)
    if not files:
        raise VideoReadError(
            f"Frame folder '{folder}' holds no {'/'.join(FRAME_EXTENSIONS)} files."
        )

    def gen():
        shape = None
        for f in files:
            try:
                with Image.open(f) as im:
                    frame = _to_rgb(np.asarray(im.convert("RGB")), f)
            except VideoReadError:
                raise
            except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
                raise VideoReadError(
                    f"Cannot read frame '{f}' of video '{folder}': {_short(e)}"
                ) from e
            if shape is not None and frame.shape != shape:
                raise VideoReadError(
                    f"Frame '{f}' has shape {frame.shape} but earlier frames of '{folder}' "
                    f"have {shape}."
                )
            shape = frame.shape
            yield frame

    return gen()


def _open_gif(path: str) -> tuple[float | None, Iterator[np.ndarray]]:
    try:
        im = Image.open(path)
        im.load()
    except Exception as e:  # noqa: BLE001
        raise VideoReadError(f"Cannot read GIF '{path}': {_short(e)}") from e
    match = _GIF_COMMENT.search(im.info.get("comment", b"") or b"")
    base_ms = int(match.group(1)) if match else None
    fps = 1000.0 / base_ms if base_ms else None
    if fps is None and im.info.get("duration"):
        fps = 1000.0 / im.info["duration"]

    def gen():
        try:
            index = 0
            while True:
                try:
                    im.seek(index)
                except EOFError:
                    break
                frame = _to_rgb(np.asarray(im.convert("RGB")), path)
                repeats = 1
                if base_ms:  # expand frames Pillow merged on write (module docstring)
                    repeats = max(1, int(round(im.info.get("duration", base_ms) / base_ms)))
                for _ in range(repeats):
                    yield frame
                index += 1
        except VideoReadError:
            raise
        except Exception as e:  # noqa: BLE001
            raise VideoReadError(f"Cannot decode GIF '{path}': {_short(e)}") from e
        finally:
            im.close()

    return fps, gen()


def _open_ffmpeg(path: str) -> tuple[float | None, Iterator[np.ndarray]]:
    import imageio.v2 as iio

    try:
        reader = iio.get_reader(path, format="FFMPEG", mode="I")
        fps = reader.get_meta_data().get("fps")
    except Exception as e:  # noqa: BLE001 - imageio/ffmpeg raise OSError, RuntimeError, ...
        raise VideoReadError(f"Cannot read video '{path}': {_short(e)}") from e

    def gen():
        try:
            for frame in reader:
                yield _to_rgb(frame, path)
        except VideoReadError:
            raise
        except Exception as e:  # noqa: BLE001
            raise VideoReadError(f"Cannot decode video '{path}': {_short(e)}") from e
        finally:
            reader.close()

    return (float(fps) if fps else None), gen()


def _pick_frames(num: int, max_frames: int | None) -> np.ndarray:
    """Evenly spaced frame indices including the first and last frame."""
    if max_frames is None or num <= max_frames:
        return np.arange(num)
    return np.round(np.linspace(0, num - 1, max_frames)).astype(int)


def _wrap(text: str, font, width: int, draw: ImageDraw.ImageDraw) -> str:
    """`text` on one line (line breaks become spaces), cut with an ellipsis to fit in `width`
    pixels."""
    text = " ".join(text.split())
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _sheet_rows(videos, captions, max_frames, scale) -> list[np.ndarray]:
    """The frames of each contact-sheet row, picked and upscaled; checks the arguments."""
    videos = [_check_frames(v, "contact_sheet") for v in videos]
    if not videos:
        raise ValueError("contact_sheet: got no videos.")
    if captions is not None and len(captions) != len(videos):
        raise ValueError(
            f"contact_sheet: {len(videos)} videos but {len(captions)} captions; give one per video."
        )
    if scale < 1:
        raise ValueError(f"contact_sheet: scale must be >= 1, got {scale}.")
    rows = []
    for v in videos:
        frames = v[_pick_frames(len(v), max_frames)]
        if scale > 1:
            frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
        rows.append(frames)
    return rows


def contact_sheet(
    videos: Sequence[np.ndarray] | np.ndarray,
    captions: Sequence[str] | None = None,
    path: str | None = None,
    max_frames: int | None = 17,
    *,
    scale: int = 1,
    gap: int = 2,
    png_text: Mapping[str, str] | None = None,
) -> np.ndarray:
    """A grid image: one row per video (evenly spaced frames across), captions above each row.

    Args:
      videos: uint8 `[N, T, H, W, 3]` or a list of `[T, H, W, 3]` (sizes may differ; each row is
        as wide as its frames).
      captions: N strings written above the rows (PIL's default font), or None for no text.
      path: if given, the sheet is also written there as PNG.
      max_frames: at most this many frames per row, evenly spaced and including the first and
        last frame; None = all frames.
      scale: integer upscaling of frames (nearest neighbour), to make tiny frames visible.
      gap: pixels between frames and rows.
      png_text: PNG text chunks (iTXt) to store with the file, e.g. {"Description": ...}.

    Returns:
      The sheet, uint8 `[H_sheet, W_sheet, 3]`.
    """
    rows = _sheet_rows(videos, captions, max_frames, scale)
    font = ImageFont.load_default()
    text_h = 0
    if captions is not None:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        left, top, right, bottom = probe.textbbox((0, 0), "Ag7|", font=font)
        text_h = bottom - top + 4
    width = max(r.shape[0] * (r.shape[2] + gap) for r in rows) + gap
    height = sum(r.shape[1] + text_h + gap for r in rows) + gap
    sheet = Image.new("RGB", (width, height), (48, 48, 48))
    draw = ImageDraw.Draw(sheet)
    y = gap
    for i, row in enumerate(rows):
        if captions is not None:
            text = _wrap(str(captions[i]), font, width - 2 * gap, draw)
            draw.text((gap, y), text, fill=(255, 255, 255), font=font)
            y += text_h
        x = gap
        for frame in row:
            sheet.paste(Image.fromarray(frame), (x, y))
            x += frame.shape[1] + gap
        y += row.shape[1] + gap
    out = np.asarray(sheet)
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        info = PngImagePlugin.PngInfo()
        for key, value in (png_text or {}).items():
            info.add_itxt(key, str(value))
        Image.fromarray(out).save(path, pnginfo=info)
    return out
