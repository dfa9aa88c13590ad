"""`idefics2 eval`: score a model on a dataset with the field's metrics (VQA accuracy, ANLS, relaxed
accuracy, multiple choice, exact match) and 95% bootstrap intervals; score an existing predictions file;
compare two predictions files (paired bootstrap). Without --data: exact-match accuracy on freshly drawn
shapes-world questions, per question type."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from idefics2.cli.common import UserError, add_engine_budget_options, add_model_options, engine_budgets
from idefics2.evaluation.metrics import METRICS
from idefics2.settings import load_pipeline, number_in, positive_int

EVAL_MAX_NEW_TOKENS = 32  # short answers, when neither the flag nor the checkpoint sets a limit
SHAPES = "shapes"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="score a model on a dataset (VQA accuracy, ANLS, relaxed, multiple choice, exact match)",
        description="Answer every row of a dataset (--data: the inputs `idefics2 batch` and `train` take, "
        "with reference answers) on the continuous-batching engine, greedily, and print the metric's score "
        "with its 95% bootstrap interval (per group with --group-by). --predictions scores a predictions "
        "file again; --compare A B tests whether B beats A on the same items (paired bootstrap). Without "
        "--data, --predictions or --compare: exact-match accuracy on freshly drawn shapes-world questions "
        "per question type (the built-in model's evaluation).",
    )
    what = p.add_argument_group("what to score (one of; none: the shapes-world evaluation)")
    what.add_argument(
        "--data", metavar="SOURCE",
        help="a JSONL or Parquet file, a Parquet folder or glob, a `datasets` folder, a hub dataset id, or "
        "'shapes' (freshly drawn shapes-world questions: --num-per-type, --seed)",
    )  # fmt: skip
    what.add_argument("--predictions", metavar="FILE", help="score this predictions file (.jsonl/.parquet)")
    what.add_argument(
        "--compare", nargs=2, metavar=("A", "B"),
        help="paired bootstrap of two predictions files of the same items: B - A, its 95%% interval, p-value",
    )  # fmt: skip
    p.add_argument(
        "--metric", choices=list(METRICS), help="the metric (with --data: required, except for shapes)"
    )
    data = p.add_argument_group("data")
    data.add_argument(
        "--columns", metavar="MAP", help="field=column[.key] pairs, e.g. prompt=query.en,answers=answers"
    )
    data.add_argument("--subset", metavar="NAME", help="the hub dataset's configuration")
    data.add_argument("--split", metavar="NAME", help="the dataset's split (e.g. test, validation)")
    data.add_argument("--limit", type=positive_int, metavar="N", help="only the first N rows")
    data.add_argument("--group-by", metavar="COLUMN", help="a score per value of this column too")
    out = p.add_argument_group("outputs")
    out.add_argument(
        "--predictions-out", metavar="FILE",
        help="per-item predictions (id, prompt, prediction, references, score): .jsonl or .parquet",
    )  # fmt: skip
    out.add_argument(
        "--summary", metavar="FILE", help="the scores, metric rules, prompt template and model as JSON"
    )
    add_model_options(p)
    gen = p.add_argument_group("asking")
    gen.add_argument(
        "--prompt-template", metavar="T",
        help="the prompt, with {question} (and {options} for mc: 'A. ...' lines); default: the metric's",
    )  # fmt: skip
    gen.add_argument(
        "--max-new-tokens", type=positive_int, metavar="N",
        help=f"most tokens per answer (default: the checkpoint's, else {EVAL_MAX_NEW_TOKENS})",
    )  # fmt: skip
    gen.add_argument(
        "--max-batch", "--batch-size", dest="batch_size", type=positive_int, default=32, metavar="N",
        help="questions decoded together (default: 32)",
    )  # fmt: skip
    add_engine_budget_options(gen)
    gen.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    ray = p.add_argument_group("Ray (as `idefics2 batch --ray`)")
    ray.add_argument(
        "--ray", nargs="?", const="auto", metavar="auto|ADDRESS",
        help="answer on a Ray cluster with Ray Data (pip install 'idefics2[ray]'; a Parquet or JSONL input): "
        "auto = the running cluster, else a local one; or the cluster's address, e.g. ray://head:10001",
    )  # fmt: skip
    ray.add_argument("--actors", type=positive_int, default=1, metavar="N", help="with --ray: model replicas")
    ray.add_argument(
        "--gpus-per-actor", type=number_in(0.0, 64.0), default=0.0, metavar="G",
        help="with --ray: GPUs each replica holds (default: 0, CPU)",
    )  # fmt: skip
    ray.add_argument(
        "--cpus-per-actor", type=number_in(0.0, 1024.0, low_open=True), default=1.0, metavar="C",
        help="with --ray: CPUs each replica holds (default: 1)",
    )  # fmt: skip
    shapes = p.add_argument_group("the shapes world (no --data, or --data shapes)")
    shapes.add_argument(
        "--num-per-type",
        type=positive_int,
        default=100,
        metavar="N",
        help="questions per type (default: 100)",
    )
    shapes.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the questions (default: 0)")
    shapes.add_argument(
        "--supersample", type=positive_int, default=1, metavar="N",
        help="draw the images N times larger and reduce them (anti-aliased edges)",
    )  # fmt: skip
    shapes.add_argument(
        "--jpeg-quality", type=number_in(1, 95, cast=int), metavar="Q",
        help="pass the images through JPEG at this quality (1-95)",
    )  # fmt: skip
    shapes.add_argument(
        "--renderer", choices=("pil", "analytic"), default="pil",
        help="how the shapes are drawn: PIL (default), or a second, independent renderer with soft edges",
    )  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    modes = [name for name in ("data", "predictions", "compare") if getattr(args, name) is not None]
    if len(modes) > 1:
        raise UserError(
            f"give one of --data, --predictions and --compare, not {' and '.join('--' + m for m in modes)}"
        )
    if args.compare is not None:
        return _compare(args)
    if args.predictions is not None:
        return _rescore(args)
    if args.data is not None:
        return _evaluate(args)
    dataset_flags = ("metric", "columns", "subset", "split", "limit", "group_by", "predictions_out",
                     "summary", "prompt_template")  # fmt: skip
    given = [name for name in dataset_flags if getattr(args, name) is not None]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise UserError(f"{flag} needs --data (e.g. --data shapes), --predictions or --compare")
    return _shapes_table(args)


# ------------------------------------------------------------------------------------- the shapes table
def _shapes_table(args: argparse.Namespace) -> int:
    from idefics2.shapes import QUESTION_TYPES, evaluate, make_dataset

    pipe = load_pipeline(args)
    examples = make_dataset(args.num_per_type, args.seed)
    print(f"asking {len(examples)} questions (seed {args.seed})...", file=sys.stderr, flush=True)
    scores = evaluate(
        pipe,
        examples=examples,
        batch_size=args.batch_size,
        supersample=args.supersample,
        jpeg_quality=args.jpeg_quality,
        renderer=args.renderer,
        max_new_tokens=args.max_new_tokens,
    )
    print(f"{'question type':<16}{'accuracy':>9}")
    for qtype in [*QUESTION_TYPES, "overall"]:
        if qtype in scores:
            print(f"{qtype:<16}{scores[qtype]:>9.3f}")
    return 0


# ---------------------------------------------------------------------------------------------- a dataset
def _shapes_records(args: argparse.Namespace):
    """Freshly drawn shapes-world questions as rows: id, prompt, images, answer and their type (qtype)."""
    from idefics2.shapes import make_dataset

    for index, example in enumerate(make_dataset(args.num_per_type, args.seed)):
        images = example.images(args.supersample, args.jpeg_quality, args.renderer)
        yield {"id": index, "prompt": example.question, "images": images, "answer": example.answer,
               "qtype": example.qtype}  # fmt: skip


def _output_paths(args: argparse.Namespace) -> tuple[Path | None, Path | None]:
    from idefics2.evaluation.runner import check_predictions_path

    predictions = check_predictions_path(args.predictions_out) if args.predictions_out else None
    summary = Path(args.summary) if args.summary else None
    for path in (predictions, summary):
        if path is not None and not path.parent.is_dir():
            raise UserError(f"output folder does not exist: {path.parent}")
    return predictions, summary


def _evaluate(args: argparse.Namespace) -> int:
    import itertools

    from idefics2.data import read_rows
    from idefics2.evaluation.runner import answer_items, check_template, prepare, report, write_predictions

    shapes = args.data == SHAPES
    if args.metric is None and not shapes:
        raise UserError(f"--data needs --metric ({', '.join(METRICS)})")
    metric = METRICS[args.metric or "exact"]
    template = args.prompt_template if args.prompt_template is not None else metric.prompt_template
    if shapes and args.prompt_template is None:
        template = "{question}"  # the built-in model was trained on the bare questions
    check_template(template, metric)
    predictions_path, summary_path = _output_paths(args)
    if shapes:
        if args.columns or args.subset or args.split:
            raise UserError("--data shapes takes no --columns, --subset or --split")
        rows = read_rows(_shapes_records(args))
        total = args.num_per_type * 7
    else:
        rows = read_rows(args.data, subset=args.subset, split=args.split, columns=args.columns)
        total = rows.num_rows
        print(f"{rows.description}: {rows.layout}", file=sys.stderr)
    if args.limit is not None:
        total = args.limit if total is None else min(total, args.limit)
    if args.ray is not None:
        if shapes:
            raise UserError("--ray reads a Parquet or JSONL input, not --data shapes")
        pipe = None  # the actors load the model
        max_new_tokens = args.max_new_tokens or _checkpoint_max_new_tokens(args) or EVAL_MAX_NEW_TOKENS
    else:
        pipe = load_pipeline(args)
        max_new_tokens = args.max_new_tokens or pipe.model.generation_config.get("max_new_tokens")
        max_new_tokens = max_new_tokens or EVAL_MAX_NEW_TOKENS
    controls = {"max_new_tokens": max_new_tokens, "do_sample": False}

    records: list[dict[str, Any]] = []

    def collected(stream):
        for record in stream:
            records.append(record)
            yield record

    def keep(stream) -> None:
        if predictions_path is not None:
            write_predictions(predictions_path, collected(stream))
        else:
            records.extend(stream)

    if args.ray is not None:
        from idefics2.integrations.ray import evaluate_on_ray

        if args.group_by and rows.columns and args.group_by not in rows.columns:
            raise UserError(f"--group-by: the data has no column {args.group_by!r}")
        try:
            keep(evaluate_on_ray(args, rows, metric, template, max_new_tokens))
        except ImportError as error:  # Ray Data is not installed: the error says what to install
            raise UserError(str(error)) from None
    else:
        from idefics2.serving import Engine

        items = prepare(itertools.islice(rows, args.limit), metric, template, args.group_by)
        options = {"max_batch": args.batch_size, **engine_budgets(args)}
        with Engine(pipe.model, pipe.processor, **options) as engine:
            keep(answer_items(engine, items, metric, controls, group_by=args.group_by, total=total,
                              progress=not args.no_progress))  # fmt: skip
    if not records:
        raise UserError(f"{args.data} holds no rows")
    result = report(records, metric, args.group_by)
    _print_scores(result, args, len(records))
    if summary_path is not None:
        summary = {**result.summary(), "prompt_template": template, "model": args.model or "built-in",
                   "adapter": args.adapter, "data": args.data, "subset": args.subset, "split": args.split,
                   "columns": args.columns, "limit": args.limit, "max_new_tokens": max_new_tokens,
                   "decoding": "greedy", **_bootstrap_settings()}  # fmt: skip
        _write_json(summary_path, summary)
    return 0


def _checkpoint_max_new_tokens(args: argparse.Namespace) -> int | None:
    """The checkpoint's max_new_tokens (generation_config.json), read without loading the model."""
    from idefics2.settings import model_folder

    path = model_folder(args.model) / "generation_config.json"
    return json.loads(path.read_text()).get("max_new_tokens") if path.is_file() else None


