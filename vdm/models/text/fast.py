"""A text encoder's config and tokenizer read without transformers, where that gives the same.

Importing transformers' config and tokenizer classes costs about a second, and imports torch
too wherever it is installed (transformers' config module does): more than the rest of loading
the text encoder. `read_config` and `load_tokenizer` read the same files with `json` and the
`tokenizers` package instead, for the cases checked to give what transformers gives:

  * config: a BERT `config.json` (BertConfig stores its fields as they are written);
  * tokenizer: a BERT WordPiece `tokenizer.json` whose tokenizer_config.json sets nothing beyond
    what the file itself holds (transformers 5 rebuilds a BertTokenizer from those settings, so
    they must agree with the file: `plain_bert_problem`).

Everything else returns None, and the caller uses transformers (`AutoConfig`, `AutoTokenizer`).
tests/test_text_encoder.py checks the token ids and modules against transformers'.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tokenizers

# tokenizer_config.json keys that do not change how text is encoded (or are checked below).
_HARMLESS = {
    "tokenizer_class", "name_or_path", "model_max_length", "clean_up_tokenization_spaces",
    "do_basic_tokenize", "never_split", "added_tokens_decoder", "padding_side",
    "truncation_side", "do_lower_case", "tokenize_chinese_chars", "strip_accents",
    "unk_token", "sep_token", "pad_token", "cls_token", "mask_token", "extra_special_tokens",
    "special_tokens_map_file", "backend",
}  # fmt: skip
_SPECIAL = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_BERT_DEFAULTS = {"do_lower_case": True, "tokenize_chinese_chars": True, "strip_accents": None}


class _Config:
    """A config.json's entries as attributes; an entry it lacks raises AttributeError and is
    noted in `missing` (transformers would fill in a default, so the caller must not guess)."""

    def __init__(self, entries: dict):
        self._entries, self.missing = entries, []

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "missing":
            raise AttributeError(name)
        if name not in self._entries:
            self.missing.append(name)
            raise AttributeError(name)
        return self._entries[name]


def read_config(model_dir: str) -> _Config | None:
    """`model_dir`'s config.json as a config object when transformers' would equal it (a BERT
    config), else None. Check `.missing` after use: a read entry it lacks means use transformers."""
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        entries = json.load(f)
    return _Config(entries) if entries.get("model_type") == "bert" else None


def _token(value: Any) -> str | None:
    """A special token as tokenizer_config.json / special_tokens_map.json write it."""
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def plain_bert_problem(spec: dict, config: dict, special_map: dict) -> str | None:
    """Why tokenizer.json `spec` with this tokenizer_config.json and special_tokens_map.json
    could encode differently from transformers' BertTokenizer (None: it cannot)."""
    if config.get("tokenizer_class") not in ("BertTokenizer", "BertTokenizerFast"):
        return f"tokenizer_class {config.get('tokenizer_class')!r}"
    if extra := sorted(set(config) - _HARMLESS):
        return f"tokenizer_config.json sets {extra}"
    usual = {
        "padding_side": ("right",), "truncation_side": ("right",), "do_basic_tokenize": (True,),
        "never_split": (None, []), "extra_special_tokens": ({}, []),
    }  # fmt: skip
    if unusual := sorted(k for k, ok in usual.items() if k in config and config[k] not in ok):
        return f"tokenizer_config.json sets {unusual} to other than the default"
    model, norm = spec.get("model") or {}, spec.get("normalizer") or {}
    settings = {k: config.get(k, v) for k, v in _BERT_DEFAULTS.items()}
    expected_norm = {
        "type": "BertNormalizer",
        "clean_text": True,
        "handle_chinese_chars": settings["tokenize_chinese_chars"],
        "strip_accents": settings["strip_accents"],
        "lowercase": settings["do_lower_case"],
    }
    if norm != expected_norm:
        return f"normalizer {norm} differs from the config's {expected_norm}"
    if (spec.get("pre_tokenizer") or {}).get("type") != "BertPreTokenizer":
        return "not a BertPreTokenizer"
    tokens = {k: _token(config.get(k, special_map.get(k))) for k in _SPECIAL}
    if any(_token(special_map.get(k, config.get(k))) != v for k, v in tokens.items()):
        return "special_tokens_map.json and tokenizer_config.json name different special tokens"
    wordpiece = {"type": "WordPiece", "continuing_subword_prefix": "##"}
    if (
        any(model.get(k) != v for k, v in wordpiece.items())
        or model.get("max_input_chars_per_word") != 100
    ):
        return "not a default WordPiece model"
    if model.get("unk_token") != tokens["unk_token"]:
        return "the model's unk_token differs"
    return _specials_problem(spec, config, tokens)


