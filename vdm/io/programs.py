"""Traced programs kept between runs: `jax.export`'s serialized StableHLO in the user's cache.

JAX's persistent compilation cache skips XLA's compile on a second run, not the Python trace and
the lowering that come before it: for the bundled model's sampling program (a flax denoiser and
VAE in a `lax.scan`) that is seconds per process. A `Cached` function exports its program
(`jax.export`: traced and lowered once, serialized as a flatbuffer, no pickle; stored with its
sha256, checked when read) into the directory `set_directory` names, and later processes
deserialize and call it instead of tracing again; XLA's compile of it then comes from the
compilation cache as before.

    encode = programs.Cached(jax.jit(f), "encode", key=repr(module))   # what else `f` closes over
    out = encode(params, x)           # traced, exported and saved once; loaded in later processes

A program is found again only under the same key: the function's own `key` (whatever it closes
over: model config, modules, constants), every argument's tree, shape, dtype and sharding, the
static arguments, and `environment()` (the jax / jaxlib / flax / numpy / Python versions, vdm's
own source, the devices, jax's config and XLA_FLAGS). Anything that differs is a miss, traced
afresh; a miss costs one trace, a wrong hit would cost a wrong video, so the key errs on the side
of missing. Results are the same bits as the plain jit call (tests/test_programs.py).

Off (plain jit) until `set_directory` is called: the mains turn it on with JAX's compilation cache
(`vdm.cli.enable_compilation_cache`; `VDM_COMPILATION_CACHE=off` turns both off).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import flax
import jax
import jaxlib
import numpy as np

SUFFIX = ".jaxexport"
# jax config options that change how programs are cached or logged, never what they compute.
_NOT_PROGRAM = frozenset(
    {
        "jax_compilation_cache_dir",
        "jax_enable_compilation_cache",
        "jax_compilation_cache_max_size",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
        "jax_log_compiles",
        "jax_explain_cache_misses",
        "jax_logging_level",
        "jax_debug_log_modules",
    }
)
_VDM_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_directory: str | None = None


def set_directory(path: str | None) -> None:
    """Where `Cached` functions keep their programs (None: off, every call is plain jit).

    Stays off, with a warning, where the `flatbuffers` package (jax's serialization format) is
    missing.
    """
    global _directory
    if path is not None and importlib.util.find_spec("flatbuffers") is None:
        logging.warning("The package 'flatbuffers' is missing: traced programs are not kept.")
        path = None
    _directory = path


def directory() -> str | None:
    """The directory `set_directory` named (None while off)."""
    return _directory


@functools.cache
def environment() -> str:
    """A fingerprint of what shapes a traced program besides its function and arguments: library
    versions, vdm's source files, the devices, jax's config and XLA_FLAGS (sha256 hex)."""
    h = hashlib.sha256()
    versions = [jax.__version__, jaxlib.__version__, flax.__version__, np.__version__, sys.version]
    devices = [(d.platform, d.device_kind, d.id, d.process_index) for d in jax.devices()]
    config = sorted((k, repr(v)) for k, v in jax.config.values.items() if k not in _NOT_PROGRAM)
    env = [os.environ.get("XLA_FLAGS", ""), jax.process_count()]
    h.update(repr((versions, devices, config, env)).encode())
    for folder, dirs, files in os.walk(_VDM_ROOT):
        dirs.sort()
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            h.update(os.path.relpath(path, _VDM_ROOT).encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read() + b"\0")
    return h.hexdigest()


def remembered(name: str, key: str, compute: Callable[[], Any]) -> Any:
    """`compute()`, a JSON value, kept in the directory like a program (under `name`, `key` and
    `environment()`): for results that take a trace to find, e.g. a module's param shapes.
    Computed every time while the directory is off."""
    if _directory is None:
        return compute()
    digest = hashlib.sha256(json.dumps([name, key, environment()]).encode()).hexdigest()
    path = os.path.join(_directory, f"{name}-{digest}.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):  # absent, or damaged: computed and written again
        value = compute()
    _write_atomic(path, json.dumps(value).encode())
    return value


def _leaf_key(x: Any) -> tuple:
    sharding = getattr(x, "sharding", None)
    dtype = getattr(x, "dtype", type(x).__name__)  # a Python scalar: its type
    return (np.shape(x), str(dtype), getattr(x, "weak_type", False), repr(sharding))


class Cached:
    """A jitted function whose traced program is kept between processes (module docstring).

    Args:
      fn: the `jax.jit`-wrapped function (static arguments are passed by keyword).
      name: a file-name-safe name for its programs.
      key: what `fn` closes over that is not an argument (e.g. reprs of its modules, its
        config, constants), as a string; `environment()` and the arguments are added to it.
    """

    def __init__(self, fn: Callable, name: str, key: str):
        self.fn, self.name, self.key = fn, name, key
        self._calls: dict[str, Callable] = {}  # full key -> jitted call of the loaded program

    def cache_key(self, args: tuple, static: dict) -> str:
        """The sha256 hex of everything that determines the program called with these args."""
        leaves, tree = jax.tree_util.tree_flatten(args)
        parts = [self.name, self.key, environment(), str(tree), [_leaf_key(x) for x in leaves]]
        parts.append(sorted((k, repr(v)) for k, v in static.items()))
        return hashlib.sha256(json.dumps(parts, default=repr).encode()).hexdigest()

    def __call__(self, *args, **static):
        if _directory is None:
            return self.fn(*args, **static)
        key = self.cache_key(args, static)
        if key not in self._calls:
            try:
                self._calls[key] = jax.jit(self._load(key, args, static).call)
            except Exception as e:  # noqa: BLE001 - e.g. a program jax.export cannot serialize
                out = self.fn(*args, **static)  # the program's own errors raise here, as always
                why = f"{type(e).__name__}: {e}"
                logging.warning("Program %s is not kept between runs (%s).", self.name, why)
                self._calls[key] = functools.partial(self.fn, **static)
                return out
        return self._calls[key](*args)

    def _load(self, key: str, args: tuple, static: dict) -> jax.export.Exported:
        """The program of `key` from its file, or traced, exported and saved there first. What
        runs is always the deserialized program, so a first run computes what later ones do."""
        path = os.path.join(_directory, f"{self.name}-{key}{SUFFIX}")
        if os.path.exists(path):
            try:
                with open(path, "rb") as f:
                    digest, blob = f.read(32), f.read()
                if hashlib.sha256(blob).digest() != digest:
                    raise ValueError("its checksum does not match")
                return jax.export.deserialize(bytearray(blob))
            except Exception as e:  # noqa: BLE001 - a damaged file: trace again, replace it
                logging.warning("Traced program %s is unreadable (%s): tracing again.", path, e)
        blob = jax.export.export(self.fn)(*args, **static).serialize()
        _write_atomic(path, hashlib.sha256(blob).digest() + blob)
        return jax.export.deserialize(blob)


def _write_atomic(path: str, data: bytes) -> None:
    """Writes `data` to `path` through a temporary file and a rename, so concurrent runs never
    read a partial program. A cache that cannot be written is only a slower next run."""
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # as JAX's own cache files (mkstemp makes them 0600)
        os.replace(tmp, path)
    except OSError as e:
        logging.warning("Could not keep the traced program in %s: %s", path, e)
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
