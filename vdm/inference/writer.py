"""The `sample.py` command: prompts -> video files + samples.jsonl."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from vdm.errors import UserError
from vdm.inference import pipeline, settings
from vdm.io import video

FORMATS = ("mp4", "gif", "npy", "png")


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
) -> list[dict]:
    """Generates and writes videos; returns the records written to samples.jsonl.

    Files are `{output_dir}/{prompt_idx:03d}_{sample_idx:02d}.{ext}`; `npy` holds uint8
    [T, H, W, 3]; `png` is a contact sheet of the frames.

    Args:
      sampling: `SamplingSettings` fields to set instead of the model's defaults (None values
        keep the default), e.g. {"num_steps": 10, "guidance": None}.
    """
    sampling = dict(sampling or {})
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise UserError(f"Unknown output format(s) {bad}; choose from {list(FORMATS)}.")
    if not formats:
        raise UserError(f"--formats is empty: nothing would be written; choose from {FORMATS}.")
    if num_samples < 1:
        raise UserError(f"--num_samples must be >= 1, got {num_samples}.")
    if batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {batch_size}.")
    settings.check(**sampling)  # before loading the model
    _check_output_dir(output_dir)
    t0 = time.perf_counter()
    print(f"Loading model from {checkpoint or pipeline.DEFAULT_MODEL} ...", flush=True)
    pipe = pipeline.load_pipeline(checkpoint)
    chosen = pipe.settings.override(**sampling)
    # What each record states: the settings with the shift the sampler used (unset = training's).
    record = {**dataclasses.asdict(chosen), "shift": pipe.sampling_spec(chosen.shift).shift}
    videos = pipe(
        list(prompts),
        seed=seed,
        num_samples=num_samples,
        settings=chosen,
        batch_size=batch_size,
        progress=True,
    )
    files = _write(videos, prompts, num_samples, output_dir, formats, pipe.config.data.fps)
    records = [
        {"prompt": prompts[p], "prompt_idx": p, "sample_idx": i, "seed": seed, **record, "file": f}
        for p, i, f in files
    ]
    with open(os.path.join(output_dir, "samples.jsonl"), "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    print(f"Wrote {len(videos)} video(s) to {output_dir}/ in {time.perf_counter() - t0:.1f} s.")
    return records


def _check_output_dir(output_dir: str) -> None:
    """Creates `output_dir` before any sampling, so a path that cannot hold the videos fails at
    once instead of after the work."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"--output_dir '{output_dir}' is a file; pass a directory.")
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"--output_dir '{output_dir}' cannot be created ({e.strerror or e}); pass a directory "
            "that can be written."
        ) from None
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise UserError(f"--output_dir '{output_dir}' is not writable; pass another directory.")


def _write(videos, prompts, num_samples, output_dir, formats, fps) -> list[tuple[int, int, str]]:
    """Writes each video in each format (into the directory `_check_output_dir` made):
    [(prompt index, sample index, file)]."""
    records = []
    for n, frames in enumerate(videos):
        p, i = divmod(n, num_samples)
        for ext in formats:
            path = os.path.join(output_dir, f"{p:03d}_{i:02d}.{ext}")
            if ext == "png":
                video.contact_sheet(frames[None], captions=[prompts[p]], path=path)
            else:
                video.write_video(path, frames, fps=fps)
            records.append((p, i, path))
    return records
