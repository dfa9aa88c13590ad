"""Ray integrations (the optional `ray` extra: `pip install 'idefics2[ray]'`): batch inference on Ray Data
and serving past one replica on Ray Serve. Nothing else in the package imports this module; the CLI loads
it behind `--ray`.

## Batch inference on Ray Data

A pool of model replicas answers the rows of a dataset streamed through them.

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
Parquet or JSONL input and writes the results as `idefics2 batch` does; `idefics2 eval --ray` runs
`EvalPredictor`, which also asks with the metric's prompt template and scores each row.

## Serving on Ray Serve

Serving past one replica: `idefics2 serve`'s app (OpenAI and TGI routes, metrics, limits, the chat page) on
Ray Serve, one model and engine per replica, Ray Serve's proxy in front routing each request (streamed ones
included) to a replica, and Ray's autoscaler adding and removing replicas when asked to.

    from ray import serve
    from idefics2.integrations.ray import ReplicaSpec, serve_application

    spec = ReplicaSpec(model="HuggingFaceM4/idefics2-8b", device="cuda", engine={"max_batch": 32})
    serve.run(serve_application(spec, num_replicas=2, gpus_per_replica=1), route_prefix="/")

`idefics2 serve --ray` does this from the command line; `serve run idefics2.integrations.ray:app_builder
model=DIR` (or a Serve config file naming that import path) does it with Ray's own tools.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from idefics2.evaluation.metrics import METRICS, Metric
from idefics2.evaluation.runner import answer_items, prepare
from idefics2.server.app import ServerSettings

DEPLOYMENT_NAME = "idefics2"
REPLICA_HEADER = "x-idefics2-replica"  # on every answer: which replica gave it
MISSING_RAY_SERVE = "serving on Ray needs Ray Serve: pip install 'idefics2[ray]'"
MISSING_RAY_DATA = "--ray needs Ray Data: pip install 'idefics2[ray]' (or 'ray[data]')"


def _ray_serve():
    try:
        from ray import serve
    except ImportError:
        raise ImportError(MISSING_RAY_SERVE) from None
    return serve


@dataclass
class ReplicaSpec:
    """What every replica loads and serves; it travels to the replicas, so it holds names, not objects.

    `model`: a checkpoint folder (visible on every node) or a hub repo id (downloaded by each node), None for
    the built-in model. `dtype`: a torch dtype, or "auto" for the checkpoint's own (what the CLI's --dtype
    resolves to). `engine`: keyword arguments of `idefics2.serving.Engine` (max_batch, max_queue, max_length,
    prefill_chunk, vision_chunk)."""

    model: str | None = None
    adapter: str | None = None
    dtype: Any = "auto"
    device: str = "cpu"
    quantize: str | None = None
    engine: dict[str, Any] = field(default_factory=dict)
    settings: ServerSettings = field(default_factory=ServerSettings)


class EngineReplica:
    """One Ray Serve replica: the model, its continuous-batching engine, and the HTTP app over them (built by
    Ray Serve on the replica through `__serve_build_asgi_app__`; the app's shutdown drains the engine)."""

    def __init__(self, spec: ReplicaSpec) -> None:
        from idefics2.pipelines import pipeline
        from idefics2.serving import Engine

        chat = pipeline(spec.model, dtype=spec.dtype, device=spec.device, adapter=spec.adapter,
                        quantize=spec.quantize)  # fmt: skip
        self.engine = Engine(chat.model, chat.processor, **spec.engine)
        self.settings = spec.settings
        self.replica_id = _ray_serve().get_replica_context().replica_id.unique_id

    def __serve_build_asgi_app__(self):
        from idefics2.server import create_app

        app = create_app(self.engine, self.settings)
        app.add_middleware(_NameReplica, replica_id=self.replica_id)
        return app

    def check_health(self) -> None:
        """Ray Serve's periodic health check: a replica whose engine died fails it, so Ray Serve replaces
        the replica instead of routing requests to it."""
        if self.engine.dead:
            raise RuntimeError(f"the engine died: {self.engine.dead_reason}")


class _NameReplica:
    """ASGI middleware: the replica's id in a header on every HTTP answer."""

    def __init__(self, app, replica_id: str) -> None:
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica_id.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named_send(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, named_send)


def serve_application(
    spec: ReplicaSpec,
    *,
    num_replicas: int | None = 1,
    gpus_per_replica: float = 0,
    cpus_per_replica: float = 1,
    autoscaling_config: dict[str, Any] | None = None,
):
    """The Ray Serve application (`serve.run` it): `num_replicas` replicas of `spec`, each with its own
    CPUs and GPUs, or, with `autoscaling_config` (Ray Serve's own keys: min_replicas, max_replicas,
    target_ongoing_requests, upscale_delay_s, ...), as many as Ray's autoscaler decides.

    Each replica gets at most its engine's max_batch requests at a time; the others wait in Ray Serve's
    queues (at most the engine's max_queue per proxy; more are answered 503), where the first replica with
    a free row takes them."""
    serve = _ray_serve()
    max_batch = spec.engine.get("max_batch", 16)
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        "max_ongoing_requests": max_batch,
        "max_queued_requests": spec.engine.get("max_queue", 256),
        "graceful_shutdown_timeout_s": spec.settings.drain_timeout_s,
    }
    if autoscaling_config is not None:
        options.update(num_replicas="auto", autoscaling_config=autoscaling_config)
    else:
        options["num_replicas"] = num_replicas
    ingress = serve.ingress()(EngineReplica)
    return serve.deployment(**options)(ingress).bind(spec)


