"""Rows of any layout as one kind of Row: the layouts are recognised by their columns (or named with
`--columns`), and each raw record becomes a Row, or a Row holding the error that stops it.

Layouts:
- messages: `messages` (+ `images`): ours and TRL's conversational format;
- cauldron: `texts` (a list of {"user", "assistant"}) + `images`, each pair a turn (the_cauldron);
- preference: `prompt`, `chosen`, `rejected` (+ `images`): TRL's preference format;
- prompt: `prompt` (+ `images`, `answer`/`answers`): our batch JSONL;
- question/answer: `question` or `query`, `image` or `images`, `answers` or `answer` (+ `choices`/`options`),
  e.g. DocVQA.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from idefics2.data.images import image_file, load_image
from idefics2.data.sources import DataSourceError, RawRecord, Source, open_source

# the fields --columns may name; `image` is one image per row, `images` a list
FIELDS = ("id", "prompt", "image", "images", "answer", "answers", "choices", "messages", "texts", "chosen",
          "rejected")  # fmt: skip
# the column names each field is recognised by, in order of preference
RECOGNISED = {
    "id": ("id",),
    "prompt": ("prompt", "question", "query"),
    "image": ("image",),
    "images": ("images",),
    "answers": ("answers", "answer"),
    "choices": ("choices", "options"),
    "messages": ("messages",),
    "texts": ("texts",),
    "chosen": ("chosen",),
    "rejected": ("rejected",),
}


@dataclass
class Row:
    """One input row in the chat format. `messages` is the whole conversation (ending with the reference
    answer as an assistant turn when the row has one); `request_messages` / `request_images` are what to
    answer: the conversation up to its last user turn. A bad row has `error` set ("row N, column C: why" or
    "line N: why") and is still yielded, so that it becomes its own error."""

    index: int  # 0-based position in the input
    id: Any  # the input's id, else the index (JSONL: the line's "id", else None)
    where: str = ""  # "row N" or "line N": how errors name this row
    prompt: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)  # RGB PIL images, in the order of the image parts
    answers: list[str] | None = None
    choices: list[str] | None = None
    chosen: str | None = None
    rejected: str | None = None
    columns: dict[str, Any] = field(default_factory=dict)  # the raw row's top-level values
    error: str | None = None

    @property
    def request_messages(self) -> list[dict[str, Any]]:
        last_user = max((i for i, m in enumerate(self.messages) if m["role"] == "user"), default=-1)
        return self.messages[: last_user + 1]

    @property
    def request_images(self) -> list[Any]:
        return self.images[: _count_image_parts(self.request_messages)]


class RowProblem(ValueError):
    """What is wrong with one row, and in which column (its label: a column name or a --columns path)."""

    def __init__(self, column: str | None, message: str):
        super().__init__(message)
        self.column = column


def parse_columns(text: str) -> dict[str, str]:
    """The --columns flag, "prompt=query.en,answers=answers,image=image", as {field: dotted path}."""
    mapping: dict[str, str] = {}
    for item in text.split(","):
        name, sep, path = (s.strip() for s in item.partition("="))
        if not sep or not name or not path:
            raise DataSourceError(f"--columns: expected FIELD=COLUMN[.KEY...] items, got {item.strip()!r}")
        if name not in FIELDS:
            raise DataSourceError(f"--columns: unknown field {name!r} (fields: {', '.join(FIELDS)})")
        if name in mapping:
            raise DataSourceError(f"--columns: {name} is given twice")
        mapping[name] = path
    return mapping


def read_rows(
    source: Any,
    *,
    subset: str | None = None,
    split: str | None = None,
    columns: dict[str, str] | str | None = None,
    base_dir: str | os.PathLike | None = None,
    decode_images: bool = True,
) -> RowStream:
    """The rows of `source` (see open_source), streamed. `columns` maps fields to (dotted) column paths for
    layouts that are not recognised by their names. With `decode_images=False` a Row's images are left as
    the input holds them (paths resolved against the input's folder, bytes, structs): a pass over the texts
    that decodes no image. DataSourceError (one line) when the input cannot be read or its layout cannot be
    told."""
    if isinstance(columns, str):
        columns = parse_columns(columns)
    opened = open_source(source, subset=subset, split=split, base_dir=base_dir)
    if base_dir is not None:
        opened.base_dir = Path(base_dir)
    return RowStream(opened, _choose_layout(opened, dict(columns or {})), decode_images)


class RowStream:
    """The Rows of a source, read as they are iterated (again for each pass). `layout` names the layout and
    the columns it reads, e.g. "cauldron (texts, images)"; `num_rows` is None when unknown; `schema` is the
    input's Arrow schema for tables, else None."""

    def __init__(self, source: Source, layout: _Layout, decode_images: bool = True):
        self.source, self._layout, self.decode_images = source, layout, decode_images
        self.layout = layout.description
        self.recognised = layout.recognised  # False when a JSONL file's layout is a guess
        self.schema = source.schema
        self.columns = source.columns

    @property
    def num_rows(self) -> int | None:
        return self.source.num_rows

    @property
    def description(self) -> str:
        return self.source.description

    def __iter__(self) -> Iterator[Row]:
        for index, raw in enumerate(self.source):
            yield self._row(index, raw, self.decode_images)

    def select(
        self, *, rank: int = 0, world: int = 1, skip_ids: set[str] | frozenset = frozenset()
    ) -> Iterator[Row]:
        """The rows of one shard (every `world`-th row from `rank`) whose id (as `id_key` gives it) is not in
        `skip_ids`; the rows left out are not built (their images not decoded)."""
        from idefics2.data.writers import id_key

        ids_from_index = self.source.kind != "jsonl"
        for index, raw in enumerate(self.source):
            if index % world != rank:
                continue
            if skip_ids and raw.error is None:
                row_id = self._layout.row_id(raw.value, index, ids_from_index)
                if row_id is not None and id_key(row_id) in skip_ids:
                    continue
            yield self._row(index, raw, self.decode_images)

    def row_at(self, index: int, *, decode_images: bool = True) -> Row:
        """The row at position `index` (random access: a Parquet input reads the row group holding it)."""
        return self._row(index, self.source.record_at(index), decode_images)

    def id_of(self, record: Any, index: int) -> Any:
        """The id a row of this input gets (see Row.id) from its raw record and position."""
        return self._layout.row_id(record, index, self.source.kind != "jsonl")

    def _row(self, index: int, raw: RawRecord, decode_images: bool) -> Row:
        ids_from_index = self.source.kind != "jsonl"
        return self._layout.row(index, raw, self.source.base_dir, ids_from_index, decode_images)


# ------------------------------------------------------------------------------------------------ layouts
@dataclass
class _Getter:
    """How one field is read from a record: its label (the column, or the --columns path) and the path."""

    label: str
    path: list[str]
    seen: bool = True  # False: a JSONL key the first line lacks, read from the lines that have it

    def __call__(self, record: dict[str, Any]) -> Any:
        if self.label in record:
            return record[self.label]
        value: Any = record
        for key in self.path:
            if isinstance(value, dict):
                value = value.get(key)
            elif isinstance(value, (list, tuple)) and key.isdigit() and int(key) < len(value):
                value = value[int(key)]
            else:
                return None
        return value


class _Values(dict):
    """A record's fields ({field: value}) with the label of each (its column or --columns path) for errors."""

    def __init__(self, values: dict[str, Any], labels: dict[str, str], decode_images: bool = True):
        super().__init__(values)
        self.labels, self.decode_images = labels, decode_images

    def label(self, name: str) -> str:
        return self.labels.get(name, name)


@dataclass
class _Layout:
    name: str
    getters: dict[str, _Getter]
    build: Callable[[Row, _Values, Path | None], None]
    recognised: bool = True  # False: a JSONL file none of whose first lines is an object of a known layout

    @property
    def description(self) -> str:
        return f"{self.name} ({', '.join(g.label for g in self.getters.values() if g.seen)})"

    def row_id(self, record: Any, index: int, ids_from_index: bool) -> Any:
        """The id column's value, else the index (None for a JSONL line without an id)."""
        value = self.getters["id"](record) if "id" in self.getters and isinstance(record, dict) else None
        return index if value is None and ids_from_index else value

    def row(
        self, index: int, raw: RawRecord, base_dir: Path | None, ids_from_index: bool, decode_images: bool
    ) -> Row:
        row = Row(index=index, id=index if ids_from_index else None, where=raw.where)
        if raw.error is not None:
            row.error = f"{raw.where}: {raw.error}"
            return row
        if not isinstance(raw.value, dict):
            row.error = f"{raw.where}: expected a JSON object, got {type(raw.value).__name__}"
            return row
        row.columns = raw.value
        row.id = self.row_id(raw.value, index, ids_from_index)
        values = _Values(
            {name: getter(raw.value) for name, getter in self.getters.items()},
            {name: getter.label for name, getter in self.getters.items()},
            decode_images,
        )
        try:
            self.build(row, values, base_dir)
        except RowProblem as problem:
            row.error = _where(raw.where, problem.column, str(problem))
        except ValueError as problem:  # a problem the chat helpers found, outside any one column
            row.error = f"{raw.where}: {problem}"
        except Exception as problem:  # whatever else goes wrong with one row stays with that row
            row.error = f"{raw.where}: {type(problem).__name__}: {' '.join(str(problem).split())}"
        return row


def _where(where: str, column: str | None, message: str) -> str:
    """The error of a row: "row 3, column image: why"; a JSONL line, or a message naming its column, without
    the column."""
    if column is None or where.startswith("line ") or message.startswith(f'"{column}"'):
        return f"{where}: {message}"
    return f"{where}, column {column}: {message}"


def _choose_layout(source: Source, mapping: dict[str, str]) -> _Layout:
    names = set(source.columns)
    for name, path in mapping.items():
        top = path.split(".")[0]
        if source.columns and path not in names and top not in names:
            raise DataSourceError(
                f"--columns {name}={path}: {source.description} has no column {top!r} "
                f"(its columns: {', '.join(source.columns)})"
            )
    getters: dict[str, _Getter] = {}
    for name in ("id", "prompt", "image", "images", "answers", "choices", "messages", "texts", "chosen",
                 "rejected"):  # fmt: skip
        mapped = mapping.get(name) or (mapping.get("answer") if name == "answers" else None)
        if mapped is not None:
            getters[name] = _Getter(mapped, mapped.split("."))
            continue
        found = next((c for c in RECOGNISED[name] if c in names), None)
        if found is not None and found not in mapping.values():
            getters[name] = _Getter(found, [found])

    schemaless = source.schema is None  # JSONL or Python rows: each record may have other keys

    def layout(name: str, build, *used: str, recognised: bool = True) -> _Layout:
        if schemaless:
            for field in ("id", *used):
                primary = RECOGNISED[field][0]
                if field not in getters and field not in mapping and primary not in mapping.values():
                    getters[field] = _Getter(primary, [primary], seen=False)
        return _Layout(name, {k: getters[k] for k in ("id", *used) if k in getters}, build, recognised)

    if schemaless:
        image_fields: tuple[str, ...] = ("image", "images")
    else:
        image_fields = ("image",) if "image" in getters and "images" not in getters else ("images",)
    extras = (*image_fields, "answers", "choices")
    if {"prompt", "chosen", "rejected"} <= getters.keys():
        return layout("preference", _build_preference, "prompt", "chosen", "rejected", *image_fields)
    if "messages" in getters:
        return layout("messages", _build_messages, "messages", *extras)
    if "texts" in getters:
        return layout("cauldron", _build_cauldron, "texts", *extras)
    prompt = getters.get("prompt")
    if prompt is not None:
        name = "prompt" if prompt.label == "prompt" else "question/answer"
        return layout(name, _build_prompt, "prompt", *extras)
    if source.kind == "jsonl":  # our batch layout, whose lines then say what they lack
        return layout("prompt", _build_prompt, "prompt", *extras, recognised=False)
    raise DataSourceError(
        f"cannot tell the layout of {source.description} from its columns ({', '.join(source.columns)}): "
        "name them with --columns, e.g. --columns prompt=question,image=image,answers=answers"
    )


# -------------------------------------------------------------------------------------- building rows
def _images(values: _Values, base_dir: Path | None) -> list[Any]:
    """The row's images, decoded: `images` holds a list, `image` one image (or none)."""
    single = values.get("image") is not None or "images" not in values
    if single:
        value, label = values.get("image"), values.label("image")
        items = [] if value is None else [value]
    else:
        value, label = values.get("images"), values.label("images")
        if value is None:
            return []
        if not isinstance(value, (list, tuple)):
            raise RowProblem(label, f'"{label}" must be a list of images, got {type(value).__name__}')
        items = list(value)
    images = []
    for k, item in enumerate(items):
        try:
            images.append(load_image(item, base_dir) if values.decode_images else _undecoded(item, base_dir))
        except ValueError as error:
            raise RowProblem(label if single else f"{label}[{k}]", str(error)) from None
    return images


def _undecoded(item: Any, base_dir: Path | None) -> Any:
    """An image left as it is, but a path resolved (and checked to exist) and a struct's bytes taken."""
    if isinstance(item, dict) and item.get("bytes") is not None:
        return item["bytes"]
    if isinstance(item, dict) and item.get("path"):
        item = item["path"]
    if isinstance(item, (str, os.PathLike)):
        return str(image_file(item, base_dir))
    return item


def _text(value: Any, label: str) -> str:
    """A non-empty text of valid Unicode."""
    from idefics2.processing.tokenizer import check_text

    if isinstance(value, dict) and value:
        example = f"{label}.{next(iter(value))}"
        raise RowProblem(
            label,
            f"holds a struct ({', '.join(map(str, value))}), not a text: pick one with --columns, "
            f"e.g. prompt={example}",
        )
    if not isinstance(value, str) or not value.strip():
        raise RowProblem(label, f'"{label}" must be a non-empty string')
    check_text(value, f'"{label}"')
    return value


def _answers(values: _Values) -> list[str] | None:
    value = values.get("answers")
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items or not all(isinstance(a, (str, int, float)) for a in items):
        raise RowProblem(values.label("answers"), "the answer(s) must be a text or a non-empty list of texts")
    return [str(a) for a in items]


def _choices(values: _Values) -> list[str] | None:
    value = values.get("choices")
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(c, (str, int, float)) for c in value):
        raise RowProblem(values.label("choices"), "the choices must be a list of texts")
    return [str(c) for c in value]


