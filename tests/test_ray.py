"""Ray Data batch inference on a local cluster (2 CPUs, started once for the module), two actors of the
built-in model: the answers are those of a single-process `idefics2 batch`, row for row, and a bad row is an
error row there too (the Predictor in `map_batches`, and `idefics2 batch --ray` over Parquet and JSONL)."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from idefics2.cli import main

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

FLAGS = ["--dtype", "float32", "--max-new-tokens", "3", "--no-progress"]
COLOURS = [(220, 30, 30), (30, 30, 220), (30, 200, 30), None, (0, 0, 0), (250, 250, 250)]


def png(colour) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (48, 40), colour).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A Parquet input (row 3's image is junk) and a JSONL input (line 4 is not JSON), with the results of a
    single-process `idefics2 batch` on each."""
    folder = tmp_path_factory.mktemp("ray")
    images = [{"bytes": png(c) if c else b"junk", "path": None} for c in COLOURS]
    questions = [f"What colour is picture {k}?" for k in range(len(COLOURS))]
    pq.write_table(pa.table({"image": images, "question": questions}), folder / "in.parquet")
    lines = [json.dumps({"id": f"q{k}", "prompt": q}) for k, q in enumerate(questions)]
    lines[3] = "{not json"
    (folder / "in.jsonl").write_text("\n".join(lines) + "\n")
    for name in ("in.parquet", "in.jsonl"):
        assert main(["batch", "--input", str(folder / name), "--output", str(folder / f"{name}.one.jsonl"),
                     *FLAGS]) == 0  # fmt: skip
    return folder


def results(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predictor_in_map_batches_answers_like_one_process(cluster, inputs):
    from idefics2.integrations.ray import Predictor

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    dataset = ray.data.read_parquet(str(inputs / "in.parquet")).repartition(3)  # work for both actors
    answered = dataset.map_batches(
        Predictor,
        fn_constructor_kwargs={"dtype": "float32", "max_new_tokens": 3},
        compute=ray.data.ActorPoolStrategy(size=2),
        num_cpus=0.5,
        batch_size=2,
        batch_format="pyarrow",
    ).take_all()
    one = results(inputs / "in.parquet.one.jsonl")
    assert [r["question"] for r in answered] == [f"What colour is picture {k}?" for k in range(6)]
    assert [r["text"] for r in answered] == [r.get("text") for r in one]
    assert [r["finish_reason"] for r in answered] == [r.get("finish_reason") for r in one]
    assert answered[3]["error"].startswith("column image: image bytes is not a readable image")
    assert one[3]["error"] == "row 3, " + answered[3]["error"]
    assert all(r["error"] is None for k, r in enumerate(answered) if k != 3)


def test_batch_ray_over_jsonl_writes_what_one_process_writes(cluster, inputs, capsys):
    base = ["--ray", "--actors", "2", "--cpus-per-actor", "0.5", "--batch-size", "2"]
    target = inputs / "ray.parquet"
    assert main(["batch", "--input", str(inputs / "in.jsonl"), "--output", str(target), *base, *FLAGS]) == 0
    one = results(inputs / "in.jsonl.one.jsonl")
    got = pq.read_table(target).to_pylist()
    assert [r["id"] for r in got] == [r["id"] for r in one] == ["q0", "q1", "q2", None, "q4", "q5"]
    assert [r["text"] for r in got] == [r.get("text") for r in one]
    assert got[3]["error"].startswith("row 3: invalid JSON") and one[3]["error"].startswith(
        "line 4: invalid JSON"
    )
    assert "wrote 6 results" in capsys.readouterr().err