def _print_scores(result, args: argparse.Namespace, total: int) -> None:
    from idefics2.evaluation.runner import format_report

    errors = f"; {result.errors} item(s) not scored, see their 'error'" if result.errors else ""
    print(f"{result.metric.title} ({result.metric.name}) on {total} item(s){errors}", file=sys.stderr)
    print(format_report(result, args.group_by))


def _bootstrap_settings() -> dict[str, Any]:
    from idefics2.evaluation.stats import CONFIDENCE, RESAMPLES, SEED

    return {"bootstrap": {"resamples": RESAMPLES, "confidence": CONFIDENCE, "seed": SEED}}


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------ a predictions file, or two
def _no_model_flags(args: argparse.Namespace, mode: str) -> None:
    for name in (
        "columns",
        "subset",
        "split",
        "limit",
        "prompt_template",
        "max_new_tokens",
        "model",
        "adapter",
    ):
        if getattr(args, name) is not None:
            raise UserError(f"--{name.replace('_', '-')} does not apply to {mode} (no model runs)")


def _rescore(args: argparse.Namespace) -> int:
    from idefics2.evaluation.runner import read_predictions, report, score_records, write_predictions

    _no_model_flags(args, "--predictions")
    if args.metric is None:
        raise UserError(f"--predictions needs --metric ({', '.join(METRICS)})")
    predictions_path, summary_path = _output_paths(args)
    metric = METRICS[args.metric]
    records = score_records(read_predictions(args.predictions), metric, args.group_by)
    result = report(records, metric, args.group_by)
    _print_scores(result, args, len(records))
    if predictions_path is not None:
        write_predictions(predictions_path, records)
    if summary_path is not None:
        _write_json(
            summary_path, {**result.summary(), "predictions": args.predictions, **_bootstrap_settings()}
        )
    return 0


def _compare(args: argparse.Namespace) -> int:
    from idefics2.evaluation.runner import (
        compare_records,
        comparison_summary,
        format_comparison,
        read_predictions,
        score_records,
    )

    _no_model_flags(args, "--compare")
    if args.group_by is not None or args.predictions_out is not None:
        raise UserError("--group-by and --predictions-out do not apply to --compare")
    _, summary_path = _output_paths(args)
    name_a, name_b = args.compare
    before, after = read_predictions(name_a), read_predictions(name_b)
    if args.metric is not None:
        before, after = (
            score_records(before, METRICS[args.metric]),
            score_records(after, METRICS[args.metric]),
        )
    metric, comparison = compare_records(before, after)
    print(f"{METRICS[metric].title if metric in METRICS else metric} ({metric}), paired bootstrap on "
          f"{comparison.n} item(s); A = {name_a}, B = {name_b}", file=sys.stderr)  # fmt: skip
    print(format_comparison(comparison, "A", "B"))
    if summary_path is not None:
        _write_json(
            summary_path, {**comparison_summary(metric, comparison, name_a, name_b), **_bootstrap_settings()}
        )
    return 0