def _assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def _build_prompt(row: Row, values: _Values, base_dir: Path | None) -> None:
    from idefics2.pipelines import user_turn

    row.prompt = _text(values.get("prompt"), values.label("prompt"))
    row.images = _images(values, base_dir)
    row.answers, row.choices = _answers(values), _choices(values)
    row.messages = [user_turn(row.prompt, len(row.images))]
    if row.answers:
        row.messages.append(_assistant(row.answers[0]))


def _conversation(value: Any, label: str) -> list[dict[str, Any]]:
    """A list of chat messages, checked, with string contents as lists of parts."""
    from idefics2.processing.chat import normalize_messages

    try:
        messages = normalize_messages(value)
    except ValueError as error:
        raise RowProblem(label, str(error)) from None
    return [{"role": m["role"], "content": [_part(p) for p in m["content"]]} for m in messages]


def _part(part: dict[str, Any]) -> dict[str, Any]:
    """A content part without the keys a table adds to make its parts one struct (text: None on an image)."""
    if part["type"] == "image":
        kept = {k: v for k, v in part.items() if k == "image" and v is not None}
        return {"type": "image", **kept}
    return {"type": "text", "text": part["text"]}


def _count_image_parts(messages: list[dict[str, Any]]) -> int:
    return sum(p["type"] == "image" for m in messages for p in m["content"])


