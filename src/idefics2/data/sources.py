"""Where rows come from: a JSONL file, Parquet shards, a `datasets` folder, a hub dataset, or Python records.

Each source yields raw records (dicts of the input's top-level columns) a batch at a time, so that a large
input is never read all at once: Parquet files one batch of rows at a time, `datasets` tables (memory-mapped
Arrow) a slice at a time, JSONL files a line at a time. Images stay as the input holds them (paths, encoded
bytes, `{"bytes", "path"}` structs, PIL images): decoding them is the layouts' business.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# rows converted from Arrow to Python at a time: small enough that rows holding large images stay bounded
ARROW_BATCH_ROWS = 32
READ_BUFFER_BYTES = 1 << 20
PARQUET_MAGIC = b"PAR1"
DATASETS_FOLDER_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")


class DataSourceError(ValueError):
    """An input that cannot be read at all (not found, unreadable, an unknown split, a hub dataset out of
    reach): one line, naming the input."""


@dataclass
class RawRecord:
    """One record as the source holds it. `value` is usually a dict of columns; a JSONL line may hold any
    JSON value (or none, with `error` set when the line is not JSON)."""

    where: str  # "line 7" (JSONL, 1-based line number) or "row 6" (0-based row number)
    value: Any
    error: str | None = None


class Source:
    """A re-iterable stream of RawRecords. `columns`: the column names when the input has a schema (tables),
    else those of the first record; `schema`: the Arrow schema of a table input, else None."""

    kind: str  # "jsonl", "parquet", "datasets" or "python"
    description: str
    columns: list[str]
    schema: Any = None
    num_rows: int | None = None
    base_dir: Path | None = None

    def __iter__(self) -> Iterator[RawRecord]:
        raise NotImplementedError

    def record_at(self, index: int) -> RawRecord:
        """The record at position `index` (random access, for training in a shuffled order)."""
        raise NotImplementedError


def open_source(
    source: Any,
    *,
    subset: str | None = None,
    split: str | None = None,
    base_dir: str | os.PathLike | None = None,
) -> Source:
    """The Source for a path (JSONL file, Parquet file, folder or glob of Parquet shards, `datasets`
    save_to_disk folder), a hub dataset id, or an iterable of Python dicts."""
    if not isinstance(source, (str, os.PathLike)):
        if isinstance(source, dict) or not isinstance(source, Iterable):
            raise DataSourceError(
                f"expected a path, a dataset id or an iterable of dicts, got {type(source).__name__}"
            )
        if _is_datasets_object(source):
            return _DatasetsSource(_one_split(source, split, "the dataset"), "the dataset")
        return _PythonSource(source, Path(base_dir) if base_dir is not None else None)
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_file():
        _no_subset_or_split(subset, split, text)
        if _is_parquet_file(path):
            return _ParquetSource([path], text)
        return _JsonlSource(path)
    if path.is_dir():
        if any((path / name).is_file() for name in DATASETS_FOLDER_FILES):
            return _datasets_folder(path, split, subset)
        shards = sorted(path.rglob("*.parquet"))
        if not shards:
            raise DataSourceError(f"{text} is a folder without Parquet files or a `datasets` save_to_disk")
        _no_subset_or_split(subset, split, text)
        return _ParquetSource(shards, text)
    if glob.has_magic(text):
        shards = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True))
        shards = [p for p in shards if p.is_file()]
        if not shards:
            raise DataSourceError(f"no file matches {text}")
        _no_subset_or_split(subset, split, text)
        return _ParquetSource(shards, text)
    if _looks_like_hub_id(text):
        return _hub_dataset(text, subset, split)
    raise DataSourceError(f"input file not found: {text}")


def require_pyarrow() -> None:
    """One line saying what to install when pyarrow (Parquet) is missing."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise DataSourceError("Parquet needs pyarrow: pip install 'idefics2[data]' (or pyarrow)") from None


def _no_subset_or_split(subset: str | None, split: str | None, text: str) -> None:
    if subset is not None or split is not None:
        flag = "--subset" if subset is not None else "--split"
        raise DataSourceError(f"{flag} applies to hub datasets and `datasets` folders, not to {text}")


def _is_parquet_file(path: Path) -> bool:
    if path.suffix == ".parquet":
        return True
    try:
        with path.open("rb") as f:
            return f.read(4) == PARQUET_MAGIC
    except OSError as error:
        raise DataSourceError(f"cannot read {path}: {error.strerror}") from None


def _looks_like_hub_id(text: str) -> bool:
    """ "owner/name" (or a bare name), not a file name such as "data.jsonl"."""
    parts = text.split("/")
    file_name = Path(text).suffix in (".jsonl", ".json", ".parquet", ".arrow", ".csv")
    return 1 <= len(parts) <= 2 and all(p and not p.startswith(".") for p in parts) and not file_name


