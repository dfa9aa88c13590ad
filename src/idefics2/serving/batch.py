"""A dataset's rows answered on the continuous-batching engine, the results written in input order as they
come: the loop of `idefics2 batch` (one process, or each process under torchrun) and of the Ray Predictor
(idefics2.integrations.ray).

A row may carry its own generation settings (max_new_tokens, temperature, top_p, seed, stop, json_schema or
regex), checked as the flags are (idefics2.settings) and applied over the run's. A row that cannot be answered
becomes {"id": ..., "error": ...} and the others go on.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from idefics2.serving.request import EngineOverloadedError, RequestFailedError
from idefics2.settings import (
    check_sampling_flags,
    generation_controls,
    non_negative_int,
    number_in,
    positive_int,
)

if TYPE_CHECKING:
    from idefics2.data import ResultWriter, Row
    from idefics2.serving.engine import Engine

# a line's own generation settings: JSON key -> (flag attribute, parser of the flag's type)
LINE_OVERRIDES = {
    "max_new_tokens": ("max_new_tokens", positive_int),
    "temperature": ("temperature", number_in(0.0, 100.0)),
    "top_p": ("top_p", number_in(0.0, 1.0, low_open=True)),
    "seed": ("seed", non_negative_int),
}


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
    except ValueError as error:
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
                raise ValueError(f'"{key}" must be a number, got {value!r}')
            try:
                settings[attribute] = parse(str(value))
            except argparse.ArgumentTypeError as error:
                raise ValueError(f'"{key}": {error}') from None
    if "json_schema" in record and "regex" in record:
        raise ValueError('give "json_schema" or "regex", not both')
    if "json_schema" in record:
        if not isinstance(record["json_schema"], dict):
            raise ValueError('"json_schema" must be a JSON schema (an object)')
        settings["json_schema"] = record["json_schema"]
    if "regex" in record:
        if not isinstance(record["regex"], str) or not record["regex"]:
            raise ValueError('"regex" must be a non-empty string')
        settings["regex"] = record["regex"]
    if "stop" in record:
        stop = record["stop"]
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not stop or not all(isinstance(s, str) and s for s in stop):
            raise ValueError('"stop" must be a non-empty string or a list of them')
        settings["stop_strings"] = stop
    return settings


def _controls(settings: argparse.Namespace, own: dict[str, Any], model) -> dict[str, Any]:
    """The run's generation controls with one line's own settings applied (checked as the flags are); a
    line's json_schema or regex replaces the run's."""
    stop = own.pop("stop_strings", None)
    constraint = {k: own[k] for k in ("json_schema", "regex") if k in own}
    if constraint:  # the line's own constraint
        own = {**own, "json_schema": None, "regex": None, **constraint}
    merged = argparse.Namespace(**{**vars(settings), **own})
    check_sampling_flags(merged)
    controls = generation_controls(merged, model)
    controls.update(constraint or settings.constraint)
    if stop:
        controls["stop_strings"] = stop
    return controls


def answer_rows(
    engine: Engine,
    settings: argparse.Namespace,
    rows: Iterable[Row],
    out: ResultWriter,
    *,
    keep: Sequence[str] = (),
    total: int | None = None,
    numbered: bool = False,
    progress: bool = False,
) -> None:
    """Submit each row to the engine (keeping about two batches in flight) and write the results to `out` in
    input order as they come: {"id", the `keep` columns, "text", "finish_reason"} or {"id", the `keep`
    columns, "error"}, with `numbered` led by the row's index as "line". `settings`: the run's generation
    settings as the flags name them (max_new_tokens, temperature, top_p, seed, json_schema, regex), checked
    with check_sampling_flags, and `constraint`, what constraint_controls made of them. `total` rows size the
    progress bar (on stderr, with `progress`). On Ctrl-C the answered rows are kept and the rest is
    cancelled."""
    writer = _OrderedWriter(out, total, list(keep), numbered, progress)
    try:
        for row in rows:
            while writer.in_flight() >= 2 * engine.options.max_batch:
                writer.write_ready(wait=True)
            try:
                messages, images, own = _read_request(row)
                controls = _controls(settings, own, engine.model)
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


def _message(error: Exception) -> str:
    """One line: the message of a user-facing error, else the error's type and message."""
    message = " ".join(str(error).split())
    if isinstance(error, (ValueError, TypeError)):
        return message
    return f"{type(error).__name__}: {message}"


def _outcome(row: Row, handle) -> dict[str, Any]:
    try:
        completion = handle.result()
    except RequestFailedError as error:
        return {"error": f"{row.where}: {error}"}
    return {"text": completion.text, "finish_reason": completion.finish_reason,
            "tokens": completion.completion_tokens}  # fmt: skip
