"""Turns user errors into a one-paragraph message and a non-zero exit, not a traceback.

Modules raise `ValueError` / `FileNotFoundError` (or `UserError`) with a message that names the bad
input and what is valid; the CLIs print that message alone. Set VDM_TRACEBACK=1 to see the full
traceback (for bug reports).
"""

import contextlib
import os
import sys

from vdm.config import ConfigError


class UserError(Exception):
    """Bad input from the user (missing checkpoint, bad prompt, unreadable file...)."""


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