def app_builder(args: dict[str, str]):
    """For Ray's tools: `serve run idefics2.integrations.ray:app_builder model=DIR dtype=float32 ...`, or a
    Serve config file with this `import_path` and these `args` (its `deployments:` entry named "idefics2"
    sets num_replicas, autoscaling_config and ray_actor_options). Keys: model, adapter, dtype (float32,
    bfloat16, float16; default: the checkpoint's), device (default cpu), quantize, served_model_name,
    api_key, max_batch, max_queue, max_length, prefill_chunk, vision_chunk."""
    import torch

    known = {"model", "adapter", "dtype", "device", "quantize", "served_model_name", "api_key", "max_batch",
             "max_queue", "max_length", "prefill_chunk", "vision_chunk"}  # fmt: skip
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    engine = {name: int(args[name]) for name in ("max_batch", "max_queue", "max_length", "prefill_chunk",
                                                 "vision_chunk") if name in args}  # fmt: skip
    dtype = args.get("dtype")
    if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    settings = ServerSettings(
        model_name=args.get("served_model_name") or args.get("model") or "idefics2-builtin",
        api_key=args.get("api_key"),
    )
    spec = ReplicaSpec(model=args.get("model"), adapter=args.get("adapter"),
                       dtype=getattr(torch, dtype) if dtype else "auto", device=args.get("device", "cpu"),
                       quantize=args.get("quantize"), engine=engine, settings=settings)  # fmt: skip
    return serve_application(spec)


def run_on_ray(
    application,
    *,
    address: str | None,
    host: str,
    port: int,
    on_ready=None,
) -> None:
    """Connect to Ray (`address`: "auto" or a cluster's address; None starts a local one unless RAY_ADDRESS
    names one), start Ray Serve's HTTP proxy on host:port, deploy `application` at "/", and serve until
    SIGTERM or SIGINT; then the application is deleted (its replicas drain) and a Ray started here stops.
    `on_ready()` is called once the replicas answer."""
    import ray

    serve = _ray_serve()
    ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application, name=DEPLOYMENT_NAME, route_prefix="/", blocking=False)
        if on_ready is not None:
            on_ready()
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            serve.delete(DEPLOYMENT_NAME)
        finally:
            ray.shutdown()  # a Ray started here stops with it; a cluster's keeps running


