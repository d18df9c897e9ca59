"""The `eval.py` command: sample-quality metrics per sampler and step count, the real-data
ceiling, and the VAE's reconstruction PSNR / SSIM, written to one JSON."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

import jax
import numpy as np

from vdm.errors import UserError


def vae_reconstruction(
    pipe, videos: np.ndarray, batch_size: int = 16
) -> tuple[dict[str, float], np.ndarray]:
    """PSNR / SSIM of the pipeline's VAE (posterior mean) on uint8 videos, and the uint8
    reconstructions (what the denoiser's best possible latents would decode to)."""
    from vdm.eval import metrics
    from vdm.models import autoencoder as ae

    @jax.jit
    def recon(x):
        z = ae.encode(pipe.vae, pipe.vae_params, x)
        return ae.decode(pipe.vae, pipe.vae_params, z, chunk=pipe.config.vae.decode_chunk)

    psnr, ssim, out = [], [], []
    for i in range(0, len(videos), batch_size):
        x = videos[i : i + batch_size].astype(np.float32) / 127.5 - 1.0
        y = np.clip(np.asarray(recon(x)), -1.0, 1.0)
        a, b = (x + 1) * 127.5, (y + 1) * 127.5
        psnr.append(np.asarray(metrics.psnr(a, b, data_range=255.0)))
        ssim.append(np.asarray(metrics.ssim(a, b, data_range=255.0)))
        out.append(np.round(b).astype(np.uint8))
    scores = {
        "vae_psnr": float(np.concatenate(psnr).mean()),
        "vae_ssim": float(np.concatenate(ssim).mean()),
    }
    return scores, np.concatenate(out)


def run(
    *,
    checkpoint: str | None = None,
    num_videos: int | None = None,
    samplers: Sequence[str] | None = None,
    num_steps: Sequence[int] | None = None,
    guidance: float | None = None,
    shift: float | None = None,
    etas: Sequence[float] | None = None,
    seed: int = 0,
    output_dir: str = "eval_out",
    random_weights: bool = False,
) -> dict:
    """Evaluates a checkpoint; returns and writes `{output_dir}/metrics.json`.

    One row per captions x sampler x eta x steps; `etas` (default: the model's `sample.eta`)
    apply to the samplers that take one ("ddim", "dpmpp2m"), "euler" gets a single row.
    """
    from vdm.eval import digits as evaluation
    from vdm.inference import pipeline
    from vdm.io import video as video_io

    pipe = pipeline.load_pipeline(checkpoint)
    cfg = pipe.config
    from vdm.data import cache

    if cache.underlying_source(cfg.data.source) != "moving_digits":
        raise UserError(
            f"eval.py scores moving-digits models; this checkpoint was trained on "
            f"'{cfg.data.source}'."
        )
    if random_weights:
        pipe.params = jax.tree.map(
            lambda p: np.asarray(jax.random.normal(jax.random.key(seed), p.shape, p.dtype)) * 0.02,
            pipe.params,
        )
    num_videos = num_videos or cfg.eval.num_videos
    samplers = list(samplers or cfg.eval.samplers)
    num_steps = list(num_steps or cfg.eval.num_steps)
    etas = [float(cfg.sample.eta)] if etas is None else [float(e) for e in etas]
    if any(e < 0 for e in etas):
        raise UserError(f"eta must be >= 0 (0 = the deterministic ODE solver), got {etas}.")
    os.makedirs(output_dir, exist_ok=True)

    ex = evaluation.test_examples(cfg.data, num_videos)
    clf = evaluation.classifier_for(cfg.data)
    half = len(ex["video"]) // 2
    vae_scores, recon = vae_reconstruction(pipe, ex["video"])
    results = {
        "checkpoint": checkpoint or pipeline.DEFAULT_MODEL,
        "num_videos": len(ex["video"]),
        "seed": seed,
        "random_weights": random_weights,
        "guidance": float(cfg.sample.guidance if guidance is None else guidance),
        "shift": _sampling_shift(pipe, shift),
        # The ceiling: real test videos scored against their own labels (FD between two halves).
        "real": evaluation.score_videos(
            ex["video"][:half],
            ex["digit"][:half],
            ex["direction"][:half],
            clf,
            reference=ex["video"][half:],
        ),
        # The ceiling of any latent model on this VAE: real test videos encoded and decoded.
        "real_through_vae": evaluation.score_videos(
            recon[:half],
            ex["digit"][:half],
            ex["direction"][:half],
            clf,
            reference=ex["video"][half:],
        ),
        **vae_scores,
        "settings": [],
    }
    for captions in ("caption", "caption_heldout"):
        for sampler, eta, steps in _grid(samplers, etas, num_steps):
            t0 = time.perf_counter()
            m, videos, prompts = evaluation.evaluate_pipeline(
                pipe,
                num_videos,
                sampler=sampler,
                num_steps=steps,
                guidance=guidance,
                shift=shift,
                eta=eta,
                seed=seed,
                captions=captions,
            )
            row = {
                "captions": captions,
                "sampler": sampler,
                "eta": eta,
                "num_steps": steps,
                **m,
                "seconds": time.perf_counter() - t0,
            }
            results["settings"].append(row)
            print(json.dumps(row), flush=True)
            tag = "" if eta is None else f"_eta{eta:g}"
            name = f"{captions}_{sampler}{tag}_{steps}.png"
            video_io.contact_sheet(
                videos[:8], captions=prompts[:8], path=os.path.join(output_dir, name)
            )
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(format_table(results))
    return results


def _grid(samplers, etas, num_steps):
    """(sampler, eta or None, steps) rows; eta None for samplers it does not apply to."""
    from vdm.diffusion.samplers import STOCHASTIC

    for sampler in samplers:
        for eta in etas if sampler in STOCHASTIC else [None]:
            for steps in num_steps:
                yield sampler, eta, steps


def _sampling_shift(pipe, shift: float | None) -> float:
    try:
        return pipe.sampling_spec(shift).shift
    except ValueError as e:
        raise UserError(str(e)) from None


def format_table(results: dict) -> str:
    """A markdown table of the settings plus the ceilings (real videos, and real videos encoded
    and decoded by the VAE)."""
    lines = [
        "| captions | sampler | eta | steps | digit acc | direction acc | consistency | Fréchet |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["settings"]:
        eta = "-" if r.get("eta") is None else f"{r['eta']:g}"
        lines.append(
            f"| {r['captions']} | {r['sampler']} | {eta} | {r['num_steps']} | "
            f"{r['digit_acc']:.3f} | {r['direction_acc']:.3f} | {r['consistency']:.3f} | "
            f"{r['frechet']:.2f} |"
        )
    ceilings = [
        ("real test videos", "real"),
        ("real test videos through the VAE", "real_through_vae"),
    ]
    for name, key in ceilings:
        if key in results:
            r = results[key]
            lines.append(
                f"| {name} | - | - | - | {r['digit_acc']:.3f} | {r['direction_acc']:.3f} | "
                f"{r['consistency']:.3f} | {r['frechet']:.2f} |"
            )
    lines.append(
        f"\nVAE reconstruction: PSNR {results['vae_psnr']:.2f} dB, SSIM {results['vae_ssim']:.4f}"
    )
    return "\n".join(lines)
