"""The exported-model format ("bundle"): the only code that knows its layout. Read and write.

    MODEL/model.json     {"config": the denoiser run's config, "latent_stats": {"shift", "scale"},
                          "text_encoder": name (referenced, not copied), "source": the denoiser
                          run, "vae_source": the VAE run (when known), "provenance": what each
                          part was trained on ({"denoiser", "vae"}: `vdm.provenance` records)}
    MODEL/denoiser/      EMA weights of the denoiser (an orbax StandardCheckpointer dir)
    MODEL/vae/           EMA weights of the VAE (the same)

Written by `python -m vdm.tools.export` (which adds the training logs beside it), read by
`vdm.load_pipeline(MODEL)`. Each weight dir is also "a bundle part": `vdm.io.checkpoint` loads it
like a training checkpoint (`--config.vae.checkpoint=MODEL/vae`, `train.init_from=MODEL/denoiser`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
import tensorstore as ts

from vdm.errors import UserError
from vdm.io.manager import describe_error

PyTree = Any

MODEL_JSON = "model.json"
PARTS = ("denoiser", "vae")
# The model that ships with the package (sample.py's default; its vae/ is the quickstart's VAE).
DEFAULT_MODEL = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "default_model"
)
# The model.json key of each part's training run ("source": the denoiser's, "vae_source").
_SOURCE_KEY = {"denoiser": "source", "vae": "vae_source"}


@dataclasses.dataclass(frozen=True)
class Bundle:
    """An exported model read back: its config (a plain dict, as stored), model.json's other
    entries (`meta`), and the two weight trees."""

    config: dict
    meta: dict
    params: PyTree
    vae_params: PyTree

    @property
    def latent_stats(self) -> dict:
        return self.meta["latent_stats"]

    @property
    def text_encoder(self) -> str:
        return self.meta.get("text_encoder", self.config["text_encoder"]["name"])


def _abs(path: str) -> str:
    return os.path.abspath(os.path.expanduser(str(path)))


def is_bundle(path: str) -> bool:
    """Whether `path` is an exported model dir (it has a model.json)."""
    return os.path.isfile(os.path.join(_abs(path), MODEL_JSON))


def part_of(path: str) -> tuple[str, str] | None:
    """`(model_dir, part)` when `path` is the `denoiser/` or `vae/` weights of an exported model
    dir, else None."""
    path = _abs(path)
    parent, part = os.path.split(os.path.normpath(path))
    if part in PARTS and os.path.isdir(path) and is_bundle(parent):
        return parent, part
    return None


def read_meta(model_dir: str) -> dict:
    """An exported model dir's model.json: config, latent statistics, text encoder, sources.

    Raises:
      UserError: model.json is truncated, garbage or lacks an entry (the file named).
    """
    file = os.path.join(_abs(model_dir), MODEL_JSON)
    try:
        with open(file, encoding="utf-8") as f:
            meta = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise UserError(
            f"The exported model's {file} is damaged ({type(e).__name__}: {e}); export the model "
            "again (python -m vdm.tools.export) or restore the file from a copy."
        ) from None
    missing = [k for k in ("config", "latent_stats") if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise UserError(
            f"The exported model's {file} lacks {missing}: it was not written by vdm.tools.export "
            "or is damaged; export the model again."
        )
    return meta


def source(model_dir: str, part: str) -> str | None:
    """The training run `part`'s weights were exported from (None when not recorded)."""
    return read_meta(model_dir).get(_SOURCE_KEY[part])


def vae_source(model_dir: str) -> str:
    """The VAE checkpoint an exported model decodes with: the run its VAE came from, else its own
    `vae/` part."""
    return source(model_dir, "vae") or os.path.join(model_dir, "vae")


