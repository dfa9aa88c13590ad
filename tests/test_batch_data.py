"""`idefics2 batch` over the data layer: Parquet and `datasets` inputs with embedded images answer exactly as
the same rows given as JSONL with image files; Parquet results with --keep; --resume answers only the rest."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from idefics2.cli import main
from idefics2.data import open_writer

FLAGS = ["--dtype", "float32", "--max-new-tokens", "3", "--no-progress"]
COLOURS = [(220, 30, 30), (30, 30, 220), (30, 200, 30)]
QUESTIONS = ["What colour is it?", "Is there a circle?", "What shape is it?"]


def png(colour) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (48, 40), colour).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def same_rows_as_jsonl(tmp_path_factory):
    """A DocVQA-shaped Parquet (one junk image) and the JSONL answers of its good rows (images as files)."""
    folder = tmp_path_factory.mktemp("batch_data")
    lines = []
    for k, (colour, question) in enumerate(zip(COLOURS, QUESTIONS)):
        (folder / f"{k}.png").write_bytes(png(colour))
        lines.append(json.dumps({"id": k, "prompt": question, "images": [f"{k}.png"]}))
    (folder / "in.jsonl").write_text("\n".join(lines) + "\n")
    assert (
        main(["batch", "--input", str(folder / "in.jsonl"), "--output", str(folder / "ref.jsonl"), *FLAGS])
        == 0
    )
    reference = [json.loads(line) for line in (folder / "ref.jsonl").read_text().splitlines()]
    images = [{"bytes": png(c), "path": None} for c in COLOURS] + [{"bytes": b"junk", "path": "junk.png"}]
    table = pa.table({"doc": ["a", "b", "c", "d"], "image": images,
                      "query": [{"en": q, "de": "?"} for q in [*QUESTIONS, "Broken?"]]})  # fmt: skip
    pq.write_table(table, folder / "docvqa.parquet", row_group_size=2)
    return folder, [r["text"] for r in reference]


def test_parquet_in_and_out_matches_jsonl_with_image_files(same_rows_as_jsonl, capsys):
    folder, texts = same_rows_as_jsonl
    target = folder / "out.parquet"
    argv = ["batch", "--input", str(folder / "docvqa.parquet"), "--columns", "prompt=query.en,image=image",
            "--keep", "doc", "--output", str(target), *FLAGS]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "4 rows, layout question/answer (query.en, image)" in err and "(1 error(s))" in err
    table = pq.read_table(target)
    assert table.column_names == ["id", "doc", "text", "finish_reason", "error"]
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == [0, 1, 2, 3] and [r["doc"] for r in rows] == ["a", "b", "c", "d"]
    assert [r["text"] for r in rows[:3]] == texts
    assert rows[3]["text"] is None and rows[3]["error"].startswith("row 3, column image: image bytes is not")


def test_resume_answers_only_the_rows_not_answered(same_rows_as_jsonl, capsys):
    folder, texts = same_rows_as_jsonl
    target = folder / "resumed.jsonl"
    with open_writer(target) as writer:  # an interrupted run: row 1 answered, row 0 failed
        writer.write({"id": 0, "error": "row 0: engine stopped"})
        writer.write({"id": 1, "text": "KEPT", "finish_reason": "length"})
    argv = ["batch", "--input", str(folder / "docvqa.parquet"), "--columns", "prompt=query.en,image=image",
            "--output", str(target), "--resume", *FLAGS]  # fmt: skip
    assert main(argv) == 0
    results = [json.loads(line) for line in target.read_text().splitlines()]
    assert [(r["id"], r.get("text")) for r in results] == [
        (1, "KEPT"),
        (0, texts[0]),
        (2, texts[2]),
        (3, None),
    ]


def test_cauldron_dataset_folder_answers_like_messages_jsonl(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    turns = [{"user": "What colour is it?", "assistant": "red", "source": "x"},
             {"user": "And the shape?", "assistant": "square", "source": "x"}]  # fmt: skip
    red = Image.new("RGB", (48, 40), COLOURS[0])
    features = datasets.Features({
        "images": datasets.Sequence(datasets.Image()),
        "texts": [{"user": datasets.Value("string"), "assistant": datasets.Value("string"),
                   "source": datasets.Value("string")}],
    })  # fmt: skip
    saved = datasets.Dataset.from_dict({"images": [[red]], "texts": [turns]}, features=features)
    datasets.DatasetDict({"train": saved}).save_to_disk(tmp_path / "cauldron")
    red.save(tmp_path / "red.png")
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": turns[0]["user"]}]},
        {"role": "assistant", "content": turns[0]["assistant"]},
        {"role": "user", "content": turns[1]["user"]},
    ]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": conversation, "images": ["red.png"]}) + "\n")
    for source, name in ((tmp_path / "cauldron", "a.jsonl"), (tmp_path / "chat.jsonl", "b.jsonl")):
        argv = ["batch", "--input", str(source), "--split", "train"] if name == "a.jsonl" else [
            "batch", "--input", str(source)]  # fmt: skip
        assert main([*argv, "--output", str(tmp_path / name), *FLAGS]) == 0
    err = capsys.readouterr().err
    assert "layout cauldron (texts, images)" in err and "layout messages (messages, images)" in err
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.jsonl", "b.jsonl"))
    assert a["text"] == b["text"] and a["id"] == 0 and b["id"] is None


def test_data_mistakes_are_one_line(tmp_path, capsys, same_rows_as_jsonl):
    folder, _ = same_rows_as_jsonl
    parquet = str(folder / "docvqa.parquet")
    cases = [
        (["--input", parquet, "--columns", "prompt=nope.en"], "has no column 'nope'"),
        (["--input", parquet, "--columns", "prompt"], "--columns: expected FIELD=COLUMN"),
        (
            ["--input", parquet, "--columns", "prompt=query.en", "--keep", "nope"],
            "--keep nope: the input has",
        ),
        (["--input", parquet, "--columns", "prompt=query.en", "--keep", "text"], "results have their own"),
        (["--input", parquet, "--split", "train"], "--split applies to hub datasets"),
    ]
    for argv, problem in cases:
        code = main(["batch", *argv, "--output", str(tmp_path / "o.parquet"), *FLAGS])
        err = capsys.readouterr().err
        assert code == 2 and problem in err and err.count("\n") <= 2, err  # the layout line, the error
        assert err.splitlines()[-1].startswith("idefics2 batch: error: ")


def test_an_interrupted_parquet_run_keeps_its_answers_and_resumes(
    same_rows_as_jsonl, capsys, monkeypatch, interrupted_third_submit
):
    from idefics2.serving.engine import Engine

    folder, texts = same_rows_as_jsonl
    target = folder / "interrupted.parquet"
    argv = ["batch", "--input", str(folder / "docvqa.parquet"), "--columns", "prompt=query.en,image=image",
            "--output", str(target), *FLAGS]  # fmt: skip
    monkeypatch.setattr(Engine, "submit", interrupted_third_submit)
    assert main(argv) == 130
    assert [(r["id"], r["text"]) for r in pq.read_table(target).to_pylist()] == [(0, texts[0]), (1, texts[1])]
    monkeypatch.setattr(Engine, "submit", interrupted_third_submit.real)
    assert main([*argv, "--resume"]) == 0
    rows = pq.read_table(target).to_pylist()
    assert [(r["id"], r["text"]) for r in rows] == [(0, texts[0]), (1, texts[1]), (2, texts[2]), (3, None)]
    assert "wrote 4 results" in capsys.readouterr().err
