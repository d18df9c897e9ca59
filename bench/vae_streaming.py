"""Streaming VAE decode: peak memory for short vs long videos, and decode throughput.

Decodes the latents of a 17-frame and a 129-frame video (16 and 128 frames after the first) with
the quickstart VAE (`configs/base.py` vae defaults) through `vdm.models.autoencoder.decode`, which
scans over chunks of `vae.decode_chunk` latent frames carrying the causal-conv caches. Streaming
is working when peak memory barely grows with the number of frames (target: long/short <= 1.3).

Peak memory is measured two ways:
  * XLA's plan: `jax.jit(decode).lower(...).compile().memory_analysis()` temp bytes (scratch
    buffers, excluding arguments and the output), for streaming and, for reference, for decoding
    all frames in one call (chunk=0), which grows with the video;
  * process RSS high-water mark, in a fresh subprocess per size: `ru_maxrss` after compiling and
    decoding, minus the RSS before the first compile (the runtime's own footprint).
Throughput is output frames per second of the compiled decode (best and median of N runs).
Chunk size: the default `vae.decode_chunk = 2` latent frames streams every video of 9 frames or
more through the loop, and its temp plan is the same for 17 and 129 frames (2.04 MiB at 32x32).
With `--chunk 4` a 17-frame video is a single iteration, which XLA compiles without a loop
(2.12 MiB), while two or more chunks keep the carried caches double-buffered (3.04 MiB, flat in
the number of frames): ratio 1.43 for a constant overhead, and more memory for every long video.

  python bench/vae_streaming.py            # --quick: 32x32, 3 timed runs
  python bench/vae_streaming.py --size 64 --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SHORT, LONG = 17, 129  # video frames: 16 and 128 after the first.
MEMORY_FRAMES = (SHORT, 33, 65, LONG)  # XLA's memory plan is also read for these.


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _setup(size: int, chunk: int | None):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from configs import base
    from vdm.models import autoencoder as ae
    from vdm.parallel import unbox

    config = base.get_config()
    module = ae.VideoAutoencoder.from_config(config.vae)
    chunk = int(config.vae.decode_chunk) if chunk is None else chunk
    # Weights do not change speed or memory; numpy draws avoid compiling one RNG kernel per param.
    x = jax.ShapeDtypeStruct((1, 1, size, size, 3), jnp.float32)
    shapes = unbox(jax.eval_shape(module.init, jax.random.key(0), x)["params"])
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape) * 0.05, jnp.float32), shapes
    )
    return jax, jnp, ae, module, params, chunk


def _latents(jnp, ae, module, frames: int, size: int, batch: int):
    import jax

    t, h, w, c = ae.latent_shape(module, frames, size, size)
    return jax.random.normal(jax.random.key(1), (batch, t, h, w, c), jnp.float32)


def child(args) -> dict:
    """One size in a fresh process: RSS before compiling, RSS high-water after decoding."""
    jax, jnp, ae, module, params, chunk = _setup(args.size, args.chunk)
    z = _latents(jnp, ae, module, args.frames, args.size, args.batch)
    jax.block_until_ready((params, z))
    before = _rss_mb()
    maxrss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # noqa: E731 (MiB)
    compiled = jax.jit(lambda p, z: ae.decode(module, p, z, chunk=chunk)).lower(params, z).compile()
    after_compile = maxrss()
    jax.block_until_ready(compiled(params, z))
    return {
        "frames": args.frames,
        "rss_before_mb": before,
        "rss_peak_compile_mb": after_compile,
        "rss_peak_mb": maxrss(),
    }


def main(args) -> None:
    jax, jnp, ae, module, params, chunk = _setup(args.size, args.chunk)
    print(
        f"VAE base={module.base_channels} mults={module.channel_multipliers} "
        f"res={module.num_res_blocks} patch={module.patch_size} ft={module.temporal_factor} "
        f"fs={module.spatial_factor} c={module.latent_channels}; {args.size}x{args.size}, "
        f"batch {args.batch}, chunk {chunk} latent frames; {jax.device_count()} device(s) "
        f"{jax.devices()[0].platform}"
    )
    results = {}
    for frames in MEMORY_FRAMES:
        z = _latents(jnp, ae, module, frames, args.size, args.batch)
        row = {}
        for name, c in (("stream", chunk), ("full", 0)):
            fn = jax.jit(lambda p, z, c=c: ae.decode(module, p, z, chunk=c))
            t0 = time.perf_counter()
            compiled = fn.lower(params, z).compile()
            row[f"{name}_compile_s"] = time.perf_counter() - t0
            mem = compiled.memory_analysis()
            row[f"{name}_temp_mb"] = mem.temp_size_in_bytes / 2**20
            row[f"{name}_out_mb"] = mem.output_size_in_bytes / 2**20
            if name == "stream" and frames in (SHORT, LONG):
                jax.block_until_ready(compiled(params, z))  # warm-up
                times = []
                for _ in range(args.runs):
                    t0 = time.perf_counter()
                    jax.block_until_ready(compiled(params, z))
                    times.append(time.perf_counter() - t0)
                n_out = args.batch * frames
                row["best_s"], row["median_s"] = min(times), statistics.median(times)
                row["fps_best"] = n_out / row["best_s"]
                row["fps_median"] = n_out / row["median_s"]
        if not args.no_rss and frames in (SHORT, LONG):
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "--frames", str(frames)]
            cmd += ["--size", str(args.size), "--batch", str(args.batch)]
            if args.chunk is not None:
                cmd += ["--chunk", str(args.chunk)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rss = json.loads(out.strip().splitlines()[-1])
            row["rss_peak_mb"] = rss["rss_peak_mb"]
            row["rss_delta_mb"] = rss["rss_peak_mb"] - rss["rss_before_mb"]
            row["rss_compile_delta_mb"] = rss["rss_peak_compile_mb"] - rss["rss_before_mb"]
        results[frames] = row
        line = (
            f"T={frames:4d} streaming: XLA temp {row['stream_temp_mb']:6.2f} MiB + output "
            f"{row['stream_out_mb']:5.2f} MiB"
        )
        if "rss_peak_mb" in row:
            line += (
                f", RSS peak {row['rss_peak_mb']:4.0f} MiB (+{row['rss_delta_mb']:.0f} MiB; "
                f"+{row['rss_compile_delta_mb']:.0f} after compiling)"
            )
        if "fps_best" in row:
            line += (
                f", {row['fps_best']:.0f} frames/s best / {row['fps_median']:.0f} median "
                f"({row['best_s'] * 1e3:.0f} / {row['median_s'] * 1e3:.0f} ms per decode)"
            )
        print(line + f" | one-call decode: XLA temp {row['full_temp_mb']:6.2f} MiB")
    s, long = results[SHORT], results[LONG]
    total = lambda r: r["stream_temp_mb"] + r["stream_out_mb"]  # noqa: E731
    print(
        f"{LONG - 1} vs {SHORT - 1} frames, streaming: XLA temp ratio "
        f"{long['stream_temp_mb'] / s['stream_temp_mb']:.2f} (target <= 1.3), temp + output "
        f"{total(long) / total(s):.2f}; one-call decode temp ratio "
        f"{long['full_temp_mb'] / s['full_temp_mb']:.2f}"
    )
    if "rss_delta_mb" in s:
        print(
            f"RSS high-water ratio {long['rss_peak_mb'] / s['rss_peak_mb']:.2f} (whole process), "
            f"{long['rss_delta_mb'] / max(s['rss_delta_mb'], 1e-9):.2f} (above the runtime's own "
            "footprint; includes compilation)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({str(k): v for k, v in results.items()}, f, indent=1)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=32, help="frame height = width (32 or 64)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--chunk", type=int, default=None, help="default: config vae.decode_chunk")
    p.add_argument("--runs", type=int, default=3, help="timed decodes per size (best, median)")
    p.add_argument("--quick", action="store_true", help="the default settings (kept for CI)")
    p.add_argument("--no_rss", action="store_true", help="skip the subprocess RSS measurement")
    p.add_argument("--json", default="", help="also write the numbers to this JSON file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--frames", type=int, default=SHORT, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a)))
    else:
        main(a)
