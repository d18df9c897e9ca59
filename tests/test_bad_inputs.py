"""The bad-input catalogue: every command refuses a wrong input with one clear paragraph.

Each case runs a command-line main as a subprocess and asserts exit != 0, no traceback, a
message that names the input (and what to do), and that nothing was written a later run could
mistake for good output (a workdir, output directory or bundle that should not exist). Cases
fail before any model work, so the subprocesses are cheap; they run a few at a time
(`_results`). Corrupt checkpoints and bundles are covered by the checkpoint tests.

Besides the catalogue: vdm.export's staging folder is removed when it is killed (SIGTERM), and
sample.py's writer keeps runs into one output directory apart.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from vdm.inference import writer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")
BUNDLE = os.path.join(ROOT, "vdm", "assets", "default_model")
UNWRITABLE = "/proc/vdm-unwritable"  # mkdir fails there even for root (unlike chmod 555)


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    argv: tuple  # after the python executable; "{tmp}" is the case folder
    named: tuple[str, ...]  # substrings the message must contain
    absent: tuple[str, ...] = ()  # paths (under {tmp}) that must not exist afterwards
    early: bool = False  # sample.py: refused before "Loading model"


def _train(*args):
    return ("train.py", f"--config={QUICKSTART}", *args)


def _sample(*args):
    return ("sample.py", "--prompt", "a 3 moving up", *args)


def _cache(*args):
    return ("-m", "vdm.tools.cache", "--config", QUICKSTART, *args)


def _export(*args):
    return ("-m", "vdm.tools.export", *args)


def _aot(*args):
    return ("-m", "vdm.tools.aot", *args)


W = "--workdir={tmp}/w"  # a workdir that must not be made by a refused run

CASES = [
    # --- train.py: output paths, config files, VAE checkpoints, numbers
    Case(
        "train-workdir-is-file",
        _train("--workdir={tmp}/a_file"),
        ("--workdir", "a_file", "is a file"),
    ),
    Case(
        "train-workdir-under-file",
        _train("--workdir={tmp}/a_file/w"),
        ("--workdir", "a_file", "cannot be created"),
    ),
    Case("train-workdir-unwritable", _train(f"--workdir={UNWRITABLE}"), ("--workdir", UNWRITABLE)),
    Case(
        "train-config-syntax",
        ("train.py", "--config={tmp}/syntax.py", W),
        ("syntax.py", "line 2", "syntax error"),
        ("w",),
    ),
    Case(
        "train-config-raises",
        ("train.py", "--config={tmp}/raises.py", W),
        ("raises.py", "line 3", "ZeroDivisionError"),
        ("w",),
    ),
    Case(
        "train-config-no-get-config",
        ("train.py", "--config={tmp}/empty.py", W),
        ("empty.py", "get_config"),
        ("w",),
    ),
    Case(
        "train-config-missing",
        ("train.py", "--config={tmp}/nope.py", W),
        ("nope.py", "does not exist"),
        ("w",),
    ),
    Case(
        "train-vae-is-denoiser",
        _train(W, f"--config.vae.checkpoint={BUNDLE}/denoiser"),
        ("config.vae.checkpoint", "denoiser", "not a VAE"),
        ("w",),
    ),
    Case(
        "train-vae-is-bundle",
        _train(W, f"--config.vae.checkpoint={BUNDLE}"),
        ("config.vae.checkpoint", f"{BUNDLE}/vae"),
        ("w",),
    ),
    Case(
        "train-vae-missing",
        _train(W, "--config.vae.checkpoint={tmp}/no_vae"),
        ("config.vae.checkpoint", "no_vae", "does not exist"),
        ("w",),
    ),
    Case(
        "train-vae-is-file",
        _train(W, "--config.vae.checkpoint={tmp}/a_file"),
        ("config.vae.checkpoint", "a_file"),
        ("w",),
    ),
    Case(
        "train-negative-steps",
        _train(W, "--config.train.num_steps=-5"),
        ("train.num_steps", "-5"),
        ("w",),
    ),
    Case(
        "train-nan-lr",
        _train(W, "--config.optim.learning_rate=nan"),
        ("optim.learning_rate",),
        ("w",),
    ),
    Case(
        "train-folder-fps-zero",
        _train(W, "--config.data.source=folder:{tmp}/clips", "--config.data.fps=0"),
        ("data.fps",),
        ("w",),
    ),
    # --- sample.py: prompts, numbers, output paths, checkpoints
    Case(
        "sample-prompt-not-utf8",
        ("sample.py", "--prompt", b"caf\xe9", "--output_dir={tmp}/o"),
        ("--prompt #1", "UTF-8", "caf\\xe9"),
        ("o",),
        True,
    ),
    Case(
        "sample-negative-not-utf8",
        _sample("--negative_prompt", b"\xff", "--output_dir={tmp}/o"),
        ("--negative_prompt", "UTF-8"),
        ("o",),
        True,
    ),
    Case(
        "sample-output-is-file",
        _sample("--output_dir={tmp}/a_file"),
        ("--output_dir", "a_file", "is a file"),
        (),
        True,
    ),
    Case(
        "sample-output-unwritable",
        _sample(f"--output_dir={UNWRITABLE}"),
        ("--output_dir", UNWRITABLE),
        (),
        True,
    ),
    Case(
        "sample-num-samples-zero",
        _sample("--num_samples=0", "--output_dir={tmp}/o"),
        ("--num_samples",),
        ("o",),
        True,
    ),
    Case(
        "sample-guidance-inf",
        _sample("--guidance=inf", "--output_dir={tmp}/o"),
        ("--guidance",),
        ("o",),
        True,
    ),
    Case(
        "sample-eta-negative", _sample("--eta=-1", "--output_dir={tmp}/o"), ("--eta",), ("o",), True
    ),
    Case(
        "sample-steps-zero",
        _sample("--num_steps=0", "--output_dir={tmp}/o"),
        ("--num_steps",),
        ("o",),
        True,
    ),
    Case(
        "sample-too-many-videos",
        _sample("--num_samples=1000000000", "--output_dir={tmp}/o"),
        ("--num_samples 1000000000", "GiB"),
        ("o",),
    ),
    Case(
        "sample-size-for-vdm-model",
        _sample("--num_frames=9", "--output_dir={tmp}/o"),
        ("--num_frames 9", "trained at that size", "Wan"),
        ("o",),
    ),
    Case(
        "sample-height-zero",
        _sample("--height=0", "--output_dir={tmp}/o"),
        ("--height must be >= 1",),
        ("o",),
        True,
    ),
    Case(
        "sample-checkpoint-missing",
        _sample("--checkpoint={tmp}/nope", "--output_dir={tmp}/o"),
        ("nope", "does not exist"),
        ("o",),
    ),
    Case(
        "sample-checkpoint-is-vae",
        _sample(f"--checkpoint={BUNDLE}/vae", "--output_dir={tmp}/o"),
        (f"{BUNDLE}/vae",),
        ("o",),
    ),
    # --- eval.py
    Case(
        "eval-steps-not-int",
        ("eval.py", "--num_steps=abc", "--output_dir={tmp}/e"),
        ("--num_steps", "'abc'"),
        ("e",),
    ),
    Case(
        "eval-eta-not-float",
        ("eval.py", "--eta=0,x", "--output_dir={tmp}/e"),
        ("--eta", "'x'"),
        ("e",),
    ),
    Case(
        "eval-zero-videos",
        ("eval.py", "--num_videos=0", "--output_dir={tmp}/e"),
        ("--num_videos 0", "at least 4"),
        ("e",),
    ),
    Case(
        "eval-two-videos",
        ("eval.py", "--num_videos=2", "--output_dir={tmp}/e"),
        ("--num_videos 2", "at least 4"),
        ("e",),
    ),
    Case(
        "eval-output-is-file",
        ("eval.py", "--output_dir={tmp}/a_file"),
        ("--output_dir", "a_file", "is a file"),
    ),
    # --- vdm.export
    Case(
        "export-output-is-file",
        _export(f"--checkpoint={BUNDLE}/denoiser", "--output={tmp}/a_file"),
        ("--output", "a_file", "is a file"),
    ),
    Case(
        "export-output-unwritable",
        _export(f"--checkpoint={BUNDLE}/denoiser", f"--output={UNWRITABLE}"),
        ("--output", UNWRITABLE),
    ),
    Case(
        "export-checkpoint-is-vae",
        _export(f"--checkpoint={BUNDLE}/vae", "--output={tmp}/x"),
        ("--checkpoint", f"{BUNDLE}/vae", "autoencoder", "not a denoiser"),
        ("x",),
    ),
    Case(
        "export-checkpoint-is-bundle",
        _export(f"--checkpoint={BUNDLE}", "--output={tmp}/x"),
        ("--checkpoint", "already an exported model", f"{BUNDLE}/denoiser"),
        ("x",),
    ),
    Case(
        "export-checkpoint-missing",
        _export("--checkpoint={tmp}/nope", "--output={tmp}/x"),
        ("--checkpoint", "nope", "does not exist"),
        ("x",),
    ),
    # --- vdm.data.cache
    Case(
        "cache-output-is-file", _cache("--output={tmp}/a_file"), ("--output", "a_file", "is a file")
    ),
    Case("cache-output-unwritable", _cache(f"--output={UNWRITABLE}"), ("--output", UNWRITABLE)),
    Case(
        "cache-folder-no-usable-clip",
        _cache("--output={tmp}/c", "--config.data.source=folder:{tmp}/gone"),
        ("gone", "no usable clips"),
        ("c",),
    ),
    Case(
        "cache-folder-no-captions",
        _cache("--output={tmp}/c", "--config.data.source=folder:{tmp}/empty_dir"),
        ("empty_dir", "captions.jsonl"),
        ("c",),
    ),
    Case(
        "cache-captions-not-utf8",
        _cache("--output={tmp}/c", "--config.data.source=folder:{tmp}/latin1"),
        ("latin1/captions.jsonl:2", "not UTF-8"),
        ("c",),
    ),
    Case(
        "cache-folder-fps-zero",
        _cache(
            "--output={tmp}/c", "--config.data.source=folder:{tmp}/clips", "--config.data.fps=0"
        ),
        ("data.fps",),
        ("c",),
    ),
    # --- vdm.aot
    Case(
        "aot-unknown-chip",
        _aot(f"--config={QUICKSTART}", "--topology=v9:2x2"),
        ("v9:2x2", "GENERATION"),
    ),
    Case(
        "aot-topology-without-shape", _aot(f"--config={QUICKSTART}", "--topology=v5e"), ("'v5e'",)
    ),
    Case(
        "aot-config-missing",
        _aot("--config={tmp}/nope.py", "--topology=v5e:2x2"),
        ("nope.py", "does not exist"),
    ),
    Case(
        "aot-unknown-program",
        _aot(f"--config={QUICKSTART}", "--topology=v5e:2x2", "--programs=foo"),
        ("foo", "train_step"),
    ),
]


def _fixtures(tmp: str) -> None:
    """The files the cases point at, in the case's own folder."""
    with open(os.path.join(tmp, "a_file"), "w") as f:
        f.write("not a directory\n")
    files = {
        "syntax.py": "def get_config():\n    return {'a': 1\n",
        "raises.py": "def get_config():\n    x = 0\n    return 1 / x\n",
        "empty.py": "X = 1\n",
    }
    for name, text in files.items():
        with open(os.path.join(tmp, name), "w") as f:
            f.write(text)
    clip = np.zeros((9, 32, 32, 3), np.uint8)
    for folder, captions in {
        "clips": b'{"file": "a.npy", "caption": "a 3 moving up"}\n',
        "gone": b'{"file": "missing.mp4", "caption": "a 3 moving up"}\n',
        "latin1": b'{"file": "a.npy", "caption": "ok"}\n{"file": "a.npy", "caption": "caf\xe9"}\n',
        "empty_dir": None,
    }.items():
        os.makedirs(os.path.join(tmp, folder))
        if captions is not None:
            np.save(os.path.join(tmp, folder, "a.npy"), clip)
            with open(os.path.join(tmp, folder, "captions.jsonl"), "wb") as f:
                f.write(captions)


