"""`idefics2 batch`: answer a JSONL file of prompts on the continuous-batching engine, one output line per
input line, in input order, written as it goes.

Under torchrun (WORLD_SIZE > 1) each process answers every WORLD_SIZE-th line into a part file next to the
output; the first process then merges the parts into the output, in input order.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from idefics2.cli.common import (
    UserError,
    add_constraint_options,
    add_engine_budget_options,
    add_model_options,
    add_sampling_options,
    check_sampling_flags,
    constraint_controls,
    engine_budgets,
    generation_controls,
    load_pipeline,
    non_negative_int,
    number_in,
    open_image,
    positive_int,
    user_message,
)

# a line's own generation settings: JSON key -> (flag attribute, parser of the flag's type)
LINE_OVERRIDES = {
    "max_new_tokens": ("max_new_tokens", positive_int),
    "temperature": ("temperature", number_in(0.0, 100.0)),
    "top_p": ("top_p", number_in(0.0, 1.0, low_open=True)),
    "seed": ("seed", non_negative_int),
}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "batch",
        help="answer a JSONL file of prompts",
        description='Answer every line of a JSONL file: {"id": ..., "images": ["a.png", ...], "prompt": '
        '"..."} (image paths relative to the input file\'s folder), optionally with its own '
        '"max_new_tokens", "temperature", "top_p", "seed", "stop" (a string or a list), "json_schema" (an '
        'object) or "regex". Writes {"id": '
        '..., "text": "...", "finish_reason": ...} lines in input order as they are answered; a bad line '
        'becomes {"id": ..., "error": "..."} and the run goes on. Requests are decoded together on the '
        "continuous-batching engine; under torchrun the lines are split between the processes. If the engine "
        "dies (a fault, or a step longer than --step-timeout), every line it did not answer gets an error "
        "line and the command exits with code 1.",
    )
    p.add_argument("--input", required=True, metavar="IN.jsonl", help="JSONL file of prompts")
    p.add_argument(
        "--output", required=True, metavar="OUT.jsonl", help="JSONL file for the answers (overwritten)"
    )
    add_model_options(p)
    add_sampling_options(p)
    add_constraint_options(p)
    p.add_argument(
        "--max-batch",
        "--batch-size",
        dest="max_batch",
        type=positive_int,
        default=16,
        metavar="N",
        help="requests decoded together (default: 16)",
    )
    p.add_argument(
        "--max-length",
        type=positive_int,
        metavar="N",
        help="cache slots per request, prompt + new tokens (default: 4096, at most the model's context)",
    )
    add_engine_budget_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run)


class _BadLine(Exception):
    """An input line of `batch` that cannot be answered; `request_id` is its "id" when it has one."""

    def __init__(self, message: str, request_id: Any = None):
        super().__init__(message)
        self.request_id = request_id


def _read_lines(source: Path) -> list[tuple[int, bytes]]:
    """(line number, bytes) of the non-blank lines of a JSONL file. Lines end at "\n" only (a JSON string may
    hold other line separators), and each is decoded on its own, so one that is not UTF-8 is one bad line."""
    lines = source.read_bytes().split(b"\n")
    return [(n, line) for n, line in enumerate(lines, 1) if line.decode("utf-8", "replace").strip()]


def _read_request(number: int, line: bytes, base: Path) -> tuple[Any, dict[str, Any], list[Any], dict]:
    """(id, user message, images, the line's own settings) of one input line; _BadLine for a bad one."""
    from idefics2.processing.tokenizer import check_text
    from idefics2.training.data import parse_json_line

    record = parse_json_line(line, lambda message: _BadLine(f"line {number}: {message}"))
    if not isinstance(record, dict):
        raise _BadLine(f"line {number}: expected a JSON object, got {type(record).__name__}")
    request_id, prompt, paths = record.get("id"), record.get("prompt"), record.get("images", [])
    try:
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError('"prompt" must be a non-empty string')
        try:
            check_text(prompt, '"prompt"')
        except ValueError as error:
            raise UserError(str(error)) from None
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise UserError('"images" must be a list of image file paths')
        settings = _line_settings(record)
        images = [open_image(base / path) for path in paths]
        return request_id, user_message(prompt, len(images)), images, settings
    except UserError as error:
        raise _BadLine(f"line {number}: {error}", request_id) from None


def _line_settings(record: dict[str, Any]) -> dict[str, Any]:
    """The line's overrides of the flags, checked like the flags: {flag attribute: value}."""
    settings = {}
    for key, (attribute, parse) in LINE_OVERRIDES.items():
        if key in record:
            value = record[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f'"{key}" must be a number, got {value!r}')
            try:
                settings[attribute] = parse(str(value))
            except argparse.ArgumentTypeError as error:
                raise UserError(f'"{key}": {error}') from None
    if "json_schema" in record and "regex" in record:
        raise UserError('give "json_schema" or "regex", not both')
    if "json_schema" in record:
        if not isinstance(record["json_schema"], dict):
            raise UserError('"json_schema" must be a JSON schema (an object)')
        settings["json_schema"] = record["json_schema"]
    if "regex" in record:
        if not isinstance(record["regex"], str) or not record["regex"]:
            raise UserError('"regex" must be a non-empty string')
        settings["regex"] = record["regex"]
    if "stop" in record:
        stop = record["stop"]
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not stop or not all(isinstance(s, str) and s for s in stop):
            raise UserError('"stop" must be a non-empty string or a list of them')
        settings["stop_strings"] = stop
    return settings


def _controls(args: argparse.Namespace, settings: dict[str, Any], model) -> dict[str, Any]:
    """The flags' generation controls with one line's overrides applied (checked as the flags are); a
    line's json_schema or regex replaces the flags'."""
    stop = settings.pop("stop_strings", None)
    constraint = {k: settings[k] for k in ("json_schema", "regex") if k in settings}
    if constraint:  # the line's own constraint
        settings = {**settings, "json_schema": None, "regex": None, **constraint}
    merged = argparse.Namespace(**{**vars(args), **settings})
    check_sampling_flags(merged)
    controls = generation_controls(merged, model)
    controls.update(constraint or args.constraint)
    if stop:
        controls["stop_strings"] = stop
    return controls


def _json_line(result: dict[str, Any]) -> str:
    """An output line; UTF-8 as it is, unless it holds a lone surrogate (an "id" such as "\\ud800", valid
    JSON): then with JSON's \\u escapes, as UTF-8 cannot hold it."""
    line = json.dumps(result, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(result)
    return line


def _distributed() -> tuple[int, int]:
    """(rank, world size) under torchrun, with the process group up (gloo); (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return dist.get_rank(), world


def run(args: argparse.Namespace) -> int:
    source, target = Path(args.input), Path(args.output)
    if not source.is_file():
        raise UserError(f"input file not found: {source}")
    if target.exists() and target.resolve() == source.resolve():
        raise UserError("--output must not be the --input file")
    if not target.parent.is_dir():
        raise UserError(f"output folder does not exist: {target.parent}")
    check_sampling_flags(args)
    args.constraint = constraint_controls(args)  # a bad schema or regex fails before the model loads
    lines = _read_lines(source)
    if not lines:
        raise UserError(f"{source} holds no lines")
    rank, world = _distributed()
    mine = lines[rank::world]
    parts = [target.with_name(f"{target.name}.part-{r}-of-{world}") for r in range(world)]
    part = target if world == 1 else parts[rank]
    pipe = load_pipeline(args)
    generation_controls(args, pipe.model)  # the flags' mistakes stop the run before any line

    from idefics2.serving import Engine

    options = {"max_batch": args.max_batch, "max_length": args.max_length, **engine_budgets(args)}
    with Engine(pipe.model, pipe.processor, **options) as engine, part.open("w", encoding="utf-8") as out:
        answer_lines(engine, args, mine, source.parent, out, progress=not args.no_progress and rank == 0)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        if rank == 0:
            _merge_parts(
                target, [target.with_name(f"{target.name}.part-{r}-of-{world}") for r in range(world)]
            )
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        results = [json.loads(line) for line in target.read_text(encoding="utf-8").split("\n") if line]
        errors = sum("error" in r for r in results)
        print(f"wrote {len(results)} results to {target} ({errors} error(s))", file=sys.stderr)
    if engine.dead:  # every line it left unanswered has an error row
        print(f"idefics2 batch: the engine died ({engine.dead_reason}); exiting with code 1", file=sys.stderr)
        return 1
    return 0


class _OrderedWriter:
    """Results in input order, written as soon as every earlier line is answered: each added line holds a
    finished result (a dict) or an engine handle still running. Under torchrun each written line also carries
    its input line number ("line"), for the merge. A tqdm bar counts lines and tokens per second."""

    def __init__(self, out, total: int, numbered: bool, progress: bool) -> None:
        from tqdm import tqdm

        self.out, self.numbered = out, numbered
        self.pending: deque[tuple[int, Any, Any]] = deque()  # (line number, id, handle or result)
        self.bar = tqdm(total=total, unit="line", disable=not progress, file=sys.stderr, dynamic_ncols=True)
        self.started, self.tokens = time.monotonic(), 0

    def add(self, number: int, request_id: Any, outcome: Any) -> None:
        self.pending.append((number, request_id, outcome))
        self.write_ready(wait=False)

    def in_flight(self) -> int:
        return sum(not isinstance(outcome, dict) and not outcome.done for _, _, outcome in self.pending)

    def write_ready(self, wait: bool) -> None:
        """Write the answered lines at the front; with `wait`, wait for the first one if needed."""
        while self.pending and (wait or isinstance(self.pending[0][2], dict) or self.pending[0][2].done):
            number, request_id, outcome = self.pending.popleft()
            if not isinstance(outcome, dict):
                outcome = _outcome(number, outcome)
                self.tokens += outcome.pop("tokens", 0)
            result = {"id": request_id, **outcome}
            if self.numbered:
                result = {"line": number, **result}
            self.out.write(_json_line(result) + "\n")
            self.out.flush()
            rate = self.tokens / max(time.monotonic() - self.started, 1e-9)
            self.bar.update(1)
            self.bar.set_postfix_str(f"{rate:.1f} tok/s", refresh=False)
            wait = False

    def close(self, drain: bool) -> None:
        while drain and self.pending:
            self.write_ready(wait=True)
        self.write_ready(wait=False)
        self.bar.close()


def answer_lines(engine, args, lines: list[tuple[int, bytes]], base: Path, out, progress: bool) -> None:
    """Submit each line to the engine (keeping about two batches in flight) and write the results in input
    order as they come. On Ctrl-C the answered lines are kept and the rest is cancelled."""
    from idefics2.serving import EngineOverloadedError

    numbered = int(os.environ.get("WORLD_SIZE", "1")) > 1
    writer = _OrderedWriter(out, len(lines), numbered, progress)
    try:
        for number, line in lines:
            while writer.in_flight() >= 2 * engine.options.max_batch:
                writer.write_ready(wait=True)
            request_id = None
            try:
                request_id, message, images, settings = _read_request(number, line, base)
                controls = _controls(args, settings, engine.model)
                while True:
                    try:
                        handle = engine.submit([message], images, **controls)
                        break
                    except EngineOverloadedError:
                        writer.write_ready(wait=True)
            except _BadLine as error:
                request_id, handle = error.request_id, {"error": str(error)}
            except Exception as error:  # whatever goes wrong with one line stays with that line
                handle = {"error": f"line {number}: {_message(error)}"}
            writer.add(number, request_id, handle)
    except KeyboardInterrupt:
        writer.close(drain=False)
        engine.close(timeout=0)
        raise
    writer.close(drain=True)


def _message(error: Exception) -> str:
    """One line: the message of a user-facing error, else the error's type and message."""
    message = " ".join(str(error).split())
    if isinstance(error, (UserError, ValueError, TypeError)):
        return message
    return f"{type(error).__name__}: {message}"


def _outcome(number: int, handle) -> dict[str, Any]:
    from idefics2.serving import RequestFailedError

    try:
        completion = handle.result()
    except RequestFailedError as error:
        return {"error": f"line {number}: {error}"}
    return {"text": completion.text, "finish_reason": completion.finish_reason,
            "tokens": completion.completion_tokens}  # fmt: skip


def _merge_parts(target: Path, parts: list[Path]) -> None:
    """Merge the processes' part files (each in input order) into `target`, in input order."""

    def records(path: Path):
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                yield json.loads(line)

    with target.open("w", encoding="utf-8") as out:
        for record in heapq.merge(*(records(p) for p in parts), key=lambda r: r["line"]):
            record.pop("line")
            out.write(_json_line(record) + "\n")
    for path in parts:
        path.unlink()
