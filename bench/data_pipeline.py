"""Benchmark: moving-digits preparation time and grain pipeline throughput.

  python bench/data_pipeline.py                 # 20k train videos of 17x32x32 (the default set)
  python bench/data_pipeline.py --quick         # 2k train videos, fewer batches
  python bench/data_pipeline.py --num_train 5000 --workers 0,2 --sizes 32,64

Preparation is timed into a fresh temporary tfds data_dir (deleted afterwards) unless --data_dir
is given. Throughput is measured in videos/s for training loaders (shuffle, global batch 32,
one process) after a warm-up batch, with 0 workers and, when asked, with grain worker processes.
Prints one JSON line per measurement. On a shared machine wall-clock numbers mostly measure the
contention; `cpu_seconds` / `videos_per_cpu_s` (0 workers) are the load-independent cost.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import base  # noqa: E402
from vdm.data import loader as pipeline
from vdm.data import moving_digits  # noqa: E402


def _config(data_dir: str, size: int, num_train: int, num_test: int, frames: int):
    c = base.get_config()
    c.data.data_dir = data_dir
    c.data.height = c.data.width = size
    c.data.num_frames = frames
    c.data.moving_digits.num_train = num_train
    c.data.moving_digits.num_test = num_test
    return c


def bench_prepare(config) -> dict:
    start, cpu = time.perf_counter(), time.process_time()
    builder = moving_digits.prepare(config.data)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    n = config.data.moving_digits.num_train + config.data.moving_digits.num_test
    size = sum(
        os.path.getsize(os.path.join(builder.data_dir, f)) for f in os.listdir(builder.data_dir)
    )
    return {
        "what": "prepare",
        "config": builder.builder_config.name,
        "videos": n,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2),
        "ms_per_video": round(1000 * seconds / n, 3),
        "disk_mb": round(size / 2**20, 1),
    }


def bench_loader(config, *, batch_size: int, workers: int, batches: int) -> dict:
    loader = pipeline.make_loader(
        config,
        "train",
        batch_size=batch_size,
        shuffle=True,
        seed=0,
        process_index=0,
        process_count=1,
        worker_count=workers,
    )
    it = iter(loader)
    start = time.perf_counter()
    next(it)  # warm-up: opens files, starts workers
    warmup = time.perf_counter() - start
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        batch = next(it)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    shape = tuple(batch["video"].shape)
    return {
        "what": "loader",
        "workers": workers,
        "batch_shape": shape,
        "batches": batches,
        "videos_per_s": round(batches * batch_size / seconds, 1),
        # CPU time of this process (all its threads; worker processes are not included), so
        # videos per CPU-second is what one idle core would deliver with 0 workers.
        "videos_per_cpu_s": round(batches * batch_size / cpu, 1) if not workers else None,
        "warmup_s": round(warmup, 2),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_train", type=int, default=20000)
    parser.add_argument("--num_test", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="2k train videos, 20 batches")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--sizes", default="32,64", help="frame sizes to time the loader at")
    parser.add_argument("--workers", default="0,2", help="grain worker counts to time")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--data_dir", default="", help="reuse this tfds data_dir (not deleted)")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_train, args.num_test, args.batches = 2000, 200, 20
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="vdm_bench_data_")
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s]
        for i, size in enumerate(sizes):
            # The full preparation is timed at the first size; other sizes only need enough
            # videos for the loader measurement.
            n_train = args.num_train if i == 0 else min(args.num_train, 2000)
            config = _config(data_dir, size, n_train, args.num_test, args.frames)
            print(json.dumps(bench_prepare(config)), flush=True)
            for workers in [int(w) for w in args.workers.split(",") if w]:
                result = bench_loader(
                    config, batch_size=args.batch_size, workers=workers, batches=args.batches
                )
                print(json.dumps(result), flush=True)
    finally:
        if not args.data_dir:
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
