"""Moving-digit videos in pure numpy: labels and trajectories, rendering, and the direction of
motion read back from pixels. `vdm.data.moving_digits` stores them as a tfds data set.

Each video shows one real handwritten digit (`sklearn.datasets.load_digits`, 8x8 with 16 grey
levels, upscaled smoothly with PIL bicubic) moving light-on-dark in one of 8 directions at one of a
few speeds, bouncing off the walls, optionally coloured.

Motion and the meaning of "direction":
  * the digit's box moves `speed * (size / 32)` pixels per frame (so the look is the same at 64x64),
    diagonals at the same speed along the diagonal; positions are sub-pixel (bilinear rendering),
    so motion is smooth at fractional speeds;
  * `direction` is the INITIAL direction. Start positions are drawn so that the digit travels
    without bouncing for at least the first `(num_frames - 1) // 2` steps (8 steps = 9 frames of
    the default 17; >= 8 px at speed 1 on 32x32) — when the speed is too high for any start
    position to allow that, the digit starts against the wall behind it (longest possible run).
    Bounces may happen later in the clip; `first_bounce` stores the first frame whose position was
    reflected (`num_frames` if none), and `trajectory` the box centre of every frame, so evaluation
    can estimate the direction from the first, bounce-free frames (`estimate_direction`). With
    the default speeds (1-2 px/frame) and a 16 px digit on 32x32 the free range is 16 px, so most
    clips bounce once in their second half (a clip without any bounce would need speed <= 1).

The functions take the data set's shape as `cfg`, a `vdm.data.moving_digits.MovingDigitsConfig`
(num_frames, height, width, num_train / num_test, colour, speeds, seed, `sprite_size()`,
`num_examples(split)`). Everything is deterministic from `cfg.seed` (numpy Generators seeded with
`[seed, split, stream]`) and vectorized over videos.
"""

from __future__ import annotations

import functools

import numpy as np

from vdm.data import captions as cap

SPLITS = ("train", "test")
_SPLIT_CODE = {"train": 0, "test": 1}
_TEST_FRACTION = 0.2  # share of each digit class's sklearn images reserved for the test split

# Unit velocity of each direction in image coordinates (x right, y DOWN); DIRECTIONS is in angle
# order with y up on screen, hence the minus sign.
_ANGLES = np.arange(8) * (np.pi / 4)
DIRECTION_VECTORS = np.stack([np.cos(_ANGLES), -np.sin(_ANGLES)], axis=1)
DIRECTIONS = cap.DIRECTIONS


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # slow to import; only generation needs it

    d = load_digits()  # bundled with scikit-learn: no download
    return d.images.astype(np.float32), d.target.astype(np.int64)


@functools.lru_cache(maxsize=4)
def _sprites(size: int) -> np.ndarray:
    """All 1797 digits upscaled to float32 `[N, size, size]` in [0, 1] (bicubic, clipped)."""
    from PIL import Image

    images, _ = _load_digits()
    out = np.empty((len(images), size, size), np.float32)
    for i, im in enumerate(images):
        pil = Image.fromarray(im / 16.0, mode="F")
        out[i] = np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC))
    return np.clip(out, 0.0, 1.0)


def source_pools(seed: int) -> dict[str, list[np.ndarray]]:
    """Disjoint sklearn image indices per split and digit class: {split: [indices of digit d]}."""
    _, targets = _load_digits()
    rng = np.random.default_rng([seed, 99])
    pools = {"train": [], "test": []}
    for d in range(10):
        idx = rng.permutation(np.flatnonzero(targets == d))
        n_test = int(round(_TEST_FRACTION * len(idx)))
        pools["test"].append(np.sort(idx[:n_test]))
        pools["train"].append(np.sort(idx[n_test:]))
    return pools


def _reflect(x: np.ndarray, limit: np.ndarray) -> np.ndarray:
    """Folds positions into [0, limit] as a ball bouncing between walls would move."""
    period = 2.0 * limit
    return limit - np.abs(limit - np.mod(x, period))


