"""The library's error types. Each message names the bad input and what is valid.

Library code raises these (or `ValueError` / `FileNotFoundError` with such a message); the
command-line mains turn them into a one-paragraph message and a non-zero exit (`vdm.cli`).
"""


class ConfigError(ValueError):
    """A config file, key or value the user gave is wrong; the message says which and why."""


class UserError(Exception):
    """Bad input from the user (missing checkpoint, bad prompt, unreadable file...)."""
