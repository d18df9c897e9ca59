"""Random-access sources of (video, caption, labels) records, chosen by `config.data.source`.

  "moving_digits"          the bundled procedural set, prepared on first use (moving_digits.py)
  "folder:/path/to/clips"  a directory of videos + captions.jsonl / captions.csv (vdm.data.folder)
  "tfds:name[/config]"     any tfds data set already prepared in array_record format, read through
                           `tfds.data_source` (needs no TensorFlow); `config.data.video_key` and
                           `config.data.caption_key` name its features (a ClassLabel caption
                           feature, e.g. ucf101's "label", becomes its class name as text).
  "cache:/path/to/dir"     a latent cache built by `python -m vdm.tools.cache` (vdm.data.cache):
                           records hold VAE posteriors and text contexts instead of a video.

Every source is a grain `RandomAccessDataSource` (`__len__`, `__getitem__`, a stable `__repr__`
for iterator checkpoints, picklable for grain workers) whose records are dicts with
  video    uint8 [T', H', W', 3] (shape as stored; `vdm.data.loader` crops / resizes it),
  caption  python str,
and any other features of the source (bytes become str), e.g. the moving-digits labels, and
every source's provenance fields `content_hash` and `origin_id` (`vdm.data.provenance`; examples
that `config.data.exclude` names are not served). Cache sources have no `video`; their records are
described in `vdm.data.cache`.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from vdm.data import moving_digits, provenance
from vdm.data.cache.source import CacheSource
from vdm.data.folder import FolderSource

SOURCE_KINDS = ("moving_digits", "folder:/path", "tfds:name[/config]", "cache:/path")


def _to_text(value: Any) -> Any:
    """bytes -> str; python scalars -> int32 / float32 numpy scalars (the promised batch dtypes)."""
    if isinstance(value, bool | np.bool_):
        return np.bool_(value)
    if isinstance(value, int):
        return np.int32(value) if -(2**31) <= value < 2**31 else np.int64(value)
    if isinstance(value, float):
        return np.float32(value)
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.dtype.kind in "SO" and value.ndim == 0:
        return _to_text(value.item())
    return value


def _label_text(name: str) -> str:
    """A class name as a caption: "ApplyEyeMakeup" / "apply_eye_makeup" -> "apply eye makeup"."""
    name = name.replace("_", " ").replace("-", " ")
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name)
    return " ".join(name.split()).lower()


class TfdsSource:
    """A tfds `ArrayRecordDataSource` whose records are renamed to `video` / `caption`.

    Args:
      data_source: what `tfds.data_source(name, split=...)` or `builder.as_data_source(split)`
        returns.
      name: the tfds name (for repr and messages).
      split: the split name.
      video_key: the feature holding uint8 [T, H, W, 3] frames.
      caption_key: the text feature (Text, bytes, or ClassLabel) used as the caption.
      features: the builder's `info.features` (to name ClassLabel captions), or None.
    """

    def __init__(
        self,
        data_source,
        *,
        name: str,
        split: str,
        video_key: str = "video",
        caption_key: str = "caption",
        features=None,
    ):
        self._source = data_source
        self._name = name
        self._split = split
        self._video_key = video_key
        self._caption_key = caption_key
        self._label_names = None
        self.selection: provenance.Selection | None = None  # set by `select`
        if features is not None:
            keys = list(features.keys())
            for key in (video_key, caption_key):
                if key not in keys:
                    raise ValueError(
                        f"tfds data set '{name}' has no feature '{key}'; its features are "
                        f"{keys}. Set config.data.video_key / config.data.caption_key."
                    )
            feature = features[caption_key]
            if isinstance(feature, tfds.features.ClassLabel):
                self._label_names = [_label_text(n) for n in feature.names]

    def __len__(self) -> int:
        return len(self._source) if self.selection is None else len(self.selection.keep)

    def __repr__(self) -> str:
        return (
            f"TfdsSource(name={self._name!r}, split={self._split!r}, "
            f"video_key={self._video_key!r}, caption_key={self._caption_key!r}, n={len(self)})"
        )

    def _caption(self, example: dict) -> str:
        caption = example[self._caption_key]
        if self._label_names is not None:
            return self._label_names[int(caption)]
        return str(_to_text(caption))

    def _examples(self) -> list[dict]:
        """Every record's content hash and id, read once (`vdm.data.provenance`)."""
        out, n = [], len(self._source)
        for start in range(0, n, 256):
            indices = list(range(start, min(n, start + 256)))
            if hasattr(self._source, "__getitems__"):
                records = self._source.__getitems__(indices)
            else:
                records = [self._source[i] for i in indices]
            for i, example in zip(indices, records, strict=True):
                digest = provenance.array_digest(example[self._video_key])
                out.append(
                    {
                        "hash": provenance.example_hash(digest, self._caption(example)),
                        "id": f"{self._name}:{self._split}:{i}",
                    }
                )
        return out

    def select(self, data_config, directory: str, version: str) -> TfdsSource:
        """Attaches the split's manifest (read from, or built once into, `directory`) and serves
        only the examples `config.data` allows. Returns self."""
        dataset = {
            "name": self._name,
            "version": version,
            "split": self._split,
            "records": len(self._source),
            "video_key": self._video_key,
            "caption_key": self._caption_key,
        }
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", self._split)
        path = os.path.join(directory, f"vdm_manifest_{name}.json")
        manifest = provenance.cached_manifest(path, dataset, self._examples)
        self.selection = provenance.select(manifest, data_config, what=f"{self._name} {name}")
        self._keep = self.selection.keep.tolist()  # python ints: the per-record lookup is cheap
        self._examples_list = manifest["examples"]
        return self

    def _convert(self, example: dict) -> dict:
        out = {}
        for key, value in example.items():
            if key == self._video_key:
                continue
            out[key] = _to_text(value)
        video = np.asarray(example[self._video_key])
        if video.ndim == 3:  # grey video [T, H, W]
            video = video[..., None]
        if video.ndim != 4 or video.dtype != np.uint8:
            raise ValueError(
                f"Feature '{self._video_key}' of '{self._name}' must be uint8 [T, H, W, C]; got "
                f"{video.dtype} {video.shape}. Set config.data.video_key to the video feature."
            )
        if video.shape[-1] == 1:
            # A read-only view; batching copies it into the batch array (no extra copy here).
            video = np.broadcast_to(video, (*video.shape[:-1], 3))
        elif video.shape[-1] == 4:
            video = video[..., :3]
        out["video"] = video
        out["caption"] = self._caption(example)
        if self._caption_key != "caption":
            out.pop(self._caption_key, None)
        return out

    def _record(self, index: int, example: dict) -> dict:
        out = self._convert(example)
        if self.selection is not None:
            provenance.tag(out, self._examples_list[index])
        return out

    def _index(self, index: int) -> int:
        return index if self.selection is None else self._keep[index]

    def __getitem__(self, index: int) -> dict:
        index = self._index(index)
        return self._record(index, self._source[index])

    def __getitems__(self, indices) -> list[dict]:
        indices = [self._index(i) for i in indices]
        if hasattr(self._source, "__getitems__"):
            examples = self._source.__getitems__(indices)
        else:
            examples = [self._source[i] for i in indices]
        return [self._record(i, e) for i, e in zip(indices, examples, strict=True)]


