"""`idefics2 chat`: an interactive multi-turn conversation on stdin/stdout."""

from __future__ import annotations

import argparse
import itertools
import sys
from typing import Any

from idefics2.cli.common import UserError, add_model_options, add_sampling_options, open_image, user_message
from idefics2.settings import check_sampling_flags, generation_controls, load_pipeline


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
    from idefics2.generation import ContextLengthError

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
            turn_images = images + pending
            dropped, limit = 0, 0
            while True:
                try:
                    pieces = pipe.stream(turns, turn_images, **controls)
                    first = next(pieces, "")  # a context overflow is raised here, before any token
                    break
                except ContextLengthError as error:
                    if len(turns) == 1:  # the message alone does not fit
                        raise
                    turns, turn_images = drop_oldest_exchange(turns, turn_images)
                    dropped, limit = dropped + 1, error.limit
            if dropped:
                note(
                    f"(the conversation outgrew the model's context of {limit} tokens: dropped its oldest "
                    f"{dropped} exchange(s); /reset starts over)"
                )
            for piece in itertools.chain([first], pieces):
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
        images, pending = turn_images, []
    return 0


def drop_oldest_exchange(turns: list[dict[str, Any]], images: list[Any]) -> tuple[list[dict], list[Any]]:
    """The conversation without its first user turn and the assistant's answer to it, and without the
    images those two turns held (the images are in the order of the image parts)."""
    cut = 2 if len(turns) > 2 and turns[1]["role"] == "assistant" else 1
    n_images = sum(part["type"] == "image" for turn in turns[:cut] for part in turn["content"])
    return turns[cut:], images[n_images:]
