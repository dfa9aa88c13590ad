"""Batch inference on Ray Data (`pip install 'idefics2[ray]'`): a pool of model replicas answers the rows of
a dataset streamed through them.

    import ray
    from idefics2.integrations.ray import Predictor

    ds = ray.data.read_parquet("s3://bucket/docvqa/")
    answers = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"model": "HuggingFaceM4/idefics2-8b", "columns": "prompt=query.en,image=image",
                               "max_new_tokens": 32},
        compute=ray.data.ActorPoolStrategy(size=8), num_gpus=1, batch_size=32, batch_format="pyarrow",
    )
    answers.write_parquet("s3://bucket/answers/")

Each actor loads the model once and answers its batches on the continuous-batching engine: the rows of a
batch are read by idefics2.data (any layout it knows, images as bytes, structs or paths) and answered as
`idefics2 batch` answers them, the batch coming back with its columns plus `text`, `finish_reason` and
`error` (a bad row gets its error, the others their answers). `idefics2 batch --ray` runs this over a
Parquet or JSONL input and writes the results as `idefics2 batch` does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from idefics2.cli.common import UserError

ANSWER_COLUMNS = ("text", "finish_reason", "error")
JSONL_LINE = "line"  # the column the JSONL lines come back in


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise UserError("--ray needs Ray Data: pip install 'idefics2[ray]' (or 'ray[data]')") from None
    return ray


class Predictor:
    """A callable class for `Dataset.map_batches`: loads the model once (per actor) and answers a batch.

    `model`: checkpoint folder or hub id (default: the built-in model); `adapter`, `device`, `dtype`,
    `quantize` as for `idefics2 batch`. `columns`: the --columns mapping (text or dict) for layouts not
    recognised by their names; `base_dir`: the folder relative image paths are read from (every node must
    reach it). `jsonl_column`: the column holding JSONL lines (e.g. "text" of `ray.data.read_text`), parsed
    like the lines of a JSONL file. Generation: `max_new_tokens`, `temperature`, `top_p`, `seed`,
    `json_schema` (a dict or its JSON), `regex`; a row's own settings (JSONL keys or columns of the same
    names) apply as in `idefics2 batch`. Engine: `max_batch`, `max_length`, `prefill_chunk`, `vision_chunk`.

    A batch (a pyarrow Table, pandas DataFrame or dict of arrays) comes back as a pyarrow Table of its
    columns plus `text`, `finish_reason`, `error` (with `jsonl_column`, the lines come back as `line`). A
    row's error names its column, not its row number (an actor does not know where its batch lies in the
    dataset).
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        adapter: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        quantize: str | None = None,
        columns: str | dict[str, str] | None = None,
        base_dir: str | None = None,
        jsonl_column: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        json_schema: dict | str | None = None,
        regex: str | None = None,
        max_batch: int = 16,
        max_length: int | None = None,
        prefill_chunk: int = 512,
        vision_chunk: int = 1024,
    ) -> None:
        from idefics2.cli.common import (
            check_sampling_flags,
            constraint_controls,
            generation_controls,
            load_pipeline,
        )
        from idefics2.data import parse_columns
        from idefics2.serving import Engine

        if isinstance(json_schema, dict):
            json_schema = json.dumps(json_schema)
        self.args = argparse.Namespace(
            model=model, adapter=adapter, device=device, dtype=dtype, quantize=quantize,
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
            json_schema=json_schema, regex=regex, keep=[],
        )  # fmt: skip
        check_sampling_flags(self.args)
        self.args.constraint = constraint_controls(self.args)
        self.columns = parse_columns(columns) if isinstance(columns, str) else columns
        self.base_dir, self.jsonl_column = base_dir, jsonl_column
        pipe = load_pipeline(self.args)
        generation_controls(self.args, pipe.model)  # the settings' mistakes fail here, once
        self.engine = Engine(
            pipe.model, pipe.processor, max_batch=max_batch, max_length=max_length,
            prefill_chunk=prefill_chunk, vision_chunk=vision_chunk,
        )  # fmt: skip

    def __call__(self, batch: Any):
        import pyarrow as pa

        from idefics2.cli.batch import answer_rows
        from idefics2.data import read_rows
        from idefics2.data.sources import parse_line

        table = _as_table(batch)
        records: list[Any] = table.to_pylist()
        if self.jsonl_column is not None:
            records = [parse_line(k + 1, _line_bytes(r[self.jsonl_column])) for k, r in enumerate(records)]
            names = [JSONL_LINE if c == self.jsonl_column else c for c in table.column_names]
            table = table.rename_columns(names)
        results = _Collected()
        rows = read_rows(records, columns=self.columns, base_dir=self.base_dir)
        answer_rows(self.engine, self.args, rows, results, len(records), progress=False)
        answers = {name: [r.get(name) for r in results.results] for name in ANSWER_COLUMNS}
        answers["error"] = [_without_row(e) for e in answers["error"]]
        kept = table.drop_columns([c for c in ANSWER_COLUMNS if c in table.column_names])
        for name in ANSWER_COLUMNS:
            kept = kept.append_column(name, pa.array(answers[name], pa.string()))
        return kept

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close(timeout=0)


