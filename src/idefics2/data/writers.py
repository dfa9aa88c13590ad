"""Result files: one result per input row, `{"id", <kept columns>, "text", "finish_reason"}` or `{"id",
<kept columns>, "error"}`, as JSONL lines or Parquet rows.

Parquet is written a row group at a time as results come (`rows_per_group`), and closed properly on an
interruption (Ctrl-C, SIGTERM), so that an interrupted run keeps what it answered; `--resume` reads the ids
already answered back with `answered_ids`. Parquet columns keep the input's Arrow types when the input is a
table; from JSONL or Python rows (no schema) the id and kept columns are written as text (JSON for values that
are not strings).
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

ANSWER_COLUMNS = ("text", "finish_reason", "error")


def id_key(value: Any) -> str:
    """An id as the text that identifies it in any result file (JSONL keeps JSON types, Parquet from JSONL
    input stores text): strings as they are, other values as JSON."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def json_line(result: dict[str, Any]) -> str:
    """A JSONL line of a result; UTF-8 as it is, unless it holds a lone surrogate (an "id" such as "\\ud800",
    valid JSON): then with JSON's \\u escapes, as UTF-8 cannot hold it. Bytes (a kept image) become base64."""
    line = json.dumps(result, ensure_ascii=False, default=_jsonable)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(result, default=_jsonable)
    return line


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode("ascii")
    return str(value)


class ResultWriter:
    """Writes results in the order given; a context manager that closes the file (Parquet: its footer)."""

    def __init__(self, path: Path):
        self.path = path
        self.written = 0

    def write(self, result: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _JsonlWriter(ResultWriter):
    def __init__(self, path: Path):
        super().__init__(path)
        self.file = path.open("w", encoding="utf-8")

    def write(self, result: dict[str, Any]) -> None:
        self.file.write(json_line(result) + "\n")
        self.file.flush()
        self.written += 1

    def close(self) -> None:
        self.file.close()


class _ParquetWriter(ResultWriter):
    def __init__(self, path: Path, keep: list[str], schema: Any, rows_per_group: int):
        from idefics2.data.sources import require_pyarrow

        require_pyarrow()
        import pyarrow as pa

        super().__init__(path)
        self.names = ["id", *keep, *ANSWER_COLUMNS]
        self.typed = schema is not None
        fields = [pa.field("id", _input_type(schema, "id", pa.int64()))]
        fields += [pa.field(name, _input_type(schema, name, pa.string())) for name in keep]
        fields += [pa.field(name, pa.string()) for name in ANSWER_COLUMNS]
        self.schema = pa.schema(fields)
        self.rows_per_group, self.pending = rows_per_group, []
        self.writer = None

    def write(self, result: dict[str, Any]) -> None:
        self.pending.append(result)
        self.written += 1
        if len(self.pending) >= self.rows_per_group:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, self.schema)
        if not self.pending:
            return
        answers = set(ANSWER_COLUMNS)
        columns = {
            name: [
                r.get(name) if self.typed or name in answers or r.get(name) is None else id_key(r[name])
                for r in self.pending
            ]
            for name in self.names
        }
        self.writer.write_table(pa.table(columns, schema=self.schema))
        self.pending = []

    def close(self) -> None:
        self.flush()
        self.writer.close()


def _input_type(schema: Any, name: str, default: Any) -> Any:
    """The Arrow type of the input's column `name` (a table input), else text (no schema) or `default`."""
    import pyarrow as pa

    if schema is None:
        return pa.string()
    return schema.field(name).type if name in schema.names else default


def open_writer(
    path: str | os.PathLike,
    *,
    keep: list[str] | tuple[str, ...] = (),
    schema: Any = None,
    rows_per_group: int = 64,
    resume: bool = False,
) -> ResultWriter:
    """A writer of results to `path`: Parquet for a `.parquet` name, else JSONL. `keep`: the input columns
    each result carries; `schema`: the input's Arrow schema (tables), for the Parquet column types. With
    `resume`, the answered results of an existing file are written again first (results with an error are
    dropped, to be answered again)."""
    path = Path(path)
    previous = None
    if resume and path.exists():
        previous = path.with_suffix(".previous" + path.suffix)
        os.replace(path, previous)
    if path.suffix == ".parquet":
        writer: ResultWriter = _ParquetWriter(path, list(keep), schema, rows_per_group)
    else:
        writer = _JsonlWriter(path)
    if previous is not None:
        for result in read_results(previous):
            if result.get("text") is not None and result.get("error") is None:
                writer.write({k: v for k, v in result.items() if v is not None or k == "id"})
        previous.unlink()
    return writer


def read_results(path: str | os.PathLike):
    """The results of a result file, one dict at a time (Parquet a row group at a time)."""
    from idefics2.data.sources import DataSourceError

    path = Path(path)
    if path.suffix == ".parquet":
        from idefics2.data.sources import require_pyarrow

        require_pyarrow()
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except Exception as error:  # a file cut short by a hard kill has no footer
            raise DataSourceError(
                f"cannot read the results in {path}: {' '.join(str(error).split())}"
            ) from None
        with parquet:
            for batch in parquet.iter_batches(columns=None):
                yield from batch.to_pylist()
        return
    with path.open("rb") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except ValueError:
                raise DataSourceError(f"{path}:{number} is not a result line (invalid JSON)") from None


def answered_ids(path: str | os.PathLike) -> set[str]:
    """The ids (as `id_key` gives them) of the results of `path` that hold an answer; empty when the file
    does not exist."""
    if not Path(path).exists():
        return set()
    return {
        id_key(r.get("id"))
        for r in read_results(path)
        if r.get("text") is not None and r.get("error") is None
    }
