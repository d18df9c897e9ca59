"""Benchmark: train-step throughput and checkpoint save time (blocking vs async).

  python bench/train_step.py                      # toy MLP task (tests/toy_task.py), quick size
  python bench/train_step.py --full               # toy MLP with 3.2M params, batch 32, 50 steps
  python bench/train_step.py --hidden 2048 --batch_size 64 --steps 50
  python bench/train_step.py --fake_devices 8 --set mesh.shape="{'data': 4, 'fsdp': 2}"
  python bench/train_step.py --config configs/quickstart.py   # the real task of that config

The step is the real one of `vdm.train.setup.build` (jit with shardings and donation, or pmap)
fed with `task.dummy_batch` in the run's layout, so the input pipeline is not measured (see
bench/data_pipeline.py). Throughput is timed over `--steps` steps after a compile + warm-up step.
Checkpoint save of the full state (params, optimizer, EMA): "blocking" = orbax without async
(the call returns when the files are on disk); "async" = the time `save()` blocks training (the
device->host copy) and the time until the background write finishes.

Prints one JSON line per measurement. On a shared machine wall-clock numbers mostly measure the
contention; `cpu_seconds` is reported alongside.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=None, help="config file (default: the toy task)")
    p.add_argument("--set", action="append", default=[], help="config override key=value")
    p.add_argument("--full", action="store_true", help="larger defaults (quick is the default)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (quick 20, full 50)")
    p.add_argument("--batch_size", type=int, default=None, help="global batch (toy: 8 / 32)")
    p.add_argument("--hidden", type=int, default=None, help="toy MLP width (1024 / 16384)")
    p.add_argument("--fake_devices", type=int, default=0, help="XLA CPU device count (0 = real)")
    p.add_argument("--saves", type=int, default=3, help="checkpoint saves timed per mode")
    args = p.parse_args()
    args.steps = args.steps or (50 if args.full else 20)
    args.hidden = args.hidden or (16384 if args.full else 1024)
    if args.config is None and not args.batch_size:
        args.batch_size = 32 if args.full else 8
    return args


def _emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def main():
    args = _parse()
    if args.fake_devices:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={args.fake_devices}"
        )
    import jax
    import numpy as np

    from vdm import parallel
    from vdm.config import load_config
    from vdm.io import checkpoint as ckpt_lib
    from vdm.models.layers import count_params
    from vdm.rng import base_key
    from vdm.train import setup as train_setup

    overrides = dict(kv.split("=", 1) for kv in args.set)
    if args.config is None:
        from tests.toy_task import ToyTask, toy_config

        if args.batch_size:
            overrides["train.batch_size"] = str(args.batch_size)
        config = toy_config(overrides)
        task = ToyTask(config, hidden=args.hidden)
        name = f"toy_mlp_h{args.hidden}"
    else:
        if args.batch_size:
            overrides["train.batch_size"] = str(args.batch_size)
        config = load_config(args.config, overrides)
        from vdm.tasks import get_task

        task = get_task(config)
        name = f"{os.path.basename(args.config)}:{config.stage}"

    mesh = parallel.make_mesh(config.mesh)
    batch_size = int(config.train.batch_size)
    parallel.check_batch_size(batch_size, mesh)
    setup = train_setup.build(task, config, mesh)
    state = train_setup.init_state(setup)
    frozen = train_setup.place_frozen(setup)
    step = setup.train_step
    num_params = count_params(state.params)
    state = setup.layout.put_state(state)
    batch = setup.layout.put_batch(task.dummy_batch(batch_size // jax.process_count()))
    key = base_key(config.seed)
    common = {
        "task": name,
        "params": num_params,
        "mesh": parallel.describe_mesh(mesh),
        "parallel": config.parallel,
        "batch": batch_size,
    }

    t0, c0 = time.perf_counter(), time.process_time()
    state, metrics = step(state, batch, key, frozen)
    jax.block_until_ready(metrics)
    _emit(
        {
            **common,
            "what": "compile+first_step",
            "seconds": round(time.perf_counter() - t0, 2),
            "cpu_seconds": round(time.process_time() - c0, 2),
        }
    )
    state, metrics = step(state, batch, key, frozen)  # warm-up
    jax.block_until_ready(metrics)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        state, metrics = step(state, batch, key, frozen)
    jax.block_until_ready((state, metrics))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    record = {
        **common,
        "what": "train_step",
        "steps": args.steps,
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu, 2),
        "steps_per_sec": round(args.steps / seconds, 2),
        "videos_per_sec": round(args.steps * batch_size / seconds, 1),
        "ms_per_step": round(1000 * seconds / args.steps, 2),
    }
    tokens = task.tokens_per_example
    if tokens:
        record["tokens_per_sec"] = round(args.steps * batch_size * tokens / seconds, 1)
    _emit(record)

    canonical = setup.layout.global_view(state)
    items = {
        "params": canonical.params,
        "opt_state": {"step": canonical.step, "opt_state": canonical.opt_state},
    }
    if canonical.ema_params is not None:
        items["ema"] = canonical.ema_params
    nbytes = sum(np.dtype(x.dtype).itemsize * x.size for x in jax.tree.leaves(items))
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("blocking", "async"):
            mngr = ckpt_lib.CheckpointManager(
                os.path.join(tmp, mode), max_to_keep=2, async_save=mode == "async"
            )
            blocked, total = [], []
            for i in range(args.saves + 1):  # the first save of a mode is a warm-up
                t0 = time.perf_counter()
                mngr.save(i, arrays=items, json_items={"config": config.to_dict()})
                t1 = time.perf_counter()
                mngr.wait()
                t2 = time.perf_counter()
                if i:
                    blocked.append(t1 - t0)
                    total.append(t2 - t0)
            mngr.close()
            _emit(
                {
                    **common,
                    "what": f"checkpoint_save_{mode}",
                    "state_mb": round(nbytes / 2**20, 2),
                    "saves": args.saves,
                    "blocking_s": round(float(np.median(blocked)), 3),
                    "until_on_disk_s": round(float(np.median(total)), 3),
                }
            )


if __name__ == "__main__":
    main()
