"""`idefics2 batch`: answer a JSONL file of prompts, one output line per input line, in input order."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from idefics2.cli.common import (
    IMAGE_MARKER,
    UserError,
    add_model_options,
    add_sampling_options,
    check_sampling_flags,
    generation_controls,
    load_pipeline,
    open_image,
    positive_int,
    user_message,
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "batch",
        help="answer a JSONL file of prompts",
        description='Answer every line of a JSONL file: {"id": ..., "images": ["a.png", ...], "prompt": '
        '"..."} (image paths relative to the input file\'s folder). Writes {"id": ..., "text": "..."} '
        'lines in input order; a bad line becomes {"id": ..., "error": "..."} and the run goes on.',
    )
    p.add_argument("--input", required=True, metavar="IN.jsonl", help="JSONL file of prompts")
    p.add_argument(
        "--output", required=True, metavar="OUT.jsonl", help="JSONL file for the answers (overwritten)"
    )
    add_model_options(p)
    add_sampling_options(p)
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=8,
        metavar="N",
        help="prompts per generation batch (default: 8)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run)


class _Progress:
    """A one-line progress bar on stderr: [#####.....] done/total, elapsed seconds."""

    def __init__(self, total: int, what: str, enabled: bool = True, width: int = 30):
        import time

        self.total, self.what, self.enabled, self.width = total, what, enabled, width
        self.done, self.clock, self.start = 0, time.monotonic, time.monotonic()
        self._draw()

    def advance(self, n: int) -> None:
        self.done += n
        self._draw()

    def _draw(self) -> None:
        if self.enabled:
            filled = self.width * self.done // max(self.total, 1)
            bar = "#" * filled + "." * (self.width - filled)
            elapsed = self.clock() - self.start
            sys.stderr.write(f"\r[{bar}] {self.done}/{self.total} {self.what} {elapsed:.0f}s")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


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


def _read_request(number: int, line: bytes, base: Path) -> tuple[Any, dict[str, Any], list[Any]]:
    """(id, user message, images) of one input line of `batch`; _BadLine for a bad one."""
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
        images = [open_image(base / path) for path in paths]
        return request_id, user_message(prompt, len(images)), images
    except UserError as error:
        raise _BadLine(f"line {number}: {error}", request_id) from None


def _json_line(result: dict[str, Any]) -> str:
    """An output line; UTF-8 as it is, unless it holds a lone surrogate (an "id" such as "\\ud800", valid
    JSON): then with JSON's \\u escapes, as UTF-8 cannot hold it."""
    line = json.dumps(result, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(result)
    return line


def _prompt_text(processor, message: dict[str, Any]) -> str:
    if processor.chat_template:
        return processor.apply_chat_template([message], add_generation_prompt=True)
    return "".join(p["text"] if p["type"] == "text" else IMAGE_MARKER for p in message["content"])


def _answer_batch(pipe, messages: list[dict], images: list[list], controls: dict[str, Any]) -> list[str]:
    """Greedy or sampled answers to one user turn each, generated together (prompts left-padded)."""
    import torch

    from idefics2.generation import default_eos_token_ids

    model, processor = pipe.model, pipe.processor
    prompts = [_prompt_text(processor, m) for m in messages]
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        batch = processor(
            text=prompts, images=images if any(images) else None, padding=True, return_tensors="pt"
        )
    finally:
        tokenizer.padding_side = side
    weight = model.lm_head.weight
    inputs = {k: v.to(weight.device) for k, v in batch.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(weight.dtype)
    with torch.no_grad():
        out = model.generate(**inputs, tokenizer=processor, **controls)
    ends = set(default_eos_token_ids(model, processor))
    answers = []
    for row in out[:, inputs["input_ids"].shape[1] :].tolist():
        row = row[: next((i for i, t in enumerate(row) if t in ends), len(row))]
        answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers


def _answer_requests(pipe, ready: list[tuple], controls: dict[str, Any]) -> list[dict[str, str]]:
    """{"text": ...} for each (line number, message, images), generated together; when that fails, one at a
    time, so that a request that fails alone gets {"error": ...} and the others their answers."""
    if not ready:
        return []
    try:
        texts = _answer_batch(pipe, [r[1] for r in ready], [r[2] for r in ready], controls)
        return [{"text": text} for text in texts]
    except ValueError:
        outcomes = []
        for number, message, images in ready:
            try:
                outcomes.append({"text": _answer_batch(pipe, [message], [images], controls)[0]})
            except ValueError as error:
                outcomes.append({"error": f"line {number}: {' '.join(str(error).split())}"})
        return outcomes


def run(args: argparse.Namespace) -> int:
    source, target = Path(args.input), Path(args.output)
    if not source.is_file():
        raise UserError(f"input file not found: {source}")
    if target.exists() and target.resolve() == source.resolve():
        raise UserError("--output must not be the --input file")
    if not target.parent.is_dir():
        raise UserError(f"output folder does not exist: {target.parent}")
    check_sampling_flags(args)
    lines = _read_lines(source)
    if not lines:
        raise UserError(f"{source} holds no lines")
    pipe = load_pipeline(args)
    controls = generation_controls(args, pipe.model)

    progress = _Progress(len(lines), "lines", enabled=not args.no_progress)
    n_errors = 0
    with target.open("w", encoding="utf-8") as out:
        for start in range(0, len(lines), args.batch_size):
            results: list[dict[str, Any]] = []
            ready = []  # (line number, message, images) of the good lines
            for number, line in lines[start : start + args.batch_size]:
                try:
                    request_id, message, images = _read_request(number, line, source.parent)
                except _BadLine as error:
                    results.append({"id": error.request_id, "error": str(error)})
                    continue
                ready.append((number, message, images))
                results.append({"id": request_id})
            outcomes = iter(_answer_requests(pipe, ready, controls))
            for result in results:
                if "error" not in result:
                    result.update(next(outcomes))
            for result in results:
                n_errors += "error" in result
                out.write(_json_line(result) + "\n")
            out.flush()
            progress.advance(len(results))
    progress.close()
    print(f"wrote {len(lines)} results to {target} ({n_errors} error(s))", file=sys.stderr)
    return 0