# ------------------------------------------------------------------------------------------------ JSONL
class _JsonlSource(Source):
    kind = "jsonl"

    def __init__(self, path: Path):
        self.path, self.description, self.base_dir = path, str(path), path.parent
        self.columns = self._first_columns()

    def _lines(self) -> Iterator[tuple[int, bytes]]:
        """(1-based line number, bytes) of the non-blank lines; lines end at "\\n" only (a JSON string may
        hold other line separators), each decoded on its own."""
        with self.path.open("rb") as lines:
            for number, line in enumerate(lines, 1):
                if line.decode("utf-8", "replace").strip():
                    yield number, line

    def _first_columns(self) -> list[str]:
        """The keys of the first line that holds a JSON object."""
        for record in self:
            if isinstance(record.value, dict):
                return list(record.value)
        return []

    @property
    def num_rows(self) -> int:  # type: ignore[override]
        return sum(1 for _ in self._lines())

    def __iter__(self) -> Iterator[RawRecord]:
        for number, line in self._lines():
            yield _parsed(number, line)

    def record_at(self, index: int) -> RawRecord:
        if not hasattr(self, "_offsets"):  # (line number, byte offset) of each non-blank line
            self._offsets, offset = [], 0
            with self.path.open("rb") as lines:
                for number, line in enumerate(lines, 1):
                    if line.decode("utf-8", "replace").strip():
                        self._offsets.append((number, offset))
                    offset += len(line)
        number, offset = self._offsets[index]
        with self.path.open("rb") as f:
            f.seek(offset)
            return _parsed(number, f.readline())


def _parsed(number: int, line: bytes) -> RawRecord:
    from idefics2.training.data import parse_json_line

    try:
        return RawRecord(f"line {number}", parse_json_line(line, _LineError))
    except _LineError as error:
        return RawRecord(f"line {number}", None, str(error))


class _LineError(Exception):
    """A JSONL line that is not JSON (its message says why)."""


# ----------------------------------------------------------------------------------------------- Python
class _PythonSource(Source):
    kind = "python"

    def __init__(self, records: Iterable[Any], base_dir: Path | None):
        if iter(records) is records:  # an iterator can be read once: keep what it gives for another pass
            records = list(records)
        self.records, self.base_dir, self.description = records, base_dir, "the given rows"
        first = next(iter(records), None)
        if isinstance(first, RawRecord):  # JSONL lines parsed by parse_line: read as a JSONL file is
            self.kind = "jsonl"
            first = next((r.value for r in records if isinstance(r.value, dict)), None)
        self.columns = list(first) if isinstance(first, dict) else []
        self.num_rows = len(records) if hasattr(records, "__len__") else None

    def __iter__(self) -> Iterator[RawRecord]:
        for index, value in enumerate(self.records):
            yield _python_record(index, value)

    def record_at(self, index: int) -> RawRecord:
        if not hasattr(self.records, "__getitem__"):
            self.records = list(self.records)
        return _python_record(index, self.records[index])


def _python_record(index: int, value: Any) -> RawRecord:
    """A record given in Python; a RawRecord (e.g. a JSONL line parsed by `parse_line`) as it is."""
    return value if isinstance(value, RawRecord) else RawRecord(f"row {index}", value)


def parse_line(number: int, line: bytes) -> RawRecord:
    """The RawRecord of one JSONL line (`number`: its 1-based line number), with an error if it is not
    JSON."""
    return _parsed(number, line)


# ---------------------------------------------------------------------------------------------- Arrow
def _arrow_records(batches: Iterable[Any]) -> Iterator[RawRecord]:
    """RawRecords of Arrow record batches (or tables), converted to Python one batch at a time."""
    index = 0
    for batch in batches:
        for value in batch.to_pylist():
            yield RawRecord(f"row {index}", value)
            index += 1


