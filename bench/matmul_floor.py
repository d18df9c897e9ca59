"""Benchmark: how fast can the peer-matched denoiser's train step be on this CPU? (issue #22)

  python bench/matmul_floor.py                 # 5 and 20 latent frames, repeats 10
  python bench/matmul_floor.py --frames 5 --repeats 5

For the model of bench/peer_latte.py (vdm `Denoiser` depth 11, width 256, batch 8, 8x8 latents,
16 text tokens), times back to back in one process:
  matmuls   every dense matmul of one train step and nothing else: for each kernel of the model,
            at the row count it sees (tokens, text tokens or one row per example), the forward
            `x W`, the input gradient `dy W^T` and the weight gradient `x^T dy`, all in one
            jitted program (no attention, norms, modulation, GELU, loss or optimizer).
  sampling  the forward matmuls alone at sampling's batch (2 = one guided example), x 30 steps.
  model     the real train step (flow loss + backward + AdamW, as bench/peer_latte.py).
  adamw     the optimizer update alone (all parameters, one jitted program).
with a 2048^3 float32 matmul peak at the start and the end. The matmul program is a floor for
the train step on XLA:CPU: it does less work than the step and lets XLA schedule the matmuls
freely (the model's are a chain). FLOPs are analytic (2 x rows x in x out per matmul).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import peer_latte  # noqa: E402  (the peer-matched model and its train step)


def _rows(path: str, tokens: int, batch: int, text: int) -> int:
    """How many rows a kernel at `path` multiplies in one forward of the denoiser."""
    if "text_embed" in path or ("cross_attn" in path and ("key" in path or "value" in path)):
        return batch * text
    if "_mod" in path or "time_embed" in path or "pooled_embed" in path:
        return batch
    return tokens


def _kernels(params, tokens: int, batch: int, text: int) -> list[tuple[int, int, int]]:
    """(rows, in, out) of every kernel, its axes flattened to a 2-D matrix as on CPU."""
    import flax.linen as nn
    import jax

    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(params)):
        name = jax.tree_util.keystr(path)
        if not name.endswith("['kernel']"):
            continue
        n_in = 2 if name.endswith("['out']['kernel']") else 1  # (heads, kv, embed)
        shape = leaf.shape
        rows = _rows(name, tokens, batch, text)
        out.append((rows, math.prod(shape[:n_in]), math.prod(shape[n_in:])))
    return out


def _matmul_program(kernels, backward: bool):
    """A jitted program of the kernels' forward (and gradient) matmuls, and its inputs."""
    import jax
    import jax.numpy as jnp

    key = jax.random.key(0)
    xs = [
        jax.random.normal(jax.random.fold_in(key, i), (r, a)) for i, (r, a, _) in enumerate(kernels)
    ]
    ws = [jnp.full((a, b), 0.01) for _, a, b in kernels]
    dys = [jnp.full((r, b), 0.01) for r, _, b in kernels]

    def run(xs, ws, dys):
        outs = [x @ w for x, w in zip(xs, ws, strict=True)]
        if backward:
            outs += [dy @ w.T for dy, w in zip(dys, ws, strict=True)]
            outs += [x.T @ dy for x, dy in zip(xs, dys, strict=True)]
        return outs

    compiled = jax.jit(run).lower(xs, ws, dys).compile()
    return (lambda: jax.block_until_ready(compiled(xs, ws, dys))), compiled


def _peak(repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    a = jnp.ones((2048, 2048), jnp.float32)
    mm = jax.jit(jnp.matmul).lower(a, a).compile()
    t = peer_latte._time(lambda: jax.block_until_ready(mm(a, a)), repeats)
    return peer_latte._emit(
        {"what": "peak", **t, "gflops": round(2 * 2048**3 / t["best_ms"] / 1e6, 1)}
    )


def _frames(frames: int, args) -> list[dict]:
    """The four timings at one latent frame count (see the module docstring)."""
    import jax
    import jax.numpy as jnp
    import optax

    batch, hw, c, text = peer_latte.BATCH, peer_latte.HW, peer_latte.C, peer_latte.TEXT
    model, params, (x0, _, ctx, mask) = peer_latte._vdm_inputs(frames)
    tokens = batch * frames * (hw // 2) ** 2
    common = {"frames": frames}
    recs = []
    for what, rows_batch, backward in (("matmuls", batch, True), ("sampling", 2, False)):
        kernels = _kernels(params, tokens * rows_batch // batch, rows_batch, text[0])
        run, _ = _matmul_program(kernels, backward)
        gflop = sum(2 * r * a * b for r, a, b in kernels) * (3 if backward else 1) / 1e9
        timing = peer_latte._time(run, args.repeats)
        if what == "sampling":  # one step's matmuls, times the sampler's step count
            timing = {k: round(v * peer_latte.STEPS, 1) for k, v in timing.items()}
            gflop *= peer_latte.STEPS
        recs.append(peer_latte._emit({**common, "what": what, **timing, "gflop": round(gflop, 2)}))
    flops = model.flops_per_example((frames, hw, hw, c), *text) * batch
    args.only = ["train"]
    recs.append(
        peer_latte._vdm_train(
            model, jax.tree.map(jnp.copy, params), x0, ctx, mask, args, {**common}, flops
        )
    )
    tx = optax.adamw(peer_latte.LR)
    state = [tx.init(params), params]
    update = (
        jax.jit(lambda g, s, p: tx.update(g, s, p), donate_argnums=(1,))
        .lower(params, state[0], params)
        .compile()
    )

    def adamw():
        updates, state[0] = update(params, state[0], params)
        jax.block_until_ready(updates)

    recs.append(
        peer_latte._emit({**common, "what": "adamw", **peer_latte._time(adamw, args.repeats)})
    )
    return recs


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--frames", default="5,20", help="latent frame counts (comma list)")
    p.add_argument("--repeats", type=int, default=10, help="timed runs after a warm-up")
    args = p.parse_args(argv)
    peaks, recs = [_peak(args.repeats)], []
    for f in (int(x) for x in args.frames.split(",")):
        recs += _frames(f, args)
    peaks.append(_peak(args.repeats))
    best = max(r["gflops"] for r in peaks)
    print(
        f"\nmatmul peak f32 2048^3 (start, end): {peaks[0]['gflops']}, {peaks[1]['gflops']} GFLOP/s"
    )
    print("| frames | program | ms best / median | GFLOP | GFLOP/s (% of peak) |")
    print("|---|---|---|---|---|")
    for r in recs:
        gflop = r.get("gflop", r.get("xla_step_gflop"))
        rate = (
            f"{gflop / r['best_ms'] * 1e3:.0f} ({100 * gflop / r['best_ms'] * 1e3 / best:.0f}%)"
            if gflop
            else "-"
        )
        ms = f"{r['best_ms']:.0f} / {r['median_ms']:.0f}"
        print(f"| {r['frames']} | {r['what']} | {ms} | {gflop or '-'} | {rate} |")
    print(f"load average at the end: {peer_latte._load()}")


if __name__ == "__main__":
    main()
