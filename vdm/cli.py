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

from vdm.config import get_key, load_config_file, unknown_key_message
from vdm.errors import ConfigError, UserError


@contextlib.contextmanager
def clear_errors():
    try:
        yield
    except (ConfigError, UserError, FileNotFoundError, ValueError, FloatingPointError) as e:
        if os.environ.get("VDM_TRACEBACK"):
            raise
        sys.stderr.write(f"error: {e}\n(set VDM_TRACEBACK=1 to see where it was raised)\n")
        sys.exit(2)


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