def _run(case: Case, root: str) -> tuple[Case, str, subprocess.CompletedProcess]:
    tmp = os.path.join(root, case.id)
    os.makedirs(tmp)
    _fixtures(tmp)

    def fill(a):
        return a.replace("{tmp}", tmp) if isinstance(a, str) else a

    r = subprocess.run(
        [sys.executable, *map(fill, case.argv)],
        capture_output=True, cwd=ROOT, timeout=300, env={**os.environ, "VDM_TRACEBACK": ""},
    )  # fmt: skip
    return case, tmp, r


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Runs every case (a few subprocesses at a time): {case id: (case, folder, result)}."""
    root = str(tmp_path_factory.mktemp("bad_inputs"))
    workers = max(2, min(4, os.cpu_count() or 2))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        done = list(pool.map(lambda c: _run(c, root), CASES))
    return {case.id: (case, tmp, r) for case, tmp, r in done}


def test_catalogue_is_broad():
    commands = {c.id.split("-")[0] for c in CASES}
    assert commands == {"train", "sample", "eval", "export", "cache", "aot"}
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case_id", [c.id for c in CASES])
def test_bad_input_is_one_clear_error(results, case_id):
    case, tmp, r = results[case_id]
    err = r.stderr.decode("utf-8", "replace").replace(tmp, "{tmp}")
    out = r.stdout.decode("utf-8", "replace")
    assert r.returncode != 0, (out, err)
    assert "Traceback" not in err, err
    message = err.replace("{tmp}", tmp)
    for text in case.named:
        assert text.replace("{tmp}", tmp) in message, (text, err)
    for path in case.absent:
        assert not os.path.exists(os.path.join(tmp, path)), (path, err)
    if case.early:
        assert "Loading model" not in out, out


def test_export_killed_removes_its_staging_folder(tmp_path):
    """SIGTERM while vdm.export works: the .export-* folder beside --output is removed, exit is
    non-zero with one line, and no bundle is left at --output."""
    out = tmp_path / "model"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vdm.tools.export", f"--checkpoint={BUNDLE}/denoiser",
         f"--output={out}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.time() + 120
    while not any(n.startswith(".export-") for n in os.listdir(tmp_path)):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.5)  # into the weight reads
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)


def _videos(n: int, value: int) -> np.ndarray:
    return np.full((n, 3, 8, 8, 3), value, np.uint8)


def test_runs_into_one_output_dir_keep_their_own_files(tmp_path):
    """Two runs into one directory, one after the other and at the same time: no file is
    overwritten and every samples.jsonl line names its own run's file (with the right video)."""
    prompts = ["two\nlines", ""]  # a multi-line prompt and the unconditional one
    out = str(tmp_path)

    def one_run(value):
        record = {"seed": value}
        return writer.write_videos(_videos(2, value), prompts, 1, out, ["npy", "png"], 8, record)

    first = one_run(1)
    assert {os.path.basename(r["file"]) for r in first} >= {"000_00.npy", "001_00.png"}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        later = list(pool.map(one_run, [2, 3, 4]))
    with open(os.path.join(out, "samples.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 4 * 2 * 2
    assert sorted(r["run"] for r in records) == sorted(r["run"] for r in first + sum(later, []))
    assert len({r["file"] for r in records}) == len(records)  # no two lines share a file
    for r in records:
        assert r["prompt"] == prompts[r["prompt_idx"]]
        if r["file"].endswith(".npy"):
            assert int(np.load(r["file"]).max()) == r["seed"], r  # the run's own video
    assert {r["run"] for r in records} == {0, 1, 2, 3}
