"""The README's commands cannot drift from what CI runs."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def _quick_start_commands():
    readme = _read("README.md")
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, re.S)


def test_quick_start_has_two_commands():
    cmds = _quick_start_commands()
    assert len(cmds) == 2, cmds
    assert "python sample.py --prompt" in cmds[0]
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command():
    install_and_test = _quick_start_commands()[1].split("&& ")
    ci = _read(".ci/run").splitlines()
    for part in install_and_test:
        part = part.strip()
        if part.startswith(("python3 -m venv", ". .venv")):
            continue  # CI makes its own venv the same way
        assert part in ci, f"README test step {part!r} is not a line of .ci/run"


def test_ci_runs_the_readme_main_command():
    """Every step of the quick start's generate command is a line of .ci/run, so CI installs
    the package without the test extra and generates a video with the bundled model."""
    ci = _read(".ci/run").splitlines()
    for part in _quick_start_commands()[0].split("&& "):
        part = part.strip()
        if part.startswith(("python3 -m venv", ". .venv")):
            continue
        assert part in ci, f"README main-command step {part!r} is not a line of .ci/run"
