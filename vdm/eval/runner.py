"""The `eval.py` command: sample-quality metrics per sampler and step count, the real-data
ceiling, and the VAE's reconstruction PSNR / SSIM, written to one JSON."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

import jax
import numpy as np

from vdm import paths
from vdm.data import cache
from vdm.diffusion.samplers import STOCHASTIC
from vdm.errors import UserError
from vdm.eval import digits, metrics
from vdm.inference import alignment, pipeline, rerank
from vdm.inference import guidance as align_guidance
from vdm.inference.settings import SamplingSettings
from vdm.io import video
from vdm.models import autoencoder as ae

# The fewest videos eval.py scores: the real-data ceiling fits a covariance to each half of the
# real videos, and a covariance needs two rows.
MIN_VIDEOS = 4
# Caption sets scored (`digits.test_examples`): training wording, unseen sentence frames, and
# unseen words + frames (the held-out vocabulary).
CAPTION_SETS = ("caption", "caption_heldout", "caption_vocab")


def vae_reconstruction(
    pipe, videos: np.ndarray, batch_size: int = 16
) -> tuple[dict[str, float], np.ndarray]:
    """PSNR / SSIM of the pipeline's VAE (posterior mean) on uint8 videos, and the uint8
    reconstructions (what the denoiser's best possible latents would decode to)."""

    @jax.jit
    def recon(x):
        z = ae.encode(pipe.vae, pipe.vae_params, x)
        return ae.decode(pipe.vae, pipe.vae_params, z, chunk=pipe.config.vae.decode_chunk)

    psnr, ssim, out = [], [], []
    for i in range(0, len(videos), batch_size):
        x = ae.from_uint8(videos[i : i + batch_size])
        y = np.clip(np.asarray(recon(x)), -1.0, 1.0)
        a, b = (x + 1) * 127.5, (y + 1) * 127.5
        psnr.append(np.asarray(metrics.psnr(a, b, data_range=255.0)))
        ssim.append(np.asarray(metrics.ssim(a, b, data_range=255.0)))
        out.append(ae.to_uint8(y))
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
    captions: Sequence[str] | None = None,
    candidates: int = 1,
    alignment: str | None = None,
    alignment_guidance: float = 0.0,
) -> dict:
    """Evaluates a checkpoint; returns and writes `{output_dir}/metrics.json`.

    One row per captions x sampler x eta x steps; `etas` (default: the model's `sample.eta`)
    apply to the samplers that take one ("ddim", "dpmpp2m"), "euler" gets a single row.
    `captions`: caption sets (default all). Rows have the mean alignment score of their videos
    when an alignment model is found (`alignment`, else the model's own), which `candidates` > 1
    (best-of-N) and `alignment_guidance` > 0 (`vdm.inference.guidance`) need.
    """
    captions = _check_request(captions, candidates, num_videos, output_dir)
    pipe = _load(checkpoint, random_weights, seed)
    aligner = _aligner(pipe, alignment, required=candidates > 1 or bool(alignment_guidance))
    pipe = align_guidance.guided(pipe, aligner, alignment_guidance)
    cfg = pipe.config
    base = pipe.settings.override(guidance=guidance, shift=shift)
    grid = _grid(
        base,
        list(samplers or cfg.eval.samplers),
        [base.eta] if etas is None else [float(e) for e in etas],
        list(num_steps or cfg.eval.num_steps),
    )
    num_videos = cfg.eval.num_videos if num_videos is None else num_videos
    os.makedirs(output_dir, exist_ok=True)
    ceilings = _ceilings(pipe, num_videos, aligner)
    results = {
        "checkpoint": checkpoint or pipeline.DEFAULT_MODEL,
        "num_videos": ceilings.pop("num_videos"),
        **dict(seed=seed, random_weights=random_weights, guidance=base.guidance),
        "shift": pipe.sampling_spec(base.shift).shift,
        **dict(candidates=candidates, alignment_guidance=alignment_guidance),
        "alignment": aligner.source if aligner else None,
        **ceilings,
        "settings": [],
    }
    for caption_set in captions:
        for eta, settings in grid:
            row = _evaluate_row(pipe, num_videos, settings, eta, seed, caption_set, output_dir,
                                (aligner, candidates))  # fmt: skip
            results["settings"].append(row)
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(format_table(results))
    return results


def _load(checkpoint: str | None, random_weights: bool, seed: int) -> pipeline.Pipeline:
    """The pipeline to score (its denoiser re-initialised randomly with `random_weights`)."""
    pipe = pipeline.load_pipeline(checkpoint)
    source = pipe.config.data.source
    if cache.underlying_source(source) != "moving_digits":
        raise UserError(
            f"eval.py scores moving-digits models; this checkpoint was trained on '{source}'."
        )
    if random_weights:
        pipe.params = jax.tree.map(
            lambda p: np.asarray(jax.random.normal(jax.random.key(seed), p.shape, p.dtype)) * 0.02,
            pipe.params,
        )
    return pipe


