"""`idefics2 batch`: answer the rows of a file or dataset (read through idefics2.data) on the
continuous-batching engine, one result per input row, in input order, written as it goes.

Under torchrun (WORLD_SIZE > 1) each process answers every WORLD_SIZE-th row into a part file next to the
output; the first process then merges the parts into the output, in input order. With --ray the rows go
through Ray Data to a pool of actors (idefics2.integrations.ray).
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import os
import sys
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from idefics2.cli.common import (
    UserError,
    add_constraint_options,
    add_data_options,
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
    open_rows,
    positive_int,
)

if TYPE_CHECKING:
    from idefics2.data import ResultWriter, Row, RowStream

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
        help="answer a file or dataset of prompts",
        description="Answer every row of a JSONL file, Parquet file/folder/glob, `datasets` folder or hub "
        'dataset. A JSONL line: {"id": ..., "images": ["a.png", ...], "prompt": "..."} (image paths relative '
        'to the input file\'s folder), optionally with its own "max_new_tokens", "temperature", "top_p", '
        '"seed", "stop" (a string or a list), "json_schema" (an object) or "regex". Other layouts (messages, '
        "the cauldron's texts, question/answer columns) are recognised by their columns, or named with "
        '--columns. Writes {"id": ..., "text": "...", "finish_reason": ...} results (JSONL or Parquet) in '
        'input order as they are answered; a bad row becomes {"id": ..., "error": "..."} and the run goes '
        "on. "
        "Requests are decoded together on the continuous-batching engine; under torchrun the rows are split "
        "between the processes; with --ray, between the actors of a Ray cluster.",
    )
    p.add_argument(
        "--input",
        required=True,
        metavar="IN",
        help="JSONL file, Parquet file / folder / glob, `datasets` save_to_disk folder, or hub dataset id",
    )
    p.add_argument(
        "--output",
        required=True,
        metavar="OUT",
        help="results: OUT.parquet (written in row groups as rows are answered) or JSONL (overwritten)",
    )
    add_data_options(p)
    p.add_argument(
        "--keep",
        type=lambda text: [c.strip() for c in text.split(",") if c.strip()],
        default=[],
        metavar="COLUMNS",
        help="input columns copied into each result, comma-separated (the id is always kept)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the answered results of an existing --output and answer only the other rows (by id)",
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
    p.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        metavar="auto|local|ADDRESS",
        help="answer on a Ray cluster with Ray Data (pip install 'idefics2[ray]'): auto = the running "
        "cluster, else a new local one; local = a new local one; or the cluster's address, e.g. "
        "ray://head:10001",
    )
    p.add_argument(
        "--actors", type=positive_int, default=1, metavar="N", help="with --ray: model replicas (default: 1)"
    )
    p.add_argument(
        "--gpus-per-actor",
        type=number_in(0.0, 64.0),
        default=0.0,
        metavar="G",
        help="with --ray: GPUs each replica holds (default: 0, CPU)",
    )
    p.add_argument(
        "--cpus-per-actor",
        type=number_in(0.0, 1024.0, low_open=True),
        default=1.0,
        metavar="C",
        help="with --ray: CPUs each replica holds (default: 1; leave some to Ray Data's reading tasks)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run)


class _BadRow(Exception):
    """A row of `batch` that cannot be answered, with its message (naming the row) and id."""

    def __init__(self, message: str, request_id: Any = None):
        super().__init__(message)
        self.request_id = request_id


def _read_request(row: Row) -> tuple[list[dict], list[Any], dict]:
    """(conversation to answer, its images, the row's own settings) of one row; _BadRow for a bad one."""
    if row.error is not None:
        raise _BadRow(row.error, row.id)
    try:
        settings = _line_settings(row.columns)
    except UserError as error:
        raise _BadRow(f"{row.where}: {error}", row.id) from None
    return row.request_messages, row.request_images, settings


def _line_settings(record: dict[str, Any]) -> dict[str, Any]:
    """The line's overrides of the flags, checked like the flags: {flag attribute: value}."""
    settings = {}
    record = {key: value for key, value in record.items() if value is not None}  # a table's empty cells
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
    target = Path(args.output)
    source_path = Path(args.input).expanduser()
    if target.exists() and source_path.exists() and target.resolve() == source_path.resolve():
        raise UserError("--output must not be the --input file")
    if not target.parent.is_dir():
        raise UserError(f"output folder does not exist: {target.parent}")
    if target.suffix == ".parquet" and target.is_dir():
        raise UserError(f"--output {target} is a folder")
    check_sampling_flags(args)
    args.constraint = constraint_controls(args)  # a bad schema or regex fails before the model loads
    rows = open_rows(args, args.input)
    _check_keep(args.keep, rows)
    if args.ray is not None:
        from idefics2.integrations.ray import run_batch

        return run_batch(args, rows)
    rank, world = _distributed()
    if args.resume and world > 1:
        raise UserError("--resume runs in one process, not under torchrun")
    done = _answered(target) if args.resume else set()
    part = target if world == 1 else target.with_name(f"{target.name}.part-{rank}-of-{world}.jsonl")
    pipe = load_pipeline(args)
    generation_controls(args, pipe.model)  # the flags' mistakes stop the run before any row

    from idefics2.data import open_writer
    from idefics2.serving import Engine

    options = {"max_batch": args.max_batch, "max_length": args.max_length, **engine_budgets(args)}
    keep = args.keep if world == 1 else [*args.keep, "line"]
    progress = not args.no_progress and rank == 0
    with _terminate_as_interrupt(), Engine(pipe.model, pipe.processor, **options) as engine:
        with open_writer(part, keep=keep, schema=rows.schema, resume=args.resume) as out:
            mine = rows.select(rank=rank, world=world, skip_ids=done)
            answer_rows(engine, args, mine, out, _share_size(rows.num_rows, rank, world), progress)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        if rank == 0:
            parts = [target.with_name(f"{target.name}.part-{r}-of-{world}.jsonl") for r in range(world)]
            _merge_parts(target, parts, args.keep, rows.schema)
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        _report(target)
    return 0


def _check_keep(keep: list[str], rows: RowStream) -> None:
    reserved = {"id", "text", "finish_reason", "error", "line"}
    clash = [c for c in keep if c in reserved]
    if clash:
        raise UserError(f"--keep {clash[0]}: the results have their own {clash[0]!r} column")
    missing = [c for c in keep if rows.schema is not None and c not in rows.columns]
    if missing:
        raise UserError(
            f"--keep {missing[0]}: the input has no such column (columns: {', '.join(rows.columns)})"
        )


def _answered(target: Path) -> set[str]:
    from idefics2.data import DataSourceError, answered_ids

    try:
        return answered_ids(target)
    except DataSourceError as error:
        raise UserError(f"--resume: {error}") from None


def _share_size(num_rows: int | None, rank: int, world: int) -> int | None:
    return None if num_rows is None else len(range(rank, num_rows, world))


def _report(target: Path) -> None:
    from idefics2.data import read_results

    results = errors = 0
    for result in read_results(target):
        results += 1
        errors += result.get("error") is not None
    print(f"wrote {results} results to {target} ({errors} error(s))", file=sys.stderr)


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (a scheduler stopping the job) is handled as Ctrl-C: the answered rows are written and the
    result file closed (a Parquet file gets its footer)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _OrderedWriter:
    """Results in input order, written as soon as every earlier row is answered: each added row holds a
    finished result (a dict) or an engine handle still running. Under torchrun each written result also
    carries its row's index ("line"), for the merge. A tqdm bar counts rows and tokens per second."""

    def __init__(self, out: ResultWriter, total: int | None, keep: list[str], numbered: bool, progress: bool):
        from tqdm import tqdm

        self.out, self.keep, self.numbered = out, keep, numbered
        self.pending: deque[tuple[Row, Any]] = deque()  # (row, handle or result)
        self.bar = tqdm(total=total, unit="line", disable=not progress, file=sys.stderr, dynamic_ncols=True)
        self.started, self.tokens = time.monotonic(), 0

    def add(self, row: Row, outcome: Any) -> None:
        self.pending.append((row, outcome))
        self.write_ready(wait=False)

    def in_flight(self) -> int:
        return sum(not isinstance(outcome, dict) and not outcome.done for _, outcome in self.pending)

    def write_ready(self, wait: bool) -> None:
        """Write the answered rows at the front; with `wait`, wait for the first one if needed."""
        while self.pending and (wait or isinstance(self.pending[0][1], dict) or self.pending[0][1].done):
            row, outcome = self.pending.popleft()
            if not isinstance(outcome, dict):
                outcome = _outcome(row, outcome)
                self.tokens += outcome.pop("tokens", 0)
            result = {"id": row.id, **{c: row.columns.get(c) for c in self.keep}, **outcome}
            if self.numbered:
                result = {"line": row.index, **result}
            self.out.write(result)
            rate = self.tokens / max(time.monotonic() - self.started, 1e-9)
            self.bar.update(1)
            self.bar.set_postfix_str(f"{rate:.1f} tok/s", refresh=False)
            wait = False

    def close(self, drain: bool) -> None:
        while drain and self.pending:
            self.write_ready(wait=True)
        self.write_ready(wait=False)
        self.bar.close()


def answer_rows(
    engine, args, rows: Iterable[Row], out: ResultWriter, total: int | None, progress: bool
) -> None:
    """Submit each row to the engine (keeping about two batches in flight) and write the results in input
    order as they come. On Ctrl-C the answered rows are kept and the rest is cancelled."""
    from idefics2.serving import EngineOverloadedError

    numbered = int(os.environ.get("WORLD_SIZE", "1")) > 1
    writer = _OrderedWriter(out, total, args.keep, numbered, progress)
    try:
        for row in rows:
            while writer.in_flight() >= 2 * engine.options.max_batch:
                writer.write_ready(wait=True)
            try:
                messages, images, settings = _read_request(row)
                controls = _controls(args, settings, engine.model)
                while True:
                    try:
                        handle = engine.submit(messages, images, **controls)
                        break
                    except EngineOverloadedError:
                        writer.write_ready(wait=True)
            except _BadRow as error:
                handle = {"error": str(error)}
            except Exception as error:  # whatever goes wrong with one row stays with that row
                handle = {"error": f"{row.where}: {_message(error)}"}
            writer.add(row, handle)
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


def _outcome(row: Row, handle) -> dict[str, Any]:
    from idefics2.serving import RequestFailedError

    try:
        completion = handle.result()
    except RequestFailedError as error:
        return {"error": f"{row.where}: {error}"}
    return {"text": completion.text, "finish_reason": completion.finish_reason,
            "tokens": completion.completion_tokens}  # fmt: skip


def _merge_parts(target: Path, parts: list[Path], keep: list[str], schema: Any) -> None:
    """Merge the processes' part files (each in input order) into `target`, in input order."""
    from idefics2.data import open_writer, read_results

    with open_writer(target, keep=keep, schema=schema) as out:
        for record in heapq.merge(*(read_results(p) for p in parts), key=lambda r: r["line"]):
            record.pop("line")
            out.write(record)
    for path in parts:
        path.unlink()
