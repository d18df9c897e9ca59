"""Builds a latent cache (`vdm.data.cache`) of one split of `config.data`:

  python -m vdm.tools.cache --config configs/quickstart.py --output /data/dq --split train
  python -m vdm.tools.cache --config configs/quickstart.py --output /data/dq --split test
  python train.py --config configs/quickstart.py --workdir wd --config.data.source=cache:/data/dq

Loads the frozen encoders the config names (`vdm.encoders.load_vae`: the EMA params of
`config.vae.checkpoint`; `vdm.encoders.load_text`: `config.text_encoder`) and hands them to
`vdm.data.cache.build.build_cache`. `--latent_dtype float32` stores float32 latents instead of
float16; `--zero_padding` stores zeros at padded context positions (exact for the denoiser, which
ignores them), which compress away.

Stage "wan" configs (configs/wan_finetune.py) cache with the Wan VAE and UMT5 of
`config.model.pretrained`; the manifest records that pipeline's directory.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from vdm import cli, encoders
from vdm.config import load_config
from vdm.data import sources
from vdm.data.cache import build
from vdm.models.wan import files as wan_files
from vdm.models.wan import finetune as wan_finetune


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vdm.tools.cache",
        description="Precompute VAE latents and text contexts of a data split (a latent cache).",
        epilog="Config overrides: --config.a.b=value (any field of configs/base.py).",
    )
    parser.add_argument("--config", required=True, help="config file, e.g. configs/quickstart.py")
    parser.add_argument("--output", required=True, help="cache directory (created if missing)")
    parser.add_argument("--split", default=None, help="split to encode (default data.train_split)")
    parser.add_argument("--batch_size", type=int, default=32, help="videos per encoder call")
    parser.add_argument("--latent_dtype", default="float16", choices=("float16", "float32"))
    parser.add_argument(
        "--zero_padding",
        action="store_true",
        help="store zeros at padded context positions (~40%% smaller; exact for the denoiser)",
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N examples")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def load_encoders(config) -> build.Encoders:
    """The frozen VAE (with its latent statistics) and text encoder `config` names (stage "wan":
    those of the Wan pipeline `config.model.pretrained`)."""
    if config.stage == "wan":
        root = wan_files.pipeline_dir(str(config.model.pretrained))
        text, vae, vae_params, stats = wan_finetune.load_encoders(
            root, int(config.text_encoder.max_length)
        )
        return build.Encoders(text, vae, vae_params, stats, wan_finetune.encode_video)
    vae, vae_params, stats = encoders.load_vae(config)
    return build.Encoders(
        text=encoders.load_text(config), vae=vae, vae_params=vae_params, latent_stats=stats
    )


def main(argv: list[str] | None = None) -> None:
    """`python -m vdm.tools.cache --config FILE --output DIR [--split S] [--config.a=b ...]`."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    for arg in rest:
        if not (arg.startswith("--config.") and "=" in arg):
            parser.error(
                f"unrecognized argument {arg!r}; config overrides look like --config.a.b=value."
            )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Our own INFO lines stay; orbax's per-restore chatter (absl INFO) does not.
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    options = dict(
        batch_size=args.batch_size, latent_dtype=args.latent_dtype, zero_padding=args.zero_padding
    )
    with cli.clear_errors():
        config = load_config(args.config, rest)
        split = args.split or config.data.train_split
        build.check_output(config, args.output, **options)  # before loading any weights
        source = sources.get_source(config.data, split)  # ... so a source with no clip fails now
        manifest = build.build_cache(
            config,
            split,
            args.output,
            encoders=load_encoders(config),
            limit=args.limit,
            progress=not args.no_progress,
            source=source,
            **options,
        )
        entry = manifest["splits"][split]
        size = os.path.getsize(os.path.join(os.path.abspath(args.output), entry["file"]))
        print(
            f"Cached {entry['num_examples']} examples of split {split!r} in {args.output} "
            f"({size / 2**20:.1f} MiB). Train with --config.data.source=cache:{args.output}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
