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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from idefics2.cli.common import (
    UserError,
    add_constraint_options,
    add_data_options,
    add_engine_budget_options,
    add_model_options,
    add_sampling_options,
    engine_budgets,
    open_rows,
)
from idefics2.settings import (
    check_sampling_flags,
    constraint_controls,
    generation_controls,
    load_pipeline,
    number_in,
    positive_int,
)

if TYPE_CHECKING:
    from idefics2.data import RowStream


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
        "between the processes; with --ray, between the actors of a Ray cluster. If the engine dies (a "
        "fault, or a step longer than --step-timeout), every row it did not answer gets an error row and the "
        "command exits with code 1.",
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
        if args.resume:
            raise UserError("--resume is not available with --ray")
        from idefics2.integrations.ray import run_batch

        try:
            run_batch(args, rows)
        except ImportError as error:  # Ray Data is not installed: the error says what to install
            raise UserError(str(error)) from None
        _report(target)
        return 0
    rank, world = _distributed()
    if args.resume and world > 1:
        raise UserError("--resume runs in one process, not under torchrun")
    done = _answered(target) if args.resume else set()
    part = target if world == 1 else target.with_name(f"{target.name}.part-{rank}-of-{world}.jsonl")
    pipe = load_pipeline(args)
    generation_controls(args, pipe.model)  # the flags' mistakes stop the run before any row

    from idefics2.data import open_writer
    from idefics2.serving import Engine
    from idefics2.serving.batch import answer_rows

    options = {"max_batch": args.max_batch, "max_length": args.max_length, **engine_budgets(args)}
    keep = args.keep if world == 1 else [*args.keep, "line"]
    progress = not args.no_progress and rank == 0
    with _terminate_as_interrupt(), Engine(pipe.model, pipe.processor, **options) as engine:
        with open_writer(part, keep=keep, schema=rows.schema, resume=args.resume) as out:
            mine = rows.select(rank=rank, world=world, skip_ids=done)
            total = _share_size(rows.num_rows, rank, world)
            answer_rows(
                engine, args, mine, out, keep=args.keep, total=total, numbered=world > 1, progress=progress
            )
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
    if engine.dead:  # every line it left unanswered has an error row
        print(f"idefics2 batch: the engine died ({engine.dead_reason}); exiting with code 1", file=sys.stderr)
        return 1
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


def _merge_parts(target: Path, parts: list[Path], keep: list[str], schema: Any) -> None:
    """Merge the processes' part files (each in input order) into `target`, in input order."""
    from idefics2.data import open_writer, read_results

    with open_writer(target, keep=keep, schema=schema) as out:
        for record in heapq.merge(*(read_results(p) for p in parts), key=lambda r: r["line"]):
            record.pop("line")
            out.write(record)
    for path in parts:
        path.unlink()
