"""The data layer: every source (JSONL, Parquet file / folder / glob, `datasets` folder, Python rows) and
layout (messages, cauldron, question/answer, prompt, preference) read into Rows, bad rows as their own errors,
and result files (JSONL, Parquet) with --resume. The fixtures are built here, images embedded as PNG/JPEG."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from idefics2.data import (
    DataSourceError,
    answered_ids,
    id_key,
    open_writer,
    parse_columns,
    read_results,
    read_rows,
)

RED, BLUE, GREEN = Image.new("RGB", (24, 16), (220, 20, 20)), Image.new("RGB", (8, 12), (0, 0, 255)), None
GREEN = Image.new("RGB", (10, 10), (0, 200, 0))


def encoded(image: Image.Image, kind: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, kind)
    return out.getvalue()


def same_pixels(a: Image.Image, b: Image.Image, tolerance: int = 0) -> bool:
    x, y = np.asarray(a.convert("RGB"), dtype=int), np.asarray(b.convert("RGB"), dtype=int)
    return x.shape == y.shape and int(np.abs(x - y).max()) <= tolerance


def user(*parts):
    return {"role": "user", "content": [{"type": "image"} if p is None else {"type": "text", "text": p}
                                        for p in parts]}  # fmt: skip


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


@pytest.fixture
def docvqa(tmp_path):
    """A DocVQA-shaped table: image ({"bytes", "path"}), query (a struct of languages), answers (a list)."""
    table = pa.table({
        "questionId": [10, 11, 12],
        "image": [{"bytes": encoded(RED), "path": "red.png"}, {"bytes": encoded(BLUE, "JPEG"), "path": None},
                  {"bytes": b"not an image", "path": "x.png"}],
        "query": [{"en": "What colour?", "de": "Welche Farbe?"}, {"en": "Which shape?", "de": "Form?"},
                  {"en": "Broken?", "de": "Kaputt?"}],
        "answers": [["red", "Red"], ["square"], ["no"]],
    })  # fmt: skip
    path = tmp_path / "docvqa.parquet"
    pq.write_table(table, path)
    return path


def test_docvqa_parquet_with_columns_mapping_and_a_bad_image(docvqa):
    rows = read_rows(
        docvqa, columns=parse_columns("prompt=query.en,image=image,answers=answers,id=questionId")
    )
    assert rows.layout == "question/answer (questionId, query.en, image, answers)"
    assert rows.num_rows == 3
    first, second, bad = list(rows)
    assert (first.index, first.id, first.prompt, first.answers) == (0, 10, "What colour?", ["red", "Red"])
    assert same_pixels(first.images[0], RED) and len(first.images) == 1
    assert first.request_messages == [user(None, "What colour?")]
    assert first.messages == [user(None, "What colour?"), assistant("red")]
    assert same_pixels(second.images[0], BLUE, tolerance=8)  # JPEG
    assert bad.id == 12 and bad.error.startswith("row 2, column image: image bytes is not a readable image")
    assert first.columns["questionId"] == 10 and first.error is None and second.error is None


def test_a_struct_where_a_text_belongs_says_how_to_map_it(docvqa):
    rows = list(read_rows(docvqa))  # recognised by its names: query is the question, but a struct
    assert rows[0].id == 0  # no id column: the row index
    assert rows[0].error == (
        "row 0, column query: holds a struct (en, de), not a text: pick one with --columns, "
        "e.g. prompt=query.en"
    )


def test_cauldron_turns_with_embedded_images(tmp_path):
    table = pa.table({
        "images": [[{"bytes": encoded(RED), "path": None}, {"bytes": encoded(GREEN), "path": None}],
                   [{"bytes": encoded(BLUE), "path": None}]],
        "texts": [[{"user": "Q1", "assistant": "A1", "source": "s"},
                   {"user": "Q2", "assistant": "A2", "source": "s"}],
                  [{"user": "Only?", "assistant": "Yes.", "source": "s"}]],
    })  # fmt: skip
    pq.write_table(table, tmp_path / "cauldron.parquet")
    rows = read_rows(tmp_path / "cauldron.parquet")
    assert rows.layout.startswith("cauldron (")
    first, second = list(rows)
    assert first.messages == [user(None, None, "Q1"), assistant("A1"), user("Q2"), assistant("A2")]
    assert first.request_messages == first.messages[:3] and first.prompt == "Q2" and first.answers == ["A2"]
    assert [same_pixels(a, b) for a, b in zip(first.images, [RED, GREEN])] == [True, True]
    assert len(first.request_images) == 2
    assert second.messages == [user(None, "Only?"), assistant("Yes.")] and second.id == 1


def test_trl_preference_and_messages_layouts(tmp_path):
    preference = pa.table({
        "images": [[{"bytes": encoded(RED), "path": None}]],
        "prompt": [[{"role": "user", "content": [{"type": "image", "text": None},
                                                 {"type": "text", "text": "Describe it."}]}]],
        "chosen": [[{"role": "assistant", "content": [{"type": "text", "text": "A red box."}]}]],
        "rejected": [[{"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]],
    })  # fmt: skip
    pq.write_table(preference, tmp_path / "preference.parquet")
    rows = read_rows(tmp_path / "preference.parquet")
    assert rows.layout.startswith("preference (")
    (row,) = rows
    assert (row.prompt, row.chosen, row.rejected) == ("Describe it.", "A red box.", "A cat.")
    assert row.messages == [user(None, "Describe it.")] and same_pixels(row.images[0], RED)

    plain = read_rows([{"images": [RED], "prompt": "Why?", "chosen": "Because.", "rejected": "No."}])
    assert [(r.prompt, r.chosen, r.rejected, r.messages) for r in plain] == [
        ("Why?", "Because.", "No.", [user(None, "Why?")])
    ]

    conversation = [user(None, "Colour?"), assistant("Red."), user("Sure?"), assistant("Yes.")]
    rows = read_rows(
        [{"messages": conversation, "images": [RED]}, {"messages": [user(None, "Hi")], "images": []}]
    )
    assert rows.layout == "messages (messages, images)"
    good, bad = list(rows)
    assert good.prompt == "Sure?" and good.answers == ["Yes."] and good.request_messages == conversation[:3]
    assert bad.error == "row 1, column messages: 1 image part(s) in the conversation but 0 image(s)"


def test_datasets_folder_with_splits_and_image_features(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})  # fmt: skip
    train = datasets.Dataset.from_dict({"image": [RED, BLUE], "question": ["a?", "b?"], "answer": ["x", "y"]},
                                       features=features)  # fmt: skip
    test = datasets.Dataset.from_dict(
        {"image": [GREEN], "question": ["c?"], "answer": ["z"]}, features=features
    )
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(tmp_path / "saved")

    with pytest.raises(DataSourceError, match="has the splits train, test: choose one with --split"):
        read_rows(tmp_path / "saved")
    with pytest.raises(DataSourceError, match="no split 'dev'"):
        read_rows(tmp_path / "saved", split="dev")
    rows = read_rows(tmp_path / "saved", split="train")
    assert rows.layout == "question/answer (question, image, answer)" and rows.num_rows == 2
    got = list(rows)
    assert [(r.prompt, r.answers) for r in got] == [("a?", ["x"]), ("b?", ["y"])]
    assert same_pixels(got[1].images[0], BLUE)
    (only,) = read_rows(tmp_path / "saved", split="test")
    assert same_pixels(only.images[0], GREEN)


def test_parquet_folder_glob_and_jsonl_with_paths(tmp_path):
    RED.save(tmp_path / "red.png")
    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(3):
        pq.write_table(pa.table({"id": [f"s{k}"], "prompt": [f"Question {k}?"],
                                 "images": [[{"bytes": None, "path": str(tmp_path / "red.png")}]]}),
                       shards / f"part-{k}.parquet")  # fmt: skip
    expected = [("s0", "Question 0?"), ("s1", "Question 1?"), ("s2", "Question 2?")]
    for source in (shards, str(shards / "part-*.parquet")):
        rows = read_rows(source)
        assert rows.num_rows == 3 and rows.layout == "prompt (id, prompt, images)"
        got = list(rows)
        assert [(r.id, r.prompt) for r in got] == expected and [r.index for r in got] == [0, 1, 2]
        assert all(same_pixels(r.images[0], RED) for r in got)

    lines = [json.dumps({"id": "a", "prompt": "<image> left of <image>?", "images": ["red.png", "red.png"]}),
             "", "{oops", json.dumps([1]),
             json.dumps({"prompt": "No id", "images": ["missing.png"]})]  # fmt: skip
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    rows = read_rows(tmp_path / "in.jsonl")
    good, broken, array, missing = list(rows)
    parts = [{"type": "image"}, {"type": "text", "text": " left of "}, {"type": "image"},
             {"type": "text", "text": "?"}]  # fmt: skip
    assert good.messages == [{"role": "user", "content": parts}]
    assert broken.error.startswith("line 3: invalid JSON") and broken.id is None
    assert array.error == "line 4: expected a JSON object, got list"
    assert missing.id is None and missing.error == f"line 5: image not found: {tmp_path / 'missing.png'}"


def test_source_and_mapping_mistakes_are_one_line(tmp_path, docvqa):
    with pytest.raises(DataSourceError, match="input file not found: nowhere/at/all.parquet"):
        read_rows("nowhere/at/all.parquet")
    with pytest.raises(DataSourceError, match=r"no file matches .*\*\.parquet"):
        read_rows(str(tmp_path / "none-*.parquet"))
    with pytest.raises(DataSourceError, match="has no column 'querry'"):
        read_rows(docvqa, columns={"prompt": "querry.en"})
    with pytest.raises(DataSourceError, match="unknown field 'question'"):
        parse_columns("question=query")
    with pytest.raises(DataSourceError, match="expected FIELD=COLUMN"):
        parse_columns("prompt")
    pq.write_table(pa.table({"a": [1], "b": ["x"]}), tmp_path / "odd.parquet")
    with pytest.raises(
        DataSourceError, match=r"cannot tell the layout .* \(a, b\): name them with --columns"
    ):
        read_rows(tmp_path / "odd.parquet")
    (tmp_path / "fake.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataSourceError, match="cannot read .*fake.parquet as Parquet"):
        read_rows(tmp_path / "fake.parquet")
    with pytest.raises(DataSourceError, match="--split applies to hub datasets"):
        read_rows(docvqa, split="train")


def test_unreachable_hub_dataset_is_one_line(tmp_path):
    pytest.importorskip("datasets")
    code = "from idefics2.data import read_rows; read_rows('nobody-here/no-such-dataset', subset='x')"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    last = run.stderr.strip().splitlines()[-1]
    assert "DataSourceError: cannot load the hub dataset nobody-here/no-such-dataset (subset x): " in last


def test_result_files_keep_ids_and_columns_and_resume(tmp_path, docvqa):
    rows = read_rows(docvqa, columns="prompt=query.en,image=image,id=questionId")
    results = [{"id": 10, "questionId": 10, "text": "red", "finish_reason": "stop"},
               {"id": 11, "questionId": 11, "error": "row 1: failed"}]  # fmt: skip
    target = tmp_path / "out.parquet"
    with open_writer(target, keep=["questionId"], schema=rows.schema, rows_per_group=1) as writer:
        for result in results:
            writer.write(result)
    table = pq.read_table(target)
    assert pq.ParquetFile(target).metadata.num_row_groups == 2  # one group per row, as they came
    assert table.column_names == ["id", "questionId", "text", "finish_reason", "error"]
    assert table.schema.field("id").type == pa.int64()  # the input's type
    assert table.to_pylist() == [
        {"id": 10, "questionId": 10, "text": "red", "finish_reason": "stop", "error": None},
        {"id": 11, "questionId": 11, "text": None, "finish_reason": None, "error": "row 1: failed"},
    ]
    assert answered_ids(target) == {id_key(10)}
    with open_writer(target, keep=["questionId"], schema=rows.schema, resume=True) as writer:
        writer.write({"id": 11, "questionId": 11, "text": "square", "finish_reason": "length"})
    assert [(r["id"], r["text"]) for r in read_results(target)] == [(10, "red"), (11, "square")]

    jsonl = tmp_path / "out.jsonl"  # JSONL results from schemaless rows keep their JSON types
    with open_writer(jsonl) as writer:
        writer.write({"id": "two", "text": "x", "finish_reason": "stop"})
        writer.write({"id": 3, "error": "line 3: bad"})
    assert jsonl.read_text().splitlines() == ['{"id": "two", "text": "x", "finish_reason": "stop"}',
                                              '{"id": 3, "error": "line 3: bad"}']  # fmt: skip
    assert answered_ids(jsonl) == {"two"} and answered_ids(tmp_path / "absent.jsonl") == set()
    text_ids = tmp_path / "from-jsonl.parquet"  # no input schema: ids written as text, still matched
    with open_writer(text_ids) as writer:
        writer.write({"id": 3, "text": "a", "finish_reason": "stop"})
        writer.write({"id": "x", "text": "b", "finish_reason": "stop"})
    assert pq.read_table(text_ids).column("id").to_pylist() == ["3", "x"]
    assert answered_ids(text_ids) == {id_key(3), id_key("x")}


def test_text_only_table_and_a_bad_image_in_a_list(tmp_path):
    pq.write_table(pa.table({"question": ["Hello?"], "answer": ["Hi."]}), tmp_path / "text.parquet")
    (row,) = read_rows(tmp_path / "text.parquet")
    assert (row.prompt, row.images, row.answers, row.error) == ("Hello?", [], ["Hi."], None)
    rows = read_rows([{"prompt": "Two?", "images": [RED, b"junk"]}])
    (bad,) = rows
    assert bad.error.startswith("row 0, column images[1]: image bytes is not a readable image")
