"""Moving digits: a bundled, procedural, offline text-video data set (a tfds builder).

Each video shows one real handwritten digit (`sklearn.datasets.load_digits`, 8x8 with 16 grey
levels, upscaled smoothly with PIL bicubic) moving light-on-dark in one of 8 directions at one of a
few speeds, bouncing off the walls, optionally coloured. Every video has a natural-English caption
(`vdm.data.captions`: varied templates and synonyms, numerals and words) and its structured labels.

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

Splits: the 1797 sklearn images are split per digit class (80% / 20%, seeded) into disjoint source
pools for train and test. `caption` uses `captions.TRAIN_TEMPLATES` in both splits;
`caption_heldout` uses `captions.HELDOUT_TEMPLATES` in the test split (empty in train).

On disk, `video` is uint8 [T, H, W, 3] for colour sets and [T, H, W, 1] for grey ones (3x less
to decompress per read); `vdm.data.sources` (and `as_rgb`) expand it to 3 channels.

Everything is deterministic from `seed` (numpy Generators seeded with `[seed, split, stream]`) and
vectorized over videos, so 20k videos of 17x32x32 prepare in well under a minute.

Preview (prepares the data set if needed, then writes a contact sheet with captions):
  python -m vdm.data.moving_digits --preview /tmp/data_preview.png --split test --num 8
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from vdm.data import captions as cap

SPLITS = ("train", "test")
_SPLIT_CODE = {"train": 0, "test": 1}
_TEST_FRACTION = 0.2  # share of each digit class's sklearn images reserved for the test split
_CHUNK = 256  # videos rendered per vectorized chunk (bounds memory: ~20 MB at 17x32x32)

# Unit velocity of each direction in image coordinates (x right, y DOWN); DIRECTIONS is in angle
# order with y up on screen, hence the minus sign.
_ANGLES = np.arange(8) * (np.pi / 4)
DIRECTION_VECTORS = np.stack([np.cos(_ANGLES), -np.sin(_ANGLES)], axis=1)
DIRECTIONS = cap.DIRECTIONS


@dataclasses.dataclass(eq=False)
class MovingDigitsConfig(tfds.core.BuilderConfig):
    """Shape and content of a moving-digits data set; `name` is derived from the fields.

    Defaults mirror `config.data` in configs/base.py (checked by a test).
    """

    name: str = ""
    num_frames: int = 17
    height: int = 32
    width: int = 32
    num_train: int = 20000
    num_test: int = 1000
    colour: bool = False  # True: each digit gets a random named colour (mentioned in captions).
    speeds: tuple[float, ...] = (1.0, 1.5, 2.0)  # pixels per frame at 32x32, scaled with size.
    digit_size: int = 16  # side of the upscaled digit at 32x32, scaled with min(height, width).
    seed: int = 1234

    def __post_init__(self):
        self.speeds = tuple(float(s) for s in self.speeds)
        problems = []
        if self.num_frames < 2:
            problems.append(f"num_frames={self.num_frames} must be >= 2")
        if self.num_train < 1 or self.num_test < 1:
            problems.append(f"num_train={self.num_train}, num_test={self.num_test} must be >= 1")
        if not self.speeds or min(self.speeds) <= 0:
            problems.append(f"speeds={self.speeds} must be a non-empty tuple of positive numbers")
        if self.sprite_size() >= min(self.height, self.width):
            problems.append(
                f"digit_size={self.digit_size} (scaled: {self.sprite_size()} px) must be smaller "
                f"than the frame ({self.height}x{self.width})"
            )
        if problems:
            raise ValueError("Invalid moving-digits config: " + "; ".join(problems) + ".")
        speeds = "-".join(f"{s:g}" for s in self.speeds)
        # The name encodes every field, so data sets of different shapes never share a directory.
        self.name = (
            f"t{self.num_frames}_{self.height}x{self.width}_tr{self.num_train}_te{self.num_test}"
            f"_{'colour' if self.colour else 'grey'}_sp{speeds}_ds{self.digit_size}_s{self.seed}"
        )
        self.description = (
            f"{self.num_train} train / {self.num_test} test videos of {self.num_frames}x"
            f"{self.height}x{self.width}, speeds {self.speeds}, seed {self.seed}."
        )

    def sprite_size(self) -> int:
        """Pixel side of the rendered digit at this frame size."""
        return max(4, int(round(self.digit_size * min(self.height, self.width) / 32)))

    def channels(self) -> int:
        """Channels stored on disk: 3 with colour, else 1 (grey; expanded to RGB when read)."""
        return 3 if self.colour else 1

    def num_examples(self, split: str) -> int:
        return {"train": self.num_train, "test": self.num_test}[split]


def config_from_data(data_config) -> MovingDigitsConfig:
    """The builder config for `config.data` (num_frames, height, width, data.moving_digits.*)."""
    md = data_config.moving_digits
    return MovingDigitsConfig(
        num_frames=int(data_config.num_frames),
        height=int(data_config.height),
        width=int(data_config.width),
        num_train=int(md.num_train),
        num_test=int(md.num_test),
        colour=bool(md.colour),
        speeds=tuple(md.speeds),
        digit_size=int(md.digit_size),
        seed=int(md.generator_seed),
    )


# --------------------------------------------------------------------------------------------
# Generation (pure numpy, usable without tfds)
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

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


def sample_labels(cfg: MovingDigitsConfig, split: str) -> dict[str, np.ndarray | list]:
    """Draws every per-video label of a split (small arrays; videos are rendered separately).

    Args:
      cfg: the data set config.
      split: "train" or "test".

    Returns:
      Dict of arrays over the split's N videos: digit, source_index, direction, speed, colour,
      top_left [N, T, 2] (x, y of the digit box), trajectory [N, T, 2] (box centre), first_bounce,
      caption / template (and caption_heldout / template_heldout, "" / -1 in train).
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown moving-digits split '{split}'; valid: {SPLITS}.")
    n, t_len = cfg.num_examples(split), cfg.num_frames
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

    size = cfg.sprite_size()
    free = np.array([cfg.width - size, cfg.height - size], np.float64)  # top-left range (x, y)
    scale = np.array([cfg.width / 32.0, cfg.height / 32.0])
    velocity = DIRECTION_VECTORS[direction] * speed[:, None] * scale  # px / frame, [N, 2]
    # Start so that the first `clear` steps do not touch a wall (module docstring).
    clear = (t_len - 1) // 2
    lo = np.where(velocity < 0, -velocity * clear, 0.0)
    hi = np.where(velocity > 0, free - velocity * clear, free)
    fits = hi >= lo
    fallback = np.where(velocity > 0, 0.0, free)  # too fast to fit: start at the wall behind
    start = np.where(fits, lo + u * (hi - lo), fallback)
    steps = np.arange(t_len, dtype=np.float64)
    raw = start[:, None, :] + velocity[:, None, :] * steps[None, :, None]  # [N, T, 2]
    top_left = _reflect(raw, free)
    outside = ((raw < -1e-6) | (raw > free + 1e-6)).any(axis=-1)  # [N, T]
    first_bounce = np.where(outside.any(axis=1), outside.argmax(axis=1), t_len)

    colours = [cap.COLOUR_NAMES[c] for c in colour_idx] if cfg.colour else None
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
        caption_heldout, template_heldout = [""] * n, np.full(n, -1)
    return {
        "digit": digit.astype(np.int32),
        "source_index": source_index.astype(np.int32),
        "direction": direction.astype(np.int32),
        "speed": speed,
        "colour": np.asarray(colours if cfg.colour else ["white"] * n),
        "top_left": top_left.astype(np.float32),
        "trajectory": (top_left + size / 2.0).astype(np.float32),
        "first_bounce": first_bounce.astype(np.int32),
        "caption": caption,
        "template": template.astype(np.int32),
        "caption_heldout": caption_heldout,
        "template_heldout": template_heldout.astype(np.int32),
    }


