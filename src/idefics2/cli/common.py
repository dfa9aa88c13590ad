"""What every command shares: the user-error type, the parser, the options of the model, sampling, data and
engine (checked and turned into a pipeline or controls by idefics2.settings), opening rows and images, and
building the user's turn."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from idefics2.settings import DEFAULT_MAX_NEW_TOKENS, non_negative_int, number_in, positive_int


class UserError(Exception):
    """A mistake in the command's arguments or inputs: reported as one line, exit code 2."""


class CommandParser(argparse.ArgumentParser):
    """argparse, with its errors on one line (no usage block) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_data_options(p: argparse.ArgumentParser) -> None:
    """--subset, --split and --columns: how a dataset is read (see idefics2.data)."""
    p.add_argument("--subset", metavar="NAME", help="the hub dataset's subset (configuration)")
    p.add_argument("--split", metavar="NAME", help="the split of a hub dataset or `datasets` folder")
    p.add_argument(
        "--columns",
        metavar="FIELD=COLUMN,...",
        help="which columns hold what, for layouts not recognised by their names: fields prompt, image, "
        "images, answers, choices, messages, texts, chosen, rejected, id; dotted paths reach into structs, "
        "e.g. prompt=query.en,image=image,answers=answers",
    )


def open_rows(
    args: argparse.Namespace,
    source: str,
    what: str = "--input",
    split: str | None = None,
    announce: bool = True,
    **options: Any,
):
    """The idefics2.data RowStream of `source` with --subset/--split/--columns (`options` go to read_rows),
    its layout printed on stderr; UserError (one line) naming `what` when it cannot be read or holds no
    rows."""
    from idefics2.data import DataSourceError, parse_columns, read_rows

    try:
        columns = parse_columns(args.columns) if args.columns else None
        split = split if split is not None else args.split
        rows = read_rows(source, subset=args.subset, split=split, columns=columns, **options)
    except DataSourceError as error:
        raise UserError(str(error) if what == "--input" else f"{what}: {error}") from None
    if rows.num_rows == 0:
        raise UserError(f"{source} holds no {'lines' if rows.source.kind == 'jsonl' else 'rows'}")
    if announce:
        announce_rows(rows)
    return rows


def announce_rows(rows) -> None:
    """One line on stderr: what is read, how many rows, and the layout recognised."""
    count = f"{rows.num_rows} rows" if rows.num_rows is not None else "rows"
    print(f"reading {rows.description}: {count}, layout {rows.layout}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- model commands


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        metavar="DIR_OR_REPO",
        help="checkpoint folder or hub repo id (default: the built-in shapes-world model)",
    )
    p.add_argument(
        "--adapter", metavar="DIR", help="LoRA adapter (PEFT format, e.g. from `idefics2 train`) to apply"
    )
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when a GPU is available")
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16", "checkpoint"],
        default="auto",
        help="weights dtype (default auto: the fastest here, bfloat16 on GPUs and CPUs with bfloat16 "
        "instructions, else float32; checkpoint: the checkpoint's own)",
    )
    add_quantize_option(p)
    p.add_argument(
        "--calibrate",
        type=positive_int,
        metavar="N",
        help="with --quantize: before quantizing, fold activation-aware scales found on N built-in "
        "shapes questions (image + question, one batch each) into the float weights (lower int4 error)",
    )


def add_quantize_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quantize",
        choices=["int8", "int4"],
        help="quantize the decoder's weights while loading: int8 (per channel) or int4 (groups of 128); "
        "faster decoding on CPUs and a quarter / an eighth of the decoder's memory",
    )


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        metavar="N",
        help=f"most tokens per answer (default: the checkpoint's, else {DEFAULT_MAX_NEW_TOKENS})",
    )
    p.add_argument(
        "--temperature",
        type=number_in(0.0, 100.0),
        metavar="T",
        help="sample at this temperature; 0 = greedy (default: the checkpoint's setting, usually greedy)",
    )
    p.add_argument(
        "--top-p",
        type=number_in(0.0, 1.0, low_open=True),
        metavar="P",
        help="nucleus sampling: keep the likeliest tokens up to this total probability (implies sampling)",
    )
    p.add_argument(
        "--seed", type=non_negative_int, metavar="S", help="random seed for sampling (reproducible answers)"
    )


def add_engine_budget_options(p: argparse.ArgumentParser) -> None:
    """The continuous-batching engine's prefill budgets per iteration (see idefics2.serving.scheduler) and
    its watchdog."""
    p.add_argument(
        "--prefill-chunk", type=positive_int, default=512, metavar="N",
        help="prompt tokens prefilled between two decode steps (default: 512; raise it on a GPU)",
    )  # fmt: skip
    p.add_argument(
        "--vision-chunk", type=positive_int, default=1024, metavar="N",
        help="image patches encoded between two decode steps, at least one request's (default: 1024, "
        "about one small image; raise it on a GPU)",
    )  # fmt: skip
    p.add_argument(
        "--step-timeout", type=number_in(0.0, 1e6, low_open=True), metavar="S",
        help="declare the engine dead when one iteration of its loop runs longer than S seconds (a hung "
        "device call): its requests fail and the command exits non-zero (default: no limit)",
    )  # fmt: skip


def engine_budgets(args: argparse.Namespace) -> dict[str, Any]:
    return {"prefill_chunk": args.prefill_chunk, "vision_chunk": args.vision_chunk,
            "step_timeout": args.step_timeout}  # fmt: skip


def add_constraint_options(p: argparse.ArgumentParser) -> None:
    """--json-schema FILE|JSON and --regex RE (structured output; one or the other)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--json-schema",
        metavar="FILE|JSON",
        help="answer with JSON that follows this JSON schema: a file, or the schema itself",
    )
    group.add_argument(
        "--regex", metavar="RE", help="answer with text that matches this regular expression (all of it)"
    )


def open_image(path: str | os.PathLike):
    """The image file (`~` expanded) as an RGB PIL image; UserError naming the file when it is missing or
    unreadable."""
    from idefics2.data.images import load_image

    try:
        return load_image(Path(path))
    except ValueError as error:
        raise UserError(str(error)) from None


def user_message(prompt: str, num_images: int) -> dict[str, Any]:
    """One user turn: the images first, then the prompt; or the images where the prompt's <image> markers
    are (one marker per image)."""
    from idefics2.processing.chat import user_turn

    try:
        return user_turn(prompt, num_images)
    except ValueError as error:
        raise UserError(str(error)) from None
