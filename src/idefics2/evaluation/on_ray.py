"""`idefics2 eval --ray`: a dataset's rows answered and scored by a pool of Ray Data actors, each holding the
model once (`EvalPredictor`, a idefics2.integrations.ray Predictor that asks with the metric's prompt
template), the records collected here in input order with their ids and error messages made global."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from typing import Any

from idefics2.cli.common import UserError
from idefics2.evaluation.metrics import METRICS, Metric
from idefics2.evaluation.runner import answer_items, prepare
from idefics2.integrations.ray import (
    JSONL_LINE,
    Predictor,
    _as_table,
    _connect,
    _import_ray,
    _line_bytes,
    _record,
    _without_row,
)

EVAL_COLUMN = "eval_record"  # each row's record (JSON) in the actors' output


class EvalPredictor(Predictor):
    """A Predictor for `Dataset.map_batches` that asks its batch's rows greedily with `template` and scores
    them with `metric`: the batch comes back with its columns plus `eval_record`, each row's record as JSON
    (its id and errors local to the batch; `evaluate_on_ray` makes them global)."""

    def __init__(self, *, metric: str, template: str, group_by: str | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.metric, self.template, self.group_by = METRICS[metric], template, group_by
        self.controls = {"max_new_tokens": options["max_new_tokens"], "do_sample": False}

    def __call__(self, batch: Any):
        import pyarrow as pa

        from idefics2.data import read_rows
        from idefics2.data.sources import parse_line
        from idefics2.data.writers import json_line

        table = _as_table(batch)
        records: list[Any] = table.to_pylist()
        if self.jsonl_column is not None:
            records = [parse_line(k + 1, _line_bytes(r[self.jsonl_column])) for k, r in enumerate(records)]
            table = table.rename_columns(
                [JSONL_LINE if c == self.jsonl_column else c for c in table.column_names]
            )
        rows = read_rows(records, columns=self.columns, base_dir=self.base_dir)
        items = prepare(rows, self.metric, self.template, self.group_by)
        answered = answer_items(self.engine, items, self.metric, self.controls, group_by=self.group_by,
                                progress=False)  # fmt: skip
        return table.append_column(EVAL_COLUMN, pa.array([json_line(r) for r in answered], pa.string()))


def evaluate_on_ray(
    args: argparse.Namespace, rows, metric: Metric, template: str, max_new_tokens: int
) -> Iterator[dict[str, Any]]:
    """The records of `rows` (an idefics2.data RowStream over a Parquet or JSONL input) in input order,
    answered by `args.actors` EvalPredictors on the Ray cluster `args.ray` names."""
    ray = _import_ray()
    kind = rows.source.kind
    if kind not in ("parquet", "jsonl"):
        raise UserError("--ray reads Parquet files (a file, folder or glob) or a JSONL file")
    _connect(ray, args.ray)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # records in input order
    context.enable_progress_bars = not args.no_progress
    blocks = max(2 * args.actors, math.ceil((rows.num_rows or 0) / (16 * args.batch_size)))
    if kind == "parquet":
        paths = [str(p) for p in rows.source.paths]
        dataset, jsonl_column = ray.data.read_parquet(paths, override_num_blocks=blocks), None
    else:
        dataset, jsonl_column = ray.data.read_text(str(rows.source.path), override_num_blocks=blocks), "text"
    if args.limit is not None:
        dataset = dataset.limit(args.limit)
    options = {
        "model": args.model, "adapter": args.adapter, "device": args.device, "dtype": args.dtype,
        "quantize": args.quantize, "columns": args.columns, "base_dir": str(rows.source.base_dir),
        "jsonl_column": jsonl_column, "max_new_tokens": max_new_tokens, "max_batch": args.batch_size,
        "prefill_chunk": args.prefill_chunk, "vision_chunk": args.vision_chunk, "metric": metric.name,
        "template": template, "group_by": args.group_by,
    }  # fmt: skip
    answered = dataset.map_batches(
        EvalPredictor,
        fn_constructor_kwargs=options,
        compute=ray.data.ActorPoolStrategy(size=args.actors),
        num_gpus=args.gpus_per_actor or None,
        num_cpus=args.cpus_per_actor,
        batch_size=2 * args.batch_size,
        batch_format="pyarrow",
    )
    index = 0
    for batch in answered.iter_batches(batch_format="pyarrow", batch_size=None):
        for result in batch.to_pylist():
            record = json.loads(result[EVAL_COLUMN])
            source = _record(result, jsonl_column)
            row_id = rows.id_of(source, index) if isinstance(source, dict) else None
            record["id"] = row_id if row_id is not None else index
            if record.get("error") is not None:
                error = _without_row(record["error"])
                record["error"] = (
                    f"row {index}, {error}" if error.startswith("column ") else f"row {index}: {error}"
                )
            yield record
            index += 1
