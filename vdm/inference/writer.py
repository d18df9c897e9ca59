"""The `sample.py` command: prompts -> video files + samples.jsonl."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

from vdm.errors import UserError

FORMATS = ("mp4", "gif", "npy", "png")


def run(
    prompts: Sequence[str],
    *,
    checkpoint: str | None = None,
    seed: int = 0,
    num_samples: int = 1,
    num_steps: int | None = None,
    sampler: str | None = None,
    guidance: float | None = None,
    eta: float | None = None,
    negative_prompt: str | None = None,
    shift: float | None = None,
    output_dir: str = "out",
    formats: Sequence[str] = FORMATS,
    batch_size: int = 8,
) -> list[dict]:
    """Generates and writes videos; returns the records written to samples.jsonl.

    Files are `{output_dir}/{prompt_idx:03d}_{sample_idx:02d}.{ext}`; `npy` holds uint8
    [T, H, W, 3]; `png` is a contact sheet of the frames.
    """
    from vdm.inference import pipeline
    from vdm.io import video as video_io

    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise UserError(f"Unknown output format(s) {bad}; choose from {list(FORMATS)}.")
    if num_samples < 1:
        raise UserError(f"--num_samples must be >= 1, got {num_samples}.")
    if num_steps is not None and num_steps < 1:
        raise UserError(f"--num_steps must be >= 1, got {num_steps}.")
    t0 = time.perf_counter()
    print(f"Loading model from {checkpoint or pipeline.DEFAULT_MODEL} ...", flush=True)
    pipe = pipeline.load_pipeline(checkpoint)
    s = pipe.config.sample
    settings = {
        "sampler": sampler or s.sampler,
        "num_steps": int(num_steps or s.num_steps),
        "guidance": float(s.guidance if guidance is None else guidance),
        "eta": float(s.eta if eta is None else eta),
        "negative_prompt": s.negative_prompt if negative_prompt is None else negative_prompt,
    }
    try:
        settings["shift"] = pipe.sampling_spec(shift).shift
    except ValueError as e:
        raise UserError(str(e)) from None
    videos = pipe(
        list(prompts),
        seed=seed,
        num_samples=num_samples,
        batch_size=batch_size,
        progress=True,
        **settings,
    )
    os.makedirs(output_dir, exist_ok=True)
    fps = pipe.config.data.fps
    records = []
    for n, video in enumerate(videos):
        p, i = divmod(n, num_samples)
        for ext in formats:
            path = os.path.join(output_dir, f"{p:03d}_{i:02d}.{ext}")
            if ext == "png":
                video_io.contact_sheet(video[None], captions=[prompts[p]], path=path)
            else:
                video_io.write_video(path, video, fps=fps)
            records.append(
                {
                    "prompt": prompts[p],
                    "prompt_idx": p,
                    "sample_idx": i,
                    "seed": seed,
                    **settings,
                    "file": path,
                }
            )
    with open(os.path.join(output_dir, "samples.jsonl"), "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    print(f"Wrote {len(videos)} video(s) to {output_dir}/ in {time.perf_counter() - t0:.1f} s.")
    return records
