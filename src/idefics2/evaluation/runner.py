"""Running a model over a dataset's rows and scoring its answers: the engine of `idefics2 eval`.

Data flows one way: rows (idefics2.data) -> prompts (the metric's template) -> the engine's answers ->
per-item records (id, prompt, prediction, references, score) -> the scores with their intervals. Records are
plain dicts, written to and read back from JSONL or Parquet prediction files, so that a file written by one
run can be scored again (`score_records`) or compared with another (`compare_records`).
"""

from __future__ import annotations

import json
import string
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from idefics2.evaluation.metrics import Metric, format_options
from idefics2.evaluation.stats import Comparison, Estimate, bootstrap_ci, group_scores, paired_bootstrap

PLACEHOLDERS = ("question", "options")
PREDICTION_FORMATS = (".jsonl", ".parquet")


class EvalError(ValueError):
    """A mistake in what `idefics2 eval` was given (template, prediction files, columns): one line."""


def check_template(template: str, metric: Metric) -> None:
    """EvalError unless `template` is a format string over {question} (and {options} for multiple choice)."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as error:
        raise EvalError(f"--prompt-template: {error} (write literal braces as {{{{ and }}}})") from None
    unknown = sorted(fields - set(PLACEHOLDERS))
    if unknown:
        raise EvalError(
            f"--prompt-template: unknown placeholder {{{unknown[0]}}} (use {{question}}, {{options}})"
        )
    if "question" not in fields:
        raise EvalError("--prompt-template: it must hold {question}")
    if "options" in fields and not metric.needs_choices:
        raise EvalError("--prompt-template: {options} is for --metric mc")


def render_prompt(template: str, question: str, choices: Sequence[str] | None) -> str:
    return template.format(question=question, options=format_options(choices) if choices else "")


@dataclass
class Item:
    """One row made ready to ask: its prompt text and images, or why it cannot be asked (`error`)."""

    id: Any
    prompt: str | None
    images: list[Any]
    references: list[str] | None
    choices: list[str] | None
    group: Any
    error: str | None = None


def prepare(rows: Iterable[Any], metric: Metric, template: str, group_by: str | None) -> Iterator[Item]:
    """Items from idefics2.data Rows; a row without a question, references or (multiple choice) options, or
    one the data layer could not read, becomes an item with its error."""
    for row in rows:
        group = row.columns.get(group_by) if group_by else None
        if group_by and not row.error and group_by not in row.columns:
            raise EvalError(
                f"--group-by: the data has no column {group_by!r} (it has: {', '.join(row.columns)})"
            )
        row_id = row.id if row.id is not None else row.index  # a JSONL line without an "id": its number
        item = Item(row_id, None, [], row.answers, row.choices, _group_label(group), row.error)
        if item.error is None:
            if not row.prompt:
                item.error = f"{row.where}: no question (a prompt, question or query column)"
            elif not row.answers:
                item.error = f"{row.where}: no reference answer (an answer or answers column)"
            elif metric.needs_choices and not row.choices:
                item.error = f"{row.where}: no options (a choices or options column)"
            else:
                item.prompt = render_prompt(template, row.prompt, row.choices)
                item.images = row.request_images
        yield item


def _group_label(value: Any) -> Any:
    """A group value as a JSON-able key: str, int, float, bool or None as they are, anything else as text."""
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def score_item(metric: Metric, prediction: str, references: Sequence[str], choices: Sequence[str] | None):
    """(score, None), or (None, why) when the references cannot be scored (e.g. an unknown option)."""
    try:
        return metric.score(prediction, references, choices), None
    except ValueError as error:
        return None, str(error)


def record(item: Item, metric: Metric, prediction: str | None, error: str | None, group_by: str | None):
    """The item's line of the predictions file."""
    out: dict[str, Any] = {"id": item.id, "prompt": item.prompt, "prediction": prediction,
                           "references": item.references, "score": None}  # fmt: skip
    if item.choices is not None:
        out["choices"] = item.choices
    out["metric"] = metric.name
    if group_by:
        out[group_by] = item.group
    if error is None and prediction is not None:
        out["score"], error = score_item(metric, prediction, item.references or [], item.choices)
    if error is not None:
        out["error"] = error
    return out


