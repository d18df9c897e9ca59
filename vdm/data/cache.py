"""A latent cache: VAE posteriors and text-encoder contexts precomputed once for the denoiser.

Training the denoiser would otherwise re-encode every video with the frozen VAE and every caption
with the frozen text encoder at every step (on CPU as costly as the denoiser itself). Build the
cache once per split, then train from it:

  python -m vdm.data.cache --config configs/quickstart.py --output /data/dq --split train
  python -m vdm.data.cache --config configs/quickstart.py --output /data/dq --split test
  python train.py --config configs/quickstart.py --workdir wd --config.data.source=cache:/data/dq

The builder reads `config.data` through the normal source and pipeline (every example, stored
order, no shuffle; the deterministic evaluation crops: centre temporal window, resize +
centre crop), encodes videos with the VAE of `config.vae.checkpoint` (EMA params) and captions
with `config.text_encoder`, in jitted batches.

Directory layout:
  manifest.json          what the cache was built from (`read_manifest`, `check_compatible`)
  <split>.array_record   one record per example (group_size 1: random access; zstd)
  null_context.npy       float16 [L, D] context of the empty prompt (mask in the manifest)

A record is a msgpack map, keys sorted, from feature name to either raw little-endian array bytes
(dtype and shape in `manifest["splits"][split]["features"]`) or a UTF-8 string. Reading it through
`config.data.source = "cache:DIR"` (`CacheSource`) yields dicts with
  latent_mean    float16 [t, h, w, c]  posterior mean, NOT normalized (use manifest latent_stats)
  latent_logvar  float16 [t, h, w, c]  posterior log-variance
  context        float16 [L, D]        the text encoder's last hidden states of `caption`
  context_mask   int32   [L]           1 on tokens, 0 on padding
  caption        str
and the source's numeric scalar labels (moving digits: digit, direction, speed, ...) with their
dtypes, and its other text fields (caption_heldout, direction_name, colour). `--latent_dtype
float32` stores float32 latents instead. `--zero_padding` stores zeros at padded context
positions (the denoiser ignores them exactly), which compress away: default moving digits take
20 instead of 32 KB per example.

Everything is deterministic: the same config and inputs give the same bytes.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import logging
import os
import re
import sys
import time
import warnings
from typing import Any

import numpy as np

from vdm.models import autoencoder as ae

log = logging.getLogger("vdm.data.cache")

FORMAT = "vdm-latent-cache"
VERSION = 1
MANIFEST = "manifest.json"
NULL_CONTEXT = "null_context.npy"
# The fields every record has; source labels may not use these names.
CACHE_FIELDS = ("latent_mean", "latent_logvar", "context", "context_mask", "caption")
_WRITER_OPTIONS = "group_size:1"  # one record per chunk: random access (as tfds writes them)
_MEMO_BYTES = 256 * 2**20  # caption -> context memo (data sets with repeated captions)


# ----------------------------------------------------------------------------- manifest


def manifest_path(path: str) -> str:
    """`DIR/manifest.json` for a cache directory (or the manifest path itself)."""
    path = os.path.expanduser(str(path))
    return path if path.endswith(".json") else os.path.join(path, MANIFEST)


def underlying_source(source: str) -> str:
    """The data source a `config.data.source` stands for: a cache's original source, else itself.

    Args:
      source: a `config.data.source` value, e.g. "moving_digits" or "cache:/data/dq".

    Returns:
      The source the cache was built from (read from its manifest), or `source` unchanged.
    """
    if not source.startswith("cache:"):
        return source
    return str(read_manifest(source[len("cache:") :])["data"]["source"])


def read_manifest(path: str) -> dict:
    """The manifest of a cache directory.

    Args:
      path: the cache directory (what follows "cache:" in `config.data.source`) or its
        manifest.json.

    Returns:
      The manifest dict: format, version, vae {checkpoint, architecture, random_init_seed},
      latent_stats {shift, scale}, latent_shape [t, h, w, c], text_encoder {name, max_length,
      dtype, dim}, data (the `config.data` it was built from), null_context {file, mask},
      latent_dtype, zero_padding, splits {split: {file, num_examples, skipped, features}}.

    Raises:
      FileNotFoundError: no manifest at `path`.
      ValueError: not a latent-cache manifest, or a newer format version.
    """
    file = manifest_path(path)
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"No latent cache at '{path}' (missing {file}). Build one with `python -m "
            f"vdm.data.cache --config CONFIG --output {os.path.dirname(file) or path} --split "
            f"train`, or fix config.data.source=cache:DIR."
        )
    with open(file) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"'{file}' is not a vdm latent-cache manifest (format != {FORMAT!r}).")
    if int(manifest.get("version", 0)) > VERSION:
        raise ValueError(
            f"Latent cache '{file}' has format version {manifest['version']}; this code reads "
            f"versions <= {VERSION}. Update vdm or rebuild the cache."
        )
    return manifest


def _abs_checkpoint(path: str) -> str:
    """The step directory a VAE checkpoint path resolves to ("" for none), symlinks resolved
    (the same checkpoint reached through a symlinked workdir is the same checkpoint)."""
    if not path:
        return ""
    from vdm.io import checkpoint

    if checkpoint.bundle_part(path) is not None:  # an exported model's vae/ weights
        return os.path.realpath(path)
    directory, step = checkpoint.resolve(path)
    return os.path.realpath(os.path.join(directory, str(step)))


def _identity(config) -> dict:
    """The parts of a config the cached arrays depend on (compared by `check_compatible`)."""
    from vdm.models import autoencoder as ae

    d = config.data
    ckpt = _abs_checkpoint(str(config.vae.checkpoint))
    return {
        "data.num_frames": int(d.num_frames),
        "data.height": int(d.height),
        "data.width": int(d.width),
        "latent_shape": list(ae.latent_shape(config.vae, d.num_frames, d.height, d.width)),
        "vae.architecture": ae.resolve_vae_config(config.vae),
        "vae.checkpoint": ckpt,
        # A random-init VAE (tests only) is a function of the seed.
        "vae.random_init_seed": None if ckpt else int(config.seed),
        "text_encoder.name": str(config.text_encoder.name),
        "text_encoder.max_length": int(config.text_encoder.max_length),
        "text_encoder.dtype": str(config.text_encoder.dtype),
    }


def _manifest_identity(manifest: dict) -> dict:
    d, v, t = manifest["data"], manifest["vae"], manifest["text_encoder"]
    return {
        "data.num_frames": int(d["num_frames"]),
        "data.height": int(d["height"]),
        "data.width": int(d["width"]),
        "latent_shape": list(manifest["latent_shape"]),
        "vae.architecture": v["architecture"],
        "vae.checkpoint": v["checkpoint"],
        "vae.random_init_seed": v["random_init_seed"],
        "text_encoder.name": t["name"],
        "text_encoder.max_length": int(t["max_length"]),
        "text_encoder.dtype": t["dtype"],
    }


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=lambda o: np.asarray(o).tolist()))


def _mismatches(expected: dict, found: dict) -> list[str]:
    return [
        f"{k}: cache has {found[k]!r}, config has {expected[k]!r}"
        for k in expected
        if _jsonable(expected[k]) != _jsonable(found[k])
    ]


def check_compatible(manifest: dict, config, split: str | None = None) -> None:
    """Raises a clear error when a cache was not built for `config` (frames, size, VAE, text).

    Compared: data.num_frames / height / width, the latent shape, the VAE architecture and
    checkpoint (the resolved step directory; the seed for a random-init VAE), and the text
    encoder's name, max_length and dtype. `config.data.source` itself is not compared (it is
    "cache:DIR" on the consuming side).

    Args:
      manifest: `read_manifest(DIR)`.
      config: the full config that will consume the cache.
      split: also require this split to be in the cache.

    Raises:
      ValueError: naming every mismatched field and how to fix it.
    """
    problems = _mismatches(_identity(config), _manifest_identity(manifest))
    if split is not None and split not in manifest["splits"]:
        problems.append(
            f"split {split!r} is not cached (cached: {sorted(manifest['splits'])}); build it with "
            f"--split {split}"
        )
    if problems:
        raise ValueError(
            f"The latent cache does not match this config: {'; '.join(problems)}. Rebuild it with "
            f"this config (`python -m vdm.data.cache --config ... --output DIR --split ...` with "
            f"the same --config overrides), or change the config to match."
        )


def load_null_context(path: str) -> tuple[np.ndarray, np.ndarray]:
    """The cached context of the empty prompt (classifier-free guidance's null condition).

    Args:
      path: the cache directory.

    Returns:
      `(context float16 [L, D], context_mask int32 [L])`.
    """
    manifest = read_manifest(path)
    directory = os.path.dirname(manifest_path(path))
    context = np.load(os.path.join(directory, manifest["null_context"]["file"]))
    return context, np.asarray(manifest["null_context"]["mask"], np.int32)


def _write_json_atomic(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- records


def _le(dtype: str) -> np.dtype:
    return np.dtype(dtype).newbyteorder("<")


def pack_record(example: dict, features: dict) -> bytes:
    """One example -> record bytes (msgpack map, sorted keys; see the module docstring)."""
    import msgpack

    out = {}
    for name in sorted(features):
        spec = features[name]
        value = example[name]
        if spec["dtype"] == "str":
            out[name] = str(value)
        else:
            arr = np.asarray(value, dtype=_le(spec["dtype"]))
            if list(arr.shape) != list(spec["shape"]):
                raise ValueError(f"Feature {name!r}: shape {arr.shape}, expected {spec['shape']}.")
            out[name] = arr.tobytes()
    return msgpack.packb(out, use_bin_type=True)


def unpack_record(data: bytes, features: dict) -> dict:
    """Record bytes -> dict of numpy arrays (0-d ones as numpy scalars) and str."""
    import msgpack

    raw = msgpack.unpackb(data, raw=False)
    out = {}
    for name, spec in features.items():
        value = raw[name]
        if spec["dtype"] == "str":
            out[name] = value
        else:
            arr = np.frombuffer(value, dtype=_le(spec["dtype"])).reshape(spec["shape"])
            out[name] = arr[()] if arr.ndim == 0 else arr
    return out


# ----------------------------------------------------------------------------- source


def split_file(split: str) -> str:
    """File name of a split ("train[:10%]" -> "train_10_.array_record")."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", split) + ".array_record"


