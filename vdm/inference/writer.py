"""The `sample.py` command: prompts -> video files + samples.jsonl.

Several runs may write into one output directory, one after another or at the same time: each
claims a run number there (`.sample-run-K`, created atomically) and names its files after it,
`{p:03d}_{i:02d}.{ext}` for the first run into a directory and `run{K}_{p:03d}_{i:02d}.{ext}` for
later ones, so no run overwrites another's videos; each appends its samples.jsonl lines (with
`"run": K` and its own `file`) in one write. Every file is labelled as AI-generated, with the
model, its training data's manifest hash, the seed, the prompt and the sampler settings
(`vdm.inference.labels`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vdm import paths
from vdm.errors import UserError
from vdm.inference import alignment as alignment_lib
from vdm.inference import guidance, labels, latents, load, pipeline, rerank, settings
from vdm.io import video

FORMATS = ("mp4", "gif", "npy", "png")
# Asked for by name only: "latent" writes the denoised latents (.npz, `vdm.inference.latents`).
OPTIONAL_FORMATS = ("latent",)
# Requests of at least this many videos are timed on one batch first and warned about (ETA).
LARGE_REQUEST = 256
_FIRST_RUN_FILE = re.compile(r"^\d{3}_\d{2}\.")


def run(
    prompts: Sequence[str],
    *,
    checkpoint: str | None = None,
    seed: int = 0,
    num_samples: int = 1,
    sampling: Mapping[str, Any] | None = None,
    output_dir: str = "out",
    formats: Sequence[str] = FORMATS,
    batch_size: int = 8,
    size: Mapping[str, int | None] | None = None,
    candidates: int = 1,
    alignment: str | None = None,
    alignment_guidance: float = 0.0,
    dtype: str | None = None,
) -> list[dict]:
    """Generates and writes videos; returns the records written to samples.jsonl.

    Files are `{output_dir}/{prefix}{prompt_idx:03d}_{sample_idx:02d}.{ext}` (`prefix` is "" for
    the first run into `output_dir`, `run{K}_` for the K-th later one; module docstring); `npy`
    holds uint8 [T, H, W, 3]; `png` is a contact sheet of the frames.

    Args:
      sampling: `SamplingSettings` fields to set instead of the model's defaults (None values
        keep the default), e.g. {"num_steps": 10, "guidance": None}.
      size, dtype: {"num_frames", "height", "width"} of the videos (None values keep the
        model's) and the compute dtype; only Wan models take them (`load.load_pipeline`).
      candidates: N > 1 draws N candidates per video and keeps the best-aligned one
        (`vdm.inference.rerank`); the records then hold every candidate's alignment score.
      alignment: the alignment model scoring them (default: the model's own, `load_aligner`).
      alignment_guidance: > 0 steers every sampler step by the alignment score's gradient with
        this step size (`vdm.inference.guidance`).

    Raises:
      UserError: a bad format, count, setting, prompt or output directory (before the model
        loads), or a request whose .npy files would not fit on the disk (before sampling).
    """
    sampling = dict(sampling or {})
    _check_request(prompts, sampling, num_samples, formats, batch_size, candidates)
    size = _size(size)
    paths.check_output_dir(output_dir, "--output_dir", create=False)  # made when writing
    t0 = time.perf_counter()
    print(f"Loading model from {checkpoint or pipeline.DEFAULT_MODEL} ...", flush=True)
    pipe = load.load_pipeline(checkpoint, **size, dtype=dtype)
    _check_size(pipe, len(prompts) * num_samples, num_samples, formats, output_dir)
    chosen = pipe.settings.override(**sampling)
    pipe, aligner = _with_alignment(pipe, chosen, candidates, alignment, alignment_guidance)
    # What each record states: the settings with the shift the sampler used (unset = training's).
    record = {**dataclasses.asdict(chosen), "shift": pipe.sampling_spec(chosen.shift).shift}
    if alignment_guidance:
        record["alignment_guidance"] = float(alignment_guidance)
    call = dict(seed=seed, settings=chosen, batch_size=batch_size)
    if len(prompts) * num_samples >= LARGE_REQUEST:
        _warn_eta(pipe, prompts, num_samples, call)
    record = {"seed": seed, **record, labels.FIELD: labels.model_label(checkpoint, pipe.config)}
    out = _Run(output_dir, prompts, formats, pipe.config.data.fps, record)
    records = _generate(pipe, aligner, prompts, out, candidates, num_samples, call)
    print(f"Wrote {len(records) // len(formats)} video(s) to {output_dir}/ in "
          f"{time.perf_counter() - t0:.1f} s.")  # fmt: skip
    return records


def _with_alignment(pipe, chosen, candidates: int, alignment, scale: float):
    """(the pipeline, guided when `scale` > 0; the Aligner, or None when neither best-of-N nor
    guidance needs one)."""
    if candidates == 1 and not scale:
        return pipe, None
    if scale and chosen.sampler == "unipc":
        raise UserError("--alignment_guidance steers euler, ddim and dpmpp2m, not unipc.")
    aligner = alignment_lib.load_aligner(pipe, alignment)
    return guidance.guided(pipe, aligner, scale), aligner


def _generate(pipe, aligner, prompts, out, candidates: int, num_samples: int, call) -> list[dict]:
    """Makes and writes the videos batch by batch (best-of-`candidates` when > 1: one prompt's
    candidates at a time); returns the records written."""
    records = []
    if candidates > 1:
        print(f"Best of {candidates}: scoring candidates with {aligner.source}", flush=True)
        kw = dict(candidates=candidates, num_samples=num_samples, progress=True, **call)
        for c in rerank.iter_best_of_n(pipe, aligner, prompts, **kw):
            pairs = [(c.prompt_idx, i) for i in range(num_samples)]
            records += out.write(pairs, c.videos, c.records())
        return records
    for pairs, videos in pipe.iter_videos(prompts, num_samples=num_samples, progress=True, **call):
        z = None
        if "latent" in out.formats:  # the same keys and sampler, without the decoder
            z = latents.sample(pipe, prompts, pairs, seed=call["seed"], settings=call["settings"])
        records += out.write(pairs, videos, z=z)
    return records


def write_videos(
    videos: np.ndarray,
    prompts: Sequence[str],
    num_samples: int,
    output_dir: str,
    formats: Sequence[str],
    fps: float,
    record: Mapping[str, Any],
) -> list[dict]:
    """Writes prompt-major uint8 `videos` [P * num_samples, T, H, W, 3] into `output_dir`
    (created if missing) as one run, under its own names (module docstring), and appends one
    samples.jsonl line per file: `record` plus prompt, indices, run number and file.

    Returns:
      The records appended.
    """
    pairs = [divmod(n, num_samples) for n in range(len(videos))]
    return _Run(output_dir, prompts, formats, fps, record).write(pairs, videos)


@dataclasses.dataclass
class _Run:
    """One sample.py run's output: claims its run number in `output_dir` when made, then writes
    batches of videos and appends their samples.jsonl lines (one write per batch)."""

    output_dir: str
    prompts: Sequence[str]
    formats: Sequence[str]
    fps: float
    record: Mapping[str, Any]

    def __post_init__(self):
        os.makedirs(self.output_dir, exist_ok=True)
        self.id, self.prefix = _claim_run(self.output_dir)

    def write(
        self,
        pairs: Sequence[tuple[int, int]],
        videos: np.ndarray,
        extra: Sequence[dict] = (),
        z: np.ndarray | None = None,
    ) -> list[dict]:
        """Writes video n as sample pairs[n] = (prompt index, sample index) in every format;
        `extra[n]` (if given) is added to video n's records; `z[n]` is its latents (for the
        "latent" format)."""
        records = []
        extra = list(extra) or [{}] * len(videos)
        for n, ((p, i), frames, more) in enumerate(zip(pairs, videos, extra, strict=True)):
            for ext in self.formats:
                name = f"{self.prefix}{p:03d}_{i:02d}."
                path = os.path.join(self.output_dir, name + _EXTENSIONS.get(ext, ext))
                record = {"prompt": self.prompts[p], "prompt_idx": p, "sample_idx": i,
                          **self.record, **more, "run": self.id, "file": path}  # fmt: skip
                if ext == "latent":
                    latents.save(path, z[n], record, frames.shape, self.fps)
                elif ext == "png":
                    text = labels.png_text(record)
                    video.contact_sheet(frames[None], [self.prompts[p]], path, png_text=text)
                else:
                    tags = labels.container_tags(record)
                    video.write_video(path, frames, fps=self.fps, metadata=tags)
                records.append(record)
        _append_records(os.path.join(self.output_dir, "samples.jsonl"), records)
        return records


_EXTENSIONS = {"latent": latents.EXTENSION}


def _size(size: Mapping[str, int | None] | None) -> dict[str, int | None]:
    """The requested video size, checked to be positive (the model checks the rest)."""
    size = {k: v for k, v in (size or {}).items() if v is not None}
    unknown = sorted(set(size) - {"num_frames", "height", "width"})
    if unknown:
        raise UserError(f"Unknown video size field(s) {unknown}; valid: num_frames, height, width.")
    for k, v in size.items():
        if int(v) < 1:
            raise UserError(f"--{k} must be >= 1, got {v}.")
    return size


def _check_request(prompts, sampling, num_samples, formats, batch_size, candidates=1) -> None:
    """Everything about the request that can be checked before the model loads."""
    if candidates < 1:
        raise UserError(f"--candidates must be >= 1 (1 = no reranking), got {candidates}.")
    if "latent" in formats and candidates > 1:
        raise UserError(
            "--formats latent re-samples each video without reranking; it cannot be combined "
            f"with --candidates {candidates}. Drop one of them."
        )
    bad = [f for f in formats if f not in FORMATS + OPTIONAL_FORMATS]
    if bad:
        raise UserError(
            f"Unknown output format(s) {bad}; choose from {list(FORMATS + OPTIONAL_FORMATS)}."
        )
    if not formats:
        raise UserError(f"--formats is empty: nothing would be written; choose from {FORMATS}.")
    if num_samples < 1:
        raise UserError(f"--num_samples must be >= 1, got {num_samples}.")
    if batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {batch_size}.")
    settings.check(**sampling)
    if not prompts:
        raise UserError('No prompt given: pass at least one --prompt ("" is unconditional).')
    named = [(f"--prompt #{n + 1}", p) for n, p in enumerate(prompts)]
    named.append(("--negative_prompt", sampling.get("negative_prompt") or ""))
    for name, text in named:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise UserError(
                f"{name} is not valid UTF-8 text: '{shown}' (undecodable bytes shown as \\xNN). "
                "Pass the prompt as UTF-8 (check the terminal's or the script's encoding)."
            ) from None
    for n, p in enumerate(prompts):
        if not p.strip():
            print(f"Note: --prompt #{n + 1} is empty: its videos are sampled unconditionally.")


def _check_size(pipe, num_videos: int, num_samples: int, formats, output_dir: str) -> None:
    """Refuses a request whose .npy files alone would not fit on the output directory's disk.
    (Videos are written batch by batch, so memory holds one batch, whatever the request.)"""
    if "npy" not in formats:
        return
    d = pipe.config.data
    need = num_videos * int(d.num_frames) * int(d.height) * int(d.width) * 3
    existing = output_dir
    while not os.path.exists(existing):
        existing = os.path.dirname(os.path.abspath(existing))
    free = shutil.disk_usage(existing).free
    if need > free:
        raise UserError(
            f"--num_samples {num_samples} x {num_videos // num_samples} prompt(s) = {num_videos:,} "
            f"videos need {need / 2**30:.1f} GiB for their .npy files alone, and {output_dir} has "
            f"{free / 2**30:.1f} GiB free; split the request into several runs (other --seed "
            "values), ask for fewer --num_samples, or leave npy out of --formats."
        )


def _warn_eta(pipe, prompts, num_samples, call) -> None:
    """Times one batch of the request's own first videos (compiling first) and says how long the
    whole request will take. Costs two batches of a request of at least LARGE_REQUEST videos."""
    n = min(num_samples, call["batch_size"])
    pipe([prompts[0]], num_samples=n, **call)  # compiles (the real call reuses the program)
    t = time.perf_counter()
    pipe([prompts[0]], num_samples=n, **call)
    per_video = (time.perf_counter() - t) / n
    total = len(prompts) * num_samples
    print(
        f"Warning: {total:,} videos requested; at {per_video:.2f} s per video on this machine "
        f"that is about {_duration(per_video * total)}. They are written as they are made; "
        "Ctrl-C stops the run and keeps the files written so far.",
        flush=True,
    )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _claim_run(output_dir: str) -> tuple[int, str]:
    """(run number, file-name prefix): the lowest run number no run has claimed in `output_dir`,
    claimed atomically (`.sample-run-K`), so runs into one directory never share file names.
    Run 0 (no prefix) is taken too when the directory already holds files of a run from before
    the claims (a samples.jsonl or `000_00.*`-style names)."""
    names = os.listdir(output_dir)
    start = 1 if "samples.jsonl" in names or any(_FIRST_RUN_FILE.match(n) for n in names) else 0
    k = start
    while True:
        try:
            fd = os.open(os.path.join(output_dir, f".sample-run-{k}"), os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            k += 1
            continue
        os.close(fd)
        return k, "" if k == 0 else f"run{k}_"


def _append_records(path: str, records: list[dict]) -> None:
    """Appends the records to samples.jsonl in one write (O_APPEND), so lines of runs writing at
    the same time never interleave. Non-finite numbers are refused (they are not JSON)."""
    data = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