def answer_items(
    engine, items: Iterable[Item], metric: Metric, controls: dict[str, Any], *, group_by: str | None = None,
    total: int | None = None, progress: bool = True,
) -> Iterator[dict[str, Any]]:  # fmt: skip
    """Ask the engine every item (about two batches in flight, continuously batched) and yield their records
    in input order as they are answered; a tqdm bar counts items."""
    from tqdm import tqdm

    from idefics2.processing.chat import user_turn
    from idefics2.serving import EngineOverloadedError, RequestFailedError

    pending: deque[tuple[Item, Any]] = deque()  # (item, engine handle or an error message)
    bar = tqdm(total=total, unit="item", disable=not progress, file=sys.stderr, dynamic_ncols=True)

    def finished(wait: bool) -> Iterator[dict[str, Any]]:
        while pending and (wait or isinstance(pending[0][1], str) or pending[0][1].done):
            item, handle = pending.popleft()
            if isinstance(handle, str):
                yield record(item, metric, None, handle, group_by)
            else:
                try:
                    yield record(item, metric, handle.result().text.strip(), None, group_by)
                except RequestFailedError as error:
                    yield record(item, metric, None, str(error), group_by)
            bar.update(1)
            wait = False

    try:
        for item in items:
            while (
                sum(not isinstance(h, str) and not h.done for _, h in pending) >= 2 * engine.options.max_batch
            ):
                yield from finished(wait=True)
            outcome: Any = item.error
            if outcome is None:
                try:
                    message = user_turn(item.prompt, len(item.images))
                    while True:
                        try:
                            outcome = engine.submit([message], item.images, **controls)
                            break
                        except EngineOverloadedError:
                            yield from finished(wait=True)
                except Exception as error:  # whatever goes wrong with one item stays with that item
                    message = " ".join(str(error).split())
                    user_facing = isinstance(error, (ValueError, TypeError))  # e.g. a prompt too long
                    outcome = message if user_facing else f"{type(error).__name__}: {message}"
            pending.append((item, outcome))
            yield from finished(wait=False)
        while pending:
            yield from finished(wait=True)
    finally:
        bar.close()


# ------------------------------------------------------------------------------------------------ scores
@dataclass(frozen=True)
class Report:
    """The scores of a run: overall and per group (None without --group-by), and the items left out."""

    metric: Metric
    overall: Estimate
    groups: dict[Any, Estimate] | None
    errors: int

    def summary(self) -> dict[str, Any]:
        metric = self.metric
        out = {"metric": metric.name, "metric_title": metric.title, "rules": metric.rules}
        out |= {**_estimate(self.overall), "errors": self.errors}
        if self.groups is not None:
            out["groups"] = {str(group): _estimate(e) for group, e in self.groups.items()}
        return out


def _estimate(estimate: Estimate) -> dict[str, Any]:
    return {"score": estimate.score, "ci_low": estimate.low, "ci_high": estimate.high, "n": estimate.n}


def report(records: Sequence[dict[str, Any]], metric: Metric, group_by: str | None = None) -> Report:
    """The mean score with its 95% bootstrap interval (and per group) over the records that hold a score;
    records with an error are counted, not scored."""
    scored = [r for r in records if r.get("score") is not None]
    if not scored:
        raise EvalError(f"no item could be scored ({len(records)} item(s), all with errors)")
    scores = [float(r["score"]) for r in scored]
    groups = None
    if group_by:
        groups = group_scores(scores, [_group_label(r.get(group_by)) for r in scored])
    return Report(metric, bootstrap_ci(scores), groups, len(records) - len(scored))


def format_report(result: Report, group_by: str | None = None) -> str:
    """The table `idefics2 eval` prints: a row per group (with --group-by), then the overall one."""
    rows = [(str(group), e) for group, e in (result.groups or {}).items()]
    rows.append(("overall", result.overall))
    first = group_by or ""
    width = max(len(first), *(len(label) for label, _ in rows)) + 2
    lines = [f"{first:<{width}}{'score':>7}  {'95% CI':<16}{'n':>7}"]
    for label, e in rows:
        lines.append(f"{label:<{width}}{e.score:>7.3f}  [{e.low:.3f}, {e.high:.3f}]{e.n:>8}")
    return "\n".join(lines)


def score_records(
    records: Sequence[dict[str, Any]], metric: Metric, group_by: str | None = None
) -> list[dict[str, Any]]:
    """The records of a predictions file scored again with `metric` (from prediction, references, choices)."""
    out = []
    for number, old in enumerate(records, 1):
        new = {key: value for key, value in old.items() if key != "error"}
        prediction, references = old.get("prediction"), old.get("references")
        if group_by and group_by not in old:
            raise EvalError(f"--group-by: record {number} has no field {group_by!r}")
        if old.get("error") is not None and prediction is None:
            new["error"] = old["error"]
            new["score"] = None
        elif not isinstance(prediction, str) or not _strings(references):
            raise EvalError(f"record {number}: expected a text 'prediction' and a list of text 'references'")
        else:
            new["score"], error = score_item(metric, prediction, references, old.get("choices"))
            if error is not None:
                new["error"] = error
        new["metric"] = metric.name
        out.append(new)
    return out


