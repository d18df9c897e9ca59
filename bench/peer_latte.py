"""Benchmark: vdm's denoiser vs diffusers' Latte (the peer) on the same CPU, back to back.

  python bench/peer_latte.py                       # creates the peer venv on first use
  python bench/peer_latte.py --peer_python /path/to/venv/bin/python   # reuse a torch+diffusers
  VDM_PEER_PYTHON=/path/to/python python bench/peer_latte.py --frames 5 --repeats 5

The peer: diffusers `LatteTransformer3DModel` (6 spatial + 6 temporal blocks, 4 heads x 64,
patch 2, GEGLU MLP, 8 latent channels, 8x8 latents, caption_channels 384 with 16 text tokens,
cross-attention width 256, ada_norm_single), float32, no caption mask (Latte's mask does not
follow its per-frame repeat of the caption; every caption here is 16 real tokens, and vdm gets
an all-ones mask), torch CPU with `--threads` threads. It runs
in its own venv (torch==2.13.0 CPU wheel + diffusers; not a vdm dependency): `--peer_python`, or
$VDM_PEER_PYTHON, or `--peer_venv DIR` (default ~/.cache/vdm/peer_latte), which is created with
`python -m venv` + pip when it does not import torch and diffusers yet.
vdm: `Denoiser` depth 11, width 256, 4 heads, patch (1, 2, 2), sincos positions, factorized
attention (the forward FLOPs match the peer's within ~5%: both counts are printed), float32.

Measured per latent frame count (`--frames`, default 5 and 20), batch 8 unless said:
  forward   one forward pass (torch.inference_mode / jax.jit).
  train     one train step: flow-matching loss (x_t = (1-t) x0 + t noise, MSE to noise - x0, on
            a fresh t and noise each step) + backward + AdamW (lr 1e-4). Peer: zero_grad, forward,
            MSE, backward, AdamW.step, eager and (unless --no_compile) torch.compile'd model.
            vdm: one jitted, donated program (vdm.diffusion.losses.diffusion_loss + optax.adamw).
  sample    30 Euler steps of a batch-1 prompt with guidance 7, i.e. one batch-2 [cond; uncond]
            forward per step (vdm: `vdm.diffusion.samplers.sample(sampler="euler")`).
  full      (vdm only) the train step with model.attention="full", for the cost growth 5 -> 20.
Each timing: best and median of `--repeats` after a warm-up call; each framework runs in its own
subprocess, one after the other (never concurrently). A f32 2048^3 matmul peak is measured in both
frameworks at the start and the end; MFU = model FLOPs / best time / the best peak of the run,
with model FLOPs of a train step = 3 x the framework's own forward count (torch FlopCounterMode /
XLA cost_analysis). Load averages are printed with every record. Output: JSON lines, then a table.
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
BATCH, HW, C, TEXT = 8, 8, 8, (16, 384)
STEPS, GUIDANCE, LR = 30, 7.0, 1e-4
PEER_PINS = ("torch==2.13.0", "diffusers==0.42.1")
TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


def _load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def _time(fn, repeats: int) -> dict:
    """`fn()` (blocking) once to warm up, then `repeats` times: best / median ms."""
    fn()
    wall = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
    return {
        "best_ms": round(min(wall) * 1e3, 2),
        "median_ms": round(statistics.median(wall) * 1e3, 2),
    }


def _emit(rec: dict) -> dict:
    rec = {**rec, "load": _load()}
    print(json.dumps(rec), flush=True)
    return rec


# ------------------------------------------------------------------------------ the peer (torch)
def _latte(frames: int):
    from diffusers import LatteTransformer3DModel

    return LatteTransformer3DModel(
        num_attention_heads=4, attention_head_dim=64, in_channels=C, out_channels=C,
        num_layers=6, cross_attention_dim=256, patch_size=2, sample_size=HW,
        norm_type="ada_norm_single", caption_channels=TEXT[1], video_length=frames,
    )  # fmt: skip


def _peer_peak(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    t = _time(lambda: torch.mm(a, b), args.repeats)
    _emit({"fw": "peer", "what": "peak", **t, "gflops": round(2 * 2048**3 / t["best_ms"] / 1e6, 1)})


def _peer_train_step(model, opt, x0, ctx):
    import torch

    def step():
        opt.zero_grad(set_to_none=True)
        t = torch.rand(x0.shape[0])
        noise = torch.randn_like(x0)
        tb = t[:, None, None, None, None]
        xt = (1 - tb) * x0 + tb * noise
        out = model(xt, timestep=t * 1000, encoder_hidden_states=ctx,
                    encoder_attention_mask=None, return_dict=False)[0]  # fmt: skip
        loss = torch.nn.functional.mse_loss(out, noise - x0)
        loss.backward()
        opt.step()
        return loss

    return step


def _peer_sample(model, noise, ctx):
    import torch

    ctx2 = torch.cat([ctx, torch.zeros_like(ctx)])  # [cond; uncond], no mask (all tokens real)

    def run():
        with torch.inference_mode():
            x, ts = noise, torch.linspace(1.0, 0.0, STEPS + 1)
            for i in range(STEPS):
                t = ts[i].repeat(2)
                out = model(torch.cat([x, x]), timestep=t * 1000, encoder_hidden_states=ctx2,
                            encoder_attention_mask=None, return_dict=False)[0]  # fmt: skip
                cond, unc = out.chunk(2)
                x = x + (ts[i + 1] - ts[i]) * (unc + GUIDANCE * (cond - unc))
        return x

    return run


def _peer(args) -> None:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    f = args.frames
    model = _latte(f)
    x0 = torch.randn(BATCH, C, f, HW, HW)  # diffusers' layout: [B, C, T, H, W]
    ctx = torch.randn(BATCH, *TEXT)
    t = torch.full((BATCH,), 500.0)
    common = {"fw": "peer", "frames": f, "torch": torch.__version__, "threads": args.threads}
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x0, timestep=t, encoder_hidden_states=ctx, encoder_attention_mask=None)
    fwd_flops = counter.get_total_flops()
    params = sum(p.numel() for p in model.parameters())
    _emit({**common, "what": "model", "params": params, "fwd_gflop": round(fwd_flops / 1e9, 2)})
    if "forward" in args.only:
        with torch.inference_mode():
            fwd = lambda: model(x0, timestep=t, encoder_hidden_states=ctx,  # noqa: E731
                                encoder_attention_mask=None, return_dict=False)  # fmt: skip
            _emit(
                {
                    **common,
                    "what": "forward",
                    **_time(fwd, args.repeats),
                    "fwd_gflop": round(fwd_flops / 1e9, 2),
                }
            )
    if "train" in args.only:
        variants = [("eager", model)] + ([] if args.no_compile else [("compiled", None)])
        for name, m in variants:
            if m is None:
                m = torch.compile(model)
            opt = torch.optim.AdamW(model.parameters(), lr=LR)
            step = _peer_train_step(m, opt, x0, ctx)
            t0 = time.perf_counter()
            step()
            rec = {
                **common,
                "what": "train",
                "variant": name,
                "first_s": round(time.perf_counter() - t0, 1),
            }
            _emit(
                {**rec, **_time(step, args.repeats), "model_gflop": round(3 * fwd_flops / 1e9, 2)}
            )
    if "sample" in args.only:
        run = _peer_sample(model, torch.randn(1, C, f, HW, HW), ctx[:1])
        _emit({**common, "what": "sample", **_time(run, args.repeats)})


# ------------------------------------------------------------------------------------------ vdm
def _vdm_model(attention: str = "factorized"):
    from vdm.models.denoiser import Denoiser

    return Denoiser(
        latent_channels=C, depth=11, width=256, num_heads=4, mlp_ratio=4.0, patch_size=(1, 2, 2),
        attention=attention, pos_encoding="sincos", qk_norm=False,
    )  # fmt: skip


def _vdm_inputs(frames: int, attention: str = "factorized"):
    """(model, params, (x0, t, ctx, mask)): the matched model and fixed random inputs."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    model = _vdm_model(attention)
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.normal(size=(BATCH, frames, HW, HW, C)), jnp.float32)
    ctx = jnp.asarray(rng.normal(size=(BATCH, *TEXT)), jnp.float32)
    mask = jnp.ones((BATCH, TEXT[0]), jnp.int32)
    t = jnp.full((BATCH,), 0.5, jnp.float32)
    params = jax.jit(model.init)(jax.random.key(0), x0, t, ctx, mask)["params"]
    return model, params, (x0, t, ctx, mask)