def _tfds_source(spec: str, data_config, split: str) -> TfdsSource:
    data_dir = moving_digits.resolve_data_dir(data_config)
    missing = FileNotFoundError(
        f"tfds data set '{spec}' is not prepared in data_dir '{data_dir}'. Prepare it first (with "
        f"file_format='array_record'; nothing is downloaded here), or set config.data.data_dir."
    )
    try:
        builder = tfds.builder(spec, data_dir=data_dir)
        if not builder.is_prepared():
            raise missing
        source = builder.as_data_source(split=split)
        info = builder.info
    except tfds.core.registered.DatasetNotFoundError:
        raise missing from None
    except ModuleNotFoundError as e:
        if e.name != "tensorflow":
            raise
        raise ValueError(
            f"tfds data set '{spec}' uses features that need TensorFlow to decode (e.g. "
            f"tfds.features.Video, as in ucf101), and TensorFlow is not installed. Install "
            f"tensorflow-cpu, or store the frames as tfds.features.Tensor(dtype=uint8)."
        ) from None
    except (ValueError, KeyError, AssertionError) as e:
        raise ValueError(
            f"Cannot read split '{split}' of tfds data set '{spec}' from '{data_dir}' through "
            f"tfds.data_source: {e}. Random access needs the array_record format; re-prepare with "
            f"`tfds.builder('{spec}', file_format='array_record').download_and_prepare()`."
        ) from None
    return TfdsSource(
        source,
        name=spec,
        split=split,
        video_key=data_config.video_key,
        caption_key=data_config.caption_key,
        features=info.features,
    ).select(data_config, builder.data_dir, str(builder.version))


def get_source(data_config, split: str):
    """The random-access source for `config.data` and a split name.

    Args:
      data_config: `config.data`.
      split: a split name ("train", "test"; tfds sources also accept slices like "train[:90%]").

    Returns:
      A grain-compatible random-access source of record dicts (see the module docstring).
    """
    spec = str(data_config.source)
    if spec == "moving_digits":
        builder = moving_digits.prepare(data_config)
        if split.split("[")[0] not in moving_digits.SPLITS:
            raise ValueError(
                f"Unknown moving_digits split '{split}'; valid: {moving_digits.SPLITS}."
            )
        return TfdsSource(
            builder.as_data_source(split=split),
            name=f"moving_digits/{builder.builder_config.name}",
            split=split,
            features=builder.info.features,
        ).select(data_config, builder.data_dir, str(builder.version))
    if spec.startswith("folder:"):
        root = os.path.expanduser(spec[len("folder:") :])
        return FolderSource(
            root,
            split=split,
            height=data_config.height,
            width=data_config.width,
            fps=data_config.fps,
            caption_key=data_config.caption_key,
            data_config=data_config,
        )
    if spec.startswith("tfds:"):
        return _tfds_source(spec[len("tfds:") :], data_config, split)
    if spec.startswith("cache:"):
        return CacheSource(spec[len("cache:") :], split, data_config=data_config)
    raise ValueError(
        f"Unknown config.data.source '{spec}'. Valid: {', '.join(SOURCE_KINDS)} "
        f"(e.g. --config.data.source=folder:/data/my_clips)."
    )