def _turn_text(message: dict[str, Any]) -> str:
    return "".join(p["text"] for p in message["content"] if p["type"] == "text")


def _with_images(row: Row, values: _Values, base_dir: Path | None, label: str) -> None:
    """The images of a conversation: the `images` column, or those its image parts name themselves."""
    inline = [p.pop("image") for m in row.messages for p in m["content"] if "image" in p]
    if inline and values.get("images") is None and values.get("image") is None:
        values = _Values({"images": inline}, {"images": label}, values.decode_images)
    row.images = _images(values, base_dir)
    parts = _count_image_parts(row.messages)
    if parts != len(row.images):
        raise RowProblem(label, f"{parts} image part(s) in the conversation but {len(row.images)} image(s)")


def _build_messages(row: Row, values: _Values, base_dir: Path | None) -> None:
    label = values.label("messages")
    row.messages = _conversation(values.get("messages"), label)
    _with_images(row, values, base_dir, label)
    users = [m for m in row.messages if m["role"] == "user"]
    if not users:
        raise RowProblem(label, "the conversation has no user turn")
    row.prompt = _turn_text(users[-1])
    if row.messages[-1]["role"] == "assistant":
        row.answers = [_turn_text(row.messages[-1])]
    if values.get("answers") is not None:
        row.answers = _answers(values)
    row.choices = _choices(values)


