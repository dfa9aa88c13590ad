"""`idefics2 eval` on datasets, predictions files and comparisons, with the built-in model (a few items)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from idefics2.cli import main
from idefics2.evaluation.metrics import exact_match, vqa_accuracy
from idefics2.shapes import QUESTION_TYPES, make_example


def run(argv: list, capsys) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_info:  # argparse mistakes
        code = exit_info.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory) -> Path:
    """One shapes-world question of each type (question/answer layout, images by path), then a row whose
    image is missing."""
    folder = tmp_path_factory.mktemp("qa")
    rng = random.Random(4)
    with open(folder / "qa.jsonl", "w") as out:
        for i, qtype in enumerate(QUESTION_TYPES):
            example = make_example(rng, qtype)
            names = [f"{i}-{k}.png" for k in range(len(example.scenes))]
            for name, image in zip(names, example.images(), strict=True):
                image.save(folder / name)
            out.write(json.dumps({"id": f"q{i}", "question": example.question, "images": names,
                                  "answer": example.answer, "qtype": qtype}) + "\n")  # fmt: skip
        out.write(json.dumps({"id": "lost", "question": "How many shapes are there?", "images": ["gone.png"],
                              "answer": "1", "qtype": "count_all"}) + "\n")  # fmt: skip
    return folder / "qa.jsonl"


def test_eval_scores_a_dataset_with_intervals_groups_and_files(qa_file, tmp_path, capsys):
    predictions, summary = tmp_path / "p.jsonl", tmp_path / "s.json"
    code, out, err = run(["eval", "--data", qa_file, "--metric", "vqa", "--prompt-template", "{question}",
                          "--group-by", "qtype", "--predictions-out", predictions, "--summary", summary,
                          "--no-progress"], capsys)  # fmt: skip
    assert code == 0, err
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [r["id"] for r in records] == [f"q{i}" for i in range(7)] + ["lost"]  # input order
    lost = records[-1]
    assert lost["score"] is None and "gone.png" in lost["error"]
    for r in records[:-1]:
        assert r["score"] == vqa_accuracy(r["prediction"], r["references"]) and r["metric"] == "vqa"
    scores = [r["score"] for r in records[:-1]]
    assert sum(scores) >= 6  # the built-in model answers nearly every shapes question
    report = json.loads(summary.read_text())
    assert report["score"] == pytest.approx(sum(scores) / 7) and report["n"] == 7 and report["errors"] == 1
    assert report["ci_low"] <= report["score"] <= report["ci_high"]
    assert report["prompt_template"] == "{question}" and report["model"] == "built-in"
    assert "leave-one-out" in report["rules"] and report["decoding"] == "greedy"
    assert set(report["groups"]) == set(QUESTION_TYPES) and report["groups"]["count_all"]["n"] == 1
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["qtype", "score", "95%"]
    assert [line.split()[0] for line in lines[1:]] == [*QUESTION_TYPES, "overall"]
    assert lines[-1].split()[1] == f"{sum(scores) / 7:.3f}" and lines[-1].split()[-1] == "7"
    assert "1 item(s) not scored" in err

    # the same file scored again with another metric, written as Parquet
    rescored = tmp_path / "r.parquet"
    code, out, err = run(["eval", "--predictions", predictions, "--metric", "exact", "--predictions-out",
                          rescored], capsys)  # fmt: skip
    assert code == 0, err
    table = pq.read_table(rescored).to_pylist()
    assert [r["id"] for r in table] == [r["id"] for r in records]
    for new, old in zip(table[:-1], records[:-1], strict=True):
        assert new["score"] == exact_match(old["prediction"], old["references"]) and new["metric"] == "exact"
    assert out.splitlines()[-1].split()[0] == "overall"


def test_multiple_choice_through_the_engine(tmp_path, capsys):
    rng = random.Random(7)
    rows = []
    for i in range(4):
        example = make_example(rng, "color_of_kind")
        example.images()[0].save(tmp_path / f"{i}.png")
        options = ["red", "green", "blue", "yellow", "purple", "orange"]
        rows.append({"question": example.question, "image": f"{i}.png", "choices": options,
                     "answer": "ABCDEF"[options.index(example.answer)]})  # fmt: skip
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out_file = tmp_path / "mc-out.jsonl"
    # the built-in model answers with the colour's name, which the extraction finds among the options
    code, out, err = run(["eval", "--data", tmp_path / "mc.jsonl", "--metric", "mc", "--prompt-template",
                          "{question}", "--predictions-out", out_file, "--no-progress"], capsys)  # fmt: skip
    assert code == 0, err
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert all(r["choices"] and r["references"] for r in records)
    assert sum(r["score"] for r in records) >= 3
    # the default prompt lists the options with their letters
    code, _, err = run(["eval", "--data", tmp_path / "mc.jsonl", "--metric", "mc", "--limit", 1,
                        "--predictions-out", out_file, "--no-progress"], capsys)  # fmt: skip
    assert code == 0, err
    prompt = json.loads(out_file.read_text())["prompt"]
    assert "\nA. red\nB. green\n" in prompt and prompt.endswith("directly.")


def test_shapes_data_with_groups(capsys):
    code, out, err = run(["eval", "--data", "shapes", "--num-per-type", 1, "--seed", 3, "--group-by", "qtype",
                          "--no-progress"], capsys)  # fmt: skip
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert list(rows) == [*QUESTION_TYPES, "overall"] and rows["overall"][-1] == "7"
    assert float(rows["overall"][1]) >= 6 / 7 - 1e-9


def write_records(path: Path, scores: list[float], metric: str = "exact", ids=None) -> None:
    ids = ids or range(len(scores))
    records = [{"id": i, "prediction": "x", "references": ["x" if s else "y"], "score": s, "metric": metric}
               for i, s in zip(ids, scores, strict=True)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_compare_two_prediction_files(tmp_path, capsys):
    from idefics2.evaluation.stats import paired_bootstrap

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    scores_a = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0] * 3
    scores_b = [1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0] * 3
    write_records(a, scores_a)
    # B lists the same items in another order: they are matched by id
    write_records(b, scores_b[::-1], ids=range(len(scores_b) - 1, -1, -1))
    code, out, err = run(["eval", "--compare", a, b, "--summary", tmp_path / "c.json"], capsys)
    assert code == 0, err
    row_a, row_b, difference = out.splitlines()[1:]
    assert row_a.split() == ["A", "0.300"] and row_b.split() == ["B", "0.700"]
    expected = paired_bootstrap(scores_a, scores_b)
    summary = json.loads((tmp_path / "c.json").read_text())
    assert summary["difference"] == pytest.approx(0.4) and summary["p_value"] == expected.p_value
    assert summary["low"] > 0 and summary["p_value"] < 0.05 and summary["n"] == 30
    assert difference.startswith("B - A") and difference.split()[3] == "+0.400"

    write_records(b, scores_b[:-1])
    code, _, err = run(["eval", "--compare", a, b], capsys)
    assert code == 2 and "different items (1 only in A, 0 only in B)" in err
    write_records(b, scores_b, metric="vqa")
    code, _, err = run(["eval", "--compare", a, b], capsys)
    assert code == 2 and "different metrics (exact, vqa)" in err
    code, _, err = run(["eval", "--compare", a, b, "--metric", "exact"], capsys)  # scored again: comparable
    assert code == 0, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "x.jsonl"], "--data needs --metric"),
        (["--metric", "vqa"], "--metric needs --data"),
        (["--data", "shapes", "--predictions", "p.jsonl"], "give one of --data, --predictions and --compare"),
        (["--data", "shapes", "--prompt-template", "{q}"], "unknown placeholder {q}"),
        (["--data", "shapes", "--prompt-template", "Say it"], "it must hold {question}"),
        (["--data", "shapes", "--prompt-template", "{question} {options}"], "{options} is for --metric mc"),
        (["--data", "shapes", "--predictions-out", "p.csv"], "ends in .jsonl or .parquet"),
        (["--data", "shapes", "--columns", "prompt=q"], "takes no --columns"),
        (["--data", "shapes", "--group-by", "colour", "--num-per-type", "1"], "no column 'colour'"),
        (["--data", "missing.jsonl", "--metric", "vqa"], "missing.jsonl"),
        (["--predictions", "p.jsonl"], "--predictions needs --metric"),
        (["--predictions", "nothing.jsonl", "--metric", "vqa"], "not found"),
        (["--compare", "a.jsonl", "b.jsonl", "--adapter", "x"], "--adapter does not apply to --compare"),
        (["--metric", "bleu"], "invalid choice: 'bleu'"),
    ],
)
def test_user_mistakes_are_one_line(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(["eval", *argv, "--no-progress"], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_parquet_input_with_a_column_mapping(tmp_path, capsys):
    """Columns the layouts do not know, mapped with --columns (dotted paths), images as bytes in a struct;
    ANLS over a list of references."""
    import io

    import pyarrow as pa

    rng = random.Random(9)
    records = []
    for i in range(3):
        example = make_example(rng, "kind_of_color")
        buffer = io.BytesIO()
        example.images()[0].save(buffer, format="PNG")
        picture = {"bytes": buffer.getvalue()}
        records.append({"key": f"k{i}", "query": {"en": example.question}, "picture": picture,
                        "refs": [example.answer, "a shape"]})  # fmt: skip
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "data.parquet")
    out_file = tmp_path / "out.jsonl"
    mapping = "id=key,prompt=query.en,image=picture,answers=refs"
    code, out, err = run(["eval", "--data", tmp_path / "data.parquet", "--metric", "anls", "--columns",
                          mapping, "--prompt-template", "{question}", "--predictions-out", out_file,
                          "--no-progress"], capsys)  # fmt: skip
    assert code == 0, err
    results = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["id"] for r in results] == ["k0", "k1", "k2"]
    assert [r["references"] for r in results] == [r["refs"] for r in records]
    assert [r["prompt"] for r in results] == [r["query"]["en"] for r in records]
    assert sum(r["score"] for r in results) >= 2  # the built-in model names the shape


def test_a_row_the_model_cannot_take_is_its_own_error(tmp_path, capsys):
    rng = random.Random(2)
    example = make_example(rng, "count_all")
    example.images()[0].save(tmp_path / "0.png")
    rows = [{"question": example.question, "image": "0.png", "answer": example.answer},
            {"question": "How many shapes? " * 300, "image": "0.png", "answer": "1"}]  # fmt: skip
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out_file = tmp_path / "out.jsonl"
    code, out, err = run(["eval", "--data", tmp_path / "qa.jsonl", "--metric", "exact", "--predictions-out",
                          out_file, "--no-progress"], capsys)  # fmt: skip
    assert code == 0, err
    first, second = (json.loads(line) for line in out_file.read_text().splitlines())
    assert first["score"] == 1.0 and second["score"] is None and "512" in second["error"]
    assert out.splitlines()[-1].split()[-1] == "1" and "1 item(s) not scored" in err