def _specials_problem(spec: dict, config: dict, tokens: dict) -> str | None:
    """BertTokenizer adds every special token (and added_tokens_decoder's) the file lacks, and
    post-processes with its own `[CLS] $A [SEP]` template: both must be the file's already."""
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    listed = [t["content"] for t in (config.get("added_tokens_decoder") or {}).values()]
    if any(t is None or t not in added or not added[t]["special"] for t in tokens.values()):
        return "a special token is not among tokenizer.json's special added tokens"
    if any(t not in added for t in listed):
        return "added_tokens_decoder names tokens tokenizer.json lacks"
    cls, sep = tokens["cls_token"], tokens["sep_token"]
    post = spec.get("post_processor") or {}
    single = [
        {"SpecialToken": {"id": cls, "type_id": 0}},
        {"Sequence": {"id": "A", "type_id": 0}},
        {"SpecialToken": {"id": sep, "type_id": 0}},
    ]
    ids = {t: (post.get("special_tokens") or {}).get(t, {}).get("ids") for t in (cls, sep)}
    if post.get("type") != "TemplateProcessing" or post.get("single") != single:
        return "the post-processor is not BertTokenizer's [CLS] $A [SEP]"
    if ids != {t: [added[t]["id"]] for t in (cls, sep)}:
        return "the post-processor's special token ids differ from the vocabulary's"
    return None


class Tokenizer:
    """A `tokenizers.Tokenizer` with the part of transformers' tokenizer API `TextEncoder` uses:
    `__call__` (untruncated ids, or max_length padded + truncated numpy arrays), the special
    tokens and their ids, and `len`."""

    def __init__(self, backend: Any, special: dict[str, str | None]):
        self._backend = backend
        for name in _SPECIAL:
            setattr(self, name, special.get(name))
        self.eos_token = special.get("eos_token")

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def __getattr__(self, name: str) -> Any:  # cls_token_id, sep_token_id, pad_token_id, ...
        if name.endswith("_token_id") and not name.startswith("_"):
            token = getattr(self, name[: -len("_id")])
            return None if token is None else self._backend.token_to_id(token)
        raise AttributeError(name)

    def __call__(
        self,
        prompts: Sequence[str],
        *,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        verbose: bool = True,
    ) -> dict:
        del verbose  # transformers' flag for its own warnings; there are none here.
        tok = self._backend
        tok.no_truncation()
        tok.no_padding()
        if truncation:
            tok.enable_truncation(max_length, strategy="longest_first", direction="right")
        if padding == "max_length":
            pad_id = tok.token_to_id(self.pad_token)
            tok.enable_padding(length=max_length, pad_id=pad_id, pad_token=self.pad_token)
        elif padding:
            raise ValueError(f"padding={padding!r} is not supported here (only 'max_length').")
        encodings = tok.encode_batch(list(prompts))
        out = {"input_ids": [e.ids for e in encodings]}
        out["attention_mask"] = [e.attention_mask for e in encodings]
        if return_tensors == "np":
            out = {k: np.asarray(v, np.int64) for k, v in out.items()}
        return out


def load_tokenizer(tokenizer_dir: str) -> Tokenizer | None:
    """The tokenizer of `tokenizer_dir` through `tokenizers` alone, when its tokenizer.json
    encodes exactly as transformers would (`plain_bert_problem`); else None."""
    path = os.path.join(tokenizer_dir, "tokenizer.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    config = _read_json(os.path.join(tokenizer_dir, "tokenizer_config.json"))
    special_map = _read_json(os.path.join(tokenizer_dir, "special_tokens_map.json"))
    if plain_bert_problem(spec, config, special_map) is not None:
        return None
    backend = tokenizers.Tokenizer.from_file(path)
    special = {k: _token(config.get(k, special_map.get(k))) for k in (*_SPECIAL, "eos_token")}
    return Tokenizer(backend, special)
