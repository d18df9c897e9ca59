"""A folder of your own clips as a data set (`config.data.source = "folder:/path/to/clips"`).

Layout:
  clips/
    captions.jsonl          {"file": "a.mp4", "caption": "a dog runs"}  (one JSON object a line)
      or captions.csv       header `file,caption`, one row per clip
    a.mp4  b.gif  c.webm  d.npy  e/ (a folder of frame_000.png ...)  sub/dir/f.mp4 ...

`file` is relative to the folder. An optional `split` field ("train", "test", ...) assigns a clip
to one split; clips without it belong to every split. The caption field name is
`config.data.caption_key` (default "caption"). Optional provenance fields `license`, `source_url`
and `consent` (true / false) go into the folder's manifest (`vdm_manifest_<split>.json`, written
beside the captions, `vdm.data.provenance`); a clip with `consent: false` is not used unless
`config.data.allow_no_consent`, nor one that a `config.data.exclude` list names.

Reading a clip (in `FolderSource.__getitem__`, so in grain workers when there are any):
  * temporal sampling is fps-aware: every `stride = round(file_fps / config.data.fps)`-th frame
    is kept (stride 1 when the file stores no frame rate: npy and frame folders are taken as
    already at the target rate), at most `MAX_FRAMES` frames;
  * each frame is immediately resized (bilinear, aspect kept) so that it covers the target
    height x width, so a long HD clip never sits in memory at full size; `vdm.data.loader` then
    center-crops it and picks `num_frames` frames (clips that are too short are padded by
    repeating their last frame: a freeze looks like a clip that ended, a loop would add a jump
    cut that the model would learn as motion).
  * a corrupt or unreadable file is skipped with one warning naming it and counted in
    `FolderSource.skipped` (per process / worker); it never stops a run. A missing folder,
    missing captions file, or no usable entry raises a clear error at construction.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os

import numpy as np
from PIL import Image

from vdm.data import provenance
from vdm.io import video as video_io

log = logging.getLogger(__name__)

MAX_FRAMES = 1024  # frames kept per clip after striding (bounds memory for very long clips)
CAPTION_FILES = ("captions.jsonl", "captions.csv")


def cover_size(h: int, w: int, height: int, width: int) -> tuple[int, int]:
    """The smallest (h', w') with the aspect of (h, w) that covers (height, width)."""
    scale = max(height / h, width / w)
    return max(height, math.ceil(h * scale - 1e-6)), max(width, math.ceil(w * scale - 1e-6))


def resize_frame(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear (antialiased when shrinking) resize of uint8 [H, W, 3] to size (h, w)."""
    if frame.shape[:2] == tuple(size):
        return frame
    image = Image.fromarray(frame).resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(image)


def read_captions(root: str, caption_key: str = "caption") -> list[dict]:
    """Parses captions.jsonl or captions.csv of a clip folder.

    Args:
      root: the folder.
      caption_key: name of the caption field.

    Returns:
      Entries {"file": path relative to root, "caption": str, "split": str | None}.

    Raises:
      FileNotFoundError: no folder or no captions file.
      ValueError: a malformed line / row (the message names file and line).
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Video folder '{root}' does not exist (config.data.source).")
    paths = [os.path.join(root, n) for n in CAPTION_FILES if os.path.exists(os.path.join(root, n))]
    if not paths:
        raise FileNotFoundError(
            f"Video folder '{root}' has no {' or '.join(CAPTION_FILES)}. Add one line per clip, "
            f'e.g. {{"file": "clip.mp4", "{caption_key}": "a dog runs on the beach"}}.'
        )
    path = paths[0]
    try:
        rows = _read_rows(path)
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}:{_line_of(path, e.start)}: the captions file is not UTF-8 text ({e.reason} at "
            f"byte {e.start}); save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
        ) from None
    return _entries(root, path, rows, caption_key)


def _read_rows(path: str) -> list[tuple[int, object]]:
    """[(line number, parsed JSON line / CSV row)] of a captions file."""
    rows = []
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append((line_no, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({e}).") from None
    else:
        with open(path, encoding="utf-8", newline="") as f:
            for line_no, row in enumerate(csv.DictReader(f), 2):
                rows.append((line_no, row))
    return rows


def _line_of(path: str, offset: int) -> int:
    """The 1-based line of byte `offset` in file `path`."""
    with open(path, "rb") as f:
        return f.read(offset).count(b"\n") + 1


def _entries(root: str, path: str, rows, caption_key: str) -> list[dict]:
    """The checked entries of a captions file's rows (module docstring)."""
    entries = []
    for line_no, row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{line_no}: expected an object with 'file' and a caption.")
        file = row.get("file", row.get("video"))
        caption = row.get(caption_key)
        if not file or caption is None:
            raise ValueError(
                f"{path}:{line_no}: needs fields 'file' and '{caption_key}'; got {sorted(row)}."
            )
        split = row.get("split") or None
        file = str(file)
        # Entries name clips inside the folder: an absolute path or one climbing out with ".."
        # would let a captions file make the loader open any file on the machine.
        inside = os.path.normpath(file)
        if os.path.isabs(file) or inside == ".." or inside.startswith(".." + os.sep):
            raise ValueError(
                f"{path}:{line_no}: file {file!r} is not inside the clip folder '{root}'; "
                "captions may only name files in it, by paths relative to it."
            )
        entry = {"file": file, "caption": str(caption), "split": split}
        for key in provenance.ORIGIN_FIELDS:
            if row.get(key) not in (None, ""):
                entry[key] = _consent(row[key], path, line_no) if key == "consent" else row[key]
        entries.append(entry)
    return entries


