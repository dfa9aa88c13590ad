"""The `idefics2` command line: one module per subcommand.

`generate` answers one prompt about images, `chat` holds a conversation on stdin/stdout, `batch` answers a
file or dataset of prompts, `eval` scores a model with the field's metrics (or on the shapes world), `train`
fine-tunes, `serve` runs the HTTP server, `kernels` shows the kernels chosen on this CPU. Heavy modules
(torch, the model) are imported inside the commands, so `idefics2 --help` is instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from idefics2.cli import batch, chat, evaluate, generate, kernels, serve, train
from idefics2.cli.common import CommandParser, UserError

COMMANDS = (generate, chat, batch, evaluate, train, serve, kernels)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="idefics2", description="Idefics2 vision-language model tools")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from idefics2.hub import CheckpointNotFoundError
    from idefics2.training.data import DataError

    try:
        return args.func(args)
    except (UserError, DataError, CheckpointNotFoundError, OSError, ValueError) as error:
        message = " ".join(str(error).split())
        print(f"idefics2 {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"idefics2 {args.command}: interrupted", file=sys.stderr)
        return 130
