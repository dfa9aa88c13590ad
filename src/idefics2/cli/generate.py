"""`idefics2 generate`: answer one prompt about images."""

from __future__ import annotations

import argparse
import sys

from idefics2.cli.common import (
    UserError,
    add_constraint_options,
    add_model_options,
    add_sampling_options,
    open_image,
    user_message,
)
from idefics2.settings import check_sampling_flags, constraint_controls, generation_controls, load_pipeline


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
    add_constraint_options(p)
    p.add_argument("--stream", action="store_true", help="print the answer while it is generated")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.prompt.strip():
        raise UserError("--prompt is empty")
    check_sampling_flags(args)
    constraint = constraint_controls(args)  # a bad schema or regex fails before the model loads
    images = [open_image(path) for path in args.image]  # bad files fail before the model loads
    message = user_message(args.prompt, len(images))
    pipe = load_pipeline(args)
    controls = {**generation_controls(args, pipe.model), **constraint}
    if args.stream:
        pieces = []
        for piece in pipe.stream([message], images, **controls):
            print(piece, end="", flush=True)
            pieces.append(piece)
        print()
        answer = "".join(pieces)
    else:
        answer = pipe.chat([message], images, **controls)
        print(answer)
    if constraint:
        limit = controls.get("max_new_tokens", pipe.model.generation_config.get("max_new_tokens"))
        warn_if_incomplete(pipe, constraint, answer, limit)
    return 0


def warn_if_incomplete(pipe, constraint: dict, answer: str, max_new_tokens) -> None:
    """The answer stopped at --max-new-tokens before its JSON or regex was complete (finish reason
    "length"): it is printed as it is, with this note on stderr."""
    from idefics2.constrained import compile_grammar

    if not compile_grammar(pipe.processor, **constraint).matches(answer):
        what = "JSON" if "json_schema" in constraint else "regex match"
        print(
            f"idefics2 generate: warning: the answer reached --max-new-tokens ({max_new_tokens}) before its "
            f"{what} was complete (finish reason: length); printed as it is",
            file=sys.stderr,
        )