def _consent(value, path: str, line_no: int) -> bool:
    text = str(value).strip().lower()
    if isinstance(value, bool) or text in ("true", "false", "yes", "no", "1", "0"):
        return value if isinstance(value, bool) else text in ("true", "yes", "1")
    raise ValueError(f"{path}:{line_no}: consent must be true or false; got {value!r}.")


def _manifest(root: str, split: str, entries: list[dict]) -> dict:
    """The folder's manifest of `entries` (`vdm.data.provenance`), read from its file when every
    clip's size and modification time are as recorded; the others' bytes are hashed again."""
    path = os.path.join(root, f"vdm_manifest_{split}.json".replace(os.sep, "_"))
    old = provenance.read_manifest(path)
    known = {e["id"]: e for e in (old or {}).get("examples", [])}
    examples = []
    for entry in entries:
        file = os.path.join(root, entry["file"])
        stat = os.stat(file)
        seen = known.get(entry["file"])
        if seen and (seen.get("size"), seen.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns):
            digest = bytes.fromhex(seen["video_sha256"])
        else:
            digest = provenance.file_digest(file)
        example = {
            "hash": provenance.example_hash(digest, entry["caption"]),
            "id": entry["file"],
            "video_sha256": digest.hex(),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
        }
        example.update({k: entry[k] for k in provenance.ORIGIN_FIELDS if k in entry})
        examples.append(example)
    dataset = {"name": "folder", "split": split}  # not its path: a moved folder is the same data
    manifest = provenance.make_manifest(dataset, examples)
    if old is None or old["examples"] != examples:
        provenance.write_manifest(path, manifest)
    return manifest


class FolderSource:
    """Random-access source over a clip folder (see the module docstring).

    Args:
      root: the folder.
      split: keep entries whose `split` is this (entries without a split are in every split).
      height, width: target frame size (frames are resized to cover it; cropping happens later).
      fps: target frame rate for temporal striding.
      caption_key: caption field name in the captions file.
      data_config: `config.data` for its opt-out fields (`exclude`, `allow_no_consent`); None:
        no exclusion lists (consent: false entries are still dropped).
    """

    def __init__(
        self,
        root: str,
        *,
        split: str,
        height: int,
        width: int,
        fps: float = 8,
        caption_key: str = "caption",
        data_config=None,
    ):
        self.root = os.path.abspath(root)
        self.split = split
        self.height, self.width, self.fps = int(height), int(width), float(fps)
        entries = read_captions(self.root, caption_key)
        entries = [e for e in entries if e["split"] in (None, split)]
        self.missing = 0
        kept = []
        for e in entries:
            if os.path.exists(os.path.join(self.root, e["file"])):
                kept.append(e)
            else:
                self.missing += 1
                log.warning(
                    "Video folder %s: listed file %s does not exist; skipped.", root, e["file"]
                )
        if not kept:
            raise ValueError(
                f"Video folder '{root}' has no usable clips for split '{split}' ({len(entries)} "
                f"listed, {self.missing} missing on disk). Check the captions file and 'split'."
            )
        manifest = _manifest(self.root, split, kept)
        self.selection = provenance.select(
            manifest, data_config or {}, root=self.root, what=f"Video folder {root} ({split})"
        )
        self.entries = [kept[i] for i in self.selection.keep]
        self._examples = [manifest["examples"][i] for i in self.selection.keep]
        self.skipped = 0  # unreadable files met so far (in this process)
        self._bad: set[str] = set()

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return (
            f"FolderSource(root={self.root!r}, split={self.split!r}, n={len(self)}, "
            f"size={self.height}x{self.width}, fps={self.fps:g})"
        )

    def load(self, index: int) -> dict:
        """Reads clip `index`; raises `video_io.VideoReadError` / OSError if it is unreadable."""
        entry = self.entries[index]
        path = os.path.join(self.root, entry["file"])
        file_fps, frames = video_io.iter_video(path)
        stride = max(1, int(round(file_fps / self.fps))) if file_fps else 1
        kept = []
        size = None
        try:
            for i, frame in enumerate(frames):
                if i % stride:
                    continue
                if size is None:
                    size = cover_size(frame.shape[0], frame.shape[1], self.height, self.width)
                kept.append(resize_frame(frame, size))
                if len(kept) >= MAX_FRAMES:
                    break
        finally:
            frames.close()
        if not kept:
            raise video_io.VideoReadError(f"Video '{path}' contains no frames.")
        record = {"video": np.stack(kept), "caption": entry["caption"], "file": entry["file"]}
        return provenance.tag(record, self._examples[index])

    def __getitem__(self, index: int) -> dict:
        try:
            return self.load(index)
        except (video_io.VideoReadError, OSError, ValueError) as e:
            file = self.entries[index]["file"]
            if file not in self._bad:
                self._bad.add(file)
                self.skipped += 1
                log.warning(
                    "Skipping unreadable video %s (%d skipped so far in this process): %s",
                    file,
                    self.skipped,
                    e,
                )
            if len(self._bad) == len(self.entries):  # else an endless loader would spin forever
                raise ValueError(
                    f"Every clip listed for split '{self.split}' in '{self.root}' is unreadable "
                    f"(last: {file}: {e})."
                ) from e
            return {"_skip": True, "file": file}
