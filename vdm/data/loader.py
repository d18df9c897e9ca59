"""The grain input pipeline: source -> (filter unreadable) -> temporal crop -> resize/crop -> batch.

`make_loader(config, split, batch_size=GLOBAL, ...)` returns a `grain.DataLoader`; `iter(loader)`
yields host-local batches
  video    uint8 [B_local, T, H, W, 3]        (B_local = batch_size // process_count)
  caption  numpy array of str [B_local]
  ...      the source's labels (moving digits: digit, direction, speed, trajectory, ...)
and has `get_state()` / `set_state(state)` (bytes) to checkpoint and restore the exact position.
A latent-cache source (`cache:DIR`, vdm.data.cache) yields its cached fields (latent_mean,
latent_logvar, context, context_mask, caption, labels) instead of `video`, uncropped.

Determinism: the order is a function of (seed, epoch) only (grain IndexSampler), each process
reads a disjoint contiguous shard of the records (grain ShardOptions, drop_remainder=True so all
processes see the same number), and random transforms draw from per-record generators derived
from the seed, so restoring an iterator state reproduces the same batches, with or without workers.
With workers (`config.data.num_workers > 0`) grain forms each batch inside one worker from that
worker's round-robin share of the records, so batch contents depend on the worker count; the
count is part of the iterator state (restoring with another count raises). Worker processes are
spawned: scripts using them need an `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import grain
import numpy as np

from vdm.data.folder import cover_size, resize_frame
from vdm.data.sources import get_source


def _data_config(config):
    return config.data if "data" in config else config


class SkipUnreadable(grain.transforms.Filter):
    """Drops records a source marked `_skip` (unreadable files; see vdm.data.folder)."""

    def filter(self, element) -> bool:
        return not element.get("_skip", False)


def _temporal_window(video: np.ndarray, num_frames: int, start: int) -> np.ndarray:
    """`num_frames` frames from `start`; too-short clips repeat their last frame (a freeze)."""
    t = video.shape[0]
    if t >= num_frames:
        return video[start : start + num_frames]
    pad = np.repeat(video[-1:], num_frames - t, axis=0)
    return np.concatenate([video, pad], axis=0)


class CenterTemporalCrop(grain.transforms.Map):
    """The middle `num_frames` frames (evaluation); pads short clips by repeating the last frame."""

    def __init__(self, num_frames: int):
        self.num_frames = num_frames

    def map(self, element: dict) -> dict:
        video = element["video"]
        start = max(0, (video.shape[0] - self.num_frames) // 2)
        element["video"] = _temporal_window(video, self.num_frames, start)
        return element


class RandomTemporalCrop(grain.transforms.RandomMap):
    """A random window of `num_frames` frames (training); pads short clips like the center crop."""

    def __init__(self, num_frames: int):
        self.num_frames = num_frames

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        video = element["video"]
        extra = video.shape[0] - self.num_frames
        start = int(rng.integers(0, extra + 1)) if extra > 0 else 0
        element["video"] = _temporal_window(video, self.num_frames, start)
        return element


class ResizeCenterCrop(grain.transforms.Map):
    """Resizes frames (aspect kept, bilinear) to cover (height, width), then center-crops.

    A no-op for videos already of the target size (e.g. moving digits prepared at this size).
    """

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width

    def map(self, element: dict) -> dict:
        video = element["video"]
        h, w = video.shape[1:3]
        if (h, w) != (self.height, self.width):
            size = cover_size(h, w, self.height, self.width)
            if (h, w) != size:
                video = np.stack([resize_frame(f, size) for f in video])
            top = (size[0] - self.height) // 2
            left = (size[1] - self.width) // 2
            video = np.ascontiguousarray(
                video[:, top : top + self.height, left : left + self.width]
            )
        element["video"] = video
        return element


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(process_index, process_count), each defaulting to jax's."""
    if process_index is None or process_count is None:
        import jax  # slow to import; callers that give both never need it

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return process_index, process_count


