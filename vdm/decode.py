"""Decodes a latent file (`sample.py --formats latent`) into a video with the model's VAE.

  python -m vdm.decode out/000_00.npz                       # -> out/000_00.decoded.mp4
  python -m vdm.decode out/000_00.npz --output clip.npy --checkpoint path/to/model

The latent file is the compressed stream, the VAE decoder its receiver (`vdm.inference.latents`):
it names the model it came from; `--checkpoint` gives the model where that path does not exist
(another machine). The decoded file keeps the latent file's label (AI-generated, model, manifest
hash, seed, prompt, sampler settings) in its metadata.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

from vdm import cli
from vdm.errors import UserError
from vdm.inference import labels, latents, load
from vdm.io import video
from vdm.models import autoencoder as ae

DEFAULT_MODEL_NAME = "vdm bundled default model"  # what labels.model_label records for it


def decode_file(path: str, checkpoint: str | None = None) -> tuple[np.ndarray, dict, float]:
    """(uint8 frames [T, H, W, 3], label, fps) of the latent file at `path`.

    Args:
      path: a latent .npz file.
      checkpoint: the model to decode with (default: the one the file names).

    Raises:
      UserError: the model is not on this machine, or its latents have another shape.
    """
    z, label, shape, fps = latents.load(path)
    model = checkpoint or label.get(labels.FIELD, {}).get("model")
    if model == DEFAULT_MODEL_NAME:
        model = None
    elif model is None or not (os.path.exists(model) or load.is_wan(model)):
        raise UserError(
            f"The latent file '{path}' was made by the model '{model}', which is not on this "
            "machine; pass the model (its exported directory) with --checkpoint."
        )
    pipe = load.load_pipeline(model)
    if tuple(z.shape) != tuple(pipe.latent_shape):
        raise UserError(
            f"The latent file '{path}' holds latents of shape {z.shape}; the model "
            f"'{model or DEFAULT_MODEL_NAME}' decodes {pipe.latent_shape}. Pass the model that "
            "made it with --checkpoint."
        )
    frames = jax.jit(pipe.decode)(pipe.vae_params, z[None])
    frames = np.asarray(ae.to_uint8(frames))[0]
    return frames[: shape[0], : shape[1], : shape[2]], label, fps


def main(argv: list[str] | None = None) -> None:
    """`python -m vdm.decode FILE.npz [--output FILE] [--checkpoint MODEL] [--fps N]`."""
    parser = argparse.ArgumentParser(
        prog="python -m vdm.decode", description=__doc__.split("\n")[0]
    )
    parser.add_argument("file", help="a latent file written by sample.py --formats latent")
    parser.add_argument(
        "--output", default=None, help="mp4, webm, gif or npy (default: FILE.decoded.mp4)"
    )
    parser.add_argument("--checkpoint", default=None, help="the model (default: the one recorded)")
    parser.add_argument("--fps", type=float, default=None, help="frame rate (default: the model's)")
    args = parser.parse_args(argv)
    cli.quiet_library_logs()
    with cli.clear_errors():
        frames, label, fps = decode_file(args.file, args.checkpoint)
        output = args.output or os.path.splitext(args.file)[0] + ".decoded.mp4"
        record = {**label, "decoded_from": os.path.abspath(args.file), "file": output}
        video.write_video(
            output, frames, fps=args.fps or fps, metadata=labels.container_tags(record)
        )
    print(
        f"Decoded {args.file} ({os.path.getsize(args.file):,} bytes) -> {output} "
        f"({os.path.getsize(output):,} bytes, {frames.shape[0]} frames of "
        f"{frames.shape[1]}x{frames.shape[2]})."
    )


if __name__ == "__main__":
    main(sys.argv[1:])
