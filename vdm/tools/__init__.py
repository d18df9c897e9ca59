"""Command-line tools run with `python -m vdm.tools.<name>`."""
