"""`idefics2 chat`: an interactive multi-turn conversation on stdin/stdout."""

from __future__ import annotations

import argparse
import sys
from typing import Any

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
        "chat",
        help="interactive multi-turn conversation",
        description="A conversation on stdin/stdout: each line is a user message, each answer is printed as "
        "it is generated. /image PATH attaches an image to the next message, /reset starts over, /quit "
        "(or end of input) leaves.",
    )
    add_model_options(p)
    add_sampling_options(p)
    p.set_defaults(func=run)


CHAT_HELP = "/image PATH attaches an image to your next message; /reset starts over; /quit leaves"


def run(args: argparse.Namespace) -> int:
    check_sampling_flags(args)
    pipe = load_pipeline(args)
    controls = generation_controls(args, pipe.model)
    interactive = sys.stdin.isatty()

    def note(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        note(f"idefics2 chat: {CHAT_HELP}")
    history: list[dict[str, Any]] = []  # the conversation so far, with its images in order
    images: list[Any] = []
    pending: list[Any] = []  # images attached to the next message
    while True:
        try:
            line = input("> " if interactive else "").strip()
        except EOFError:
            break
        if not line:
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command in ("/quit", "/exit"):
                break
            if command == "/reset":
                history, images, pending = [], [], []
                note("(conversation cleared)")
            elif command == "/image":
                path = rest.strip().strip("'\"")  # a path pasted with quotes around it
                try:
                    if not path:
                        raise UserError("usage: /image PATH")
                    pending.append(open_image(path))
                    note(f"(image {path} attached to your next message)")
                except UserError as error:
                    note(f"error: {error}")
            elif command == "/help":
                note(CHAT_HELP)
            else:
                note(f"error: unknown command {line!r}: {CHAT_HELP}")
            continue
        reply: list[str] = []
        try:
            turns = history + [user_message(line, len(pending))]
            for piece in pipe.stream(turns, images + pending, **controls):
                print(piece, end="", flush=True)
                reply.append(piece)
            print(flush=True)
        except (UserError, ValueError) as error:
            if reply:
                print(flush=True)
            note(f"error: {' '.join(str(error).split())}")
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat; the turn is forgotten
            print(flush=True)
            note("(interrupted)")
            continue
        history = turns + [{"role": "assistant", "content": [{"type": "text", "text": "".join(reply)}]}]
        images, pending = images + pending, []
    return 0