def _vdm_peak(args) -> None:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (2048, 2048), jnp.float32)
    mm = jax.jit(jnp.matmul).lower(a, a).compile()
    t = _time(lambda: jax.block_until_ready(mm(a, a)), args.repeats)
    _emit({"fw": "vdm", "what": "peak", **t, "gflops": round(2 * 2048**3 / t["best_ms"] / 1e6, 1)})


def _xla_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def vdm_step(model):
    """(step, tx): vdm's train step (flow loss on a fresh t and noise + backward + AdamW)."""
    import jax
    import jax.numpy as jnp
    import optax

    from configs import quickstart
    from vdm.diffusion import losses
    from vdm.models import denoiser as dn

    diffusion = quickstart.get_config().diffusion  # flow matching (cfg dropout 0.1)
    tx = optax.adamw(LR)

    def step(params, opt_state, key, x0, ctx, mask):
        null = (jnp.zeros_like(ctx[:1]), jnp.ones_like(mask[:1]))

        def loss_fn(p):
            model_fn = dn.model_fn(model, p)
            return losses.diffusion_loss(model_fn, x0, (ctx, mask), key, diffusion, null).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, tx


def _vdm_train(model, params, x0, ctx, mask, args, common, fwd_flops) -> None:
    import jax

    step, tx = vdm_step(model)
    state, data = [params, tx.init(params)], (x0, ctx, mask)
    t0 = time.perf_counter()
    jitted = jax.jit(step, donate_argnums=(0, 1))
    compiled = jitted.lower(*state, jax.random.key(0), *data).compile()
    compile_s = time.perf_counter() - t0
    keys = iter(jax.random.split(jax.random.key(1), args.repeats + 1))

    def run():
        state[0], state[1], loss = compiled(state[0], state[1], next(keys), *data)
        jax.block_until_ready(loss)

    return _emit({**common, "what": "train", "variant": "jit", "attention": model.attention,
           "compile_s": round(compile_s, 1), **_time(run, args.repeats),
           "xla_step_gflop": round(_xla_flops(compiled) / 1e9, 2),
           "model_gflop": round(3 * fwd_flops / 1e9, 2)})  # fmt: skip


