"""`idefics2 generate`: answer one prompt about images."""

from __future__ import annotations

import argparse

from idefics2.cli.common import (
    UserError,
    add_model_options,
    add_sampling_options,
    check_sampling_flags,
    generation_controls,
    load_pipeline,
    open_image,
    user_message,
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="answer one prompt about images",
        description="Answer one prompt about zero or more images and print the answer. The prompt becomes "
        "one user turn of the checkpoint's chat template with the images first, unless it holds <image> "
        "markers that place them (one per image).",
    )
    p.add_argument(
        "--image", action="append", default=[], metavar="PATH", help="an image file (repeat for several)"
    )
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the question or instruction")
    add_model_options(p)
    add_sampling_options(p)
    p.add_argument("--stream", action="store_true", help="print the answer while it is generated")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.prompt.strip():
        raise UserError("--prompt is empty")
    check_sampling_flags(args)
    images = [open_image(path) for path in args.image]  # bad files fail before the model loads
    message = user_message(args.prompt, len(images))
    pipe = load_pipeline(args)
    controls = generation_controls(args, pipe.model)
    if args.stream:
        for piece in pipe.stream([message], images, **controls):
            print(piece, end="", flush=True)
        print()
    else:
        print(pipe.chat([message], images, **controls))
    return 0
