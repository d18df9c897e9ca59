"""Benchmark: what data provenance costs the loader (vdm.data.provenance).

  python bench/provenance.py                  # 2k moving-digits train videos of 17x32x32
  python bench/provenance.py --num_train 20000 --repeats 5

Times, in one process on one prepared data set:
  * building the split's manifest once (every record read and hashed; later runs read the file),
    and reading it back;
  * loader passes of `--videos` training videos (shuffle, batch 32, 0 workers) through the
    source without provenance (the pre-provenance TfdsSource: no manifest, no index map, no
    hash fields), with it, and with it plus a 1% exclusion list; best of `--repeats`,
    interleaved so machine load affects all three alike. CPU seconds are reported beside wall
    seconds (the machine may be shared).
Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import base  # noqa: E402
from vdm.data import loader as pipeline  # noqa: E402
from vdm.data import moving_digits, sources  # noqa: E402


def _source(config, builder, with_provenance: bool):
    source = sources.TfdsSource(
        builder.as_data_source(split="train"),
        name=f"moving_digits/{builder.builder_config.name}",
        split="train",
        features=builder.info.features,
    )
    if with_provenance:
        source.select(config.data, builder.data_dir, str(builder.version))
    return source


def _pass(config, source, videos: int) -> tuple[float, float]:
    loader = pipeline.make_loader(
        config, "train", batch_size=32, shuffle=True, seed=0, process_index=0, process_count=1,
        source=source,
    )  # fmt: skip
    it = iter(loader)
    next(it)  # warm-up
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(videos // 32):
        next(it)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num_train", type=int, default=2000)
    parser.add_argument("--videos", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data_dir", default=None)
    args = parser.parse_args()
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="vdm_bench_prov_")
    c = base.get_config()
    c.data.data_dir = data_dir
    c.data.moving_digits.num_train = args.num_train
    c.data.moving_digits.num_test = 100
    builder = moving_digits.prepare(c.data)
    manifest = os.path.join(builder.data_dir, "vdm_manifest_train.json")
    if os.path.exists(manifest):
        os.remove(manifest)
    t = time.perf_counter()
    source = _source(c, builder, True)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    _source(c, builder, True)
    read_s = time.perf_counter() - t
    print(json.dumps({"manifest_build_s": round(build_s, 3), "manifest_read_s": round(read_s, 3),
                      "num_train": args.num_train,
                      "manifest_bytes": os.path.getsize(manifest)}), flush=True)  # fmt: skip
    hashes = [e["hash"] for e in source.selection.manifest["examples"]]
    optout = os.path.join(data_dir, "optout.txt")
    with open(optout, "w") as f:
        f.write("\n".join(hashes[::100]) + "\n")
    excluding = copy.deepcopy(c)
    excluding.data.exclude = optout
    variants = {
        "without": lambda: _source(c, builder, False),
        "with": lambda: _source(c, builder, True),
        "with_1pct_excluded": lambda: _source(excluding, builder, True),
    }
    best = {k: (float("inf"), float("inf")) for k in variants}
    for _ in range(args.repeats):
        for name, make in variants.items():
            wall, cpu = _pass(c, make(), args.videos)
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    for name, (wall, cpu) in best.items():
        print(json.dumps({"variant": name, "videos": args.videos, "best_wall_s": round(wall, 3),
                          "videos_per_s": round(args.videos / wall, 1),
                          "best_cpu_s": round(cpu, 3)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
