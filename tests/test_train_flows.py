"""`idefics2 train` as a new user runs it, on the built-in model: no --model needed, an output folder that
holds an old run is refused (or replaced with --overwrite), checkpoints kept, a warmup longer than the run, a
resume with the other mode, and image parts that carry their image."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from idefics2.cli import main
from idefics2.training.data import DataError, normalize_example

REPO = Path(__file__).resolve().parents[1]
SHAPES = REPO / "examples" / "shapes.png"

pytestmark = pytest.mark.skipif(not SHAPES.is_file(), reason="no examples/shapes.png")


def example(answer: str, inline: bool = False) -> dict:
    image = {"type": "image", "image": "shapes.png"} if inline else {"type": "image"}
    user = {"role": "user", "content": [image, {"type": "text", "text": "What color is the circle?"}]}
    line = {"messages": [user, {"role": "assistant", "content": answer}]}
    return line if inline else {**line, "images": ["shapes.png"]}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    shutil.copy(SHAPES, folder / "shapes.png")
    lines = [example("The circle is green."), example("It is green.", inline=True)]
    (folder / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder / "train.jsonl"


def train(capsys, data: Path, output: Path, *flags) -> tuple[int, str]:
    argv = ["train", "--data", data, "--output", output, "--no-progress", *flags]
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def checkpoints(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("checkpoint-*"))


def test_a_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(tmp_path, data, capsys):
    out = tmp_path / "adapter"
    code, err = train(capsys, data, out, "--max-steps", "3", "--save-steps", "1")  # no --model: built-in
    assert code == 0, err
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-3"]  # the newest 2 are kept
    assert (out / "adapter_config.json").is_file()
    (out / "notes.txt").write_text("mine")

    code, err = train(capsys, data, out, "--max-steps", "1")
    assert code == 2 and err.count("\n") == 1
    assert "holds a previous run (checkpoint-2, checkpoint-3, adapter_config.json" in err
    assert "--resume" in err and "--overwrite" in err

    code, err = train(capsys, data, out, "--max-steps", "1", "--save-steps", "1", "--overwrite")
    assert code == 0, err
    assert checkpoints(out) == ["checkpoint-1"] and (out / "notes.txt").read_text() == "mine"
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["step"] == 1

    code, err = train(capsys, data, out, "--max-steps", "2", "--save-steps", "1", "--resume")
    assert code == 0, err
    assert checkpoints(out) == ["checkpoint-1", "checkpoint-2"]

    code, err = train(capsys, data, out, "--resume", "--overwrite")
    assert code == 2 and "choose one" in err
    code, err = train(capsys, data, out, "--max-steps", "3", "--resume", "--full")
    assert code == 2 and err.count("\n") == 1
    assert "it is a LoRA run, this run trains all weights" in err


def test_every_checkpoint_is_kept_with_save_total_limit_0(tmp_path, data, capsys):
    out = tmp_path / "adapter"
    code, err = train(capsys, data, out, "--max-steps", "3", "--save-steps", "1", "--save-total-limit", "0")
    assert code == 0, err
    assert checkpoints(out) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]


def test_a_warmup_longer_than_the_run_is_one_warning(tmp_path, data, capsys):
    flags = ["--max-steps", "2", "--warmup-steps", "50", "--lr", "1e-3"]
    code, err = train(capsys, data, tmp_path / "a", *flags)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: warmup_steps (50) is not shorter than the run (2 steps): the learning rate never reaches "
        "lr=0.001 (the last step uses 2.00e-05); lower warmup_steps"
    ]
    code, err = train(capsys, data, tmp_path / "b", "--max-steps", "2", "--warmup-steps", "1")
    assert code == 0 and "warning" not in err


def test_the_model_folder_is_not_an_output(tmp_path, data, capsys):
    from idefics2.assets import builtin_model_dir

    code, err = train(capsys, data, builtin_model_dir(), "--full", "--overwrite")
    assert code == 2 and "is the --model folder" in err


def test_image_parts_may_carry_their_image(tmp_path):
    shutil.copy(SHAPES, tmp_path / "shapes.png")
    normalized = normalize_example(example("green", inline=True), base_dir=tmp_path)
    assert normalized["images"] == [str(tmp_path / "shapes.png")]
    assert normalized["messages"][0]["content"][0] == {"type": "image"}
    both = {**example("green", inline=True), "images": ["shapes.png"]}
    with pytest.raises(DataError, match='either inside the image parts or in "images", not both'):
        normalize_example(both, base_dir=tmp_path)
    half = example("green", inline=True)
    half["messages"][0]["content"].append({"type": "image"})
    with pytest.raises(DataError, match='1 of the 2 image parts hold an "image"'):
        normalize_example(half, base_dir=tmp_path)
    missing = example("green", inline=True)
    missing["messages"][0]["content"][0]["image"] = "nope.png"
    with pytest.raises(DataError, match="file not found"):
        normalize_example(missing, base_dir=tmp_path)
