"""`build_cache`: encodes one split of `config.data` into a latent cache.

The builder reads `config.data` through the normal source and loader (every example, stored
order, no shuffle; the deterministic evaluation crops: centre temporal window, resize + centre
crop), encodes videos with the VAE and captions with the text encoder it is GIVEN (`encoders`:
anything with `.text`, `.vae`, `.vae_params`, `.latent_stats`, e.g. `Encoders` below or
`vdm.encoders.FrozenEncoders`; `vdm.tools.cache` loads them from the config), in jitted batches,
and writes the files `vdm.data.cache.format` describes.

Everything is deterministic: the same config and inputs give the same bytes.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from array_record.python import array_record_module
from tqdm import tqdm

from vdm import paths
from vdm.config import to_dict
from vdm.data import loader, provenance
from vdm.data.cache import format as fmt
from vdm.data.sources import get_source
from vdm.models import autoencoder as ae

log = logging.getLogger("vdm.data.cache")

_MEMO_BYTES = 256 * 2**20  # caption -> context memo (data sets with repeated captions)


@dataclasses.dataclass(frozen=True)
class Encoders:
    """The frozen encoders a cache is built with.

    Attributes:
      text: a `vdm.models.text.encoder.TextEncoder` with its params.
      vae: the `VideoAutoencoder` module.
      vae_params: its (EMA) params.
      latent_stats: {"shift": [c], "scale": [c]}, recorded in the manifest.
      encode_video: `(vae, vae_params, video in [-1, 1]) -> (mean, logvar)`; None = the vdm
        `VideoAutoencoder`'s `encode_moments` (`vdm.models.wan.finetune.encode_video` for Wan).
    """

    text: Any
    vae: Any
    vae_params: Any
    latent_stats: dict
    encode_video: Any = None


# ----------------------------------------------------------------------------- encoding


def _moments(module, params, x):
    return module.apply({"params": params}, x, method=module.encode_moments)


def _encode_videos(module, latent_dtype: str, encode, params, video):
    """uint8 video [B, T, H, W, 3] -> posterior (mean, logvar) in `latent_dtype`."""
    mean, logvar = encode(module, params, ae.from_uint8(video))
    return mean.astype(latent_dtype), logvar.astype(latent_dtype)


def _encode_text(text, params, ids, mask):
    return text.encode(params, ids, mask).astype(jnp.float16)


@functools.cache
def _jitted(fn, num_static: int):
    """One jitted function per encoder (static leading args), so repeated builds compile once."""
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

    def _tokenize(self, captions: list[str]):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ids, mask = self.text.tokenize(captions)
        for w in caught:  # one summary line at the end instead of a warning per caption
            if "truncated" in str(w.message):
                self.truncated += 1
                self.example = self.example or str(w.message)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return ids, mask

    def _encode(self, captions: list[str]) -> None:
        for i in range(0, len(captions), self.batch_size):
            chunk = captions[i : i + self.batch_size]
            padded = chunk + [""] * (self.batch_size - len(chunk))  # one jit shape
            ids, mask = self._tokenize(padded)
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
        if name in fmt.CACHE_FIELDS:
            raise ValueError(
                f"The data source has a field {name!r}, a name the cache reserves "
                f"({fmt.CACHE_FIELDS}); rename it in the source."
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


class _VideoEncoder:
    """uint8 videos [n <= batch_size, T, H, W, 3] -> device posteriors (mean, logvar) of a batch
    padded to `batch_size` (one jit shape; the caller keeps the first n)."""

    def __init__(self, encoders, latent_dtype: str, batch_size: int):
        encode = getattr(encoders, "encode_video", None) or _moments
        fn = _jitted(_encode_videos, 3)
        self._fn = functools.partial(fn, encoders.vae, latent_dtype, encode)
        self._params = encoders.vae_params
        self._batch_size = batch_size

    def __call__(self, video: np.ndarray):
        return self._fn(self._params, _pad_batch(video, self._batch_size))


# ----------------------------------------------------------------------------- writing


class _SplitWriter:
    """Writes the records of one split to a temporary file; `commit` moves it into place.

    The record features are fixed by the first batch (`latent` [t, h, w, c], the text encoder's
    [L, D], and the source's scalar labels).
    """

    def __init__(self, output: str, split: str, captions: _CaptionEncoder, **layout):
        self.path = os.path.join(output, fmt.split_file(split))
        self.split = split
        self._tmp = self.path + ".tmp"
        self._writer = array_record_module.ArrayRecordWriter(self._tmp, fmt.WRITER_OPTIONS)
        self._captions = captions
        self._layout = layout  # latent_dtype, latent, zero_padding
        self.features = None
        self.written = 0
        self.examples: list[tuple[str, str]] = []  # (content hash, origin id) of each record

    def fix_features(self, batch: dict) -> None:
        """Fixes the record features from the first batch."""
        dtype, latent = self._layout["latent_dtype"], self._layout["latent"]
        text = self._captions.text
        self.features = {
            "latent_mean": {"dtype": dtype, "shape": latent},
            "latent_logvar": {"dtype": dtype, "shape": latent},
            "context": {"dtype": "float16", "shape": [text.max_length, text.dim]},
            "context_mask": {"dtype": "int32", "shape": [text.max_length]},
            "caption": {"dtype": "str", "shape": []},
            **_label_features(batch),
        }

    def write(self, batch: dict, latents, n: int) -> None:
        """The first `n` examples of `batch` with their (device) posteriors `latents`."""
        mean, logvar = (np.asarray(a)[:n] for a in latents)
        context, mask = self._captions([str(c) for c in batch["caption"][:n]])
        if self._layout["zero_padding"]:
            context = context * mask[..., None].astype(context.dtype)
        for i in range(n):
            example = {k: batch[k][i] for k in self.features if k not in fmt.CACHE_FIELDS}
            example.update(
                latent_mean=mean[i],
                latent_logvar=logvar[i],
                context=context[i],
                context_mask=mask[i],
                caption=str(batch["caption"][i]),
            )
            self._writer.write(fmt.pack_record(example, self.features))
        if provenance.HASH_FIELD in batch:
            ids = batch[provenance.ID_FIELD][:n]
            self.examples += [
                (str(h), str(i)) for h, i in zip(batch[provenance.HASH_FIELD][:n], ids, strict=True)
            ]
        self.written += n

    def abort(self) -> None:
        self._writer.close()
        os.remove(self._tmp)

    def commit(self, source) -> None:
        """Moves the records into place, with the data manifest of the examples they hold."""
        self._writer.close()
        os.replace(self._tmp, self.path)
        _write_provenance(os.path.dirname(self.path), self.split, source, self.examples)


def _encode_and_write(batches, total: int, encode, writer: _SplitWriter, bar) -> None:
    """Encodes and writes up to `total` examples; batch i is written while i+1 is encoded."""
    pending = None  # (batch, device latents, n)
    for batch in batches:
        n = min(len(batch["video"]), total - writer.written - (pending[2] if pending else 0))
        if n <= 0:
            break
        if writer.features is None:
            writer.fix_features(batch)
        latents = encode(batch["video"])
        if pending is not None:
            writer.write(*pending)
            bar.update(pending[2])
        pending = (batch, latents, n)
    if pending is not None:
        writer.write(*pending)
        bar.update(pending[2])


def _write_split(batches, total: int, encode, writer: _SplitWriter, *, desc, progress) -> None:
    """`_encode_and_write` with a progress bar; on any error the partial file is removed."""
    bar = tqdm(total=total, unit="video", desc=desc, disable=not progress)
    try:
        _encode_and_write(batches, total, encode, writer, bar)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()


# ----------------------------------------------------------------------------- building


def _check_request(config, output: str, latent_dtype: str, zero_padding: bool, batch_size: int):
    """(the manifest already in `output` or None, `format.identity(config)`); see check_output."""
    if str(config.data.source).startswith("cache:"):
        raise ValueError(
            f"config.data.source={config.data.source!r} is already a cache; give the source the "
            "cache should be built from (e.g. moving_digits or folder:/path)."
        )
    if latent_dtype not in ("float16", "float32"):
        raise ValueError(f"latent_dtype must be 'float16' or 'float32', got {latent_dtype!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    output = paths.check_output_dir(output, "The cache --output", create=False)
    ident = fmt.identity(config)
    if not os.path.isfile(fmt.manifest_path(output)):
        return None, ident
    existing = fmt.read_manifest(output)
    problems = fmt.mismatches(ident, fmt.manifest_identity(existing))
    if existing.get("latent_dtype") != latent_dtype:
        problems.append(f"latent_dtype: cache {existing.get('latent_dtype')}, now {latent_dtype}")
    if bool(existing.get("zero_padding")) != zero_padding:
        problems.append(f"zero_padding: cache {existing.get('zero_padding')}, now {zero_padding}")
    if problems:
        raise ValueError(
            f"'{output}' already holds a latent cache built differently: "
            f"{'; '.join(problems)}. Use another --output directory for this config."
        )
    return existing, ident


def check_output(
    config, output: str, *, latent_dtype: str = "float16", zero_padding: bool = False,
    batch_size: int = 32,
) -> dict | None:  # fmt: skip
    """Checks a build request before any encoder runs (`vdm.tools.cache` calls it before loading
    them): the source is not itself a cache, the options are valid, and a cache already in
    `output` was built the same way.

    Returns:
      The manifest already in `output`, or None.

    Raises:
      ValueError: naming the offending option or every difference from the existing cache.
    """
    return _check_request(config, output, latent_dtype, zero_padding, batch_size)[0]


def _check_text(text, config) -> None:
    if text.max_length != int(config.text_encoder.max_length):
        raise ValueError(
            f"The text encoder has max_length={text.max_length}, config.text_encoder.max_length="
            f"{config.text_encoder.max_length}."
        )


def _ordered_batches(config, split: str, batch_size: int, source):
    """Every example of `split` once, in stored order, with the evaluation crops."""
    return loader.make_loader(
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


def _report(split: str, written: int, start: float, setup_start: float, captions) -> None:
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
            captions.text.max_length,
            captions.example,
        )


def _manifest(existing: dict | None, ident: dict, config, encoders, layout: dict, null_mask):
    """The manifest's build description (everything but `splits`), over `existing`."""
    text = encoders.text
    manifest = existing or {}
    manifest.update(
        format=fmt.FORMAT,
        version=fmt.VERSION,
        vae={
            "checkpoint": ident["vae.checkpoint"],
            "architecture": ident["vae.architecture"],
            "random_init_seed": ident["vae.random_init_seed"],
        },
        latent_stats={k: [float(x) for x in encoders.latent_stats[k]] for k in ("shift", "scale")},
        latent_shape=layout["latent"],
        latent_dtype=layout["latent_dtype"],
        zero_padding=bool(layout["zero_padding"]),
        text_encoder={
            "name": ident["text_encoder.name"],
            "max_length": text.max_length,
            "dtype": ident["text_encoder.dtype"],
            "dim": text.dim,
        },
        data=fmt.jsonable(to_dict(config.data)),
        null_context={"file": fmt.NULL_CONTEXT, "mask": null_mask[0].tolist()},
    )
    return manifest


def _split_entry(split: str, writer: _SplitWriter, total: int, limit: int | None) -> dict:
    return {
        "file": fmt.split_file(split),
        "num_examples": writer.written,
        # Records the source marked unreadable (folder sources) and so are not cached.
        "skipped": (total - writer.written) if limit is None else 0,
        "limit": limit,
        "features": writer.features,
    }


def build_cache(
    config,
    split: str,
    output: str,
    *,
    encoders,
    batch_size: int = 32,
    latent_dtype: str = "float16",
    zero_padding: bool = False,
    limit: int | None = None,
    progress: bool = True,
    source=None,
) -> dict:
    """Encodes one split of `config.data` into a latent cache in `output` (module docstring).

    Adding a split to an existing cache requires the same VAE, text encoder and video shape;
    rebuilding a split overwrites it.

    Args:
      config: the full config (data, vae, text_encoder, seed).
      split: the split to encode (e.g. `config.data.train_split`).
      output: the cache directory (created if missing).
      encoders: `.text` (a TextEncoder), `.vae` (the module), `.vae_params`, `.latent_stats`.
      batch_size: videos (and captions) per jitted encoder call.
      latent_dtype: "float16" or "float32" for latent_mean / latent_logvar.
      zero_padding: store zeros at padded context positions (smaller; exact for the denoiser).
      limit: encode only the first `limit` examples (for timing; the manifest records it).
      progress: show a tqdm progress bar.
      source: `get_source(config.data, split)` if made already (the CLI makes it first).

    Returns:
      The written manifest.
    """
    setup_start = time.perf_counter()
    existing, ident = _check_request(config, output, latent_dtype, zero_padding, batch_size)
    output = os.path.abspath(os.path.expanduser(str(output)))
    os.makedirs(output, exist_ok=True)
    _check_text(encoders.text, config)
    encode = _VideoEncoder(encoders, latent_dtype, batch_size)
    captions = _CaptionEncoder(encoders.text, batch_size)
    null_context, null_mask = captions([""])
    latent = [int(s) for s in ident["latent_shape"]]
    layout = {"latent_dtype": latent_dtype, "latent": latent, "zero_padding": zero_padding}
    source = get_source(config.data, split) if source is None else source
    total = len(source) if limit is None else min(limit, len(source))
    batches = _ordered_batches(config, split, batch_size, source)
    writer = _SplitWriter(output, split, captions, **layout)
    start = time.perf_counter()
    _write_split(batches, total, encode, writer, desc=f"caching {split}", progress=progress)
    _report(split, writer.written, start, setup_start, captions)
    if writer.written == 0:
        writer.abort()
        raise ValueError(f"Split {split!r} of {config.data.source!r} gave no readable examples.")
    writer.commit(source)
    np.save(os.path.join(output, fmt.NULL_CONTEXT), null_context[0])
    manifest = _manifest(existing, ident, config, encoders, layout, null_mask)
    entry = _split_entry(split, writer, total, limit)
    manifest["splits"] = {**manifest.get("splits", {}), split: entry}
    fmt.write_manifest(output, manifest)
    return manifest


def _write_provenance(output: str, split: str, source, written: list[tuple[str, str]]) -> None:
    """The data manifest of the cached records (their source manifest's entries, record order)."""
    path = os.path.join(output, fmt.provenance_file(split))
    selection = getattr(source, "selection", None)
    if selection is None:  # a source without provenance: no manifest (exclusions are refused)
        if os.path.exists(path):
            os.remove(path)
        return
    by_hash = {(e["hash"], e["id"]): e for e in selection.manifest["examples"]}
    examples = [
        {k: v for k, v in by_hash[key].items() if k not in ("size", "mtime_ns")} for key in written
    ]
    built = selection.summary()
    provenance.write_manifest(
        path, provenance.make_manifest(selection.manifest["dataset"], examples, built_from=built)
    )
