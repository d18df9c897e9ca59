"""Best-of-N: draw N candidate videos per requested sample and keep the best-aligned one.

Candidate c of sample i of prompt p is the video the plain pipeline makes as sample
`c * num_samples + i` of prompt p (`candidate_index`), so every candidate has its own
per-example key from the seed, candidate 0 is the video sample.py makes without reranking, and
the candidates of N are the first N of any larger N (best-of-8 never scores below best-of-4 on
the alignment score). Each candidate is scored at batch 1 (`Aligner.score_videos(batch_size=1)`),
so the choice depends only on (seed, p, i, N, prompt, settings): not on the batch size, the other
prompts or the device count. Ties go to the lowest candidate index.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np


def candidate_index(sample: int, candidate: int, num_samples: int) -> int:
    """The pipeline sample index of candidate `candidate` of requested sample `sample`."""
    return candidate * num_samples + sample


def choose(scores: np.ndarray, n: int | None = None) -> np.ndarray:
    """The chosen candidate of each row of `scores [B, N]` among its first `n` (default all)."""
    scores = np.asarray(scores)
    return scores[:, : n or scores.shape[1]].argmax(axis=1)


@dataclasses.dataclass
class Chosen:
    """The kept videos of one prompt: uint8 `videos [S, ...]`, `scores [S, N]` of every
    candidate, and the index `chosen [S]` of the kept one."""

    prompt_idx: int
    videos: np.ndarray
    scores: np.ndarray
    chosen: np.ndarray

    def records(self) -> list[dict]:
        """Per kept video: what samples.jsonl records about the choice."""
        return [
            {
                "candidates": int(self.scores.shape[1]),
                "candidate": int(c),
                "alignment_score": float(s[c]),
                "candidate_scores": [round(float(x), 6) for x in s],
            }
            for s, c in zip(self.scores, self.chosen, strict=True)
        ]


def iter_best_of_n(
    pipe, aligner, prompts: Sequence[str], *, candidates: int, num_samples: int = 1, **call
) -> Iterator[Chosen]:
    """Yields each prompt's kept videos in order (memory holds one prompt's candidates).

    Args:
      pipe: the `vdm.inference.pipeline.Pipeline`.
      aligner: a `vdm.inference.alignment.Aligner` for it.
      prompts: the prompts.
      candidates: N >= 1 (1 keeps the plain samples, scored).
      num_samples: kept videos per prompt.
      **call: `pipe.iter_videos` arguments (seed, settings, batch_size, progress).
    """
    per_prompt = candidates * num_samples
    pending: list[np.ndarray] = []
    for pairs, videos in pipe.iter_videos(prompts, num_samples=per_prompt, **call):
        for (p, _), v in zip(pairs, videos, strict=True):
            pending.append(v)
            if len(pending) == per_prompt:
                yield _choose(aligner, p, prompts[p], np.stack(pending), candidates, num_samples)
                pending = []


def _choose(aligner, p: int, prompt: str, videos: np.ndarray, n: int, s: int) -> Chosen:
    """Scores one prompt's candidates (pipeline sample order j = c * s + i) and keeps the best."""
    scores = aligner.score_videos(videos, [prompt] * len(videos), batch_size=1)
    scores = scores.reshape(n, s).T  # [S, N]
    chosen = choose(scores)
    kept = videos.reshape(n, s, *videos.shape[1:])[chosen, np.arange(s)]
    return Chosen(prompt_idx=p, videos=kept, scores=scores, chosen=chosen)


def best_of_n(pipe, aligner, prompts: Sequence[str], **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """`iter_best_of_n` gathered: (kept videos [P * S, ...] prompt-major, scores [P * S, N])."""
    chosen = list(iter_best_of_n(pipe, aligner, prompts, **kwargs))
    return np.concatenate([c.videos for c in chosen]), np.concatenate([c.scores for c in chosen])
