"""What every command-line main shares: flag parsing with clear errors, and user errors turned
into a one-paragraph message and a non-zero exit, not a traceback.

Modules raise `ValueError` / `FileNotFoundError` (or `UserError`) with a message that names the bad
input and what is valid; the CLIs print that message alone. Set VDM_TRACEBACK=1 to see the full
traceback (for bug reports).
"""

import contextlib
import os
import sys
from collections.abc import Sequence

import jax

from vdm.config import get_key, load_config_file, unknown_key_message
from vdm.errors import ConfigError, UserError
from vdm.io import programs


@contextlib.contextmanager
def clear_errors():
    try:
        yield
    except (ConfigError, UserError, FileNotFoundError, ValueError, FloatingPointError) as e:
        if os.environ.get("VDM_TRACEBACK"):
            raise
        sys.stderr.write(f"error: {e}\n(set VDM_TRACEBACK=1 to see where it was raised)\n")
        sys.exit(2)


def compilation_cache_dir() -> str | None:
    """Where the mains keep compiled programs between runs (JAX's persistent compilation cache).

    `$VDM_COMPILATION_CACHE` names the directory, or turns the cache off with "off" / "0"; the
    default is `$XDG_CACHE_HOME/vdm/jax` (~/.cache/vdm/jax). A directory the user gave JAX itself
    (`JAX_COMPILATION_CACHE_DIR`) wins. Returns None when off.
    """
    value = os.environ.get("VDM_COMPILATION_CACHE", "")
    if value.lower() in ("off", "0", "false", "no"):
        return None
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    if value:
        return os.path.expanduser(value)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vdm", "jax")


def enable_compilation_cache() -> None:
    """Turns on JAX's persistent compilation cache (`compilation_cache_dir`): a second run of the
    same program loads it instead of compiling it again; and beside it (`exported/`) the traced
    programs of `vdm.io.programs`, so a second run does not trace them again either. Results are
    the same either way."""
    path = compilation_cache_dir()
    if path is None:
        return
    programs.set_directory(os.path.join(path, "exported"))
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        # Small programs too: sampling is a few dozen of them, most well under JAX's 1 s default.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)


def quiet_library_logs() -> None:
    """Hides library INFO chatter (orbax handler setup, 'no TPU backend') unless the user asked for
    it with absl's --verbosity / -v; our own progress and summaries still print."""
    from absl import flags, logging

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def parse_flags_with_help(argv: Sequence[str]):
    """absl `flags_parser` for `app.run`: turns flag errors into one clear message and exit 2.

    Unknown `--config.*` keys are checked against the config file before absl parses anything, so
    the message names the key and the closest valid ones instead of a KeyError traceback.
    """
    from absl import flags

    config_path = None
    for i, arg in enumerate(argv[1:], start=1):
        if arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            config_path = argv[i + 1]
    try:
        if config_path is not None:
            config = load_config_file(config_path)
            for arg in argv[1:]:
                if arg.startswith("--config.") and "=" in arg:
                    key = arg[len("--config.") :].split("=", 1)[0]
                    try:
                        get_key(config, key)
                    except (KeyError, AttributeError):
                        raise ConfigError(unknown_key_message(config, key)) from None
        return flags.FLAGS(argv)
    except (ConfigError, flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
        message = str(e).strip("'\"")
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)