def _vdm(args) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from configs import quickstart
    from vdm.diffusion import samplers
    from vdm.models import denoiser as dn

    f = args.frames
    model, params, (x0, t, ctx, mask) = _vdm_inputs(f, args.attention)
    fwd = jax.jit(lambda p, x, t, c, m: model.apply({"params": p}, x, t, c, m))
    fwd_c = fwd.lower(params, x0, t, ctx, mask).compile()
    fwd_flops = _xla_flops(fwd_c)
    common = {"fw": "vdm", "frames": f, "jax": jax.__version__, "attention": args.attention}
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    analytic = model.flops_per_example((f, HW, HW, C), *TEXT) * BATCH
    _emit({**common, "what": "model", "params": n_params, "fwd_gflop": round(fwd_flops / 1e9, 2),
           "analytic_fwd_gflop": round(analytic / 1e9, 2)})  # fmt: skip
    if "forward" in args.only:
        run = lambda: jax.block_until_ready(fwd_c(params, x0, t, ctx, mask))  # noqa: E731
        _emit(
            {
                **common,
                "what": "forward",
                **_time(run, args.repeats),
                "fwd_gflop": round(fwd_flops / 1e9, 2),
            }
        )
    if "sample" in args.only:

        def apply(p, x, t, cond):
            return dn.model_fn(model, p)(x, t, cond)

        model_fn = jax.tree_util.Partial(apply, params)  # params traced, not baked in
        noise, cond = x0[:1], (ctx[:1], mask[:1])
        null = (jnp.zeros_like(ctx[:1]), jnp.ones_like(mask[:1]))
        diffusion = quickstart.get_config().diffusion

        def sample():
            out = samplers.sample(model_fn, noise, cond, null, sampler="euler", num_steps=STEPS,
                                  guidance=GUIDANCE, diffusion_config=diffusion)  # fmt: skip
            jax.block_until_ready(out)

        _emit({**common, "what": "sample", **_time(sample, args.repeats)})
    if "train" in args.only:
        _vdm_train(model, params, x0, ctx, mask, args, common, fwd_flops)