ANSWER_COLUMNS = ("text", "finish_reason", "error")
JSONL_LINE = "line"  # the column the JSONL lines come back in


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise ImportError(MISSING_RAY_DATA) from None
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
        from idefics2.data import parse_columns
        from idefics2.serving import Engine
        from idefics2.settings import (
            check_sampling_flags,
            constraint_controls,
            generation_controls,
            load_pipeline,
        )

        if isinstance(json_schema, dict):
            json_schema = json.dumps(json_schema)
        self.args = argparse.Namespace(
            model=model, adapter=adapter, device=device, dtype=dtype, quantize=quantize,
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
            json_schema=json_schema, regex=regex,
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

        from idefics2.data import read_rows
        from idefics2.data.sources import parse_line
        from idefics2.serving.batch import answer_rows

        table = _as_table(batch)
        records: list[Any] = table.to_pylist()
        if self.jsonl_column is not None:
            records = [parse_line(k + 1, _line_bytes(r[self.jsonl_column])) for k, r in enumerate(records)]
            names = [JSONL_LINE if c == self.jsonl_column else c for c in table.column_names]
            table = table.rename_columns(names)
        results = _Collected()
        rows = read_rows(records, columns=self.columns, base_dir=self.base_dir)
        answer_rows(self.engine, self.args, rows, results, total=len(records))
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
def run_batch(args: argparse.Namespace, rows) -> None:
    """`idefics2 batch --ray`: the input read by Ray Data, answered by `--actors` Predictors, the results
    written here to `args.output` in input order (as `idefics2 batch` writes them), with Ray's progress on
    stderr. ImportError (saying what to install) without Ray Data."""
    ray = _import_ray()
    from idefics2.data import open_writer

    kind = rows.source.kind
    check = argparse.Namespace(**vars(args))
    dataset, jsonl_column = _input_dataset(ray, args, rows, 2 * args.max_batch)
    options = {
        **_model_options(args, rows, jsonl_column), "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed,
        "json_schema": check.constraint.get("json_schema"), "regex": check.constraint.get("regex"),
        "max_batch": args.max_batch, "max_length": args.max_length,
    }  # fmt: skip
    answered = _on_actors(ray, args, dataset, Predictor, options, 2 * args.max_batch)
    target = Path(args.output)
    schema = rows.schema if kind == "parquet" else None
    index = 0
    with open_writer(target, keep=args.keep, schema=schema) as out:
        for batch in answered.iter_batches(batch_format="pyarrow", batch_size=None):
            for result in batch.to_pylist():
                record = _record(result, jsonl_column)
                out.write(_result(rows, record, result, index, args.keep))
                index += 1


def _input_dataset(ray, args: argparse.Namespace, rows, batch_size: int, limit: int | None = None):
    """(the --ray input as a Ray dataset kept in input order, the column holding JSONL lines or None for
    Parquet), on the cluster `args.ray` names. Cut into blocks of one batch each (a streaming step), so that
    a small input still reaches every actor."""
    kind = rows.source.kind
    if kind not in ("parquet", "jsonl"):
        raise ValueError("--ray reads Parquet files (a file, folder or glob) or a JSONL file")
    _connect(ray, args.ray)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # results in input order
    context.enable_progress_bars = not args.no_progress
    if kind == "parquet":
        dataset, jsonl_column = ray.data.read_parquet([str(p) for p in rows.source.paths]), None
    else:
        dataset, jsonl_column = ray.data.read_text(str(rows.source.path)), "text"
    if limit is not None:
        dataset = dataset.limit(limit)
    return dataset.map_batches(_same, batch_size=batch_size, batch_format="pyarrow"), jsonl_column


def _model_options(args: argparse.Namespace, rows, jsonl_column: str | None) -> dict[str, Any]:
    """The Predictor options that the --ray commands share: the model, the input's layout, the engine's
    prefill budgets."""
    return {
        "model": args.model, "adapter": args.adapter, "device": args.device, "dtype": args.dtype,
        "quantize": args.quantize, "columns": args.columns, "base_dir": str(rows.source.base_dir),
        "jsonl_column": jsonl_column, "prefill_chunk": args.prefill_chunk, "vision_chunk": args.vision_chunk,
    }  # fmt: skip


def _on_actors(ray, args: argparse.Namespace, dataset, predictor: type, options: dict, batch_size: int):
    """`dataset` answered by a pool of `args.actors` actors of `predictor`, each holding the model once."""
    return dataset.map_batches(
        predictor,
        fn_constructor_kwargs=options,
        compute=ray.data.ActorPoolStrategy(size=args.actors),
        num_gpus=args.gpus_per_actor or None,
        num_cpus=args.cpus_per_actor,
        batch_size=batch_size,
        batch_format="pyarrow",
    )


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
            raise ValueError(f"--ray {address}: cannot connect: {' '.join(str(error).split())}") from None
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


# ------------------------------------------------------------------------------------- idefics2 eval --ray
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
    answered by `args.actors` EvalPredictors on the Ray cluster `args.ray` names. ImportError
    (saying what to install) without Ray Data."""
    ray = _import_ray()
    dataset, jsonl_column = _input_dataset(ray, args, rows, 2 * args.batch_size, limit=args.limit)
    options = {
        **_model_options(args, rows, jsonl_column), "max_new_tokens": max_new_tokens,
        "max_batch": args.batch_size, "metric": metric.name, "template": template, "group_by": args.group_by,
    }  # fmt: skip
    answered = _on_actors(ray, args, dataset, EvalPredictor, options, 2 * args.batch_size)
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