def _check_batch_and_seed(batch_size: int, process_count: int, seed: int) -> None:
    if batch_size <= 0 or batch_size % process_count:
        raise ValueError(
            f"Global batch_size={batch_size} must be a positive multiple of the process count "
            f"({process_count}); each process loads batch_size // process_count examples."
        )
    if not 0 <= seed < 2**32:
        raise ValueError(f"Data seed must be in [0, 2**32), got {seed}.")


def _sampler(source, split: str, shard, *, shuffle: bool, num_epochs, seed: int):
    """The global order: a function of (seed, epoch) only; this process's shard of it."""
    if len(source) // shard.shard_count == 0:
        raise ValueError(
            f"Split '{split}' has {len(source)} examples, fewer than the {shard.shard_count} "
            "processes."
        )
    return grain.samplers.IndexSampler(
        num_records=len(source),
        shard_options=shard,
        shuffle=shuffle,
        num_epochs=num_epochs,
        seed=seed,
    )


def _operations(source, data, *, shuffle: bool, local_batch: int, drop_remainder: bool) -> list:
    operations = [SkipUnreadable()]
    # Latent caches (vdm.data.cache) hold no video: their records were cropped before encoding.
    if getattr(source, "provides_video", True):
        num_frames = int(data.num_frames)
        operations += [
            RandomTemporalCrop(num_frames) if shuffle else CenterTemporalCrop(num_frames),
            ResizeCenterCrop(int(data.height), int(data.width)),
        ]
    operations.append(grain.transforms.Batch(batch_size=local_batch, drop_remainder=drop_remainder))
    return operations


def _mark_flags_parsed() -> None:
    """grain's worker processes read absl flags; programs that never parsed them (tests,
    notebooks, plain-argparse tools) must mark them parsed first."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _read_options(data, local_batch: int) -> grain.ReadOptions:
    buffer = max(1, int(data.prefetch) * local_batch)
    # At most `buffer` reads can be in flight; more threads would only idle (and grain warns about
    # it on every run).
    return grain.ReadOptions(num_threads=min(16, buffer), prefetch_buffer_size=buffer)


def make_loader(
    config,
    split: str,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    drop_remainder: bool = True,
    worker_count: int | None = None,
    source=None,
) -> grain.DataLoader:
    """A deterministic, sharded, checkpointable grain loader over `config.data`.

    Args:
      config: the full config (uses `config.data`), or `config.data` itself.
      split: split name, e.g. `config.data.train_split`.
      batch_size: the GLOBAL batch size; each process gets `batch_size // process_count`.
      shuffle: shuffle globally each epoch (from `seed`); also enables random temporal crops.
      seed: 32-bit non-negative seed of the order and the random transforms.
      num_epochs: passes over the data; None = repeat forever (training).
      process_index: this process's shard (default `jax.process_index()`).
      process_count: number of shards (default `jax.process_count()`).
      drop_remainder: drop the last partial batch (and the uneven remainder of the shards), so
        every batch has the same shape.
      worker_count: grain worker processes (default `config.data.num_workers`; 0 = in-process).
      source: a ready random-access source (default `vdm.data.sources.get_source`).

    Returns:
      A `grain.DataLoader`; `iter()` of it yields dicts of numpy arrays (module docstring). Its
      `provenance` attribute is the source's `vdm.data.provenance.Selection.summary()` (what the
      data set is, what was dropped), or None for a source without a manifest.
    """
    data = _data_config(config)
    process_index, process_count = _processes(process_index, process_count)
    _check_batch_and_seed(batch_size, process_count, seed)
    local_batch = batch_size // process_count
    source = get_source(data, split) if source is None else source
    shard = grain.sharding.ShardOptions(
        shard_index=process_index, shard_count=process_count, drop_remainder=True
    )
    sampler = _sampler(source, split, shard, shuffle=shuffle, num_epochs=num_epochs, seed=seed)
    workers = int(data.num_workers) if worker_count is None else int(worker_count)
    if workers > 0:
        _mark_flags_parsed()
    data_loader = grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=_operations(
            source, data, shuffle=shuffle, local_batch=local_batch, drop_remainder=drop_remainder
        ),
        worker_count=workers,
        shard_options=shard,
        read_options=_read_options(data, local_batch),
    )
    selection = getattr(source, "selection", None)
    data_loader.provenance = None if selection is None else selection.summary()
    return data_loader