def _check_request(captions, candidates: int, num_videos: int | None, output_dir: str) -> list:
    """What can be checked before the model loads; returns the caption sets (default all)."""
    captions = list(captions or CAPTION_SETS)
    bad = [c for c in captions if c not in CAPTION_SETS]
    if bad or not captions:
        raise UserError(f"Unknown caption set(s) {bad} (--captions); choose from {CAPTION_SETS}.")
    if candidates < 1:
        raise UserError(f"--candidates must be >= 1 (1 = no reranking), got {candidates}.")
    if num_videos is not None and num_videos < MIN_VIDEOS:
        raise UserError(
            f"--num_videos {num_videos} is too few: the Fréchet distance compares the covariance "
            f"of two halves of the real videos, which needs at least {MIN_VIDEOS} videos "
            f"(hundreds for a stable figure; default config.eval.num_videos). Pass "
            f"--num_videos >= {MIN_VIDEOS}."
        )
    paths.check_output_dir(output_dir, "--output_dir", create=False)
    return captions


def _aligner(pipe, path: str | None, required: bool):
    """The alignment model scoring the rows: `path`, else the model's own; None (with a note)
    when there is none and none is required (`path` given = required)."""
    required = required or path is not None
    try:
        return alignment.load_aligner(pipe, path)
    except UserError as e:
        if required:
            raise
        print(f"Note: no alignment score ({e})", flush=True)
        return None


def _ceilings(pipe: pipeline.Pipeline, num_videos: int, aligner=None) -> dict:
    """The test set's size, the scores of real test videos (the ceiling; FD between two halves)
    and of real test videos encoded and decoded (the ceiling of any latent model on this VAE),
    and the VAE's reconstruction PSNR / SSIM."""
    ex = digits.test_examples(pipe.config.data, num_videos)
    clf = digits.classifier_for(pipe.config.data)
    half = len(ex["video"]) // 2
    vae_scores, recon = vae_reconstruction(pipe, ex["video"])

    def score(videos):
        labels = ex["digit"][:half], ex["direction"][:half]
        out = digits.score_videos(videos[:half], *labels, clf, reference=ex["video"][half:])
        if aligner is not None:
            prompts = [str(c) for c in ex["caption"][:half]]
            out["alignment"] = float(aligner.score_videos(videos[:half], prompts).mean())
        return out

    return {
        "num_videos": len(ex["video"]),
        "real": score(ex["video"]),
        "real_through_vae": score(recon),
        **vae_scores,
    }


def _evaluate_row(pipe, num_videos, settings, eta, seed, captions, output_dir, scoring) -> dict:
    """Scores one setting on one caption set and writes its contact sheet. `scoring`:
    (aligner or None, candidates)."""
    aligner, n = scoring
    t0 = time.perf_counter()
    generate = None
    if n > 1:

        def generate(prompts, **kw):
            return rerank.best_of_n(pipe, aligner, prompts, candidates=n, progress=True, **kw)[0]

    m, videos, prompts = digits.evaluate_pipeline(
        pipe, num_videos, settings=settings, seed=seed, captions=captions, generate=generate
    )
    if aligner is not None:
        m["alignment"] = float(aligner.score_videos(videos, prompts).mean())
    row = {
        "captions": captions,
        "sampler": settings.sampler,
        "eta": eta,
        "num_steps": settings.num_steps,
        **m,
        "seconds": time.perf_counter() - t0,
        "seconds_per_video": (time.perf_counter() - t0) / max(len(videos), 1),
    }
    tag = "" if eta is None else f"_eta{eta:g}"
    name = f"{captions}_{settings.sampler}{tag}_{settings.num_steps}.png"
    video.contact_sheet(videos[:8], captions=prompts[:8], path=os.path.join(output_dir, name))
    print(json.dumps(row), flush=True)
    return row


def _grid(base: SamplingSettings, samplers, etas, num_steps) -> list:
    """[(eta or None, settings)] rows, all checked before any work; eta is None (the model's
    is used) for samplers it does not apply to."""
    return [
        (eta, base.override(sampler=sampler, eta=eta, num_steps=steps))
        for sampler in samplers
        for eta in (etas if sampler in STOCHASTIC else [None])
        for steps in num_steps
    ]


def format_table(results: dict) -> str:
    """A markdown table of the settings plus the ceilings (real videos, and real videos encoded
    and decoded by the VAE)."""
    lines = [
        "| captions | sampler | eta | steps | digit acc | direction acc | consistency | Fréchet "
        "| alignment |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["settings"]:
        eta = "-" if r.get("eta") is None else f"{r['eta']:g}"
        lines.append(
            f"| {r['captions']} | {r['sampler']} | {eta} | {r['num_steps']} | "
            f"{r['digit_acc']:.3f} | {r['direction_acc']:.3f} | {r['consistency']:.3f} | "
            f"{r['frechet']:.2f} | {_align(r)} |"
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
                f"{r['consistency']:.3f} | {r['frechet']:.2f} | {_align(r)} |"
            )
    lines.append(
        f"\nVAE reconstruction: PSNR {results['vae_psnr']:.2f} dB, SSIM {results['vae_ssim']:.4f}"
    )
    return "\n".join(lines)


def _align(row: dict) -> str:
    return f"{row['alignment']:.3f}" if "alignment" in row else "-"