def save_tree(path: str, tree: PyTree) -> None:
    """Saves a param pytree as an orbax checkpoint dir (a bundle part)."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(_abs(path), tree, force=True)


def restore_tree(path: str, make_target: Callable[[PyTree], PyTree] | None = None) -> PyTree:
    """Restores a param pytree saved by `save_tree`: onto the default device, or into the
    abstract target `make_target(the stored tree's metadata)` builds.

    Raises:
      UserError: a weight file is truncated or garbage (the directory and the cause named).
    """
    path = _abs(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"The exported model has no weights directory '{path}'.")
    if make_target is None and (arrays := _read_plain(path)) is not None:
        return jax.device_put(arrays)
    with ocp.StandardCheckpointer() as ckptr:
        target = None
        if make_target is not None:
            try:
                stored = ckptr.metadata(path).item_metadata
            except Exception as e:  # noqa: BLE001 - a damaged _METADATA file
                raise UserError(_damaged(path, e)) from e
            target = make_target(stored)  # a model mismatch raises here, as itself
        try:
            return ckptr.restore(path, target)
        except Exception as e:  # noqa: BLE001 - truncated or garbage array files
            raise UserError(_damaged(path, e)) from e


def _plain_keys(meta: dict) -> list[list[str]] | None:
    """The key paths of a `_METADATA` whose tree `_read_plain` can read: OCDBT + zarr v2
    storage, every leaf an array, every key a dict key without "." (orbax joins them with ".")."""
    if not meta.get("use_ocdbt") or meta.get("use_zarr3"):
        return None
    paths = []
    for leaf in meta["tree_metadata"].values():
        value, keys = leaf["value_metadata"], leaf["key_metadata"]
        if value["value_type"] not in ("jax.Array", "np.ndarray") or value["skip_deserialize"]:
            return None
        if any(k["key_type"] != 2 or "." in str(k["key"]) for k in keys):  # 2: a dict key
            return None
        paths.append([k["key"] for k in keys])
    return paths


def _read_plain(path: str) -> PyTree | None:
    """A bundle part's arrays (numpy) read with tensorstore directly, as orbax stores them
    (`_plain_keys`): all at once, without orbax's per-array asyncio and type checks (a fifth of
    its CPU time for the bundled model's 576 small arrays). None for any other layout, and on
    any read problem: orbax then reads the part, or names what is wrong with it."""
    try:
        with open(os.path.join(path, "_METADATA"), encoding="utf-8") as f:
            paths = _plain_keys(json.load(f))
        if paths is None:
            return None
        kvstore = {"driver": "ocdbt", "base": {"driver": "file", "path": path}}
        specs = [{"driver": "zarr", "kvstore": {**kvstore, "path": ".".join(p)}} for p in paths]
        context = ts.Context()  # one for all: one OCDBT manifest read and one thread pool
        stores = [ts.open(spec, open=True, read=True, context=context) for spec in specs]
        reads = [store.result().read() for store in stores]
        arrays = [r.result() for r in reads]
    except Exception:  # noqa: BLE001 - orbax reads it instead, and reports damage
        return None
    tree: dict = {}
    for keys, array in zip(paths, arrays, strict=True):
        node = tree
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = array
    return tree


def _damaged(path: str, e: BaseException) -> str:
    return (
        f"The exported model's weights '{path}' cannot be read ({describe_error(e)}); export the "
        "model again (python -m vdm.tools.export) or restore it from a copy."
    )


def read(path: str) -> Bundle:
    """Reads the exported model dir `path` (weights onto the default device)."""
    meta = read_meta(path)
    config = meta.pop("config")
    return Bundle(
        config=config,
        meta=meta,
        params=restore_tree(os.path.join(path, "denoiser")),
        vae_params=restore_tree(os.path.join(path, "vae")),
    )


def part_item(model_dir: str, part: str, item: str) -> dict:
    """The "config" / "metadata" of an exported model's `part`, as a training checkpoint has them.

    The bundle's config is its denoiser run's; its `vae` section describes the VAE, but the rest
    (stage, optimizer, data) is not how the VAE was trained, so the VAE part has no config.

    Raises:
      FileNotFoundError: the part has no such item (named).
    """
    meta = read_meta(model_dir)
    if item == "config" and part == "denoiser":
        return meta["config"]
    if item == "metadata":
        out = {"latent_stats": meta["latent_stats"]}
        if part == "denoiser":
            out["text_encoder"] = meta.get("text_encoder", meta["config"]["text_encoder"]["name"])
            out["vae_checkpoint"] = os.path.join(model_dir, "vae")
        return out
    raise FileNotFoundError(
        f"'{os.path.join(model_dir, part)}' is an exported model's {part} weights: it has no "
        f"'{item}' of its own (its training config is the denoiser's, in "
        f"{os.path.join(model_dir, MODEL_JSON)})."
    )


def write(
    out_dir: str,
    *,
    config: dict,
    latent_stats: dict,
    text_encoder: str,
    params: PyTree,
    vae_params: PyTree,
    source: str,
    vae_source: str | None = None,
    provenance: dict | None = None,
) -> str:
    """Writes an exported model dir: both weight trees and model.json.

    Args:
      out_dir: the directory (created; files of the same names are replaced).
      config: the denoiser's config as a plain dict (what `read` gives back).
      latent_stats: the VAE's latent {"shift", "scale"}.
      text_encoder: the text encoder's name (the bundle references it, does not copy it).
      params, vae_params: the denoiser's and the VAE's (EMA) weights.
      source, vae_source: the training runs the weights come from (recorded as absolute paths).
      provenance: {"denoiser": record, "vae": record} of `vdm.provenance` (None: not recorded).

    Returns:
      `out_dir`.
    """
    os.makedirs(out_dir, exist_ok=True)
    save_tree(os.path.join(out_dir, "denoiser"), params)
    save_tree(os.path.join(out_dir, "vae"), vae_params)
    meta = {
        "config": config,
        "latent_stats": latent_stats,
        "text_encoder": text_encoder,
        _SOURCE_KEY["denoiser"]: os.path.abspath(source),
    }
    if vae_source:
        meta[_SOURCE_KEY["vae"]] = os.path.abspath(vae_source)
    if provenance is not None:
        meta["provenance"] = provenance
    with open(os.path.join(out_dir, MODEL_JSON), "w") as f:
        json.dump(meta, f, indent=1, default=list)
    return out_dir


# -- the optional alignment part -------------------------------------------------------------------
# MODEL/alignment/       EMA weights of the text-video alignment model (stage "alignment")
# MODEL/alignment.json   {"config": its run's config, "text_encoder", "latent_stats", "source",
#                         "retrieval": figures measured when it was bundled}
ALIGNMENT = "alignment"
ALIGNMENT_JSON = "alignment.json"


def has_alignment(model_dir: str) -> bool:
    """Whether an exported model dir has an alignment model part."""
    return os.path.isfile(os.path.join(_abs(model_dir), ALIGNMENT_JSON))


def write_alignment(model_dir: str, params: PyTree, meta: dict) -> str:
    """Writes (replaces) the alignment part of an exported model dir; returns its weights dir.

    Args:
      model_dir: the exported model dir.
      params: the alignment model's (EMA) weights.
      meta: JSON-able facts (see the comment above); "config" is required.
    """
    if "config" not in meta:
        raise ValueError("The alignment part's meta needs the run's 'config'.")
    path = os.path.join(_abs(model_dir), ALIGNMENT)
    save_tree(path, params)
    with open(os.path.join(_abs(model_dir), ALIGNMENT_JSON), "w") as f:
        json.dump(meta, f, indent=1, default=list)
    return path


def read_alignment(model_dir: str) -> tuple[dict, PyTree]:
    """(alignment.json, weights) of an exported model dir's alignment part.

    Raises:
      FileNotFoundError: the model has no alignment part.
      UserError: alignment.json is damaged.
    """
    file = os.path.join(_abs(model_dir), ALIGNMENT_JSON)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"The exported model '{model_dir}' has no alignment model part.")
    try:
        with open(file, encoding="utf-8") as f:
            meta = json.load(f)
    except ValueError as e:
        raise UserError(f"{file} is damaged ({type(e).__name__}: {e}); bundle it again.") from None
    return meta, restore_tree(os.path.join(_abs(model_dir), ALIGNMENT))
