"""Checks of the output paths users give, made where they enter (before any work), so a path that
cannot hold the results fails at once with a message naming it, not with a makedirs traceback
after the work."""

from __future__ import annotations

import os
import tempfile

from vdm.errors import UserError


def check_output_dir(path: str, name: str, *, create: bool = True) -> str:
    """Checks that directory `path` (given as `name`, e.g. "--output_dir") can be written.

    With `create` the directory (and its parents) is made; without, the nearest existing
    ancestor must be a writable directory and nothing is made. A file is written and removed to
    prove it (a read-only mount refuses even root).

    Returns:
      The absolute path.

    Raises:
      UserError: `path` is a file, lies under a file, cannot be created or is not writable.
    """
    path = os.path.abspath(os.path.expanduser(str(path)))
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{name} '{path}' is a file; pass a directory (new or existing).")
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(
            f"{name} '{path}' cannot be created: '{probe}' is a file. Pass a directory path."
        )
    try:
        if create:
            os.makedirs(path, exist_ok=True)
            probe = path
        with tempfile.TemporaryFile(dir=probe, prefix=".vdm-write-test-"):
            pass
    except OSError as e:
        what = "cannot be created" if not os.path.isdir(path) else "is not writable"
        raise UserError(
            f"{name} '{path}' {what} ({e.strerror or e}); pass a directory you can write to."
        ) from None
    return path
