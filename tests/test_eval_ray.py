"""`idefics2 eval --ray` on a local 2-CPU Ray cluster gives the records and scores of a single-process run."""

from __future__ import annotations

import json
import random

import pytest

from idefics2.cli import main
from idefics2.shapes import QUESTION_TYPES, make_example

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_eval_on_ray_matches_one_process(cluster, tmp_path, capsys):
    rng = random.Random(5)
    lines = []
    for i, qtype in enumerate(QUESTION_TYPES[:5]):
        example = make_example(rng, qtype)
        example.images()[0].save(tmp_path / f"{i}.png")
        record = {
            "question": example.question,
            "images": [f"{i}.png"],
            "answer": example.answer,
            "qtype": qtype,
        }
        lines.append(json.dumps(record))
    lines.insert(2, "{not json")  # a bad line: its own error, at its place
    (tmp_path / "qa.jsonl").write_text("\n".join(lines) + "\n")
    flags = ["--data", tmp_path / "qa.jsonl", "--metric", "vqa", "--prompt-template", "{question}",
             "--group-by", "qtype", "--batch-size", 2, "--no-progress"]  # fmt: skip
    outputs = {}
    for name, extra in (("one", []), ("ray", ["--ray", "--actors", 1, "--cpus-per-actor", 0.5])):
        target = tmp_path / f"{name}.jsonl"
        assert main(["eval", *map(str, [*flags, "--predictions-out", target, *extra])]) == 0
        outputs[name] = (
            [json.loads(line) for line in target.read_text().splitlines()],
            capsys.readouterr().out,
        )
    (one, table_one), (on_ray, table_ray) = outputs["one"], outputs["ray"]
    assert [r["id"] for r in on_ray] == [r["id"] for r in one] == list(range(6))
    assert [r.get("prediction") for r in on_ray] == [r.get("prediction") for r in one]
    assert [r["score"] for r in on_ray] == [r["score"] for r in one]
    assert one[2]["error"].startswith("line 3") and on_ray[2]["error"].startswith("row 2")
    assert table_ray == table_one and table_one.splitlines()[-1].split()[-1] == "5"
