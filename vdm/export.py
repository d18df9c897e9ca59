"""Exports a trained denoiser (and its VAE) as a compact, self-contained model directory.

  python -m vdm.export --checkpoint workdirs/quickstart --output vdm/assets/default_model \
      [--vae workdirs/vae_quickstart_decoder]

Writes `vdm.pipeline.export`'s bundle (EMA weights of the denoiser and the VAE, the config, the
latent statistics; the text encoder referenced by name) plus the training logs of both stages
(`train_log.jsonl`, `vae_train_log.jsonl`: each workdir's metrics.jsonl; `vae_init_train_log.jsonl`
when the VAE was fine-tuned from another run) so the bundle carries the record of how it was
made. `sample.py --checkpoint OUT` and `vdm.load_pipeline(OUT)` load it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys


def _workdir_of(path: str) -> str:
    """The training workdir of a workdir, its checkpoints/ dir, or a checkpoint step dir."""
    path = os.path.abspath(path)
    for candidate in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
        if os.path.exists(os.path.join(candidate, "metrics.jsonl")):
            return candidate
    raise FileNotFoundError(f"No metrics.jsonl in or above '{path}' (not a training workdir?).")


def export_with_logs(checkpoint: str, output: str, vae: str | None = None) -> dict[str, str]:
    """Exports `checkpoint` to `output` and copies both stages' training logs beside it.

    Args:
      checkpoint: a denoiser training workdir (or checkpoint step dir).
      output: the bundle directory (created; existing weights in it are replaced).
      vae: a decoder fine-tune of the denoiser's VAE to bundle instead (`pipeline.swap_vae`).

    Returns:
      {"bundle": output, "train_log": path, "vae_train_log": path} and, when the bundled VAE
      was itself started from another checkpoint (`train.init_from`), "vae_init_train_log".
    """
    from vdm import checkpoint as ckpt
    from vdm import pipeline

    for sub in ("denoiser", "vae"):  # orbax refuses to overwrite; a re-export replaces them.
        shutil.rmtree(os.path.join(output, sub), ignore_errors=True)
    pipeline.export(checkpoint, output, vae=vae)
    out = {"bundle": output}
    vae = vae or ckpt.load_metadata(checkpoint)["vae_checkpoint"]
    logs = {"train_log": checkpoint, "vae_train_log": vae}
    init_from = ckpt.load_config(vae).train.get("init_from", "")
    if init_from:
        logs["vae_init_train_log"] = init_from
    stale = os.path.join(output, "vae_init_train_log.jsonl")
    if not init_from and os.path.exists(stale):
        os.remove(stale)
    for name, source in logs.items():
        dst = os.path.join(output, f"{name}.jsonl")
        shutil.copyfile(os.path.join(_workdir_of(source), "metrics.jsonl"), dst)
        out[name] = dst
    return out


def main(argv: list[str] | None = None) -> None:
    """`python -m vdm.export --checkpoint WORKDIR --output DIR`."""
    parser = argparse.ArgumentParser(
        prog="python -m vdm.export", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--checkpoint", required=True, help="denoiser training workdir")
    parser.add_argument("--output", required=True, help="bundle directory to write")
    parser.add_argument(
        "--vae",
        default=None,
        help="a decoder-only fine-tune of the denoiser's VAE to bundle instead of it "
        "(same encoder weights; e.g. configs/vae_quickstart_decoder.py)",
    )
    args = parser.parse_args(argv)

    from absl import logging as absl_logging

    from vdm import cli_errors

    absl_logging.set_verbosity(absl_logging.WARNING)
    with cli_errors.clear_errors():
        out = export_with_logs(args.checkpoint, args.output, vae=args.vae)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.output) for f in fs)
    print(f"Exported {args.checkpoint} -> {out['bundle']} ({size / 2**20:.1f} MiB).")


if __name__ == "__main__":
    main(sys.argv[1:])