class _Collected:
    """A ResultWriter that keeps the results in memory (one batch's)."""

    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []

    def write(self, result: dict[str, Any]) -> None:
        self.results.append(result)


def _as_table(batch: Any):
    import pyarrow as pa

    if isinstance(batch, pa.Table):
        return batch
    if hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # a pandas DataFrame
        return pa.Table.from_pandas(batch, preserve_index=False)
    return pa.table({name: list(values) for name, values in batch.items()})


def _line_bytes(line: Any) -> bytes:
    return line.encode("utf-8", "surrogatepass") if isinstance(line, str) else bytes(line or b"")


def _without_row(error: str | None) -> str | None:
    """An error without the batch-local "row N" / "line N" it starts with."""
    if error is None:
        return None
    head, sep, rest = error.partition(", ") if error.startswith("row ") else ("", "", "")
    if sep and head.split()[-1].isdigit():
        return rest
    head, sep, rest = error.partition(": ")
    return rest if sep and head.split()[0] in ("row", "line") and head.split()[-1].isdigit() else error


# ------------------------------------------------------------------------------------ idefics2 batch --ray
def run_batch(args: argparse.Namespace, rows) -> int:
    """`idefics2 batch --ray`: the input read by Ray Data, answered by `--actors` Predictors, the results
    written here in input order (as `idefics2 batch` writes them), with Ray's progress on stderr."""
    ray = _import_ray()
    from idefics2.data import open_writer

    if args.resume:
        raise UserError("--resume is not available with --ray")
    kind = rows.source.kind
    if kind not in ("parquet", "jsonl"):
        raise UserError("--ray reads Parquet files (a file, folder or glob) or a JSONL file")
    check = argparse.Namespace(**vars(args))
    _connect(ray, args.ray)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # results in input order
    context.enable_progress_bars = not args.no_progress
    if kind == "parquet":
        dataset, jsonl_column = ray.data.read_parquet([str(p) for p in rows.source.paths]), None
    else:
        dataset, jsonl_column = ray.data.read_text(str(rows.source.path)), "text"
    # blocks of one batch each (a streaming step), so that a small input still reaches every actor
    dataset = dataset.map_batches(_same, batch_size=2 * args.max_batch, batch_format="pyarrow")
    options = {
        "model": args.model, "adapter": args.adapter, "device": args.device, "dtype": args.dtype,
        "quantize": args.quantize, "columns": args.columns, "base_dir": str(rows.source.base_dir),
        "jsonl_column": jsonl_column, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
        "top_p": args.top_p, "seed": args.seed, "json_schema": check.constraint.get("json_schema"),
        "regex": check.constraint.get("regex"), "max_batch": args.max_batch, "max_length": args.max_length,
        "prefill_chunk": args.prefill_chunk, "vision_chunk": args.vision_chunk,
    }  # fmt: skip
    answered = dataset.map_batches(
        Predictor,
        fn_constructor_kwargs=options,
        compute=ray.data.ActorPoolStrategy(size=args.actors),
        num_gpus=args.gpus_per_actor or None,
        num_cpus=args.cpus_per_actor,
        batch_size=2 * args.max_batch,
        batch_format="pyarrow",
    )
    target = Path(args.output)
    schema = rows.schema if kind == "parquet" else None
    index = 0
    with open_writer(target, keep=args.keep, schema=schema) as out:
        for batch in answered.iter_batches(batch_format="pyarrow", batch_size=None):
            for result in batch.to_pylist():
                record = _record(result, jsonl_column)
                out.write(_result(rows, record, result, index, args.keep))
                index += 1
    from idefics2.cli.batch import _report

    _report(target)
    return 0


def _same(batch):
    return batch


def _connect(ray, address: str) -> None:
    """auto: the running cluster (RAY_ADDRESS or one started with `ray start`), else a local one; local: a
    new local one."""
    if ray.is_initialized():
        return
    if address == "local":
        ray.init(address="local")
        return
    if address != "auto":
        try:
            ray.init(address=address)
        except (ConnectionError, ValueError, RuntimeError) as error:
            raise UserError(f"--ray {address}: cannot connect: {' '.join(str(error).split())}") from None
        return
    try:
        ray.init(address="auto")
    except (ConnectionError, ValueError, RuntimeError):
        print("--ray auto: no running Ray cluster, starting a local one", file=sys.stderr, flush=True)
        ray.init()


def _record(result: dict[str, Any], jsonl_column: str | None) -> Any:
    """The input record of a result row: its columns, or the JSONL line's object."""
    if jsonl_column is None:
        return result
    try:
        return json.loads(result[JSONL_LINE])
    except (ValueError, RecursionError):
        return None


def _result(rows, record: Any, result: dict[str, Any], index: int, keep: list[str]) -> dict[str, Any]:
    """The result as `idefics2 batch` writes it: id, kept columns, then the answer or the error, the error
    naming the row by its position in the input."""
    out = {"id": rows.id_of(record, index)}
    out.update({c: record.get(c) if isinstance(record, dict) else None for c in keep})
    if result["error"] is not None:
        error = result["error"]
        out["error"] = f"row {index}, {error}" if error.startswith("column ") else f"row {index}: {error}"
    else:
        out.update(text=result["text"], finish_reason=result["finish_reason"])
    return out