class _ParquetSource(Source):
    """Parquet files read one after the other, `ARROW_BATCH_ROWS` rows at a time."""

    kind = "parquet"

    def __init__(self, paths: list[Path], description: str):
        require_pyarrow()
        import pyarrow.parquet as pq

        self.paths, self.description = paths, description
        self.base_dir = paths[0].parent if len(paths) == 1 else Path(os.path.commonpath(paths))
        try:
            files = [pq.ParquetFile(p) for p in paths]
        except Exception as error:  # pyarrow raises ArrowInvalid, OSError... on files that are not Parquet
            raise DataSourceError(f"cannot read {description} as Parquet: {_one_line(error)}") from None
        self.schema = files[0].schema_arrow
        for path, f in zip(paths[1:], files[1:]):
            if f.schema_arrow.names != self.schema.names:
                raise DataSourceError(
                    f"{path} has the columns {', '.join(f.schema_arrow.names)}, unlike {paths[0]} "
                    f"({', '.join(self.schema.names)})"
                )
        self.columns = list(self.schema.names)
        self.num_rows = sum(f.metadata.num_rows for f in files)

    def __iter__(self) -> Iterator[RawRecord]:
        import pyarrow.parquet as pq

        def batches():
            for path in self.paths:
                # read in buffered chunks: pre-buffering whole column chunks made the memory grow with the
                # file (+360 MiB over a 300 MiB file, against +0 for this)
                with pq.ParquetFile(path, pre_buffer=False, buffer_size=READ_BUFFER_BYTES) as f:
                    yield from f.iter_batches(batch_size=ARROW_BATCH_ROWS, use_threads=False)

        return _arrow_records(batches())

    def record_at(self, index: int) -> RawRecord:
        """The row group holding the row is read (and kept, for the next rows of the same group)."""
        import bisect

        import pyarrow.parquet as pq

        if not hasattr(self, "_groups"):  # (first row, file, row group) of every row group
            self._groups, first = [], 0
            for path in self.paths:
                metadata = pq.ParquetFile(path).metadata
                for group in range(metadata.num_row_groups):
                    self._groups.append((first, path, group))
                    first += metadata.row_group(group).num_rows
            self._cached: tuple[int, Any] = (-1, None)
        k = bisect.bisect_right([g[0] for g in self._groups], index) - 1
        if self._cached[0] != k:
            first, path, group = self._groups[k]
            with pq.ParquetFile(path) as f:
                self._cached = (k, f.read_row_group(group, use_threads=False))
        table = self._cached[1]
        return RawRecord(f"row {index}", table.slice(index - self._groups[k][0], 1).to_pylist()[0])


# -------------------------------------------------------------------------------------------- datasets
def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise DataSourceError(
            "reading `datasets` folders and hub datasets needs the datasets package: "
            "pip install 'idefics2[data]' (or datasets)"
        ) from None
    return datasets


def _is_datasets_object(value: Any) -> bool:
    return type(value).__module__.startswith("datasets.")


class _DatasetsSource(Source):
    """A `datasets.Dataset` (memory-mapped Arrow), read as raw Arrow a slice at a time: its Image features
    stay `{"bytes", "path"}` structs, decoded row by row later."""

    kind = "datasets"

    def __init__(self, dataset: Any, description: str):
        self.dataset, self.description = dataset, description
        self.schema = dataset.features.arrow_schema
        self.columns = list(dataset.column_names)
        self.num_rows = dataset.num_rows
        cache = getattr(dataset, "cache_files", None) or []
        self.base_dir = Path(cache[0]["filename"]).parent if cache else None

    def __iter__(self) -> Iterator[RawRecord]:
        return _arrow_records(self.dataset.with_format("arrow").iter(batch_size=ARROW_BATCH_ROWS))

    def record_at(self, index: int) -> RawRecord:
        return RawRecord(f"row {index}", self.dataset.with_format("arrow")[index].to_pylist()[0])


def _one_split(dataset: Any, split: str | None, description: str) -> Any:
    """The split of a DatasetDict (`split`, or its only split); a Dataset as it is."""
    if not hasattr(dataset, "keys"):
        if split is not None and getattr(dataset, "split", None) not in (None, split):
            raise DataSourceError(f"{description} holds the split {dataset.split}, not {split}")
        return dataset
    splits = list(dataset.keys())
    if split is None:
        if len(splits) == 1:
            return dataset[splits[0]]
        raise DataSourceError(f"{description} has the splits {', '.join(splits)}: choose one with --split")
    if split not in splits:
        raise DataSourceError(f"{description} has no split {split!r} (it has {', '.join(splits)})")
    return dataset[split]


def _datasets_folder(path: Path, split: str | None, subset: str | None) -> Source:
    if subset is not None:
        raise DataSourceError(f"--subset applies to hub datasets, not to the `datasets` folder {path}")
    datasets = _import_datasets()
    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as error:  # datasets raises FileNotFoundError, ValueError... on a damaged folder
        raise DataSourceError(f"cannot load the `datasets` folder {path}: {_one_line(error)}") from None
    return _DatasetsSource(_one_split(dataset, split, str(path)), str(path))


def _hub_dataset(name: str, subset: str | None, split: str | None) -> Source:
    datasets = _import_datasets()
    what = name + (f" (subset {subset})" if subset else "")
    try:
        dataset = datasets.load_dataset(name, subset, split=split)
    except Exception as error:  # no network, no such dataset or subset, no cache: all one line
        raise DataSourceError(f"cannot load the hub dataset {what}: {_one_line(error)}") from None
    return _DatasetsSource(_one_split(dataset, split, what), what)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."
