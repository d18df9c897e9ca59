"""Turns known user errors into a one-paragraph message and a non-zero exit, not a traceback."""

import contextlib
import sys

from vdm.config import ConfigError


class UserError(Exception):
    """Bad input from the user (missing checkpoint, bad prompt, unreadable file...)."""


@contextlib.contextmanager
def clear_errors():
    try:
        yield
    except (ConfigError, UserError, FileNotFoundError) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
