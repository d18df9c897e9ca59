"""Retrieval accuracy of the alignment model on moving-digits test pairs.

Moving-digits captions describe a class (digit x direction; 80 of them), not one clip, so many
test pairs share a description and "the exact paired clip" is not a meaningful target. A
retrieval counts as correct when the retrieved item has the query's labels:

- text -> video: for each caption, the top-1 of the N test videos by score; correct when its
  digit and direction are the caption's (also reported for the digit and the direction alone);
- video -> text: for each video, the top-1 of the N captions, the same way.

Chance with uniform labels: 0.1 digit, 0.125 direction, 0.0125 both. Caption sets are
`vdm.eval.digits.test_examples`'s: training wording, unseen sentence frames, unseen vocabulary.
"""

from __future__ import annotations

import numpy as np

from vdm.eval import digits

CAPTION_SETS = ("caption", "caption_heldout", "caption_vocab")


def retrieval(
    video_emb: np.ndarray, text_emb: np.ndarray, digit: np.ndarray, direction: np.ndarray
) -> dict[str, float]:
    """Top-1 label-matched retrieval both ways (module docstring).

    Args:
      video_emb, text_emb: unit embeddings `[N, E]`; row i of each is pair i.
      digit, direction: int `[N]` labels of pair i.

    Returns:
      {"t2v", "t2v_digit", "t2v_direction", "v2t", "v2t_digit", "v2t_direction"} in [0, 1].
    """
    sim = np.asarray(text_emb, np.float32) @ np.asarray(video_emb, np.float32).T  # [text, video]
    digit, direction = np.asarray(digit), np.asarray(direction)
    out = {}
    for name, best in (("t2v", sim.argmax(1)), ("v2t", sim.argmax(0))):
        d_ok = digit[best] == digit
        r_ok = direction[best] == direction
        out[name] = float((d_ok & r_ok).mean())
        out[f"{name}_digit"] = float(d_ok.mean())
        out[f"{name}_direction"] = float(r_ok.mean())
    return out


def evaluate(aligner, data_config, num_pairs: int) -> dict[str, dict[str, float]]:
    """Retrieval on the first `num_pairs` test videos for each caption set, plus the mean score
    of matching pairs and of mismatched ones (shuffled captions).

    Args:
      aligner: a `vdm.inference.alignment.Aligner`.
      data_config: the moving-digits `config.data`.
      num_pairs: test pairs (>= 2).

    Returns:
      {caption set: {retrieval figures, "score_pos", "score_neg"}}.
    """
    ex = digits.test_examples(data_config, num_pairs)
    video_emb = aligner.embed_videos(ex["video"])
    perm = np.random.default_rng(0).permutation(len(video_emb))
    out = {}
    for name in CAPTION_SETS:
        text_emb = aligner.embed_prompts([str(c) for c in ex[name]])
        row = retrieval(video_emb, text_emb, ex["digit"], ex["direction"])
        row["score_pos"] = float((video_emb * text_emb).sum(-1).mean())
        row["score_neg"] = float((video_emb * text_emb[perm]).sum(-1).mean())
        out[name] = row
    return out


def format_table(results: dict[str, dict[str, float]], num_pairs: int) -> str:
    """Markdown table of `evaluate`'s results."""
    lines = [
        f"Retrieval on {num_pairs} test pairs (top-1, label-matched; chance 0.1 / 0.125 / 0.0125)",
        "| captions | t2v digit | t2v direction | t2v both | v2t digit | v2t direction | v2t both "
        "| score match / shuffled |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['t2v_digit']:.3f} | {r['t2v_direction']:.3f} | {r['t2v']:.3f} | "
            f"{r['v2t_digit']:.3f} | {r['v2t_direction']:.3f} | {r['v2t']:.3f} | "
            f"{r['score_pos']:.3f} / {r['score_neg']:.3f} |"
        )
    return "\n".join(lines)