def _trajectories(cfg, direction: np.ndarray, speed: np.ndarray, u: np.ndarray):
    """(top_left float64 [N, T, 2], first_bounce int [N]) of digits starting in `direction` at
    `speed`, their start drawn from `u` (uniform [N, 2]) within the bounce-free range."""
    size = cfg.sprite_size()
    free = np.array([cfg.width - size, cfg.height - size], np.float64)  # top-left range (x, y)
    scale = np.array([cfg.width / 32.0, cfg.height / 32.0])
    velocity = DIRECTION_VECTORS[direction] * speed[:, None] * scale  # px / frame, [N, 2]
    # Start so that the first `clear` steps do not touch a wall (module docstring).
    clear = (cfg.num_frames - 1) // 2
    lo = np.where(velocity < 0, -velocity * clear, 0.0)
    hi = np.where(velocity > 0, free - velocity * clear, free)
    fits = hi >= lo
    fallback = np.where(velocity > 0, 0.0, free)  # too fast to fit: start at the wall behind
    start = np.where(fits, lo + u * (hi - lo), fallback)
    steps = np.arange(cfg.num_frames, dtype=np.float64)
    raw = start[:, None, :] + velocity[:, None, :] * steps[None, :, None]  # [N, T, 2]
    top_left = _reflect(raw, free)
    outside = ((raw < -1e-6) | (raw > free + 1e-6)).any(axis=-1)  # [N, T]
    first_bounce = np.where(outside.any(axis=1), outside.argmax(axis=1), cfg.num_frames)
    return top_left, first_bounce


def _captions(cfg, split: str, digit, direction, colours) -> dict:
    """caption / template (TRAIN_TEMPLATES) and caption_heldout / template_heldout
    (HELDOUT_TEMPLATES in test; "" / -1 in train), each from its own generator."""
    caption, template = cap.sample_captions(
        np.random.default_rng([cfg.seed, _SPLIT_CODE[split], 1]),
        digit,
        direction,
        cap.TRAIN_TEMPLATES,
        colours,
    )
    if split == "test":
        caption_heldout, template_heldout = cap.sample_captions(
            np.random.default_rng([cfg.seed, _SPLIT_CODE[split], 2]),
            digit,
            direction,
            cap.HELDOUT_TEMPLATES,
            colours,
        )
    else:
        n = len(digit)
        caption_heldout, template_heldout = [""] * n, np.full(n, -1)
    return {
        "caption": caption,
        "template": template.astype(np.int32),
        "caption_heldout": caption_heldout,
        "template_heldout": template_heldout.astype(np.int32),
    }


