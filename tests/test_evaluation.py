"""The sample-quality metrics can both pass and fail: real videos score high, noise scores low."""

import numpy as np
import pytest

from vdm.data import moving_digits as md
from vdm.eval import digits


@pytest.fixture(scope="module")
def clf():
    return digits.train_classifier(17, 32, 32, 16, 1234, num_videos=300)


@pytest.fixture(scope="module")
def real():
    cfg = md.MovingDigitsConfig(num_train=8, num_test=200, seed=1234)
    labels = md.sample_labels(cfg, "test")
    return md.render(cfg, labels["source_index"], labels["top_left"]), labels


def test_real_test_videos_score_high(clf, real):
    videos, labels = real
    half = len(videos) // 2
    m = digits.score_videos(
        videos[:half],
        labels["digit"][:half],
        labels["direction"][:half],
        clf,
        reference=videos[half:],
    )
    assert m["digit_acc"] >= 0.9, m
    assert m["direction_acc"] >= 0.97, m
    assert m["consistency"] >= 0.9, m
    assert m["frechet"] < 5.0, m


def test_noise_and_shuffled_labels_score_low(clf, real):
    videos, labels = real
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, videos.shape, dtype=np.uint8)
    m = digits.score_videos(noise, labels["digit"], labels["direction"], clf, reference=videos)
    assert m["digit_acc"] < 0.3 and m["direction_acc"] < 0.3, m
    # Real videos but the wrong prompts: the metric must notice.
    perm = rng.permutation(len(videos))
    m2 = digits.score_videos(videos, labels["digit"][perm], labels["direction"][perm], clf)
    assert m2["digit_acc"] < 0.3 and m2["direction_acc"] < 0.3, m2
    # Frechet distance to noise is far larger than between two halves of real data.
    half = len(videos) // 2
    real_fd = digits.frechet_distance(
        digits.video_features(videos[:half], clf), digits.video_features(videos[half:], clf)
    )
    assert m["frechet"] > 10 * real_fd, (m["frechet"], real_fd)
