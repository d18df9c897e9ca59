"""Moving digits: a bundled, procedural, offline text-video data set (a tfds builder).

Each video shows one real handwritten digit moving light-on-dark in one of 8 directions at one of a
few speeds, bouncing off the walls, optionally coloured (`vdm.data.digit_videos` draws the labels
and renders the frames; the meaning of "direction" is documented there). Every video has a
natural-English caption (`vdm.data.captions`: varied templates and synonyms, numerals and words)
and its structured labels.

Splits: the 1797 sklearn images are split per digit class (80% / 20%, seeded) into disjoint source
pools for train and test. `caption` uses `captions.TRAIN_TEMPLATES` in both splits;
`caption_heldout` uses `captions.HELDOUT_TEMPLATES` in the test split (empty in train).

On disk, `video` is uint8 [T, H, W, 3] for colour sets and [T, H, W, 1] for grey ones (3x less
to decompress per read); `vdm.data.sources` (and `as_rgb`) expand it to 3 channels.

Everything is deterministic from `seed` (numpy Generators seeded with `[seed, split, stream]`) and
vectorized over videos, so 20k videos of 17x32x32 prepare in well under a minute.

Preview (prepares the data set if needed, then writes a contact sheet with captions):
  python -m vdm.tools.moving_digits --preview /tmp/data_preview.png --split test --num 8
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from vdm.data.digit_videos import (
    DIRECTION_VECTORS,
    DIRECTIONS,
    SPLITS,
    as_rgb,
    digit_centres,
    estimate_direction,
    render,
    sample_labels,
    source_pools,
)

__all__ = [
    "DIRECTIONS",
    "DIRECTION_VECTORS",
    "SPLITS",
    "MovingDigits",
    "MovingDigitsConfig",
    "as_rgb",
    "builder_for",
    "config_from_data",
    "digit_centres",
    "estimate_direction",
    "generate",
    "prepare",
    "render",
    "resolve_data_dir",
    "sample_labels",
    "source_pools",
]

_CHUNK = 256  # videos rendered per vectorized chunk (bounds memory: ~20 MB at 17x32x32)


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


# --------------------------------------------------------------------------------------------
# The tfds builder
# --------------------------------------------------------------------------------------------


class MovingDigits(tfds.core.GeneratorBasedBuilder):
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
