"""A/B of issue #22's fix: `Linear` on CPU as a dot_general (before 665c826) vs one 2-D matmul.

  python bench/contract_ab.py --frames 20 --rounds 10

Builds bench/peer_latte.py's train step (flow loss + backward + AdamW) twice in one process, with
the pre-665c826 `layers._contract` and with main's, calling `jax.clear_caches()` before each
build (without it jax reuses the first trace and both programs are the same), checks that the
losses agree to the bit, counts the transposes in each optimized HLO, and times the two
interleaved: best / median ms. On a shared machine record `uptime` beside the figures.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import peer_latte  # noqa: E402  (the peer-matched model and its inputs)


def dot_general_contract(x, kernel, n_in: int):
    """`layers._contract` as it was before 665c826: only multi-axis kernels flattened on CPU."""
    import jax
    import jax.numpy as jnp

    from vdm.models.attention import current_platform

    in_shape, out_shape = kernel.shape[:n_in], kernel.shape[n_in:]
    if current_platform() == "cpu" and (n_in > 1 or len(out_shape) > 1):
        lead = x.shape[: x.ndim - n_in]
        k2 = kernel.reshape(math.prod(in_shape), math.prod(out_shape))
        y = jnp.dot(x.reshape(*lead, math.prod(in_shape)), k2)
        return y.reshape(*lead, *out_shape)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    return jax.lax.dot_general(x, kernel, (contract, ((), ())))


def build(contract, frames: int):
    """(compiled train step, its inputs, transposes in its optimized HLO) with `contract`."""
    import jax

    from vdm.models import layers

    model, params, (x0, _, ctx, mask) = peer_latte._vdm_inputs(frames)
    step, tx = peer_latte.vdm_step(model)
    main_contract = layers._contract
    jax.clear_caches()
    layers._contract = contract
    try:
        args = (params, tx.init(params), jax.random.key(0), x0, ctx, mask)
        compiled = jax.jit(step).lower(*args).compile()
    finally:
        layers._contract = main_contract
    return compiled, args, compiled.as_text().count(" transpose(")


def main() -> None:
    import jax
    import numpy as np

    from vdm.models import layers

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--rounds", type=int, default=10)
    a = p.parse_args()
    variants = {"before": build(dot_general_contract, a.frames)}
    variants["after"] = build(layers._contract, a.frames)
    losses = {k: float(c(*args)[2]) for k, (c, args, _) in variants.items()}
    times = {k: [] for k in variants}
    for _ in range(a.rounds):
        for k, (c, args, _) in variants.items():
            t0 = time.perf_counter()
            jax.block_until_ready(c(*args))
            times[k].append((time.perf_counter() - t0) * 1e3)
    for k, (_, _, transposes) in variants.items():
        ts = times[k]
        best, median = min(ts), float(np.median(ts))
        print(f"{a.frames} frames, {k}: {transposes} transposes, loss {losses[k]!r}, "
              f"best {best:.0f} ms, median {median:.0f} ms ({a.rounds} rounds)")  # fmt: skip
    print("losses equal:", losses["before"] == losses["after"], "| load:", os.getloadavg())


if __name__ == "__main__":
    main()
