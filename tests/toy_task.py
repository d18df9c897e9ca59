"""A tiny Task and data iterator for the training-loop tests (no data set, no VAE, no text).

The model is a two-layer MLP over a flattened 2x4x4x3 video with logically partitioned kernels
(`embed` x `mlp`), an activation constraint on `batch`, an unboxed scalar (replicated) and a
length-3 `embed` vector (3 does not divide fsdp=2, so it exercises the replication fallback).
The loss is denoising: predict the clean video (plus a frozen shift) from a noisy one.

Run as a script it trains in a workdir; the kill/resume and multi-process tests use that:

  python tests/toy_task.py --workdir /tmp/w --set train.num_steps=12 [--kill_at 9]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from vdm import parallel, rng  # noqa: E402
from vdm.tasks.base import Task  # noqa: E402
from vdm.train import loop  # noqa: E402

T, H, W = 2, 4, 4
DIM = T * H * W * 3  # 96 values per video.


def _part(init, names):
    return nn.with_logical_partitioning(init, names)


class ToyModel(nn.Module):
    """Denoising MLP on flattened videos."""

    hidden: int = 32  # hidden width (logical axis "mlp").
    features: int = DIM  # output width (logical axis "embed").
    dtype: Any = jnp.float32  # compute dtype; params stay float32.

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(
            self.hidden,
            dtype=self.dtype,
            kernel_init=_part(nn.initializers.lecun_normal(), ("embed", "mlp")),
            bias_init=_part(nn.initializers.zeros_init(), ("mlp",)),
            name="fc1",
        )(x)
        h = nn.with_logical_constraint(h, ("batch", "mlp"))
        h = nn.gelu(h)
        y = nn.Dense(
            self.features,
            dtype=self.dtype,
            kernel_init=_part(nn.initializers.lecun_normal(), ("mlp", "embed")),
            bias_init=_part(nn.initializers.zeros_init(), ("embed",)),
            name="fc2",
        )(h)
        gain = self.param("gain", nn.initializers.ones_init(), ())  # unboxed -> replicated
        odd = self.param("odd", _part(nn.initializers.zeros_init(), ("embed",)), (3,))
        return (y * gain + jnp.mean(odd)).astype(jnp.float32)


class ToyTask(Task):
    """Learns ToyModel; `noise=False` makes the loss deterministic (pmap == jit exactly)."""

    tokens_per_example = T * H * W

    def __init__(self, config, *, noise: bool = True, hidden: int = 32):
        super().__init__(config)
        self.noise = noise
        self.model = ToyModel(hidden=hidden)
        self.eval_calls: list[tuple[int, float]] = []

    def dummy_batch(self, batch_size):
        return {
            "video": np.zeros((batch_size, T, H, W, 3), np.uint8),
            "scale": np.ones((batch_size,), np.float32),
        }

    def init(self, key, batch):
        return self.model.init(key, self._inputs(batch["video"]))["params"]

    def frozen(self):
        shift = np.linspace(-0.1, 0.1, DIM, dtype=np.float32)
        return {"shift": nn.LogicallyPartitioned(jnp.asarray(shift), ("embed",))}

    @staticmethod
    def _inputs(video):
        return video.reshape(video.shape[0], -1).astype(jnp.float32) / 127.5 - 1.0

    def per_example_loss(self, params, frozen, batch, key):
        x = self._inputs(batch["video"])
        x = nn.with_logical_constraint(x, ("batch", "embed"))
        if self.noise:
            x_noisy = x + 0.5 * jax.random.normal(rng.stream(key, "noise"), x.shape)
        else:
            x_noisy = 0.5 * x
        pred = self.model.apply({"params": params}, x_noisy)
        target = x + frozen["shift"]
        return jnp.mean((pred - target) ** 2, axis=-1) * batch["scale"]

    def loss(self, params, frozen, batch, key):
        per_example = self.per_example_loss(params, frozen, batch, key)
        return jnp.mean(per_example), {"max_example_loss": jnp.max(per_example)}

    def device_batch(self, batch):
        return {"video": np.asarray(batch["video"]), "scale": np.asarray(batch["scale"])}

    def evaluate(self, params, frozen, step, workdir):
        batch = {"video": make_examples(0, 10_000, 8), "scale": np.ones((8,), np.float32)}
        mse = float(jnp.mean(self.per_example_loss(params, frozen, batch, jax.random.key(0))))
        self.eval_calls.append((step, mse))
        return {"mse": mse}

    def metadata(self, params, frozen):
        leaves = [np.asarray(p) for p in jax.tree.leaves(params)]
        return {
            "toy": True,
            "dim": DIM,
            "param_norm": float(np.sqrt(sum(np.sum(p**2) for p in leaves))),
        }


def make_examples(seed: int, start: int, n: int) -> np.ndarray:
    """Videos number start..start+n-1 of the stream (each from its own seed: order-exact)."""
    return np.stack(
        [
            np.random.default_rng([seed, j]).integers(0, 256, (T, H, W, 3), np.uint8)
            for j in range(start, start + n)
        ]
    )


class ToyIterator:
    """Deterministic batches with a grain-like checkpointable state (JSON bytes).

    Batch i holds examples [i*B, (i+1)*B) of the global stream; this process gets its
    `process_index`-th slice. Fault injection for tests (by batch index): `kill_at` (SIGKILL
    self), `term_at` (SIGTERM self), `nan_at` (scale = NaN), `sleep` seconds per batch.
    """

    def __init__(
        self,
        *,
        batch_size,
        seed,
        process_index,
        process_count,
        kill_at=None,
        term_at=None,
        nan_at=None,
        sleep=0.0,
    ):
        self.global_batch = batch_size
        self.local_batch = batch_size // process_count
        self.seed = seed
        self.process_index = process_index
        self.next_index = 0
        self.kill_at, self.term_at, self.nan_at, self.sleep = kill_at, term_at, nan_at, sleep

    def __iter__(self):
        return self

    def __next__(self):
        i = self.next_index
        if self.kill_at is not None and i == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.term_at is not None and i == self.term_at:
            os.kill(os.getpid(), signal.SIGTERM)
        if self.sleep:
            time.sleep(self.sleep)
        start = i * self.global_batch + self.process_index * self.local_batch
        scale = np.ones((self.local_batch,), np.float32)
        if self.nan_at is not None and i == self.nan_at:
            scale[:] = np.nan
        self.next_index += 1
        return {
            "video": make_examples(self.seed, start, self.local_batch),
            "scale": scale,
            "caption": np.array([f"toy {start + j}" for j in range(self.local_batch)]),
        }

    def get_state(self) -> bytes:
        return json.dumps({"next_index": self.next_index}).encode()

    def set_state(self, state: bytes) -> None:
        self.next_index = json.loads(state.decode())["next_index"]


def iterator_factory(**faults):
    """A `make_iterator` for `train_and_evaluate` yielding ToyIterators (with fault injection)."""

    def make(config, split, *, batch_size, shuffle, seed, process_index, process_count):
        del config, split, shuffle
        return ToyIterator(
            batch_size=batch_size,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
            **faults,
        )

    return make


TOY_OVERRIDES = {
    "train.num_steps": 8,
    "train.batch_size": 8,
    "train.log_every_steps": 2,
    "train.eval_every_steps": 0,
    "checkpoint.every_steps": 4,
    "checkpoint.async_save": True,
    "optim.learning_rate": 1e-2,
    "optim.warmup_steps": 2,
    "optim.ema_decay": 0.9,
    "mesh.shape": {"data": -1, "fsdp": 1, "tensor": 1},
}


def toy_config(overrides: dict | None = None):
    """configs/base.py with the toy defaults above plus `overrides` (dotted keys)."""
    from vdm.config import load_config

    merged = dict(TOY_OVERRIDES)
    merged.update(overrides or {})
    return load_config(os.path.join(ROOT, "configs", "base.py"), merged)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--set", action="append", default=[], help="config key=value")
    parser.add_argument("--kill_at", type=int, default=None)
    parser.add_argument("--term_at", type=int, default=None)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--coordinator_address", default=None)
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)
    args = parser.parse_args(argv)

    parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    overrides = dict(kv.split("=", 1) for kv in args.set)
    config = toy_config({k: v for k, v in overrides.items()})
    loop.train_and_evaluate(
        config,
        args.workdir,
        task=ToyTask(config),
        make_iterator=iterator_factory(
            kill_at=args.kill_at, term_at=args.term_at, sleep=args.sleep
        ),
    )
    if jax.process_count() > 1:
        jax.distributed.shutdown()


def finish(proc, timeout: float = 180) -> tuple[int, str]:
    """(exit code, combined output) of a toy-run subprocess; kills it and fails past `timeout`."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"subprocess timed out:\n{out[-3000:]}") from None
    return proc.returncode, out


if __name__ == "__main__":
    main()
