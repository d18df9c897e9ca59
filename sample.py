"""Generates videos from text prompts. All logic lives in `vdm.inference` (writer, pipeline).

  python sample.py --prompt "the digit 4 moving down" [--prompt ...] [--checkpoint DIR] --seed 0 \
      [--num_samples N] [--num_steps 30] [--sampler euler|ddim|dpmpp2m] [--eta 1] [--guidance 5.0] \
      [--negative_prompt ...] [--shift 3.0] [--output_dir out/] [--formats mp4,gif,npy,png] \
      [--num_frames 81 --height 480 --width 832] [--candidates N] [--alignment DIR] \
      [--alignment_guidance 0.1]

With no --checkpoint it uses the bundled default model. --checkpoint also takes a Wan 2.1
Diffusers-format directory or hub id (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers); only Wan models
take --num_frames / --height / --width (vdm's own make the size they were trained at). Writes
out/{prompt_idx:03d}_{sample_idx:02d}.{ext} and out/samples.jsonl (one line per file). A later
(or concurrent) run into the same --output_dir never overwrites those: it claims the next run
number K there and writes out/run{K}_{prompt_idx:03d}_{sample_idx:02d}.{ext}, its samples.jsonl
lines saying "run": K and naming its own files.

An empty prompt ("") samples unconditionally (said on the console); a prompt longer than the text
encoder's max_length is truncated with a warning; a prompt that is not valid UTF-8 is refused. A
request of many videos is timed on one batch first and warned about with an estimate of the time
it takes. Videos are written batch by batch as they are made (memory holds one batch; Ctrl-C
keeps what was written); a request whose .npy files would not fit on the disk is refused.
"""

from absl import app, flags

from vdm import cli
from vdm.diffusion.samplers import SAMPLERS
from vdm.inference import writer

_PROMPT = flags.DEFINE_multi_string("prompt", None, "Text prompt (repeat for several).")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint",
    None,
    "Denoiser workdir, checkpoint step dir, exported model dir, or a Wan 2.1 Diffusers-format "
    "dir / hub id (default: the bundled model).",
)
_SEED = flags.DEFINE_integer("seed", 0, "Base seed; same seed, same videos.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Videos per prompt.")
_NUM_STEPS = flags.DEFINE_integer(
    "num_steps", None, "Sampling steps (default: the model's config)."
)
_SAMPLER = flags.DEFINE_enum("sampler", None, list(SAMPLERS), "Sampler.")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Classifier-free guidance scale.")
_ETA = flags.DEFINE_float(
    "eta", None, "Stochasticity of ddim / dpmpp2m (0 = deterministic ODE, 1 = the reverse SDE)."
)
_NEGATIVE = flags.DEFINE_string("negative_prompt", None, "Prompt to steer away from.")
_SHIFT = flags.DEFINE_float(
    "shift", None, "Flow sampling time shift (> 1: more steps near noise; default: the model's)."
)
_NUM_FRAMES = flags.DEFINE_integer(
    "num_frames", None, "Frames per video, 4k + 1 (Wan models only; default: the model's, 81)."
)
_HEIGHT = flags.DEFINE_integer("height", None, "Video height, a multiple of 16 (Wan only; 480).")
_WIDTH = flags.DEFINE_integer("width", None, "Video width, a multiple of 16 (Wan only; 832).")
_DTYPE = flags.DEFINE_string(
    "dtype", None, "Wan pipelines only: float32 (default) or bfloat16 text encoder + transformer."
)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "out", "Where videos and samples.jsonl go.")
_FORMATS = flags.DEFINE_list(
    "formats",
    ["mp4", "gif", "npy", "png"],
    "Output formats; also 'latent': the denoised latents (.npz; python -m vdm.decode FILE).",
)
_CANDIDATES = flags.DEFINE_integer(
    "candidates",
    1,
    "Best-of-N: draw N candidates per video (reproducible from the seed) and keep the one the "
    "alignment model scores highest; samples.jsonl records every candidate's score.",
)
_ALIGNMENT = flags.DEFINE_string(
    "alignment", None, "Alignment model for --candidates (default: the model's own)."
)
_ALIGNMENT_GUIDANCE = flags.DEFINE_float(
    "alignment_guidance",
    0.0,
    "Alignment guidance step (> 0: each sampler step moves the predicted clean latents along the "
    "alignment score's gradient by this many RMS units; try 0.1; 0 = off).",
)
_BATCH = flags.DEFINE_integer(
    "batch_size", 8, "Videos dispatched at once, one per device per call (result is unchanged)."
)
flags.mark_flag_as_required("prompt")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    cli.quiet_library_logs()
    cli.enable_compilation_cache()
    with cli.clear_errors():
        writer.run(
            prompts=_PROMPT.value,
            checkpoint=_CHECKPOINT.value,
            seed=_SEED.value,
            num_samples=_NUM_SAMPLES.value,
            sampling={
                "sampler": _SAMPLER.value,
                "num_steps": _NUM_STEPS.value,
                "guidance": _GUIDANCE.value,
                "eta": _ETA.value,
                "negative_prompt": _NEGATIVE.value,
                "shift": _SHIFT.value,
            },
            output_dir=_OUTPUT_DIR.value,
            formats=_FORMATS.value,
            batch_size=_BATCH.value,
            size={"num_frames": _NUM_FRAMES.value, "height": _HEIGHT.value,
                  "width": _WIDTH.value},
            candidates=_CANDIDATES.value,
            alignment=_ALIGNMENT.value,
            alignment_guidance=_ALIGNMENT_GUIDANCE.value,
            dtype=_DTYPE.value,
        )  # fmt: skip


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags_with_help)