def _strings(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def compare_records(
    before: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]]
) -> tuple[str, Comparison]:
    """The paired bootstrap of the items that both files scored, matched by id: (metric name, comparison).
    EvalError when the files do not hold the same items or were scored with different metrics."""
    metrics = {r.get("metric") for r in [*before, *after]}
    if len(metrics) != 1 or None in metrics:
        raise EvalError(f"--compare: the files were scored with different metrics ({_names(metrics)}); "
                        "score both with --metric M")  # fmt: skip
    ids_a, ids_b = _by_id(before, "A"), _by_id(after, "B")
    if ids_a.keys() != ids_b.keys():
        only_a, only_b = len(ids_a.keys() - ids_b.keys()), len(ids_b.keys() - ids_a.keys())
        raise EvalError(f"--compare: the files hold different items ({only_a} only in A, {only_b} only in B)")
    both = [
        key for key in ids_a if ids_a[key].get("score") is not None and ids_b[key].get("score") is not None
    ]
    if not both:
        raise EvalError("--compare: no item is scored in both files")
    scores_a = [float(ids_a[key]["score"]) for key in both]
    scores_b = [float(ids_b[key]["score"]) for key in both]
    return metrics.pop(), paired_bootstrap(scores_a, scores_b)


def _names(metrics: set) -> str:
    return ", ".join(sorted("none" if m is None else str(m) for m in metrics))


def _by_id(records: Sequence[dict[str, Any]], name: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for record_ in records:
        key = json.dumps(record_.get("id"), sort_keys=True)
        if key in out:
            raise EvalError(f"--compare: file {name} holds the id {record_.get('id')!r} twice")
        out[key] = record_
    return out


def format_comparison(comparison: Comparison, name_a: str, name_b: str) -> str:
    width = max(len(name_a), len(name_b), 5) + 2
    c = comparison
    return "\n".join([
        f"{'':<{width}}{'score':>7}  {'95% CI':<18}{'p':>7}{'n':>7}",
        f"{name_a:<{width}}{c.score_a:>7.3f}",
        f"{name_b:<{width}}{c.score_b:>7.3f}",
        f"{'B - A':<{width}}{c.difference:>+7.3f}  [{c.low:+.3f}, {c.high:+.3f}]{c.p_value:>7.3f}{c.n:>7}",
    ])  # fmt: skip


def comparison_summary(metric: str, comparison: Comparison, name_a: str, name_b: str) -> dict[str, Any]:
    return {"metric": metric, "a": name_a, "b": name_b, **asdict(comparison)}


# ---------------------------------------------------------------------------------------- prediction files
def check_predictions_path(path: str) -> Path:
    """The path of a predictions file: .jsonl, or .parquet (with pyarrow installed)."""
    from idefics2.data.sources import require_pyarrow

    target = Path(path)
    if target.suffix not in PREDICTION_FORMATS:
        raise EvalError(f"{path}: a predictions file ends in .jsonl or .parquet")
    if target.suffix == ".parquet":
        require_pyarrow()
    return target


def write_predictions(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """The records to `path`: JSONL (each written as it comes) or Parquet (at the end; the columns are the
    records' own, with their types, unlike the fixed columns of idefics2.data's result writers)."""
    from idefics2.data.writers import json_line

    if path.suffix == ".jsonl":
        with path.open("w", encoding="utf-8") as out:
            for record_ in records:
                out.write(json_line(record_) + "\n")
                out.flush()
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pa.Table.from_pylist(list(records))
    except (pa.ArrowException, ValueError, TypeError) as error:  # e.g. ids of mixed types
        raise EvalError(f"{path}: cannot write these predictions as Parquet ({error}); use .jsonl") from None
    pq.write_table(table, path)


def read_predictions(path: str) -> list[dict[str, Any]]:
    """The records of a predictions file (JSONL or Parquet); EvalError when it cannot be read."""
    source = check_predictions_path(path)
    if not source.is_file():
        raise EvalError(f"predictions file not found: {path}")
    from idefics2.data.writers import read_results

    records = list(read_results(source))
    for number, value in enumerate(records, 1):
        if not isinstance(value, dict):
            raise EvalError(f"{path}, line {number}: expected a JSON object")
    if not records:
        raise EvalError(f"{path} holds no predictions")
    return records
