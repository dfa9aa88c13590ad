"""What every command shares: the user-error type, argument types, model and sampling options, loading the
pipeline, opening images and building the user's turn."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any


class UserError(Exception):
    """A mistake in the command's arguments or inputs: reported as one line, exit code 2."""


class CommandParser(argparse.ArgumentParser):
    """argparse, with its errors on one line (no usage block) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def number_in(low: float, high: float, *, low_open: bool = False, cast=float):
    """An argparse type: a number (`cast`: float or int) in [low, high] ((low, high] with low_open)."""

    def parse(text: str) -> float:
        try:
            value = cast(text)
        except ValueError:
            what = "an integer" if cast is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (low < value if low_open else low <= value) or not value <= high:
            span = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"expected a number in {span}, got {text!r}")
        return value

    return parse


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
DEFAULT_MAX_NEW_TOKENS = 256  # when neither --max-new-tokens nor the checkpoint's generation_config sets one
IMAGE_MARKER = "<image>"


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


def constraint_controls(args: argparse.Namespace) -> dict[str, Any]:
    """json_schema= or regex= for generation from --json-schema / --regex, read and checked without the
    model (so a bad schema or regex is reported before anything loads)."""
    from idefics2.constrained import validate

    if getattr(args, "json_schema", None) is not None:
        schema = read_json_schema(args.json_schema, "--json-schema")
        try:
            validate(json_schema=schema)
        except ValueError as error:
            raise UserError(f"--json-schema: {error}") from None
        return {"json_schema": schema}
    if getattr(args, "regex", None) is not None:
        try:
            validate(regex=args.regex)
        except ValueError as error:
            raise UserError(f"--regex: {error}") from None
        return {"regex": args.regex}
    return {}


def read_json_schema(file_or_json: str, what: str) -> dict[str, Any]:
    """A JSON schema given inline (text starting with "{") or as a file path; UserError naming `what`."""
    text = file_or_json
    if not file_or_json.lstrip().startswith("{"):
        path = Path(file_or_json)
        if not path.is_file():
            raise UserError(f"{what}: {file_or_json} is neither a file nor a JSON object")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"{what}: cannot read {file_or_json}: {error}") from None
    try:
        schema = json.loads(text)
    except ValueError as error:
        raise UserError(f"{what}: not valid JSON: {error}") from None
    if not isinstance(schema, dict):
        raise UserError(f"{what}: a JSON schema must be a JSON object, got {type(schema).__name__}")
    return schema


def model_folder(name: str | None) -> Path:
    from idefics2.hub import resolve_checkpoint

    if name is None:
        try:
            from idefics2.assets import builtin_model_dir
        except ImportError:
            raise UserError("this install has no built-in model: name a checkpoint with --model") from None
        return builtin_model_dir()
    folder = resolve_checkpoint(name)
    if not (folder / "config.json").is_file():
        raise UserError(f"{name} is not a checkpoint: it has no config.json")
    return folder


def adapter_folder(name: str) -> Path:
    from idefics2.hub import CheckpointNotFoundError, resolve_checkpoint

    local = Path(name).expanduser()
    parent = local.parent
    # A name whose first part is a local folder, or that ends in a training checkpoint's folder name, is a
    # mistyped local path, not a hub repo id: say so instead of trying the hub.
    looks_local = (parent != Path(".") and parent.is_dir()) or re.fullmatch(r"checkpoint-\d+", local.name)
    if not local.exists() and looks_local:
        if parent.is_dir():
            inside = sorted(p.name for p in parent.iterdir() if (p / "adapter_config.json").is_file())
            hint = f"; {parent} holds: {', '.join(inside)}" if inside else f"; {parent} holds no adapter"
        else:
            hint = f"; there is no folder {parent} either"
        raise UserError(f"--adapter: no such folder: {name}{hint}")
    try:
        folder = resolve_checkpoint(name)
    except CheckpointNotFoundError as error:
        raise UserError(f"--adapter: {error}") from None
    if not (folder / "adapter_config.json").is_file():
        raise UserError(f"--adapter: {name} is not a LoRA adapter: it has no adapter_config.json")
    return folder


def load_pipeline(args: argparse.Namespace):
    """The ChatPipeline for --model (or the built-in model), --adapter, --device, --dtype and --quantize."""
    import torch

    from idefics2.pipelines import pipeline

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = weights_dtype(args.dtype, device)
    folder = model_folder(args.model)
    adapter = adapter_folder(args.adapter) if args.adapter else None
    if not getattr(args, "calibrate", None):
        return pipeline(folder, dtype=dtype, device=device, adapter=adapter, quantize=args.quantize)
    if not args.quantize:
        raise UserError("--calibrate N needs --quantize int8|int4")
    pipe = pipeline(folder, dtype=dtype, device=device, adapter=adapter)
    try:
        pipe.model.quantize(args.quantize, calibration=shapes_calibration(pipe.processor, args.calibrate))
    except ValueError as error:  # e.g. a checkpoint saved quantized
        raise UserError(f"--calibrate: {error}") from None
    return pipe


def shapes_calibration(processor, count: int) -> list[dict]:
    """`count` built-in shapes questions (image and question, chat template applied) as model inputs."""
    from idefics2.shapes import QUESTION_TYPES, make_dataset

    batches = []
    for example in make_dataset(-(-count // len(QUESTION_TYPES)), seed=0)[:count]:
        prompt = processor.apply_chat_template(example.messages(), add_generation_prompt=True)
        batches.append(dict(processor(text=prompt, images=[example.images()], return_tensors="pt")))
    return batches


def check_sampling_flags(args: argparse.Namespace) -> None:
    """The mistakes visible before the model loads."""
    if args.temperature == 0 and args.top_p is not None:
        raise UserError("--top-p needs sampling, but --temperature 0 asks for greedy decoding")
    if args.temperature == 0 and args.seed is not None:
        raise UserError("--seed needs sampling, but --temperature 0 asks for greedy decoding")


def generation_controls(args: argparse.Namespace, model) -> dict[str, Any]:
    """Generation controls from the flags; unset ones follow the checkpoint's generation_config. With
    --json-schema or --regex the grammar ends the answer, so the default limit is DEFAULT_MAX_NEW_TOKENS
    rather than the checkpoint's (the built-in model's 8 suits one-word answers, not JSON)."""
    controls: dict[str, Any] = {}
    constrained = getattr(args, "json_schema", None) is not None or getattr(args, "regex", None) is not None
    if args.max_new_tokens is not None:
        controls["max_new_tokens"] = args.max_new_tokens
    elif constrained or not model.generation_config.get("max_new_tokens"):
        controls["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
    if args.temperature == 0:
        controls["do_sample"] = False
    elif args.temperature is not None or args.top_p is not None:
        controls["do_sample"] = True
        if args.temperature is not None:
            controls["temperature"] = args.temperature
        if args.top_p is not None:
            controls["top_p"] = args.top_p
    if args.seed is not None:
        if not controls.get("do_sample", bool(model.generation_config.get("do_sample"))):
            raise UserError("--seed needs sampling: add --temperature (above 0) or --top-p")
        controls["seed"] = args.seed
    return controls


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


def weights_dtype(choice: str, device: str):
    """The --dtype choice as what from_pretrained takes: "auto" is the fastest dtype on the device,
    "checkpoint" the checkpoint's own."""
    import torch

    from idefics2.modeling.kernels import fastest_dtype

    if choice == "auto":
        return fastest_dtype(device)
    return "auto" if choice == "checkpoint" else getattr(torch, choice)
