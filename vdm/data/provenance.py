"""Where every training example came from, and which ones must not be used.

Every source of `vdm.data.sources` yields, with each record,
  content_hash  a stable hash of the raw example: sha256 of the raw video (the file's bytes for a
                folder clip, the stored uint8 array with its shape for tfds / moving digits) and
                the caption (`example_hash`); the same clip and caption give the same hash on any
                machine, under any path;
  origin_id     where it is: the file path relative to a clip folder, `name:split:index` for a
                tfds record.
A data set's manifest lists these for all its examples, with the data set's name and version and,
for folder sets, the optional `license`, `source_url` and `consent` fields of captions.jsonl /
.csv, plus `manifest_hash`, one hash of the whole. It is built once and written next to the data
(`vdm_manifest*.json` in the clip folder / the tfds version directory; a latent cache has one per
split, of the examples it holds), so loading reads it instead of hashing again.

Opt-out: `config.data.exclude` names files (comma-separated) of content hashes, origin ids or
paths, one a line (`#` starts a comment). Every source drops the examples they name before
batching (an index map: an excluded record is never read), and so does a latent cache built before
the list existed, from the hashes it stored. Entries of a folder set with `consent: false` are
dropped unless `config.data.allow_no_consent`. `Selection.summary()` is what checkpoints record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence

import numpy as np

from vdm.errors import ConfigError

log = logging.getLogger("vdm.data")

FORMAT = "vdm-data-manifest"
VERSION = 1
HASH_FIELD = "content_hash"
ID_FIELD = "origin_id"
ORIGIN_FIELDS = ("license", "source_url", "consent")  # optional columns of a folder's captions


def _sha(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def array_digest(video) -> bytes:
    """Digest of a raw video array: its dtype, shape and C-order bytes."""
    a = np.ascontiguousarray(video)
    head = f"{a.dtype.str}{list(a.shape)}".encode()
    return hashlib.sha256(head + a.tobytes()).digest()


def file_digest(path: str) -> bytes:
    """Digest of a clip file's bytes, or of a frame folder (its file names and bytes, in order)."""
    h = hashlib.sha256()
    files = [path]
    if os.path.isdir(path):
        files = [os.path.join(path, n) for n in sorted(os.listdir(path))]
        files = [f for f in files if os.path.isfile(f)]
    for file in files:
        if file != path:
            h.update(os.path.basename(file).encode() + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.digest()


def example_hash(video_digest: bytes, caption: str) -> str:
    """The content hash of one example: its raw video's digest and its caption."""
    return _sha(b"vdm-example-v1", video_digest, str(caption).encode("utf-8"))


def manifest_hash(dataset: dict, examples: Sequence[dict]) -> str:
    """One hash of a data set's identity and its examples' (hash, id), in order."""
    rows = json.dumps([[e["hash"], e["id"]] for e in examples], separators=(",", ":"))
    return _sha(b"vdm-manifest-v1", json.dumps(dataset, sort_keys=True).encode(), rows.encode())


def make_manifest(dataset: dict, examples: list[dict], **extra) -> dict:
    """A manifest dict (module docstring) of `examples` [{"hash", "id", ...origin}]."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "dataset": dataset,
        "num_examples": len(examples),
        "manifest_hash": manifest_hash(dataset, examples),
        "examples": examples,
        **extra,
    }


def read_manifest(path: str) -> dict | None:
    """The manifest at `path`, or None when there is none (or it is not one this code reads)."""
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    if int(manifest.get("version", 0)) != VERSION:
        return None
    return manifest


def write_manifest(path: str, manifest: dict) -> None:
    """Writes a manifest atomically; a read-only data directory only costs a warning (the
    manifest is then rebuilt by the next run)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, separators=(",", ":"))
        os.replace(tmp, path)
    except OSError as e:
        log.warning("Could not write the data manifest %s (%s); it is kept in memory.", path, e)


def cached_manifest(path: str, dataset: dict, build: Callable[[], list[dict]]) -> dict:
    """The manifest at `path` when it describes `dataset`, else `build()`'s examples, written
    there."""
    manifest = read_manifest(path)
    if manifest is not None and manifest.get("dataset") == json.loads(json.dumps(dataset)):
        return manifest
    manifest = make_manifest(dataset, build())
    write_manifest(path, manifest)
    return manifest


