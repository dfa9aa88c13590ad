"""`idefics2 eval`: exact-match accuracy on freshly drawn shapes-world questions."""

from __future__ import annotations

import argparse
import sys

from idefics2.cli.common import add_model_options, load_pipeline, number_in, positive_int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="accuracy on the shapes world",
        description="Ask a model freshly drawn shapes-world questions (seeded) and print its exact-match "
        "accuracy (greedy answers) per question type and overall.",
    )
    add_model_options(p)
    p.add_argument(
        "--num-per-type",
        type=positive_int,
        default=100,
        metavar="N",
        help="questions per type (default: 100)",
    )
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the questions (default: 0)")
    p.add_argument(
        "--batch-size", type=positive_int, default=32, metavar="N", help="questions per batch (default: 32)"
    )
    p.add_argument(
        "--supersample",
        type=positive_int,
        default=1,
        metavar="N",
        help="draw the images N times larger and reduce them (anti-aliased edges)",
    )
    p.add_argument(
        "--jpeg-quality",
        type=number_in(1, 95, cast=int),
        metavar="Q",
        help="pass the images through JPEG at this quality (1-95)",
    )
    p.add_argument(
        "--renderer",
        choices=("pil", "analytic"),
        default="pil",
        help="how the shapes are drawn: PIL (default), or a second, independent renderer with soft edges",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from idefics2.shapes import QUESTION_TYPES, evaluate, make_dataset

    pipe = load_pipeline(args)
    examples = make_dataset(args.num_per_type, args.seed)
    print(f"asking {len(examples)} questions (seed {args.seed})...", file=sys.stderr, flush=True)
    scores = evaluate(
        pipe,
        examples=examples,
        batch_size=args.batch_size,
        supersample=args.supersample,
        jpeg_quality=args.jpeg_quality,
        renderer=args.renderer,
    )
    print(f"{'question type':<16}{'accuracy':>9}")
    for qtype in [*QUESTION_TYPES, "overall"]:
        if qtype in scores:
            print(f"{qtype:<16}{scores[qtype]:>9.3f}")
    return 0