# ------------------------------------------------------------------------------- orchestration
def _peer_python(args) -> str:
    """The peer venv's python: --peer_python / $VDM_PEER_PYTHON, else --peer_venv (created)."""
    given = args.peer_python or os.environ.get("VDM_PEER_PYTHON")
    if given:
        return given
    venv = os.path.expanduser(args.peer_venv)
    python = os.path.join(venv, "bin", "python")
    probe = [python, "-c", "import torch, diffusers"]
    if os.path.exists(python) and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    pins = ", ".join(PEER_PINS)
    print(f"# creating the peer venv {venv} ({pins}; torch from {args.torch_index})", flush=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    pip = [python, "-m", "pip", "install", "-q"]
    subprocess.run([*pip, PEER_PINS[0], "--index-url", args.torch_index], check=True)
    subprocess.run([*pip, PEER_PINS[1]], check=True)
    subprocess.run(probe, check=True)
    return python


def _child(python: str, role: str, args, records: list, **extra) -> None:
    """Runs this file as `--role role` under `python` and collects its JSON lines."""
    cmd = [python, os.path.abspath(__file__), "--role", role, "--repeats", str(args.repeats),
           "--threads", str(args.threads), "--only", ",".join(args.only)]  # fmt: skip
    cmd += [x for k, v in extra.items() for x in (f"--{k}", str(v))]
    cmd += ["--no_compile"] if args.no_compile else []
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            print(line, flush=True)
            records.append(json.loads(line))
    if proc.returncode:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"{role} child failed (exit {proc.returncode}): {' '.join(cmd)}")


def _find(records, **match) -> dict | None:
    hits = [r for r in records if all(r.get(k) == v for k, v in match.items())]
    return hits[0] if hits else None


def _row(label, peer, ours, peak=None, flops_key=None) -> str:
    """One markdown row: peer best / median (MFU), vdm best / median (MFU), speed-ups."""

    def cell(r):
        if not r:
            return "-"
        text = f"{r['best_ms']:.0f} / {r['median_ms']:.0f}"
        if flops_key and peak:
            text += f" ({100 * r[flops_key] / r['best_ms'] * 1e3 / peak:.0f}% MFU)"
        return text

    up = lambda k: f"{peer[k] / ours[k]:.2f}x" if peer and ours else "-"  # noqa: E731
    return f"| {label} | {cell(peer)} | {cell(ours)} | **{up('best_ms')}** | {up('median_ms')} |"


def _model_line(records, f) -> str:
    pm = _find(records, fw="peer", frames=f, what="model")
    vm = _find(records, fw="vdm", frames=f, what="model", attention="factorized")
    peer = (
        f"peer {pm['fwd_gflop']} (torch FlopCounterMode, {pm['params'] / 1e6:.1f}M params), "
        if pm
        else ""
    )
    ours = (
        f"vdm {vm['fwd_gflop']} (XLA; analytic {vm['analytic_fwd_gflop']}, "
        f"{vm['params'] / 1e6:.1f}M params)"
        if vm
        else ""
    )
    return f"{f} latent frames, forward GFLOP (batch {BATCH}): {peer}{ours}"


def _frame_rows(records, f, peak) -> list[str]:
    get = lambda fw, what, **kw: _find(records, fw=fw, frames=f, what=what, **kw)  # noqa: E731
    rows = [_row(f"forward, {f} frames", get("peer", "forward"), get("vdm", "forward"))]
    trains = [r for r in records if r["fw"] == "peer" and r.get("frames") == f]
    trains = [r for r in trains if r["what"] == "train"]
    ours = get("vdm", "train", attention="factorized")
    for r in sorted(trains, key=lambda r: r["best_ms"]) or [None]:
        label = f"train step, {f} frames" + (f", vs peer {r['variant']}" if r else "")
        rows.append(_row(label, r, ours, peak, "model_gflop"))
    rows.append(_row(f"30-step guided sampling, {f} frames", get("peer", "sample"),
                     get("vdm", "sample")))  # fmt: skip
    return rows