# ----------------------------------------------------------------------------- opt-out


def _list_files(spec) -> list[str]:
    if isinstance(spec, str):
        spec = spec.split(",")
    return [os.path.abspath(os.path.expanduser(s.strip())) for s in spec or () if str(s).strip()]


@dataclasses.dataclass(frozen=True)
class Exclusions:
    """The opt-out lists in force: the names they hold, and each file's sha256."""

    names: frozenset = frozenset()
    lists: tuple = ()  # ({"file": abs path, "sha256": ..., "entries": n}, ...)

    @classmethod
    def from_config(cls, data_config) -> Exclusions:
        """`config.data.exclude` read (module docstring).

        Raises:
          ConfigError: a listed file does not exist or is not UTF-8 text.
        """
        names, lists = set(), []
        for file in _list_files(data_config.get("exclude", "")):
            try:
                with open(file, "rb") as f:
                    raw = f.read()
                text = raw.decode("utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(
                    f"config.data.exclude names '{file}', which cannot be read as a UTF-8 text "
                    f"file ({e}). Give existing files of content hashes, ids or paths, one a line."
                ) from None
            lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
            lines = [ln for ln in lines if ln]
            names.update(lines)
            entry = {"file": file, "sha256": hashlib.sha256(raw).hexdigest(), "entries": len(lines)}
            lists.append(entry)
        return cls(frozenset(names), tuple(lists))

    def named(self, example: dict, root: str = "") -> bool:
        """Whether an example (its hash, id and, in a folder, its path) is on a list."""
        if not self.names:
            return False
        keys = [example["hash"], example["id"]]
        if root:
            keys.append(os.path.join(root, example["id"]))
        return any(k in self.names for k in keys)


@dataclasses.dataclass(frozen=True)
class Selection:
    """The examples of a manifest a source serves: `keep` (manifest indices, in order) and why
    the others were dropped."""

    manifest: dict
    keep: np.ndarray
    excluded: int
    no_consent: int
    exclusions: Exclusions

    @property
    def dropped(self) -> int:
        return self.excluded + self.no_consent

    def summary(self) -> dict:
        """What a checkpoint records about its data (JSON)."""
        kept = [self.manifest["examples"][i] for i in self.keep]
        return {
            "dataset": self.manifest["dataset"],
            "manifest_hash": self.manifest["manifest_hash"],
            "num_examples": int(self.manifest["num_examples"]),
            "used_hash": manifest_hash(self.manifest["dataset"], kept),
            "used": len(kept),
            "dropped": self.dropped,
            "dropped_excluded": self.excluded,
            "dropped_no_consent": self.no_consent,
            "exclude_lists": list(self.exclusions.lists),
        }


def select(manifest: dict, data_config, *, root: str = "", what: str = "") -> Selection:
    """The examples of `manifest` that `config.data` allows (module docstring); logs the count
    dropped."""
    exclusions = Exclusions.from_config(data_config)
    allow_no_consent = bool(data_config.get("allow_no_consent", False))
    keep, excluded, no_consent = [], 0, 0
    for i, example in enumerate(manifest["examples"]):
        if exclusions.named(example, root):
            excluded += 1
        elif example.get("consent") is False and not allow_no_consent:
            no_consent += 1
        else:
            keep.append(i)
    if excluded or no_consent:
        log.info(
            "%s: dropped %d of %d examples (%d on config.data.exclude lists, %d with consent: "
            "false).",
            what or manifest["dataset"].get("name", "data"),
            excluded + no_consent,
            len(manifest["examples"]),
            excluded,
            no_consent,
        )
    if not keep:
        raise ConfigError(
            f"Every example of {what or 'the data set'} is excluded ({excluded} by "
            f"config.data.exclude, {no_consent} with consent: false): nothing is left to train on."
        )
    return Selection(manifest, np.asarray(keep, np.int64), excluded, no_consent, exclusions)


def tag(record: dict, example: dict) -> dict:
    """`record` with the example's content hash and origin id (the fields every source yields)."""
    record[HASH_FIELD] = example["hash"]
    record[ID_FIELD] = example["id"]
    return record