def _build_cauldron(row: Row, values: _Values, base_dir: Path | None) -> None:
    texts, label = values.get("texts"), values.label("texts")
    if not isinstance(texts, (list, tuple)) or not texts:
        raise RowProblem(label, f'"{label}" must be a non-empty list of {{"user", "assistant"}} turns')
    row.images = _images(values, base_dir)
    for k, turn in enumerate(texts):
        if not isinstance(turn, dict):
            raise RowProblem(f"{label}[{k}]", 'a turn must be a {"user", "assistant"} struct')
        user = _text(turn.get("user"), f"{label}[{k}].user")
        content = [{"type": "image"}] * (len(row.images) if k == 0 else 0) + [{"type": "text", "text": user}]
        row.messages.append({"role": "user", "content": content})
        if turn.get("assistant") is not None:
            row.messages.append(_assistant(_text(turn["assistant"], f"{label}[{k}].assistant")))
    row.prompt = _turn_text(row.request_messages[-1])
    if row.messages[-1]["role"] == "assistant":
        row.answers = [_turn_text(row.messages[-1])]
    row.choices = _choices(values)


def _build_preference(row: Row, values: _Values, base_dir: Path | None) -> None:
    from idefics2.pipelines import user_turn

    prompt, label = values.get("prompt"), values.label("prompt")
    if isinstance(prompt, (list, tuple)):
        row.messages = _conversation(prompt, label)
        _with_images(row, values, base_dir, label)
        users = [m for m in row.messages if m["role"] == "user"]
        if not users:
            raise RowProblem(label, "the prompt has no user turn")
        row.prompt = _turn_text(users[-1])
    else:
        row.prompt = _text(prompt, label)
        row.images = _images(values, base_dir)
        row.messages = [user_turn(row.prompt, len(row.images))]
    row.chosen = _reply(values.get("chosen"), values.label("chosen"))
    row.rejected = _reply(values.get("rejected"), values.label("rejected"))


def _reply(value: Any, label: str) -> str:
    """A preference reply: a text, or a conversation of assistant turns (their texts, joined)."""
    if isinstance(value, (list, tuple)):
        turns = [m for m in _conversation(value, label) if m["role"] == "assistant"]
        if not turns:
            raise RowProblem(label, f'"{label}" holds no assistant turn')
        return "".join(_turn_text(m) for m in turns)
    return _text(value, label)