def render(
    cfg: MovingDigitsConfig,
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


def generate(cfg: MovingDigitsConfig, split: str, chunk: int = _CHUNK) -> Iterator[dict]:
    """Yields the examples of a split in order, as dicts of numpy values / python str.

    Args:
      cfg: the data set config.
      split: "train" or "test".
      chunk: videos rendered together (memory vs. vectorization).

    Yields:
      One example dict per video (the tfds features; see `MovingDigits._info`). `video` is
      uint8 [T, H, W, 3] with colour, [T, H, W, 1] without (as stored on disk).
    """
    labels = sample_labels(cfg, split)
    n = cfg.num_examples(split)
    for begin in range(0, n, chunk):
        sl = slice(begin, min(n, begin + chunk))
        videos = render(
            cfg,
            labels["source_index"][sl],
            labels["top_left"][sl],
            labels["colour"][sl] if cfg.colour else None,
        )
        if not cfg.colour:
            videos = np.ascontiguousarray(videos[..., :1])  # grey: store one channel
        for j, i in enumerate(range(sl.start, sl.stop)):
            yield {
                "video": videos[j],
                "caption": labels["caption"][i],
                "caption_heldout": labels["caption_heldout"][i],
                "digit": labels["digit"][i],
                "direction": labels["direction"][i],
                "direction_name": DIRECTIONS[labels["direction"][i]],
                "speed": labels["speed"][i],
                "colour": str(labels["colour"][i]),
                "start": labels["trajectory"][i, 0],
                "trajectory": labels["trajectory"][i],
                "first_bounce": labels["first_bounce"][i],
                "source_index": labels["source_index"][i],
                "template": labels["template"][i],
                "template_heldout": labels["template_heldout"][i],
            }


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


# --------------------------------------------------------------------------------------------
# The tfds builder
# --------------------------------------------------------------------------------------------


# Run as `python -m vdm.data.moving_digits` the module is also `__main__`; registering the class
# from there too would make tfds raise "already registered" when the package imports it.
class MovingDigits(tfds.core.GeneratorBasedBuilder, skip_registration=__name__ == "__main__"):
    """Procedural text-video data set of moving handwritten digits (see the module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [MovingDigitsConfig()]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # tfds' default looks the module up through `importlib_resources`, which is not installed
        # (and not needed: there are no checksums or metadata files to find beside this file).
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        cfg: MovingDigitsConfig = self.builder_config
        t, h, w = cfg.num_frames, cfg.height, cfg.width
        features = tfds.features.FeaturesDict(
            {
                # zlib: a dark background compresses ~5x. Grey sets store one channel (3x less to
                # decompress when reading, the pipeline's bottleneck); readers expand it to RGB.
                "video": tfds.features.Tensor(
                    shape=(t, h, w, cfg.channels()), dtype=np.uint8, encoding="zlib"
                ),
                "caption": tfds.features.Text(),
                "caption_heldout": tfds.features.Text(),  # "" in train
                "digit": tfds.features.Scalar(dtype=np.int32),
                "direction": tfds.features.Scalar(dtype=np.int32),  # index into DIRECTIONS
                "direction_name": tfds.features.Text(),
                "speed": tfds.features.Scalar(dtype=np.float32),  # nominal px/frame at 32x32
                "colour": tfds.features.Text(),  # "white" unless colour=True
                "start": tfds.features.Tensor(shape=(2,), dtype=np.float32),  # (x, y) at frame 0
                "trajectory": tfds.features.Tensor(shape=(t, 2), dtype=np.float32),  # box centre
                "first_bounce": tfds.features.Scalar(dtype=np.int32),  # T if no bounce
                "source_index": tfds.features.Scalar(dtype=np.int32),  # into load_digits()
                "template": tfds.features.Scalar(dtype=np.int32),  # into TRAIN_TEMPLATES
                "template_heldout": tfds.features.Scalar(dtype=np.int32),  # -1 in train
            }
        )
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=features,
            homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        # Keys are the generation index; tfds stores examples in the (deterministic) order of
        # their key hashes.
        yield from enumerate(generate(self.builder_config, split))


# --------------------------------------------------------------------------------------------
# Preparing and locating
# --------------------------------------------------------------------------------------------


def resolve_data_dir(data_config=None) -> str:
    """`config.data.data_dir` if set, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    configured = "" if data_config is None else str(data_config.get("data_dir", "") or "")
    if configured:
        return os.path.expanduser(configured)
    return tfds.core.constants.get_default_data_dir()


def builder_for(cfg: MovingDigitsConfig, data_dir: str) -> MovingDigits:
    """The (not necessarily prepared) builder of `cfg` in `data_dir`."""
    # tfds refuses a config object that shares its name with a BUILDER_CONFIGS entry (the
    # default shape); pass that one by name.
    config = cfg.name if cfg.name in MovingDigits.builder_configs else cfg
    return MovingDigits(config=config, data_dir=data_dir, file_format="array_record")


def prepare(data_config, *, data_dir: str | None = None) -> MovingDigits:
    """Builds the moving-digits data set for `config.data` if it is not prepared yet.

    Downloads nothing. Safe to call every run (a prepared config is only opened). In multi-host
    runs with a shared data_dir, prepare once before starting the hosts.

    Args:
      data_config: `config.data` (ConfigDict), or a `MovingDigitsConfig`.
      data_dir: overrides `config.data.data_dir`.

    Returns:
      The prepared builder; `builder.as_data_source(split)` reads it.
    """
    if isinstance(data_config, MovingDigitsConfig):
        cfg, configured_dir = data_config, None
    else:
        cfg, configured_dir = config_from_data(data_config), data_config
    root = data_dir or resolve_data_dir(configured_dir)
    builder = builder_for(cfg, root)
    if not builder.is_prepared():
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    return builder


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vdm.data.moving_digits",
        description="Prepare the moving-digits data set and write a contact sheet of it.",
    )
    defaults = MovingDigitsConfig()
    parser.add_argument("--preview", required=True, help="output PNG contact sheet")
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--num", type=int, default=8, help="videos in the sheet")
    parser.add_argument("--frames", type=int, default=defaults.num_frames)
    parser.add_argument("--size", type=int, default=defaults.height, help="height = width")
    parser.add_argument("--num_train", type=int, default=defaults.num_train)
    parser.add_argument("--num_test", type=int, default=defaults.num_test)
    parser.add_argument("--colour", action="store_true")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="generator seed")
    parser.add_argument("--data_dir", default="", help="tfds data_dir (default: tfds default)")
    parser.add_argument("--heldout", action="store_true", help="show caption_heldout (test)")
    args = parser.parse_args(argv)

    from vdm.io import video as video_io

    cfg = MovingDigitsConfig(
        num_frames=args.frames,
        height=args.size,
        width=args.size,
        num_train=args.num_train,
        num_test=args.num_test,
        colour=args.colour,
        speeds=defaults.speeds,
        digit_size=defaults.digit_size,
        seed=args.seed,
    )
    builder = prepare(cfg, data_dir=args.data_dir or resolve_data_dir())
    source = builder.as_data_source(args.split)
    examples = [source[i] for i in range(min(args.num, len(source)))]
    key = "caption_heldout" if args.heldout else "caption"
    texts = []
    for e in examples:
        text = e[key].decode() if isinstance(e[key], bytes) else str(e[key])
        texts.append(f"{text}  [{e['digit']}, {DIRECTIONS[e['direction']]}, v={e['speed']:g}]")
    video_io.contact_sheet(
        [as_rgb(e["video"]) for e in examples],
        texts,
        path=args.preview,
        scale=max(1, 64 // args.size),
    )
    print(f"Wrote {len(examples)} {args.split} videos to {args.preview} ({builder.data_dir}).")


if __name__ == "__main__":
    main()
