"""Loading configs, applying `--config.a.b=value` overrides, and validating them with clear errors.

The CLIs use `ml_collections.config_flags.DEFINE_config_file(lock_config=True)`; absl's own
messages for a typo'd key are a bare KeyError, so `parse_flags_with_help` re-raises them as a
`ConfigError` that names the key and the closest valid keys. Tests and notebooks use
`load_config(path, overrides)`, which goes through the same rules without absl flags.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import importlib.util
import math
import os
import sys
import traceback
from collections.abc import Iterable

import ml_collections
from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

from vdm.diffusion.schedules import DiffusionSpec, sampling_spec
from vdm.errors import ConfigError
from vdm.parallel.pmap import MODES as PARALLEL_MODES


def flat_keys(config: ConfigDict, prefix: str = "") -> list[str]:
    """All leaf keys of `config` as dotted paths, e.g. ``["data.height", "model.depth", ...]``."""
    keys = []
    for k, v in config.items():
        path = f"{prefix}{k}"
        if isinstance(v, ConfigDict) and len(v) > 0 and k != "shape":
            keys.extend(flat_keys(v, path + "."))
        else:
            keys.append(path)
    return keys


def closest_keys(config: ConfigDict, key: str, n: int = 3) -> list[str]:
    """The valid dotted keys most similar to `key` (for "did you mean" messages)."""
    candidates = flat_keys(config)
    close = difflib.get_close_matches(key, candidates, n=n, cutoff=0.5)
    if not close:  # Match on the last component: `--config.depht=4` -> `model.depth`.
        last = key.rsplit(".", 1)[-1]
        by_leaf = {c.rsplit(".", 1)[-1]: c for c in candidates}
        close = [
            by_leaf[m] for m in difflib.get_close_matches(last, list(by_leaf), n=n, cutoff=0.6)
        ]
    return close


def unknown_key_message(config: ConfigDict, key: str) -> str:
    close = closest_keys(config, key)
    hint = f" Did you mean: {', '.join('config.' + c for c in close)}?" if close else ""
    return (
        f"Unknown config key 'config.{key}'. Configs are locked so a typo cannot create a new "
        f"field silently.{hint} All fields are documented in configs/base.py."
    )


def load_config_file(path: str, arg: str | None = None) -> ConfigDict:
    """Imports a config file and calls its `get_config()` (or `get_config(arg)` for `path:arg`)."""
    if arg is None and ":" in os.path.basename(path):
        path, arg = path.rsplit(":", 1)
    if not os.path.exists(path):
        raise ConfigError(
            f"Config file '{path}' does not exist (working directory: {os.getcwd()})."
        )
    name = "vdm_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    # Config files import each other (`from configs import base`); make the repo root importable:
    # the parent of the outermost `configs/` above the file (configs/scale/x.py works too).
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    parts = os.path.abspath(path).split(os.sep)
    if "configs" in parts[:-1]:
        root = os.sep.join(parts[: parts.index("configs")]) or os.sep
    if root not in sys.path:
        sys.path.insert(0, root)
    with _naming_errors_in(path, "importing it"):
        spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(
            f"Config file '{path}' has no get_config() function; a config file defines "
            "get_config() returning an ml_collections.ConfigDict (see configs/base.py)."
        )
    with _naming_errors_in(path, "calling its get_config()"):
        return module.get_config(arg) if arg is not None else module.get_config()


@contextlib.contextmanager
def _naming_errors_in(path: str, doing: str):
    """Turns an error raised by a config file's own code into a ConfigError naming the file and
    the line (the innermost one in a config file, or the syntax error's)."""
    try:
        yield
    except SyntaxError as e:
        where = f"'{e.filename}', line {e.lineno}" if e.filename else f"'{path}'"
        raise ConfigError(
            f"Config file {where} has a syntax error ({e.msg}) ({doing}): "
            f"{(e.text or '').strip()!r}. Fix the line and run again."
        ) from None
    except Exception as e:  # noqa: BLE001 - any error of the user's own code, named
        frames = [f for f in traceback.extract_tb(e.__traceback__) if _is_config_file(f.filename)]
        where = f"'{frames[-1].filename}', line {frames[-1].lineno}" if frames else f"'{path}'"
        raise ConfigError(
            f"Config file {where} raised {type(e).__name__}: {e} ({doing}). Fix the config file."
        ) from None


def _is_config_file(filename: str) -> bool:
    """Whether a traceback frame is in a config file (not in vdm or a library)."""
    if filename.startswith("<"):  # <frozen importlib._bootstrap> and the like
        return False
    here = os.path.dirname(os.path.abspath(__file__))
    return not os.path.abspath(filename).startswith(here) and "site-packages" not in filename


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if text.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
            return float(text)  # as absl parses a float flag (then refused by `validate`)
        return text  # A bare string such as `--config.stage=autoencoder`.


def apply_override(config: ConfigDict, key: str, text: str) -> None:
    """Sets dotted `key` of a locked `config` from its command-line `text`, with clear errors."""
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        if not isinstance(node, ConfigDict) or p not in node:
            raise ConfigError(unknown_key_message(config, key))
        node = node[p]
    if not isinstance(node, ConfigDict) or leaf not in node:
        raise ConfigError(unknown_key_message(config, key))
    old = node[leaf]
    value = _parse_value(text)
    if old is None:  # a typed placeholder: check against its declared type instead
        ftype = node.get_type(leaf)
        if ftype is tuple and isinstance(value, list | int | float | str):
            value = tuple(value) if isinstance(value, list) else (value,)
        if ftype is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if ftype not in (type(None), object) and not isinstance(value, ftype):
            raise ConfigError(
                f"config.{key} is a {ftype.__name__} (default: unset); cannot set it to {text!r}."
            )
    if isinstance(old, ConfigDict):
        if not isinstance(value, dict):
            raise ConfigError(f"config.{key} is a group of fields; give a dict, got {text!r}.")
        with node.ignore_type():
            node[leaf] = ConfigDict(value)
        return
    if isinstance(old, bool) and not isinstance(value, bool):
        raise ConfigError(f"config.{key} is a bool; give True or False, got {text!r}.")
    if isinstance(old, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(old, tuple) and not isinstance(value, tuple):
        value = (value,)
    if old is not None and not isinstance(value, type(old)):
        raise ConfigError(
            f"config.{key} is a {type(old).__name__} (default {old!r}); "
            f"cannot set it to {text!r} ({type(value).__name__})."
        )
    try:
        node[leaf] = value
    except (TypeError, AttributeError) as e:
        raise ConfigError(f"Cannot set config.{key} to {text!r}: {e}") from None


def load_config(path: str, overrides: Iterable[str] | dict = ()) -> ConfigDict:
    """Loads a config file, locks it, applies `key=value` overrides and validates it.

    Args:
      path: a config file (optionally `file.py:arg`).
      overrides: `["model.depth=4", ...]` (with or without a leading `--config.`), or a dict.

    Returns:
      The locked, validated ConfigDict.
    """
    config = load_config_file(path)
    config.lock()
    items = overrides.items() if isinstance(overrides, dict) else (_split(o) for o in overrides)
    for key, text in items:
        apply_override(config, key, text if isinstance(text, str) else repr(text))
    validate(config)
    return config


def _split(override: str) -> tuple[str, str]:
    override = override.removeprefix("--").removeprefix("config.")
    if "=" not in override:
        raise ConfigError(f"Override '{override}' is not of the form key=value.")
    key, value = override.split("=", 1)
    return key, value


_CHOICES = {
    "stage": ("autoencoder", "denoiser", "alignment", "wan"),
    "parallel": PARALLEL_MODES,
    "model.attention": ("factorized", "full", "spatial_only"),
    "model.remat": ("none", "block", "dots"),
    "model.attention_kernel": ("auto", "xla", "splash", "splash_interpret", "cudnn"),
    "model.sequence_parallel": ("ulysses", "ring"),
    "diffusion.objective": ("flow", "eps", "v"),
    "diffusion.time_sampling": ("logit_normal", "uniform"),
    "sample.sampler": ("euler", "ddim", "dpmpp2m"),
    "vae.temporal_factor": (1, 2, 4),
    "vae.spatial_factor": (4, 8),
}

REQUIRED = (
    "seed",
    "stage",
    "parallel",
    "train.num_steps",
    "train.batch_size",
    "checkpoint.every_steps",
    "mesh.shape",
)


def get_key(config: ConfigDict, key: str):
    node = config
    for p in key.split("."):
        node = node[p]
    return node


# The numbers guard: values that can only be wrong are refused where they enter (the config), not
# where they break (a ZeroDivisionError in a data thread, a run that trains nothing and exits 0).
# Every number must be finite; every one but these may not be negative; these must be positive.
_SIGNED = ("seed", "diffusion.logit_mean")
_POSITIVE = (
    "data.fps", "data.num_frames", "data.height", "data.width", "train.batch_size",
    "sample.num_steps", "optim.accumulate_steps", "model.depth", "model.width",
    "model.num_heads", "text_encoder.max_length", "vae.latent_channels",
)  # fmt: skip


def _number_problems(config: ConfigDict) -> list[str]:
    problems = []
    for key in flat_keys(config):
        value = get_key(config, key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if not math.isfinite(value):
            problems.append(f"{key}={value} is not a finite number")
        elif key in _POSITIVE and value <= 0:
            problems.append(f"{key}={value} must be positive")
        elif key not in _SIGNED and value < 0:
            problems.append(f"{key}={value} must not be negative")
    return problems


def validate(config: ConfigDict) -> None:
    """Checks required fields, enumerated choices and shape constraints; raises ConfigError."""
    problems = []
    for key in REQUIRED:
        try:
            get_key(config, key)
        except (KeyError, AttributeError):
            problems.append(f"required field config.{key} is missing")
    for key, choices in _CHOICES.items():
        try:
            value = get_key(config, key)
        except (KeyError, AttributeError):
            continue
        if value not in choices:
            problems.append(f"config.{key}={value!r} is not one of {choices}")
    if "data" in config and "vae" in config:
        t, ft = config.data.num_frames, config.vae.temporal_factor
        if ft in (1, 2, 4) and (t - 1) % ft:
            valid = ", ".join(str(1 + k * ft) for k in range(1, 6))
            problems.append(
                f"data.num_frames={t} is not 1 + k*vae.temporal_factor ({ft}); valid: {valid}, ..."
            )
        fs = config.vae.spatial_factor
        for name in ("height", "width"):
            size = config.data[name]
            if fs in (4, 8) and size % fs:
                problems.append(f"data.{name}={size} is not divisible by vae.spatial_factor={fs}")
    if "diffusion" in config:
        try:
            spec = DiffusionSpec.from_config(config.diffusion)
        except ValueError as e:
            problems.append(f"config.diffusion: {e}")
        else:
            try:
                sampling_spec(spec, config.sample.get("shift") if "sample" in config else None)
            except ValueError as e:
                problems.append(f"config.sample: {e}")
    problems += _number_problems(config)
    if problems:
        raise ConfigError("Invalid config: " + "; ".join(problems) + ".")


# -- upgrades of saved configs ---------------------------------------------------------------------
# A config saved with a checkpoint or a bundle is read back by newer code. `config.version` (absent
# = 0) says which schema it follows; `upgrade` brings it to CONFIG_VERSION, one step per version.
CONFIG_VERSION = 6

# Version 1: fields added to configs/base.py after models were saved, at their base.py defaults.
# A missing field would break `--config` overrides of it (e.g. `export --sample shift=3`) and the
# code that reads it. A placeholder is a typed "unset" (a JSON null loses its type on reading).
_V1_FIELDS = {
    "sample.shift": lambda: placeholder(float),
    "train.init_from": lambda: "",
    "train.init_new_params": lambda: False,
    "train.init_skip": lambda: "",
    "optim.freeze": lambda: "",
    "optim.ema_warmup": lambda: True,
    "vae.train_frames": lambda: 0,
    "vae.stats_num_examples": lambda: 256,
}


# Version 2: the attention kernel switch (vdm.models.attention); old models keep "auto", which on
# CPU is the same XLA call they were trained with.
_V2_FIELDS = {"model.attention_kernel": lambda: "auto"}

# Version 3: sequence parallelism (vdm.parallel.sequence); the method only matters with a
# `sequence` mesh axis of size > 1, which old configs' mesh.shape does not have (size 1).
_V3_FIELDS = {"model.sequence_parallel": lambda: "ulysses"}

# Version 4: LoRA fine-tuning (vdm.tasks.lora); older runs trained without adapters.
_V4_FIELDS = {
    "optim.lora_rank": lambda: 0,
    "optim.lora_alpha": lambda: 0.0,
    "optim.lora_targets": lambda: "",
}

# Version 5: data opt-out (vdm.data.provenance); older runs had no exclusion lists.
_V5_FIELDS = {"data.exclude": lambda: "", "data.allow_no_consent": lambda: False}


# Version 6: the text-video alignment model's section (vdm.models.alignment; configs/base.py
# `_alignment`, whose defaults these are). Older models have no alignment model of their own.
_V6_SECTION = {
    "variant": "S",
    "width": None,
    "depth": None,
    "num_heads": None,
    "embed_dim": None,
    "text_hidden": None,
    "dtype": "float32",
    "checkpoint": "",
    "eval_pairs": 500,
}


def _add_fields(config: ConfigDict, fields) -> None:
    for key, default in fields.items():
        section, leaf = key.split(".")
        if section in config and config[section].get(leaf) is None:
            with config[section].unlocked(), config[section].ignore_type():
                config[section][leaf] = default()


def _to_v1(config: ConfigDict) -> None:
    _add_fields(config, _V1_FIELDS)


def _to_v2(config: ConfigDict) -> None:
    _add_fields(config, _V2_FIELDS)


def _to_v3(config: ConfigDict) -> None:
    _add_fields(config, _V3_FIELDS)


def _to_v4(config: ConfigDict) -> None:
    _add_fields(config, _V4_FIELDS)


def _to_v5(config: ConfigDict) -> None:
    _add_fields(config, _V5_FIELDS)


def _to_v6(config: ConfigDict) -> None:
    if "alignment" not in config:
        sizes = ("width", "depth", "num_heads", "embed_dim", "text_hidden")
        section = ConfigDict(
            {k: placeholder(int) if k in sizes else v for k, v in _V6_SECTION.items()}
        )
        with config.unlocked():
            config.alignment = section


_UPGRADES = (
    _to_v1,
    _to_v2,
    _to_v3,
    _to_v4,
    _to_v5,
    _to_v6,
)  # _UPGRADES[v] upgrades a version-v config to version v + 1


def upgrade(config: ConfigDict) -> ConfigDict:
    """Upgrades a saved config (from a checkpoint or a bundle) to the current schema, in place.

    A config without `version` is version 0. Each upgrade step adds what its version introduced,
    so an old model takes the same overrides and runs the same code as a new one.

    Returns:
      `config`, with `version` = CONFIG_VERSION when it records one.

    Raises:
      ConfigError: a config newer than this code.
    """
    version = int(config.get("version", 0) or 0)
    if version > CONFIG_VERSION:
        raise ConfigError(
            f"The saved config has version {version}; this code reads versions <= "
            f"{CONFIG_VERSION}. Update vdm."
        )
    for step in _UPGRADES[version:]:
        step(config)
    with config.unlocked():
        config.version = CONFIG_VERSION
    return config


def to_dict(config: ConfigDict) -> dict:
    """Plain dict (JSON-serialisable) copy of a config, e.g. to store beside a checkpoint."""
    return ml_collections.ConfigDict(config).to_dict()
