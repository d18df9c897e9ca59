"""Measures a trained alignment model's retrieval on moving-digits test pairs, and bundles it.

  python -m vdm.tools.alignment --checkpoint workdirs/alignment [--num_pairs 1000] \
      [--bundle vdm/assets/default_model] [--output retrieval.json]

Prints text->video and video->text top-1 retrieval (label-matched, `vdm.eval.alignment`) for the
training captions, the unseen sentence frames and the held-out vocabulary, then (with --bundle)
writes the EMA weights as that exported model's `alignment/` part with the figures recorded in
its alignment.json. The model scores videos of the model in --bundle (default: the bundled one),
whose VAE and text encoder it must have been trained on (checked).
"""

from __future__ import annotations

import argparse
import json
import sys

from vdm import cli
from vdm.errors import UserError
from vdm.eval import alignment as align_eval
from vdm.inference import alignment as aligner_lib
from vdm.inference import pipeline
from vdm.io import bundle


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vdm.tools.alignment",
        description="Retrieval figures of a trained alignment model; optionally bundle it.",
    )
    parser.add_argument("--checkpoint", required=True, help="stage 'alignment' workdir / step")
    parser.add_argument("--bundle", default=None, help="exported model dir to add it to")
    parser.add_argument("--num_pairs", type=int, default=1000, help="test pairs scored (>= 2)")
    parser.add_argument("--output", default=None, help="also write the figures to this JSON")
    return parser


def run(checkpoint_path: str, num_pairs: int, model_dir: str | None = None) -> dict:
    """Retrieval figures of the alignment model at `checkpoint_path` (and bundles it into
    `model_dir` when given). Returns {"num_pairs", "retrieval": {caption set: figures}}."""
    if num_pairs < 2:
        raise UserError(f"--num_pairs must be >= 2 (a retrieval needs a choice), got {num_pairs}.")
    pipe = pipeline.load_pipeline(model_dir)
    aligner = aligner_lib.load_aligner(pipe, checkpoint_path)
    results = align_eval.evaluate(aligner, pipe.config.data, num_pairs)
    print(align_eval.format_table(results, num_pairs))
    out = {"num_pairs": num_pairs, "retrieval": results}
    if model_dir:
        part, params = aligner_lib.bundle_part(checkpoint_path)
        path = bundle.write_alignment(model_dir, params, {**part, **out})
        print(f"Bundled the alignment model in {path}")
    return out


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    cli.quiet_library_logs()
    with cli.clear_errors():
        out = run(args.checkpoint, args.num_pairs, args.bundle)
        if args.output:
            with open(args.output, "w") as f:
                json.dump(out, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
