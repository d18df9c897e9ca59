"""Prepares the moving-digits data set (`vdm.data.moving_digits`) and writes a contact sheet of
it, one row per video with its caption and labels:

  python -m vdm.tools.moving_digits --preview /tmp/data_preview.png --split test --num 8
"""

from __future__ import annotations

import argparse

from vdm.data.moving_digits import (
    DIRECTIONS,
    SPLITS,
    MovingDigitsConfig,
    as_rgb,
    prepare,
    resolve_data_dir,
)
from vdm.io import video as video_io


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vdm.tools.moving_digits",
        description="Prepare the moving-digits data set and write a contact sheet of it.",
    )
    defaults = MovingDigitsConfig()
    parser.add_argument("--preview", required=True, help="output PNG contact sheet")
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--num", type=int, default=8, help="videos in the sheet")
    parser.add_argument("--frames", type=int, default=defaults.num_frames)
    parser.add_argument("--size", type=int, default=defaults.height, help="height = width")
    parser.add_argument("--num_train", type=int, default=defaults.num_train)
    parser.add_argument("--num_test", type=int, default=defaults.num_test)
    parser.add_argument("--colour", action="store_true")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="generator seed")
    parser.add_argument("--data_dir", default="", help="tfds data_dir (default: tfds default)")
    parser.add_argument("--heldout", action="store_true", help="show caption_heldout (test)")
    args = parser.parse_args(argv)
    cfg = MovingDigitsConfig(
        num_frames=args.frames,
        height=args.size,
        width=args.size,
        num_train=args.num_train,
        num_test=args.num_test,
        colour=args.colour,
        speeds=defaults.speeds,
        digit_size=defaults.digit_size,
        seed=args.seed,
    )
    builder = prepare(cfg, data_dir=args.data_dir or resolve_data_dir())
    source = builder.as_data_source(args.split)
    examples = [source[i] for i in range(min(args.num, len(source)))]
    key = "caption_heldout" if args.heldout else "caption"
    texts = []
    for e in examples:
        text = e[key].decode() if isinstance(e[key], bytes) else str(e[key])
        texts.append(f"{text}  [{e['digit']}, {DIRECTIONS[e['direction']]}, v={e['speed']:g}]")
    video_io.contact_sheet(
        [as_rgb(e["video"]) for e in examples],
        texts,
        path=args.preview,
        scale=max(1, 64 // args.size),
    )
    print(f"Wrote {len(examples)} {args.split} videos to {args.preview} ({builder.data_dir}).")


if __name__ == "__main__":
    main()
