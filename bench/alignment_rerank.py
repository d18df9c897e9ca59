"""What best-of-N reranking and alignment guidance do to direction accuracy, and what they cost.

  python bench/alignment_rerank.py [--num_videos 100] [--captions caption_vocab] \
      [--max_candidates 8] [--guidance_scales 0.1,0.3] [--output bench_rerank.json]

The bundled model with its own sampling defaults on the first `num_videos` test prompts of one
caption set (`--captions`: caption = training templates, caption_heldout = unseen sentence frames,
caption_vocab = held-out vocabulary, the default). Draws `max_candidates` candidates per prompt ONCE
(candidate c = `vdm.inference.rerank.candidate_index(0, c, 1)` = sample index c, exactly what
`eval.py --candidates N` / `sample.py --candidates N` draw), scores each at batch 1, and reports
best-of-N for N = 1, 2, 4, ... from the nested candidate sets: the same videos those commands
keep. Also "any of N": the share of prompts where at least one of the first N candidates moves
the right way (the ceiling of any reranker). Then one row per alignment-guidance scale (N = 1).

Cost per video = N x (sampling + scoring one candidate), measured here (wall-clock: on a shared
machine it mostly measures the contention; `--output` records the load averages at start and end).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from vdm.data import moving_digits as md
from vdm.eval import digits
from vdm.inference import alignment, guidance, pipeline, rerank


def _row(name, videos, ex, prompts, aligner, clf, seconds_per_video, extra=None) -> dict:
    m = digits.score_videos(videos, ex["digit"], ex["direction"], clf)
    m["alignment"] = float(aligner.score_videos(videos, prompts).mean())
    row = {"setting": name, **m, "seconds_per_video": seconds_per_video, **(extra or {})}
    print(json.dumps(row), flush=True)
    return row


def best_of_n_rows(pipe, aligner, ex, prompts, max_n: int, seed: int) -> list[dict]:
    """best-of-N rows from one draw of `max_n` candidates per prompt."""
    clf = digits.classifier_for(pipe.config.data)
    p = len(prompts)
    pipe(prompts[:1], seed=seed)  # compile outside the timing
    t0 = time.perf_counter()
    cands = pipe(prompts, seed=seed, num_samples=max_n, progress=True)  # [P * N], prompt-major
    t_sample = (time.perf_counter() - t0) / len(cands)
    t0 = time.perf_counter()
    scores = aligner.score_videos(cands, [q for q in prompts for _ in range(max_n)], batch_size=1)
    t_score = (time.perf_counter() - t0) / len(cands)
    scores = scores.reshape(p, max_n)
    cands = cands.reshape(p, max_n, *cands.shape[1:])
    right = md.estimate_direction(cands.reshape(-1, *cands.shape[2:])).reshape(p, max_n)
    right = right == np.asarray(ex["direction"])[:, None]
    rows, n = [], 1
    while n <= max_n:
        kept = cands[np.arange(p), rerank.choose(scores, n)]
        extra = {"candidates": n, "any_of_n_direction": float(right[:, :n].any(1).mean()),
                 "seconds_sample": t_sample, "seconds_score": t_score}  # fmt: skip
        cost = n * (t_sample + (t_score if n > 1 else 0.0))
        rows.append(_row(f"best-of-{n}", kept, ex, prompts, aligner, clf, cost, extra))
        n *= 2
    return rows


def guidance_rows(pipe, aligner, ex, prompts, scales, seed: int) -> list[dict]:
    clf = digits.classifier_for(pipe.config.data)
    rows = []
    for scale in scales:
        guided = guidance.guided(pipe, aligner, scale)
        guided(prompts[:1], seed=seed)  # compile outside the timing
        t0 = time.perf_counter()
        videos = guided(prompts, seed=seed, progress=True)
        cost = (time.perf_counter() - t0) / len(videos)
        extra = {"alignment_guidance": scale}
        rows.append(_row(f"guidance {scale:g}", videos, ex, prompts, aligner, clf, cost, extra))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--num_videos", type=int, default=100)
    sets = ("caption", "caption_heldout", "caption_vocab")
    parser.add_argument("--captions", default="caption_vocab", choices=sets)
    parser.add_argument("--max_candidates", type=int, default=8)
    parser.add_argument("--guidance_scales", default="0.1,0.3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    load_start = os.getloadavg()
    pipe = pipeline.load_pipeline(args.checkpoint)
    aligner = alignment.load_aligner(pipe)
    ex = digits.test_examples(pipe.config.data, args.num_videos)
    prompts = [str(c) for c in ex[args.captions]]
    rows = best_of_n_rows(pipe, aligner, ex, prompts, args.max_candidates, args.seed)
    scales = [float(s) for s in args.guidance_scales.split(",") if s]
    rows += guidance_rows(pipe, aligner, ex, prompts, scales, args.seed)
    print(
        "| setting | digit | direction | consistency | alignment | any-of-N direction | s/video |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        any_n = r.get("any_of_n_direction", float("nan"))
        print(f"| {r['setting']} | {r['digit_acc']:.3f} | {r['direction_acc']:.3f} | "
              f"{r['consistency']:.3f} | {r['alignment']:.3f} | {any_n:.3f} | "
              f"{r['seconds_per_video']:.2f} |")  # fmt: skip
    if args.output:
        with open(args.output, "w") as f:
            load = {"start": load_start, "end": os.getloadavg()}  # 1/5/15-min, with the seconds
            json.dump({"args": vars(args), "loadavg": load, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
