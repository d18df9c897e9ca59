"""Sample-quality metrics for moving-digits models: are the generated videos the right digit,
moving the right way, the same digit in every frame, and distributed like real videos?

- digit accuracy: a digit classifier, trained on crops of *real* frames rendered from the train
  split's source digits (never the test digits), labels every generated frame; the video's digit
  is the majority vote, compared with the digit the prompt asked for.
- direction accuracy: the digit's intensity-weighted centre over the first, bounce-free frames,
  fitted with a line, rounded to the nearest of the 8 directions
  (`vdm.data.moving_digits.estimate_direction`), compared with the prompt's direction.
- identity consistency: the share of frames whose predicted digit equals the video's majority.
- Fréchet distance between Gaussian fits of per-video features (mean digit crop, classifier
  scores, velocity, brightness) of generated and real test videos. Our own features, not I3D
  (no downloadable network here), so the number is comparable only within this project.

All of it is numpy + scikit-learn on the host; a random model scores near chance (1/10 digits,
1/8 directions), real test videos near 100% — `tests/test_evaluation.py` checks both.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import numpy as np
from scipy import linalg

from vdm.data import captions
from vdm.data import moving_digits as md

if TYPE_CHECKING:  # annotations only: scoring needs neither jax nor a model
    from vdm.inference.pipeline import Pipeline
    from vdm.inference.settings import SamplingSettings

CROP = 8  # classifier input: the digit box downsampled to sklearn's native 8x8


def _grey(videos: np.ndarray) -> np.ndarray:
    return np.asarray(videos, np.float32).max(axis=-1) / 255.0  # colour-agnostic brightness


def digit_crops(videos: np.ndarray, box: int) -> np.ndarray:
    """The `box`-pixel square around each frame's digit centre, downsampled to 8x8.

    Args:
      videos: uint8 `[N, T, H, W, 3]`.
      box: side of the digit box in pixels (the data set's sprite size).

    Returns:
      float32 `[N, T, 8, 8]` in [0, 1]; frames with no visible digit are all zero.
    """
    grey = _grey(videos)
    n, t, h, w = grey.shape
    centres = md.digit_centres(videos).reshape(n * t, 2)
    centres = np.nan_to_num(centres, nan=-1e4)
    pad = box
    padded = np.pad(grey.reshape(n * t, h, w), ((0, 0), (pad, pad), (pad, pad)))
    # Integer box origins; sub-pixel error is absorbed by the 8x8 downsampling below.
    x0 = np.clip(np.round(centres[:, 0] - box / 2).astype(np.int64) + pad, 0, w + pad)
    y0 = np.clip(np.round(centres[:, 1] - box / 2).astype(np.int64) + pad, 0, h + pad)
    ar = np.arange(box)
    rows = (y0[:, None] + ar[None, :])[:, :, None]
    cols = (x0[:, None] + ar[None, :])[:, None, :]
    crops = padded[np.arange(n * t)[:, None, None], rows, cols]  # [N*T, box, box]
    # Area-average to 8x8 (box is a multiple of 8 for the data set's sizes; otherwise resample).
    if box % CROP == 0:
        k = box // CROP
        small = crops.reshape(n * t, CROP, k, CROP, k).mean(axis=(2, 4))
    else:
        idx = (np.arange(CROP) * box / CROP).astype(np.int64)
        small = crops[:, idx][:, :, idx]
    return small.reshape(n, t, CROP, CROP).astype(np.float32)


@dataclasses.dataclass
class DigitClassifier:
    """Logistic regression on 8x8 digit crops, trained on real frames of the train split."""

    model: object
    box: int

    def scores(self, videos: np.ndarray) -> np.ndarray:
        """Class log-probabilities per frame, `[N, T, 10]`."""
        crops = digit_crops(videos, self.box)
        n, t = crops.shape[:2]
        return self.model.predict_log_proba(crops.reshape(n * t, -1)).reshape(n, t, 10)

    def predict(self, videos: np.ndarray) -> np.ndarray:
        """Predicted digit per frame, int `[N, T]`."""
        return self.scores(videos).argmax(-1)


@functools.lru_cache(maxsize=4)
def train_classifier(
    num_frames: int, height: int, width: int, digit_size: int, seed: int, num_videos: int = 1500
) -> DigitClassifier:
    """Fits the classifier on crops of rendered train-split videos (train source digits only)."""
    from sklearn.linear_model import LogisticRegression

    cfg = md.MovingDigitsConfig(
        name="eval_classifier",
        num_frames=num_frames,
        height=height,
        width=width,
        num_train=num_videos,
        num_test=1,
        digit_size=digit_size,
        seed=seed,
    )
    labels = md.sample_labels(cfg, "train")
    videos = md.render(cfg, labels["source_index"], labels["top_left"])
    crops = digit_crops(videos, cfg.sprite_size())
    x = crops.reshape(-1, CROP * CROP)
    y = np.repeat(labels["digit"], num_frames)
    model = LogisticRegression(C=1.0, max_iter=2000)
    model.fit(x, y)
    return DigitClassifier(model=model, box=cfg.sprite_size())


def classifier_for(data_config) -> DigitClassifier:
    """The classifier matching a config's frame shape and digit size."""
    d, m = data_config, data_config.moving_digits
    return train_classifier(d.num_frames, d.height, d.width, m.digit_size, m.generator_seed)


def video_features(videos: np.ndarray, clf: DigitClassifier) -> np.ndarray:
    """Per-video features for the Fréchet distance: `[N, 64 + 10 + 3]`."""
    crops = digit_crops(videos, clf.box)  # [N, T, 8, 8]
    n, t = crops.shape[:2]
    scores = clf.scores(videos)  # [N, T, 10]
    centres = np.nan_to_num(md.digit_centres(videos), nan=0.0)  # [N, T, 2]
    half = (t - 1) // 2 + 1
    velocity = (centres[:, half - 1] - centres[:, 0]) / max(half - 1, 1)
    brightness = _grey(videos).mean(axis=(1, 2, 3))[:, None]
    return np.concatenate(
        [crops.mean(1).reshape(n, -1), np.exp(scores).mean(1), velocity, brightness], axis=1
    )


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature rows of `a` and `b` (as in FID)."""
    if min(len(a), len(b)) < 2:
        raise ValueError(
            f"The Fréchet distance needs at least 2 feature rows on each side (a covariance), got "
            f"{len(a)} and {len(b)}; score more videos."
        )
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # near-singular: regularise as the FID reference does
        eps = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2.0 * covmean))


def score_videos(
    videos: np.ndarray,
    digits: np.ndarray,
    directions: np.ndarray,
    clf: DigitClassifier,
    reference: np.ndarray | None = None,
) -> dict[str, float]:
    """Digit accuracy, direction accuracy, identity consistency (and FD against `reference`).

    Args:
      videos: uint8 `[N, T, H, W, 3]`, generated (or real, for the ceiling).
      digits, directions: int `[N]`, what each video's prompt asked for.
      clf: the digit classifier.
      reference: real videos for the Fréchet distance (optional).

    Returns:
      {"digit_acc", "direction_acc", "consistency", ("frechet")} as floats in [0, 1] (FD >= 0).
    """
    frames = clf.predict(videos)  # [N, T]
    majority = np.array([np.bincount(f, minlength=10).argmax() for f in frames])
    consistency = (frames == majority[:, None]).mean()
    est = md.estimate_direction(videos)
    out = {
        "digit_acc": float((majority == np.asarray(digits)).mean()),
        "direction_acc": float((est == np.asarray(directions)).mean()),
        "consistency": float(consistency),
    }
    if reference is not None:
        out["frechet"] = frechet_distance(
            video_features(videos, clf), video_features(reference, clf)
        )
    return out


def test_examples(data_config, num: int) -> dict[str, np.ndarray]:
    """The first `num` moving-digits test videos with their labels and three caption sets:
    `caption` (training templates and words), `caption_heldout` (unseen sentence frames) and
    `caption_vocab` (unseen words and frames, `captions.heldout_vocabulary_captions`).

    Rendered directly from the generator (bit-identical to the prepared tfds split), so evaluation
    needs no prepared data set.
    """
    m = data_config.moving_digits
    cfg = md.MovingDigitsConfig(
        num_frames=data_config.num_frames,
        height=data_config.height,
        width=data_config.width,
        num_train=m.num_train,
        num_test=m.num_test,
        colour=m.colour,
        speeds=tuple(m.speeds),
        digit_size=m.digit_size,
        seed=m.generator_seed,
    )
    labels = md.sample_labels(cfg, "test")
    num = min(num, len(labels["digit"]))
    colour = labels["colour"][:num] if m.colour else None
    videos = md.render(cfg, labels["source_index"][:num], labels["top_left"][:num], colour)
    return {
        "video": videos,
        "digit": labels["digit"][:num],
        "direction": labels["direction"][:num],
        "caption": np.asarray(labels["caption"][:num]),
        "caption_heldout": np.asarray(labels["caption_heldout"][:num]),
        "caption_vocab": np.asarray(
            captions.heldout_vocabulary_captions(
                labels["digit"][:num],
                labels["direction"][:num],
                None if colour is None else list(colour),
            )
        ),
    }


def evaluate_pipeline(
    pipe: Pipeline,
    num_videos: int,
    *,
    settings: SamplingSettings | None = None,
    seed: int = 0,
    captions: str = "caption",
    generate=None,
) -> tuple[dict[str, float], np.ndarray, list[str]]:
    """Generates one video per test prompt and scores it against the prompt's labels.

    Args:
      pipe: a `vdm.inference.pipeline.Pipeline` on a moving-digits config.
      num_videos: how many test prompts (one video each).
      settings: sampling settings (default: the model's, `pipe.settings`).
      seed: sampling seed.
      captions: "caption" (training templates), "caption_heldout" (sentence frames never trained
        on) or "caption_vocab" (words and frames never trained on).
      generate: `generate(prompts, seed=, settings=) -> uint8 videos` instead of `pipe(...)`
        (e.g. best-of-N, `vdm.inference.rerank`).

    Returns:
      (metrics, generated uint8 videos, prompts).
    """
    ex = test_examples(pipe.config.data, num_videos)
    prompts = [str(c) for c in ex[captions]]
    generate = generate or functools.partial(pipe, progress=True)
    videos = generate(prompts, seed=seed, settings=settings)
    clf = classifier_for(pipe.config.data)
    metrics = score_videos(videos, ex["digit"], ex["direction"], clf, reference=ex["video"])
    return metrics, videos, prompts