class CacheSource:
    """Random-access source over one split of a latent cache (`config.data.source="cache:DIR"`).

    Records are the dicts described in the module docstring. The source holds no video, so
    `vdm.data.loader` skips its video crops for it (`provides_video = False`).

    Args:
      path: the cache directory.
      split: a cached split name.
      data_config: `config.data` of the consumer; when given, its num_frames / height / width
        must be those the cache was built with (the rest is checked by `check_compatible`).
    """

    provides_video = False

    def __init__(self, path: str, split: str, data_config=None):
        self._path = os.path.abspath(os.path.expanduser(str(path)))
        self._split = split
        manifest = read_manifest(self._path)
        if split not in manifest["splits"]:
            raise ValueError(
                f"Latent cache '{self._path}' has no split {split!r}; cached: "
                f"{sorted(manifest['splits'])}. Build it: python -m vdm.data.cache --config ... "
                f"--output {self._path} --split {split}"
            )
        if data_config is not None:
            found = {k: manifest["data"][k] for k in ("num_frames", "height", "width")}
            wanted = {k: int(data_config[k]) for k in found}
            if found != wanted:
                raise ValueError(
                    f"Latent cache '{self._path}' was built for videos {found}, but config.data "
                    f"asks for {wanted}. Rebuild the cache with this config or set "
                    f"config.data.num_frames/height/width to the cached values."
                )
        entry = manifest["splits"][split]
        self._features = entry["features"]
        self._file = os.path.join(self._path, entry["file"])
        self._len = int(entry["num_examples"])
        self._reader = None
        if not os.path.isfile(self._file):
            raise FileNotFoundError(
                f"Latent cache '{self._path}' lists split {split!r} but '{self._file}' is "
                "missing; rebuild that split."
            )

    @property
    def features(self) -> dict:
        """{name: {"dtype": str, "shape": list}} of every record field ("str" for text)."""
        return self._features

    def _source(self):
        if self._reader is None:
            import grain

            self._reader = grain.sources.ArrayRecordDataSource([self._file])
        return self._reader

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"CacheSource(path={self._path!r}, split={self._split!r}, n={self._len})"

    def __getitem__(self, index: int) -> dict:
        return unpack_record(self._source()[index], self._features)

    def __getitems__(self, indices) -> list[dict]:
        return [unpack_record(r, self._features) for r in self._source().__getitems__(indices)]

    def __getstate__(self):
        # Workers reopen the file themselves (readers hold native handles).
        state = dict(self.__dict__)
        state["_reader"] = None
        return state


