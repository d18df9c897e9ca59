"""Scores a text-to-video checkpoint with the project's sample-quality metrics.

  python eval.py [--checkpoint DIR] [--num_videos 200] [--samplers euler,ddim,dpmpp2m] \
      [--num_steps 10,20,50] [--eta 0,1] [--output_dir eval_out/] \
      [--captions caption_vocab] [--candidates N] [--alignment DIR] \
      [--alignment_guidance 0.1]

Prints a table and writes eval_out/metrics.json plus a contact sheet per setting. With no
--checkpoint it evaluates the bundled default model. With an alignment model (the bundled model
has one) every row also has the mean alignment score of its videos with their prompts;
--candidates N scores best-of-N videos (vdm.inference.rerank). All logic lives in `vdm.eval.runner`.
"""

from absl import app, flags

from vdm import cli
from vdm.errors import UserError
from vdm.eval import runner

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Denoiser checkpoint (default: bundled).")
_NUM_VIDEOS = flags.DEFINE_integer(
    "num_videos", None, "Test prompts per setting (at least 4; default: config.eval.num_videos)."
)
_SAMPLERS = flags.DEFINE_list("samplers", None, "Samplers to evaluate.")
_NUM_STEPS = flags.DEFINE_list("num_steps", None, "Step counts to evaluate.")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Guidance scale (default: the model's).")
_SHIFT = flags.DEFINE_float("shift", None, "Flow sampling time shift (default: the model's).")
_ETA = flags.DEFINE_list(
    "eta", None, "Stochasticity of ddim / dpmpp2m, one row each (default: the model's; 0 = ODE)."
)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "eval_out", "Where metrics.json goes.")
_CAPTIONS = flags.DEFINE_list(
    "captions", None, "Caption sets (default all): caption, caption_heldout, caption_vocab."
)
_CANDIDATES = flags.DEFINE_integer(
    "candidates", 1, "Best-of-N: score the best-aligned of N candidates per prompt."
)
_ALIGNMENT = flags.DEFINE_string(
    "alignment", None, "Alignment model for the alignment column (default: the model's own)."
)
_ALIGNMENT_GUIDANCE = flags.DEFINE_float(
    "alignment_guidance", 0.0, "Alignment guidance step for every row (0 = off)."
)
_RANDOM = flags.DEFINE_bool(
    "random_weights", False, "Re-initialise the denoiser randomly (shows the metrics can fail)."
)


def _numbers(flag: str, values: list[str] | None, kind: type) -> list | None:
    """A comma-separated list flag as numbers, or a message naming the flag and the bad item."""
    if not values:
        return None
    try:
        return [kind(v) for v in values]
    except ValueError:
        bad = [v for v in values if not _parses(v, kind)]
        example = "10,20" if kind is int else "0,1"
        raise UserError(
            f"{flag} takes comma-separated {kind.__name__}s (e.g. {flag}={example}), got "
            f"{bad[0]!r}."
        ) from None


def _parses(text: str, kind: type) -> bool:
    try:
        kind(text)
    except ValueError:
        return False
    return True


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    cli.quiet_library_logs()
    cli.enable_compilation_cache()
    with cli.clear_errors():
        runner.run(
            checkpoint=_CHECKPOINT.value,
            num_videos=_NUM_VIDEOS.value,
            samplers=_SAMPLERS.value,
            num_steps=_numbers("--num_steps", _NUM_STEPS.value, int),
            guidance=_GUIDANCE.value,
            shift=_SHIFT.value,
            etas=_numbers("--eta", _ETA.value, float),
            seed=_SEED.value,
            output_dir=_OUTPUT_DIR.value,
            random_weights=_RANDOM.value,
            captions=_CAPTIONS.value,
            candidates=_CANDIDATES.value,
            alignment=_ALIGNMENT.value,
            alignment_guidance=_ALIGNMENT_GUIDANCE.value,
        )


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags_with_help)
