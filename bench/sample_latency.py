"""Latency of `python sample.py` as a user runs it: cold and warm compilation cache, 40 prompts.

  python bench/sample_latency.py [--runs 3] [--num_prompts 40] [--skip_breakdown] [--root DIR]

Every figure is one `sample.py --prompt ... --output_dir TMP` subprocess (the bundled model, its
default settings), timed by wall clock around the process:
  * first: one video with an empty compilation cache (`VDM_COMPILATION_CACHE=` a new temporary
    directory, which also holds the kept traced programs), so everything traces and compiles;
  * second: the same command again, `--runs` times (warm cache): best and median;
  * many: `--num_prompts` prompts (warm cache), videos/s = prompts / wall;
  * breakdown: one warm run in-process, phase by phase, wall and CPU seconds (imports, model
    files, text encoder, prompt encoding, the first sampling call with its program and
    compilation-cache loads, a second sampling call, file writing).
`--root DIR` times another checkout's sample.py (e.g. an older commit, unpacked with `git archive`)
the same way, for a before / after comparison.
One JSON line per measurement, each with the load average (`os.getloadavg`) before it: on a shared
machine the wall clock mostly measures the contention, so compare best-of-N on a quiet machine.
"""

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "the digit 4 moving down"
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
WAYS = ["up", "down", "to the left", "to the right"]

BREAKDOWN = r"""
import sys, time, json
t, c = time.perf_counter(), time.process_time(); laps = {}
def lap(name):
    global t, c
    now, cpu = time.perf_counter(), time.process_time()
    laps[name] = [round(now - t, 3), round(cpu - c, 3)]; t, c = now, cpu
import jax; lap("import jax")
from vdm import cli; from vdm.inference import pipeline, writer; lap("import vdm")
cli.enable_compilation_cache()
from vdm.models.text import encoder as te
from vdm.io import bundle
b = bundle.read(pipeline.DEFAULT_MODEL); lap("read model files")
te.load_text_encoder(b.text_encoder, max_length=b.config["text_encoder"]["max_length"])
lap("load text encoder (config, weights, tokenizer)")
pipe = pipeline.load_pipeline(); lap("load_pipeline (all of the above again)")
pipe.encode_prompts([sys.argv[1]]); lap("encode the prompt")
v = pipe([sys.argv[1]]); lap("first call: program + compile-cache load, sample, decode")
v = pipe([sys.argv[1]]); lap("second call: sample + decode")
writer.write_videos(v, [sys.argv[1]], 1, sys.argv[2], writer.FORMATS, pipe.config.data.fps, {})
lap("write mp4, gif, npy, png")
print(json.dumps(laps))
"""


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run(args, env, cwd=ROOT) -> tuple[float, float, str]:
    """(wall s, CPU s of the child, its stdout)."""
    start, cpu = time.perf_counter(), _cpu()
    proc = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return wall, _cpu() - cpu, proc.stdout


def _sample(env, prompts, out_dir, root=ROOT) -> tuple[float, float]:
    args = [sys.executable, "sample.py", "--output_dir", out_dir]
    for p in prompts:
        args += ["--prompt", p]
    return _run(args, env, cwd=root)[:2]


def _emit(name, **fields):
    print(json.dumps({"bench": name, "load_avg": [round(x, 2) for x in os.getloadavg()], **fields}))
    sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="warm single-video runs")
    parser.add_argument("--num_prompts", type=int, default=40)
    parser.add_argument("--skip_breakdown", action="store_true")
    parser.add_argument("--root", default=ROOT, help="the checkout whose sample.py is timed")
    args = parser.parse_args()
    root = os.path.abspath(args.root)
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "VDM_COMPILATION_CACHE": os.path.join(tmp, "cache")}
        env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        sample = functools.partial(_sample, env, root=root)
        load = os.getloadavg()
        first, cpu = sample([PROMPT], os.path.join(tmp, "first"))
        _emit("first_run_cold_cache", root=root, wall_s=round(first, 2), cpu_s=round(cpu, 2),
              load_avg_before=[round(x, 2) for x in load])  # fmt: skip
        runs = [sample([PROMPT], os.path.join(tmp, f"warm{i}")) for i in range(args.runs)]
        walls = [w for w, _ in runs]
        _emit(
            "second_run_warm_cache",
            best_s=round(min(walls), 2),
            median_s=round(statistics.median(walls), 2),
            runs=[round(w, 2) for w in walls],
            cpu_s=[round(c, 2) for _, c in runs],
        )
        prompts = [
            f"the digit {DIGITS[k % 10]} moving {WAYS[k % 4]}" for k in range(args.num_prompts)
        ]
        wall, cpu = sample(prompts, os.path.join(tmp, "many"))
        _emit(
            "many_prompts_warm_cache",
            videos=len(prompts),
            wall_s=round(wall, 2),
            cpu_s=round(cpu, 2),
            videos_per_s=round(len(prompts) / wall, 3),
        )
        if not args.skip_breakdown:
            out = os.path.join(tmp, "breakdown")
            os.makedirs(out)
            stdout = _run([sys.executable, "-c", BREAKDOWN, PROMPT, out], env, cwd=root)[2]
            _emit("breakdown_warm_cache_wall_cpu_s", **json.loads(stdout.strip().splitlines()[-1]))


if __name__ == "__main__":
    main()
