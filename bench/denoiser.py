"""Benchmark: the quickstart denoiser's train step, MFU, sampler scan overhead and scaling.

  python bench/denoiser.py                          # --quick (default sizes), the default sections
  python bench/denoiser.py --only peak,train        # a subset of sections
  python bench/denoiser.py --repeats 10 --matmul 4096
  python bench/denoiser.py --only variant --variant S --batch 32 --latent 5,8,8,8 \
      [--attention full] [--depth 6] [--remat block]   # any named size, any shape

The model is `Denoiser.from_config(configs/quickstart.py model, 8)` on random inputs: latents
5x8x8x8 (a 17x32x32 video), patch 1x2x2, context 24x384 (MiniLM). No VAE or text encoder is
loaded, so only the denoiser is measured (bench/train_step.py --config times the full task step,
VAE encode and text encoder included). Sections (`--only`):

  peak     jitted f32 matmul N x N x N -> GFLOP/s: this machine's peak, the MFU denominator.
  train    jitted flow-matching train step (forward + backward + AdamW, donated), batch 32:
           time/step, videos/s, FLOPs/step from XLA's `cost_analysis()` and from the analytic
           `3 * Denoiser.flops_per_example * batch`, achieved GFLOP/s and MFU = achieved / peak.
  sampler  `vdm.diffusion.samplers.sample` (euler, dpmpp2m; 20 steps, guidance 4, batch 8, so 16
           per model call) vs 20 x one jitted guided model evaluation: scan overhead %.
  frames   train-step time (batch 8) at 17 vs 65 frames (latent t 5 vs 17) with factorized vs
           full attention, and the 65/17 ratio per mode.
  devices  the same train step on 1 device vs a mesh data=8 of fake CPU devices
           (XLA_FLAGS=--xla_force_host_platform_device_count=8), each in a fresh subprocess. The
           fake devices share the same cores, so this measures sharding overhead, not speedup.
  variant  (not run by default) one jitted forward + backward (MSE to the input, no optimizer) of
           `vdm.models.denoiser.variant_model(--variant)` with --latent t,h,w,c, --context L,D,
           --attention, --patch, --remat and --depth / --width / --heads overrides, at --batch:
           the model's summary, compile time, best / median wall and best CPU time, analytic
           GFLOP/s (3 x forward FLOPs) and MFU against `peak` when measured.

Every timing is best and median of `--repeats` runs after a compile + warm-up call. Prints one
JSON line per measurement and a markdown table at the end. On a shared machine wall-clock numbers
are noisy: report `uptime` with them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFAULT_SECTIONS = ("peak", "train", "sampler", "frames", "devices")
SECTIONS = (*DEFAULT_SECTIONS, "variant")
CONTEXT = (24, 384)  # L, D of MiniLM hidden states at text_encoder.max_length = 24.
LATENT_C = 8  # quickstart VAE latent channels.


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the default sizes (kept for CI)")
    p.add_argument("--only", default=",".join(DEFAULT_SECTIONS), help=f"comma list of {SECTIONS}")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    p.add_argument("--matmul", type=int, default=2048, help="N of the peak N x N x N matmul")
    p.add_argument("--batch", type=int, default=32, help="train-step batch (train, devices)")
    p.add_argument("--sample_batch", type=int, default=8, help="videos per sampler call")
    p.add_argument("--sample_steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--frames_batch", type=int, default=8, help="train-step batch in 'frames'")
    p.add_argument("--fake_devices", type=int, default=8)
    v = p.add_argument_group("variant", "the 'variant' section's model and inputs")
    v.add_argument("--variant", default="S", help="a key of vdm.models.denoiser.VARIANTS")
    v.add_argument("--latent", default="5,8,8,8", help="t,h,w,c of one example's latents")
    v.add_argument("--context", default="32,384", help="L,D of the text context")
    v.add_argument("--attention", default="factorized", help="factorized | full | spatial_only")
    v.add_argument("--patch", default="1,2,2", help="t,h,w of a patch")
    v.add_argument("--depth", type=int, default=None)
    v.add_argument("--width", type=int, default=None)
    v.add_argument("--heads", type=int, default=None)
    v.add_argument("--remat", default="none", help="none | block | dots")
    p.add_argument("--peak_gflops", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--child_devices", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.only = [s for s in args.only.split(",") if s]
    bad = set(args.only) - set(SECTIONS)
    if bad:
        p.error(f"--only: unknown sections {sorted(bad)}; valid: {', '.join(SECTIONS)}")
    return args


def _emit(record: dict) -> dict:
    print(json.dumps(record), flush=True)
    return record


def _load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def _time(fn, repeats: int, cpu: bool = False) -> dict:
    """Calls `fn()` (which must block) once to warm up, then `repeats` times: best/median ms
    (and with `cpu` the best process CPU time, which counts every core's work)."""
    fn()
    wall, cpu_s = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu_s.append(time.process_time() - c0)
    out = {
        "best_ms": round(min(wall) * 1e3, 2),
        "median_ms": round(statistics.median(wall) * 1e3, 2),
    }
    if cpu:
        out["cpu_best_ms"] = round(min(cpu_s) * 1e3, 2)
    return out


def _xla_flops(compiled) -> float | None:
    """FLOPs of a compiled program from XLA's cost analysis (a dict, or a list of one)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None else None


def _model(attention: str = "factorized"):
    from configs import quickstart
    from vdm.models.denoiser import Denoiser

    config = quickstart.get_config()
    config.model.attention = attention
    return Denoiser.from_config(config.model, LATENT_C), config


def _inputs(batch: int, latent_t: int, seed: int = 0):
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    ln, d = CONTEXT
    x = jnp.asarray(rng.normal(size=(batch, latent_t, 8, 8, LATENT_C)), jnp.float32)
    ctx = jnp.asarray(rng.normal(size=(batch, ln, d)), jnp.float32)
    mask = jnp.ones((batch, ln), jnp.int32)
    return x, ctx, mask


def _train_step_fn(model, config):
    """(params, opt_state, x0, ctx, mask, key) -> (params, opt_state, loss): one AdamW step."""
    import jax
    import jax.numpy as jnp
    import optax

    from vdm.diffusion import losses
    from vdm.models import denoiser as dn

    tx = optax.adamw(config.optim.learning_rate, weight_decay=0.0)

    def step(params, opt_state, x0, ctx, mask, key):
        null = (jnp.zeros_like(ctx[:1]), jnp.ones_like(mask[:1]))

        def loss_fn(p):
            per = losses.diffusion_loss(
                dn.model_fn(model, p), x0, (ctx, mask), key, config.diffusion, null
            )
            return per.mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return tx, step


def _measure_train(model, config, batch, latent_t, repeats, peak, mesh=None) -> dict:
    """Compiles and times the train step; FLOPs (XLA + analytic), GFLOP/s and MFU."""
    import jax

    x, ctx, mask = _inputs(batch, latent_t)
    params = jax.jit(model.init)(jax.random.key(0), x, x[:, 0, 0, 0, 0], ctx, mask)["params"]
    tx, step = _train_step_fn(model, config)
    opt_state = tx.init(params)
    key = jax.random.key(1)
    if mesh is not None:
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        params, opt_state = jax.device_put((params, opt_state), rep)
        x, ctx, mask = jax.device_put((x, ctx, mask), data)
        jitted = jax.jit(
            step,
            in_shardings=(rep, rep, data, data, data, rep),
            out_shardings=(rep, rep, rep),
            donate_argnums=(0, 1),
        )
    else:
        jitted = jax.jit(step, donate_argnums=(0, 1))
    t0 = time.perf_counter()
    compiled = jitted.lower(params, opt_state, x, ctx, mask, key).compile()
    compile_s = time.perf_counter() - t0
    state = [params, opt_state]

    def run():
        state[0], state[1], loss = compiled(state[0], state[1], x, ctx, mask, key)
        jax.block_until_ready(loss)

    t = _time(run, repeats)
    xla = _xla_flops(compiled)
    analytic = 3.0 * model.flops_per_example((latent_t, 8, 8, LATENT_C), *CONTEXT) * batch
    best_s = t["best_ms"] / 1e3
    # With sharding XLA reports the per-device program; the step's total is that x devices.
    devices = 1 if mesh is None else mesh.size
    xla_total = None if xla is None else xla * devices
    rec = {
        "batch": batch,
        "latent": f"{latent_t}x8x8x{LATENT_C}",
        "attention": model.attention,
        "compile_s": round(compile_s, 1),
        **t,
        "videos_per_s": round(batch / best_s, 1),
        "steps_per_s": round(1 / best_s, 2),
        "xla_gflop_per_step": None if xla_total is None else round(xla_total / 1e9, 3),
        "analytic_gflop_per_step": round(analytic / 1e9, 3),
    }
    flops = xla_total if xla_total else analytic
    rec["achieved_gflops"] = round(flops / best_s / 1e9, 2)
    if peak:
        rec["mfu_pct"] = round(100 * flops / best_s / 1e9 / peak, 1)
    return rec


def bench_peak(args) -> dict:
    import jax
    import jax.numpy as jnp

    n = args.matmul
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), jnp.float32)
    b = jax.random.normal(k2, (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul).lower(a, b).compile()
    t = _time(lambda: jax.block_until_ready(mm(a, b)), args.repeats)
    flops = 2.0 * n**3
    return _emit(
        {
            "what": "peak_matmul_f32",
            "n": n,
            **t,
            "gflops_best": round(flops / t["best_ms"] * 1e3 / 1e9, 1),
            "gflops_median": round(flops / t["median_ms"] * 1e3 / 1e9, 1),
            "load": _load(),
        }
    )


def bench_train(args, peak) -> dict:
    model, config = _model()
    rec = _measure_train(model, config, args.batch, 5, args.repeats, peak)
    return _emit({"what": "train_step", **rec, "peak_gflops": peak, "load": _load()})


def bench_sampler(args) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from vdm.diffusion import samplers
    from vdm.models import denoiser as dn

    model, config = _model()
    b = args.sample_batch
    noise, ctx, mask = _inputs(b, 5, seed=2)
    params = jax.jit(model.init)(jax.random.key(0), noise, noise[:, 0, 0, 0, 0], ctx, mask)[
        "params"
    ]
    cond = (ctx, mask)
    null = (jnp.zeros_like(ctx[:1]), jnp.ones_like(mask[:1]))

    model_fn = dn.model_fn(model, params)
    guidance = jnp.float32(args.guidance)

    # One guided evaluation = one model call on the [cond; uncond] batch of 2B + the CFG mix.
    @jax.jit
    def guided(p, x, t, c, n):
        return samplers.guided_output(dn.model_fn(model, p), x, t, c, n, guidance)

    t_mid = jnp.float32(0.5)
    ev = _time(
        lambda: jax.block_until_ready(guided(params, noise, t_mid, cond, null)), args.repeats
    )
    records = [
        _emit(
            {
                "what": "guided_eval",
                "batch": b,
                "model_batch": 2 * b,
                **ev,
                "load": _load(),
            }
        )
    ]
    n = args.sample_steps
    for sampler in ("euler", "dpmpp2m"):

        def run(sampler=sampler):
            out = samplers.sample(
                model_fn, noise, cond, null, sampler=sampler, num_steps=n,
                guidance=args.guidance, diffusion_config=config.diffusion,
            )  # fmt: skip
            jax.block_until_ready(out)

        t = _time(run, args.repeats)
        rec = {"what": "sampler_scan", "sampler": sampler, "batch": b, "steps": n, **t}
        for k in ("best", "median"):
            evals = n * ev[f"{k}_ms"]
            rec[f"sum_evals_{k}_ms"] = round(evals, 1)
            rec[f"overhead_{k}_pct"] = round(100 * (t[f"{k}_ms"] - evals) / evals, 1)
        rec["load"] = _load()
        records.append(_emit(rec))
    return records


def bench_frames(args, peak) -> list[dict]:
    records = []
    for attention in ("factorized", "full"):
        model, config = _model(attention)
        for frames, latent_t in ((17, 5), (65, 17)):
            rec = _measure_train(model, config, args.frames_batch, latent_t, args.repeats, peak)
            records.append(_emit({"what": "frames_attention", "frames": frames, **rec,
                                  "load": _load()}))  # fmt: skip
    for attention in ("factorized", "full"):
        rows = {r["frames"]: r for r in records if r["attention"] == attention}
        _emit(
            {
                "what": "frames_ratio_65_over_17",
                "attention": attention,
                "time_ratio_best": round(rows[65]["best_ms"] / rows[17]["best_ms"], 2),
                "time_ratio_median": round(rows[65]["median_ms"] / rows[17]["median_ms"], 2),
                "analytic_flops_ratio": round(
                    rows[65]["analytic_gflop_per_step"] / rows[17]["analytic_gflop_per_step"], 2
                ),
            }
        )
    return records


def bench_variant(args, peak) -> dict:
    """One jitted forward + backward of a named variant on random inputs (see the docstring)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from vdm.models import denoiser as dn
    from vdm.models.layers import count_params

    (t, h, w, c), (ln, d) = (tuple(map(int, s.split(","))) for s in (args.latent, args.context))
    over = {k: v for k, v in dict(depth=args.depth, width=args.width, num_heads=args.heads).items()
            if v is not None}  # fmt: skip
    model = dn.variant_model(
        args.variant, c, attention=args.attention, remat=args.remat,
        patch_size=tuple(map(int, args.patch.split(","))), **over,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    b = args.batch
    x = jnp.asarray(rng.normal(size=(b, t, h, w, c)), jnp.float32)
    tt = jnp.asarray(rng.uniform(size=(b,)), jnp.float32)
    ctx = jnp.asarray(rng.normal(size=(b, ln, d)), jnp.float32)
    mask = jnp.ones((b, ln), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), x, tt, ctx, mask)["params"]
    print(model.summary(params, latent_shape=(t, h, w, c), context_shape=(ln, d)), flush=True)

    def loss(p):
        return jnp.mean((model.apply({"params": p}, x, tt, ctx, mask) - x) ** 2)

    t0 = time.perf_counter()
    step = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
    compile_s = time.perf_counter() - t0
    timing = _time(lambda: jax.block_until_ready(step(params)), args.repeats, cpu=True)
    flops = 3 * b * model.flops_per_example((t, h, w, c), ln, d)
    best_s = timing["best_ms"] / 1e3
    rec = {"what": "variant_fwd_bwd", "variant": args.variant, "batch": b,
           "latent": "x".join(map(str, (t, h, w, c))), "attention": model.attention,
           "remat": model.remat, "params": count_params(params),
           "compile_s": round(compile_s, 1), **timing,
           "analytic_gflop_per_step": round(flops / 1e9, 3),
           "achieved_gflops": round(flops / best_s / 1e9, 2)}  # fmt: skip
    if peak:
        rec["mfu_pct"] = round(100 * flops / best_s / 1e9 / peak, 1)
    return _emit({**rec, "load": _load()})


def _child(args) -> None:
    """Runs in a subprocess: the train step on `--child_devices` devices (mesh data=k)."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    k = args.child_devices
    mesh = Mesh(np.asarray(jax.devices()[:k]), ("data",)) if k > 1 else None
    model, config = _model()
    rec = _measure_train(model, config, args.batch, 5, args.repeats, args.peak_gflops, mesh)
    _emit({"what": "train_step_devices", "devices": k, "jax_device_count": jax.device_count(),
           **rec, "load": _load()})  # fmt: skip


def bench_devices(args, peak) -> list[dict]:
    records = []
    for k in (1, args.fake_devices):
        env = dict(os.environ)
        flags = env.get("XLA_FLAGS", "")
        if k > 1:
            flags += f" --xla_force_host_platform_device_count={k}"
        env["XLA_FLAGS"] = flags.strip()
        cmd = [sys.executable, os.path.abspath(__file__), "--child_devices", str(k),
               "--batch", str(args.batch), "--repeats", str(args.repeats),
               "--peak_gflops", str(peak or 0.0)]  # fmt: skip
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if out.returncode:
            sys.stderr.write(out.stderr[-3000:])
            raise RuntimeError(f"devices child with {k} devices failed (rc {out.returncode})")
        for line in out.stdout.splitlines():
            if line.startswith("{"):
                rec = json.loads(line)
                print(line, flush=True)
                records.append(rec)
    return records


def _table(peak_rec, train_rec, sampler_recs, frames_recs, device_recs, variant_rec) -> str:
    lines = ["| measurement | best | median | notes |", "|---|---|---|---|"]
    if peak_rec:
        lines.append(
            f"| peak f32 matmul {peak_rec['n']}^3 | {peak_rec['gflops_best']} GFLOP/s | "
            f"{peak_rec['gflops_median']} GFLOP/s | {peak_rec['best_ms']} ms best |"
        )

    def train_row(label, r):
        mfu = f", MFU {r['mfu_pct']}%" if "mfu_pct" in r else ""
        return (
            f"| {label} | {r['best_ms']} ms | {r['median_ms']} ms | {r['videos_per_s']} videos/s, "
            f"XLA {r['xla_gflop_per_step']} / analytic {r['analytic_gflop_per_step']} GFLOP/step, "
            f"{r['achieved_gflops']} GFLOP/s{mfu} |"
        )

    if train_rec:
        lines.append(train_row(f"train step batch {train_rec['batch']}", train_rec))
    for r in sampler_recs:
        if r["what"] == "guided_eval":
            lines.append(f"| guided eval (batch {r['batch']}x2) | {r['best_ms']} ms | "
                         f"{r['median_ms']} ms | one CFG model call |")  # fmt: skip
        else:
            lines.append(
                f"| sample {r['sampler']} {r['steps']} steps | {r['best_ms']} ms | "
                f"{r['median_ms']} ms | overhead vs {r['steps']} evals: "
                f"{r['overhead_best_pct']}% (best), {r['overhead_median_pct']}% (median) |"
            )
    for r in frames_recs:
        lines.append(train_row(f"train b{r['batch']} {r['frames']} frames {r['attention']}", r))
    for attention in ("factorized", "full"):
        rows = {r["frames"]: r for r in frames_recs if r["attention"] == attention}
        if 17 in rows and 65 in rows:
            a, b = rows[65], rows[17]
            flops = a["analytic_gflop_per_step"] / b["analytic_gflop_per_step"]
            lines.append(
                f"| ratio 65/17 frames {attention} | {a['best_ms'] / b['best_ms']:.2f}x | "
                f"{a['median_ms'] / b['median_ms']:.2f}x | analytic FLOPs {flops:.2f}x |"
            )
    for r in device_recs:
        lines.append(train_row(f"train b{r['batch']} on {r['devices']} device(s)", r))
    if variant_rec:
        r = variant_rec
        mfu = f", MFU {r['mfu_pct']}%" if "mfu_pct" in r else ""
        lines.append(
            f"| variant {r['variant']} fwd+bwd b{r['batch']} {r['latent']} {r['attention']} | "
            f"{r['best_ms']} ms | {r['median_ms']} ms | cpu {r['cpu_best_ms']} ms best, analytic "
            f"{r['analytic_gflop_per_step']} GFLOP, {r['achieved_gflops']} GFLOP/s{mfu} |"
        )
    return "\n".join(lines)


def main(argv=None):
    args = _parse(argv)
    if args.child_devices:
        _child(args)
        return
    import jax

    print(f"# jax {jax.__version__}, devices {jax.devices()}, load {_load()}", flush=True)
    peak_rec = bench_peak(args) if "peak" in args.only else None
    peak = peak_rec["gflops_best"] if peak_rec else args.peak_gflops or None
    train_rec = bench_train(args, peak) if "train" in args.only else None
    sampler_recs = bench_sampler(args) if "sampler" in args.only else []
    frames_recs = bench_frames(args, peak) if "frames" in args.only else []
    device_recs = bench_devices(args, peak) if "devices" in args.only else []
    variant_rec = bench_variant(args, peak) if "variant" in args.only else None
    print()
    print(_table(peak_rec, train_rec, sampler_recs, frames_recs, device_recs, variant_rec))
    print(f"\nload average at end: {_load()}")


if __name__ == "__main__":
    main()