def _growth(records, frames) -> list[str]:
    if len(frames) != 2:
        return []
    a, b = frames
    lines = []
    for name in ("factorized", "full"):
        ra = _find(records, fw="vdm", frames=a, what="train", attention=name)
        rb = _find(records, fw="vdm", frames=b, what="train", attention=name)
        if ra and rb:
            lines.append(
                f"vdm train step {a} -> {b} frames, {name} attention: {ra['best_ms']:.0f} -> "
                f"{rb['best_ms']:.0f} ms best = {rb['best_ms'] / ra['best_ms']:.2f}x "
                f"(medians {rb['median_ms'] / ra['median_ms']:.2f}x)"
            )
    return lines


def _table(records, frames) -> str:
    peaks = [r for r in records if r["what"] == "peak"]
    peak = max(r["gflops"] for r in peaks)
    lines = [
        "matmul peak f32 2048^3, GFLOP/s in run order (start, end): "
        + ", ".join(f"{r['fw']} {r['gflops']}" for r in peaks)
        + f"; MFU denominator = the best, {peak}",
        *[_model_line(records, f) for f in frames],
        "",
        "| measurement | peer ms best / median | vdm ms best / median | speed-up (best) "
        "| speed-up (median) |",
        "|---|---|---|---|---|",
    ]
    for f in frames:
        lines += _frame_rows(records, f, peak)
    lines += ["", *_growth(records, frames)]
    loads = [r["load"] for r in records]
    lines.append(f"load average (1/5/15 min) at the first / last record: {loads[0]} / {loads[-1]}")
    return "\n".join(lines)


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--frames", default="5,20", help="latent frame counts (comma list)")
    p.add_argument("--repeats", type=int, default=10, help="timed runs after a warm-up")
    p.add_argument(
        "--only", default="forward,train,sample,full", help="subset of forward,train,sample,full"
    )
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    p.add_argument("--no_compile", action="store_true", help="skip the torch.compile'd peer")
    p.add_argument("--no_peer", action="store_true", help="vdm only (before / after of vdm)")
    p.add_argument("--peer_python", default="", help="python of a venv with torch + diffusers")
    p.add_argument("--peer_venv", default="~/.cache/vdm/peer_latte", help="created if missing")
    p.add_argument("--torch_index", default=TORCH_INDEX, help="pip index of the torch CPU wheel")
    p.add_argument("--vdm_python", default=sys.executable, help="python with vdm's deps (jax)")
    p.add_argument("--role", default="main", help=argparse.SUPPRESS)
    p.add_argument("--attention", default="factorized", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.only = [s for s in args.only.split(",") if s]
    return args


def main(argv=None) -> None:
    args = _parse(argv)
    if args.role != "main":
        args.frames = int(args.frames)
        roles = {"peer": _peer, "vdm": _vdm, "peer_peak": _peer_peak, "vdm_peak": _vdm_peak}
        return roles[args.role](args)
    frames = [int(f) for f in args.frames.split(",")]
    peer_py = "" if args.no_peer else _peer_python(args)
    records: list = []
    t0 = time.time()
    print(f"# start {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, load {_load()}, "
          f"{os.cpu_count()} cpus, peer {peer_py}, vdm {args.vdm_python}", flush=True)  # fmt: skip
    if not args.no_peer:
        _child(peer_py, "peer_peak", args, records, frames=0)
    _child(args.vdm_python, "vdm_peak", args, records, frames=0)
    for f in frames:
        if not args.no_peer:
            _child(peer_py, "peer", args, records, frames=f)
        _child(args.vdm_python, "vdm", args, records, frames=f)
    if "full" in args.only:
        for f in frames:
            _child(args.vdm_python, "vdm", args, records, frames=f, attention="full", only="train")
    if not args.no_peer:
        _child(peer_py, "peer_peak", args, records, frames=0)
    _child(args.vdm_python, "vdm_peak", args, records, frames=0)
    print(f"\n# done in {time.time() - t0:.0f} s\n")
    print(_table(records, frames))


if __name__ == "__main__":
    main()
