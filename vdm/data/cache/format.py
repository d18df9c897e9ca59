"""The latent cache on disk: its manifest, its records and its file names.

Directory layout:
  manifest.json          what the cache was built from (`read_manifest`, `check_compatible`)
  <split>.array_record   one record per example (group_size 1: random access; zstd)
  null_context.npy       float16 [L, D] context of the empty prompt (mask in the manifest)
  <split>.provenance.json  the data manifest of the cached examples, in record order
                         (`vdm.data.provenance`): what `config.data.exclude` is checked against

A record is a msgpack map, keys sorted, from feature name to either raw little-endian array bytes
(dtype and shape in `manifest["splits"][split]["features"]`) or a UTF-8 string. Reading it through
`config.data.source = "cache:DIR"` (`vdm.data.cache.CacheSource`) yields dicts with
  latent_mean    float16 [t, h, w, c]  posterior mean, NOT normalized (use manifest latent_stats)
  latent_logvar  float16 [t, h, w, c]  posterior log-variance
  context        float16 [L, D]        the text encoder's last hidden states of `caption`
  context_mask   int32   [L]           1 on tokens, 0 on padding
  caption        str
and the source's numeric scalar labels (moving digits: digit, direction, speed, ...) with their
dtypes, and its other text fields (caption_heldout, direction_name, colour). A cache built with
`--latent_dtype float32` stores float32 latents instead; one built with `--zero_padding` stores
zeros at padded context positions (the denoiser ignores them exactly), which compress away:
default moving digits take 20 instead of 32 KB per example.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import msgpack
import numpy as np

from vdm.io import checkpoint
from vdm.models import autoencoder as ae
from vdm.models.wan import files as wan_files
from vdm.models.wan import finetune as wan_finetune

FORMAT = "vdm-latent-cache"
VERSION = 1
MANIFEST = "manifest.json"
NULL_CONTEXT = "null_context.npy"
# The fields every record has; source labels may not use these names.
CACHE_FIELDS = ("latent_mean", "latent_logvar", "context", "context_mask", "caption")
WRITER_OPTIONS = "group_size:1"  # one record per chunk: random access (as tfds writes them)
BUILD_COMMAND = "python -m vdm.tools.cache"


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
            f"No latent cache at '{path}' (missing {file}). Build one with `{BUILD_COMMAND} "
            f"--config CONFIG --output {os.path.dirname(file) or path} --split train`, or fix "
            f"config.data.source=cache:DIR."
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


def write_manifest(path: str, manifest: dict) -> None:
    """Writes `manifest` to the cache directory `path` atomically (a reader never sees half)."""
    file = manifest_path(path)
    tmp = file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, file)


def _abs_checkpoint(path: str) -> str:
    """The step directory a VAE checkpoint path resolves to ("" for none), symlinks resolved
    (the same checkpoint reached through a symlinked workdir is the same checkpoint)."""
    return os.path.realpath(checkpoint.weights_dir(path)) if path else ""


def identity(config) -> dict:
    """The parts of a config the cached arrays depend on (compared by `check_compatible`).

    Stage "wan" caches are encoded by the VAE and UMT5 of the Wan pipeline `config.model.pretrained`
    (`vdm.models.wan.finetune.cache_identity`): its real directory is what is recorded.
    """
    d = config.data
    if config.get("stage") == "wan":
        try:
            root = wan_files.pipeline_dir(str(config.model.pretrained))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"model.pretrained={config.model.pretrained!r}: {e}") from None
        return wan_finetune.cache_identity(
            root, d.num_frames, d.height, d.width, config.text_encoder.max_length
        )
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


def manifest_identity(manifest: dict) -> dict:
    """`identity` of the config a manifest was built with."""
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


def jsonable(x: Any) -> Any:
    """`x` as plain JSON types (numpy arrays and scalars become lists and numbers)."""
    return json.loads(json.dumps(x, default=lambda o: np.asarray(o).tolist()))


def mismatches(expected: dict, found: dict) -> list[str]:
    """One line per identity field where a cache (`found`) differs from a config (`expected`)."""
    return [
        f"{k}: cache has {found[k]!r}, config has {expected[k]!r}"
        for k in expected
        if jsonable(expected[k]) != jsonable(found[k])
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
    problems = mismatches(identity(config), manifest_identity(manifest))
    if split is not None and split not in manifest["splits"]:
        problems.append(
            f"split {split!r} is not cached (cached: {sorted(manifest['splits'])}); build it with "
            f"--split {split}"
        )
    if problems:
        raise ValueError(
            f"The latent cache does not match this config: {'; '.join(problems)}. Rebuild it with "
            f"this config (`{BUILD_COMMAND} --config ... --output DIR --split ...` with the same "
            f"--config overrides), or change the config to match."
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
    context = np.load(member(directory, manifest["null_context"]["file"]))
    return context, np.asarray(manifest["null_context"]["mask"], np.int32)


# ----------------------------------------------------------------------------- records


def member(directory: str, name: str) -> str:
    """The path of a file a cache's manifest names, which must be a plain name inside the cache
    directory (a manifest is data: it may not point the loader at other files).

    Raises:
      ValueError: `name` is absolute, has a directory part, or climbs out.
    """
    name = str(name)
    if not name or os.path.isabs(name) or os.path.basename(name) != name or name in (".", ".."):
        raise ValueError(
            f"Latent cache '{directory}': its {MANIFEST} names the file {name!r}, which is not a "
            "file inside the cache directory; the manifest is damaged or was edited. Rebuild it."
        )
    return os.path.join(directory, name)


def split_file(split: str) -> str:
    """File name of a split ("train[:10%]" -> "train_10_.array_record")."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", split) + ".array_record"


def provenance_file(split: str) -> str:
    """File name of a split's data manifest ("train" -> "train.provenance.json")."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", split) + ".provenance.json"


def _le(dtype: str) -> np.dtype:
    return np.dtype(dtype).newbyteorder("<")


def pack_record(example: dict, features: dict) -> bytes:
    """One example -> record bytes (msgpack map, sorted keys; see the module docstring)."""
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