# ----------------------------------------------------------------------------- building


def _encode_videos(module, latent_dtype: str, params, video):
    """uint8 video [B, T, H, W, 3] -> posterior (mean, logvar) in `latent_dtype`."""

    x = ae.from_uint8(video)
    mean, logvar = module.apply({"params": params}, x, method=module.encode_moments)
    return mean.astype(latent_dtype), logvar.astype(latent_dtype)


def _encode_text(text, params, ids, mask):
    import jax.numpy as jnp

    return text.encode(params, ids, mask).astype(jnp.float16)


@functools.cache
def _jitted(fn, num_static: int):
    """One jitted function per encoder (static leading args), so repeated builds compile once."""
    import jax

    return jax.jit(fn, static_argnums=tuple(range(num_static)))


class _CaptionEncoder:
    """Captions -> (float16 context [B, L, D], int32 mask [B, L]) in fixed-size jitted batches,
    remembering recent captions so data sets with repeated captions encode each once."""

    def __init__(self, text, batch_size: int):
        self.text = text
        self.batch_size = batch_size
        self._fn = functools.partial(_jitted(_encode_text, 1), text)
        per_entry = text.max_length * (text.dim * 2 + 4)
        self._max_entries = max(batch_size, _MEMO_BYTES // per_entry)
        self.truncated = 0  # captions longer than max_length tokens (encoded truncated)
        self.example = ""  # the first truncation warning
        self._memo: collections.OrderedDict[str, tuple[np.ndarray, np.ndarray]] = (
            collections.OrderedDict()
        )

    def _encode(self, captions: list[str]) -> None:
        for i in range(0, len(captions), self.batch_size):
            chunk = captions[i : i + self.batch_size]
            padded = chunk + [""] * (self.batch_size - len(chunk))  # one jit shape
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ids, mask = self.text.tokenize(padded)
            for w in caught:  # one summary line at the end instead of a warning per caption
                if "truncated" in str(w.message):
                    self.truncated += 1
                    self.example = self.example or str(w.message)
                else:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            hidden = np.asarray(self._fn(self.text.params, ids, mask))
            for j, caption in enumerate(chunk):
                self._memo[caption] = (hidden[j], mask[j])
                if len(self._memo) > self._max_entries:
                    self._memo.popitem(last=False)

    def __call__(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        # Known captions become the newest entries first, so encoding the new ones (at most one
        # batch of them) never evicts a caption of this batch.
        for c in captions:
            if c in self._memo:
                self._memo.move_to_end(c)
        self._encode(list(dict.fromkeys(c for c in captions if c not in self._memo)))
        pairs = [self._memo[c] for c in captions]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def _label_features(batch: dict) -> dict:
    """Which source fields to copy: numeric scalars (with their dtype) and text."""
    features = {}
    for name in sorted(batch):
        if name == "video" or name.startswith("_") or name == "caption":
            continue
        value = np.asarray(batch[name])
        if value.ndim != 1:
            log.info("Not caching field %r of shape %s (not a scalar).", name, value.shape[1:])
            continue
        if name in CACHE_FIELDS:
            raise ValueError(
                f"The data source has a field {name!r}, a name the cache reserves "
                f"({CACHE_FIELDS}); rename it in the source."
            )
        if value.dtype.kind in "biuf":
            features[name] = {"dtype": value.dtype.name, "shape": []}
        elif value.dtype.kind in "USO":
            features[name] = {"dtype": "str", "shape": []}
    return features


def _pad_batch(video: np.ndarray, size: int) -> np.ndarray:
    if len(video) == size:
        return video
    return np.concatenate([video, np.repeat(video[-1:], size - len(video), axis=0)])


def build_cache(
    config,
    output: str,
    split: str = "train",
    *,
    batch_size: int = 32,
    latent_dtype: str = "float16",
    zero_padding: bool = False,
    limit: int | None = None,
    vae: tuple | None = None,
    text_encoder=None,
    progress: bool = True,
) -> dict:
    """Encodes one split of `config.data` into a latent cache in `output` (see module docstring).

    Adding a split to an existing cache requires the same VAE, text encoder and video shape;
    rebuilding a split overwrites it.

    Args:
      config: the full config (data, vae, text_encoder, seed).
      output: the cache directory (created if missing).
      split: the split to encode (e.g. `config.data.train_split`).
      batch_size: videos (and captions) per jitted encoder call.
      latent_dtype: "float16" or "float32" for latent_mean / latent_logvar.
      zero_padding: store zeros at padded context positions (smaller; exact for the denoiser,
        which ignores padding).
      limit: encode only the first `limit` examples (for timing; the manifest records it).
      vae: a ready `(module, params, latent_stats)` (default: `vdm.encoders.load_vae`).
      text_encoder: a ready TextEncoder (default: `load_text_encoder(config.text_encoder...)`).
      progress: show a tqdm progress bar.

    Returns:
      The written manifest.
    """
    import jax.numpy as jnp
    from array_record.python import array_record_module
    from tqdm import tqdm

    from vdm.data import loader as pipeline
    from vdm.data.sources import get_source
    from vdm.models.text import encoder as te

    if str(config.data.source).startswith("cache:"):
        raise ValueError(
            f"config.data.source={config.data.source!r} is already a cache; give the source the "
            "cache should be built from (e.g. moving_digits or folder:/path)."
        )
    if latent_dtype not in ("float16", "float32"):
        raise ValueError(f"latent_dtype must be 'float16' or 'float32', got {latent_dtype!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    setup_start = time.perf_counter()
    output = os.path.abspath(os.path.expanduser(str(output)))
    identity = _identity(config)
    existing = None
    if os.path.isfile(manifest_path(output)):
        existing = read_manifest(output)
        problems = _mismatches(identity, _manifest_identity(existing))
        if existing.get("latent_dtype") != latent_dtype:
            problems.append(
                f"latent_dtype: cache {existing.get('latent_dtype')}, now {latent_dtype}"
            )
        if bool(existing.get("zero_padding")) != zero_padding:
            problems.append(
                f"zero_padding: cache {existing.get('zero_padding')}, now {zero_padding}"
            )
        if problems:
            raise ValueError(
                f"'{output}' already holds a latent cache built differently: "
                f"{'; '.join(problems)}. Use another --output directory for this config."
            )
    os.makedirs(output, exist_ok=True)

    if vae is None:
        from vdm.encoders import load_vae

        vae = load_vae(config)
    module, vae_params, stats = vae
    if text_encoder is None:
        text_encoder = te.load_text_encoder(
            config.text_encoder.name,
            max_length=config.text_encoder.max_length,
            dtype=jnp.dtype(config.text_encoder.dtype),
        )
    text = text_encoder
    if text.max_length != int(config.text_encoder.max_length):
        raise ValueError(
            f"The text encoder has max_length={text.max_length}, config.text_encoder.max_length="
            f"{config.text_encoder.max_length}."
        )
    encode_videos = functools.partial(_jitted(_encode_videos, 2), module, latent_dtype)
    captions = _CaptionEncoder(text, batch_size)
    null_context, null_mask = captions([""])
    length, dim = text.max_length, text.dim
    latent = [int(s) for s in identity["latent_shape"]]

    source = get_source(config.data, split)
    total = len(source) if limit is None else min(limit, len(source))
    loader = pipeline.make_loader(
        config,
        split,
        batch_size=batch_size,
        shuffle=False,
        seed=0,
        num_epochs=1,
        process_index=0,
        process_count=1,
        drop_remainder=False,
        source=source,
    )
    features = None
    tmp = os.path.join(output, split_file(split) + ".tmp")
    writer = array_record_module.ArrayRecordWriter(tmp, _WRITER_OPTIONS)
    written = 0

    def write(batch, latents, n):
        nonlocal written
        mean, logvar = (np.asarray(a)[:n] for a in latents)
        context, mask = captions([str(c) for c in batch["caption"][:n]])
        if zero_padding:
            context = context * mask[..., None].astype(context.dtype)
        for i in range(n):
            example = {k: batch[k][i] for k in features if k not in CACHE_FIELDS}
            example.update(
                latent_mean=mean[i],
                latent_logvar=logvar[i],
                context=context[i],
                context_mask=mask[i],
                caption=str(batch["caption"][i]),
            )
            writer.write(pack_record(example, features))
        written += n

    bar = tqdm(total=total, unit="video", desc=f"caching {split}", disable=not progress)
    start = time.perf_counter()
    pending = None  # (batch, device latents, n): write batch i while batch i+1 is encoded
    try:
        for batch in loader:
            n = min(len(batch["video"]), total - written - (pending[2] if pending else 0))
            if n <= 0:
                break
            if features is None:
                features = {
                    "latent_mean": {"dtype": latent_dtype, "shape": latent},
                    "latent_logvar": {"dtype": latent_dtype, "shape": latent},
                    "context": {"dtype": "float16", "shape": [length, dim]},
                    "context_mask": {"dtype": "int32", "shape": [length]},
                    "caption": {"dtype": "str", "shape": []},
                    **_label_features(batch),
                }
            latents = encode_videos(vae_params, _pad_batch(batch["video"], batch_size))
            if pending is not None:
                write(*pending)
                bar.update(pending[2])
            pending = (batch, latents, n)
        if pending is not None:
            write(*pending)
            bar.update(pending[2])
    except BaseException:
        writer.close()
        os.remove(tmp)
        raise
    finally:
        bar.close()
    writer.close()
    seconds = time.perf_counter() - start
    log.info(
        "Encoded %d examples of split %r in %.1f s (%.1f videos/s, after %.1f s of setup).",
        written,
        split,
        seconds,
        written / max(seconds, 1e-9),
        start - setup_start,
    )
    if captions.truncated:
        log.warning(
            "%d captions were longer than text_encoder.max_length=%d tokens and were truncated, "
            "e.g.: %s",
            captions.truncated,
            length,
            captions.example,
        )
    if written == 0:
        os.remove(tmp)
        raise ValueError(f"Split {split!r} of {config.data.source!r} gave no readable examples.")
    os.replace(tmp, os.path.join(output, split_file(split)))
    np.save(os.path.join(output, NULL_CONTEXT), null_context[0])

    from vdm.config import to_dict

    manifest = existing or {}
    manifest.update(
        format=FORMAT,
        version=VERSION,
        vae={
            "checkpoint": identity["vae.checkpoint"],
            "architecture": identity["vae.architecture"],
            "random_init_seed": identity["vae.random_init_seed"],
        },
        latent_stats={k: [float(x) for x in stats[k]] for k in ("shift", "scale")},
        latent_shape=latent,
        latent_dtype=latent_dtype,
        zero_padding=bool(zero_padding),
        text_encoder={
            "name": identity["text_encoder.name"],
            "max_length": length,
            "dtype": identity["text_encoder.dtype"],
            "dim": dim,
        },
        data=_jsonable(to_dict(config.data)),
        null_context={"file": NULL_CONTEXT, "mask": null_mask[0].tolist()},
    )
    splits = dict(manifest.get("splits", {}))
    splits[split] = {
        "file": split_file(split),
        "num_examples": written,
        # Records the source marked unreadable (folder sources) and so are not cached.
        "skipped": (total - written) if limit is None else 0,
        "limit": limit,
        "features": features,
    }
    manifest["splits"] = splits
    _write_json_atomic(manifest_path(output), manifest)
    return manifest


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    """`python -m vdm.data.cache --config FILE --output DIR [--split S] [--config.a=b ...]`."""
    parser = argparse.ArgumentParser(
        prog="python -m vdm.data.cache",
        description="Precompute VAE latents and text contexts of a data split (a latent cache).",
        epilog="Config overrides: --config.a.b=value (any field of configs/base.py).",
    )
    parser.add_argument("--config", required=True, help="config file, e.g. configs/quickstart.py")
    parser.add_argument("--output", required=True, help="cache directory (created if missing)")
    parser.add_argument("--split", default=None, help="split to encode (default data.train_split)")
    parser.add_argument("--batch_size", type=int, default=32, help="videos per encoder call")
    parser.add_argument("--latent_dtype", default="float16", choices=("float16", "float32"))
    parser.add_argument(
        "--zero_padding",
        action="store_true",
        help="store zeros at padded context positions (~40%% smaller; exact for the denoiser)",
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N examples")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    args, rest = parser.parse_known_args(argv)
    overrides = []
    for arg in rest:
        if not (arg.startswith("--config.") and "=" in arg):
            parser.error(
                f"unrecognized argument {arg!r}; config overrides look like --config.a.b=value."
            )
        overrides.append(arg)

    from vdm import cli
    from vdm.config import load_config

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Our own INFO lines stay; orbax's per-restore chatter (absl INFO) does not.
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    with cli.clear_errors():
        config = load_config(args.config, overrides)
        split = args.split or config.data.train_split
        manifest = build_cache(
            config,
            args.output,
            split,
            batch_size=args.batch_size,
            latent_dtype=args.latent_dtype,
            zero_padding=args.zero_padding,
            limit=args.limit,
            progress=not args.no_progress,
        )
        entry = manifest["splits"][split]
        size = os.path.getsize(os.path.join(os.path.abspath(args.output), entry["file"]))
        print(
            f"Cached {entry['num_examples']} examples of split {split!r} in {args.output} "
            f"({size / 2**20:.1f} MiB). Train with --config.data.source=cache:{args.output}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