def sample_labels(cfg, split: str) -> dict[str, np.ndarray | list]:
    """Draws every per-video label of a split (small arrays; videos are rendered separately).

    Args:
      cfg: the data set config (a `MovingDigitsConfig`).
      split: "train" or "test".

    Returns:
      Dict of arrays over the split's N videos: digit, source_index, direction, speed, colour,
      top_left [N, T, 2] (x, y of the digit box), trajectory [N, T, 2] (box centre), first_bounce,
      caption / template (and caption_heldout / template_heldout, "" / -1 in train).
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown moving-digits split '{split}'; valid: {SPLITS}.")
    n = cfg.num_examples(split)
    rng = np.random.default_rng([cfg.seed, _SPLIT_CODE[split], 0])
    pool = source_pools(cfg.seed)[split]
    digit = rng.integers(0, 10, n)
    lens = np.array([len(p) for p in pool])
    offsets = np.concatenate([[0], np.cumsum(lens)[:-1]])
    flat = np.concatenate(pool)
    pick = np.minimum((rng.random(n) * lens[digit]).astype(np.int64), lens[digit] - 1)
    source_index = flat[offsets[digit] + pick]
    direction = rng.integers(0, 8, n)
    speed = np.asarray(cfg.speeds, np.float32)[rng.integers(0, len(cfg.speeds), n)]
    colour_idx = rng.integers(0, len(cap.COLOUR_NAMES), n)
    u = rng.random((n, 2))
    top_left, first_bounce = _trajectories(cfg, direction, speed, u)
    colours = [cap.COLOUR_NAMES[c] for c in colour_idx] if cfg.colour else None
    return {
        "digit": digit.astype(np.int32),
        "source_index": source_index.astype(np.int32),
        "direction": direction.astype(np.int32),
        "speed": speed,
        "colour": np.asarray(colours if cfg.colour else ["white"] * n),
        "top_left": top_left.astype(np.float32),
        "trajectory": (top_left + cfg.sprite_size() / 2.0).astype(np.float32),
        "first_bounce": first_bounce.astype(np.int32),
        **_captions(cfg, split, digit, direction, colours),
    }


def render(
    cfg,
    source_index: np.ndarray,
    top_left: np.ndarray,
    colour: np.ndarray | None = None,
) -> np.ndarray:
    """Renders videos of digits at sub-pixel positions (vectorized over videos and frames).

    Args:
      cfg: the data set config (frame size, digit size).
      source_index: int [n] sklearn image per video.
      top_left: float [n, T, 2] (x, y) of the digit box per frame, within [0, W - S] x [0, H - S].
      colour: [n] colour names, or None for white.

    Returns:
      uint8 `[n, T, H, W, 3]`.
    """
    size = cfg.sprite_size()
    sprite = _sprites(size)[source_index]  # [n, S, S]
    n, t_len = top_left.shape[:2]
    ix = np.floor(top_left).astype(np.int64)
    fx = (top_left - ix).astype(np.float32)  # fractional offsets [n, T, 2]
    # The bilinear patch below is S+1 wide; a digit exactly at the far wall (integer position
    # W - S) is drawn as position W - S - 1 with fraction 1, so the patch stays in the frame.
    at_wall = ix >= np.array([cfg.width - size, cfg.height - size])
    ix = np.where(at_wall, ix - 1, ix)
    fx = np.where(at_wall, np.float32(1.0), fx)
    wx, wy = fx[..., 0, None, None], fx[..., 1, None, None]
    s = sprite[:, None]  # [n, 1, S, S]
    patch = np.zeros((n, t_len, size + 1, size + 1), np.float32)
    # Bilinear sub-pixel shift: the sprite spreads over an (S+1)^2 patch with four weights.
    patch[..., :size, :size] += (1 - wy) * (1 - wx) * s
    patch[..., :size, 1:] += (1 - wy) * wx * s
    patch[..., 1:, :size] += wy * (1 - wx) * s
    patch[..., 1:, 1:] += wy * wx * s
    if colour is None:
        rgb = np.full((n, 3), 255.0, np.float32)
    else:
        rgb = np.array([cap.COLOURS[str(c)] for c in colour], np.float32)
    # Colour the small patches, not the full frames (5x fewer pixels). Weights sum to 1 and the
    # sprite is in [0, 1], so values stay within [0, 255] and rounding by +0.5 is safe.
    patch_rgb = (patch[..., None] * rgb[:, None, None, None, :] + 0.5).astype(np.uint8)
    video = np.zeros((n, t_len, cfg.height, cfg.width, 3), np.uint8)
    ar = np.arange(size + 1)
    rows = (ix[..., 1, None] + ar)[:, :, :, None]  # [n, T, S+1, 1]
    cols = (ix[..., 0, None] + ar)[:, :, None, :]  # [n, T, 1, S+1]
    video[np.arange(n)[:, None, None, None], np.arange(t_len)[None, :, None, None], rows, cols] = (
        patch_rgb
    )
    return video


def as_rgb(video: np.ndarray) -> np.ndarray:
    """A stored video (grey sets keep one channel) as uint8 [..., 3]."""
    return video if video.shape[-1] == 3 else np.repeat(video, 3, axis=-1)


# --------------------------------------------------------------------------------------------
# Direction from pixels (for evaluation of generated videos)
# --------------------------------------------------------------------------------------------


def digit_centres(videos: np.ndarray) -> np.ndarray:
    """Intensity-weighted centre (x, y) of every frame: float `[N, T, 2]` (NaN for black frames).

    Args:
      videos: uint8 or float `[N, T, H, W, C]` (or one video `[T, H, W, C]`).
    """
    v = np.asarray(videos, np.float32)
    single = v.ndim == 4
    if single:
        v = v[None]
    grey = v.mean(axis=-1)
    # Ignore the dark background (and decoder noise in generated videos) below 20% of the max.
    grey = np.where(grey > 0.2 * grey.max(axis=(2, 3), keepdims=True), grey, 0.0)
    mass = grey.sum(axis=(2, 3))
    ys = np.arange(v.shape[2], dtype=np.float32)
    xs = np.arange(v.shape[3], dtype=np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = (grey.sum(axis=2) * xs).sum(axis=-1) / mass
        cy = (grey.sum(axis=3) * ys).sum(axis=-1) / mass
    out = np.stack([cx, cy], axis=-1)
    return out[0] if single else out


def estimate_direction(videos: np.ndarray, num_frames: int | None = None) -> np.ndarray:
    """Direction index (see DIRECTIONS) of each video from its digit centre's motion.

    Fits a line to the centre over the first `num_frames` frames (default `(T - 1) // 2 + 1`, the
    part that is guaranteed bounce-free in the data set) and rounds its angle to the nearest of
    the 8 directions.

    Args:
      videos: `[N, T, H, W, C]`.
      num_frames: frames to use from the start.

    Returns:
      int32 `[N]`; -1 where the digit does not move (or is not visible).
    """
    centres = digit_centres(videos)
    t_len = centres.shape[1]
    k = num_frames or (t_len - 1) // 2 + 1
    c = centres[:, :k]
    t = np.arange(k, dtype=np.float32) - (k - 1) / 2.0
    with np.errstate(invalid="ignore"):
        slope = (c * t[None, :, None]).sum(axis=1) / (t**2).sum()  # least squares, px / frame
    angle = np.arctan2(-slope[:, 1], slope[:, 0])  # y up on screen
    index = np.mod(np.rint(angle / (np.pi / 4)), 8).astype(np.int32)
    still = ~np.isfinite(slope).all(axis=1) | (np.linalg.norm(slope, axis=1) < 0.1)
    return np.where(still, -1, index).astype(np.int32)
