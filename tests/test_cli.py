"""`idefics2 train`: help, one-line errors with exit code 2 (bad JSONL lines named), full runs, resume."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from idefics2 import Idefics2ForConditionalGeneration, Idefics2Processor
from idefics2.cli import main
from test_distributed import build_model_folder, write_dataset

IMAGE_TURNS = '[{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "x"}]'


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_folder(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"))


def run_main(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err


def test_help_works():
    for args in (["--help"], ["train", "--help"]):
        out = subprocess.run([sys.executable, "-m", "idefics2.cli", *args], capture_output=True, text=True)
        assert out.returncode == 0 and "usage: idefics2" in out.stdout
    assert "--lora-rank" in out.stdout and "--resume" in out.stdout


@pytest.mark.parametrize(
    "line, problem",
    [
        ("{not json", "invalid JSON"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
        (
            f'{{"messages": {IMAGE_TURNS}, "images": ["missing.png"]}}',
            "file not found",
        ),
        (
            f'{{"messages": {IMAGE_TURNS}}}',
            "1 image part(s) in the messages but 0 image(s)",
        ),
        ('["a", "list"]', "must be a JSON object"),
    ],
)
def test_a_bad_line_is_one_clear_error_with_its_number(tmp_path, data, line, problem, capsys):
    lines = data.read_text().splitlines()
    bad = tmp_path / "train.jsonl"
    for i in range(2):  # two good lines (with their images), then the bad one
        (tmp_path / f"{i}.png").write_bytes((data.parent / f"{i}.png").read_bytes())
    bad.write_text("\n".join(lines[:2] + [line]) + "\n")
    code, err = run_main(
        ["train", "--model", "/nonexistent", "--data", str(bad), "--output", str(tmp_path / "o")], capsys
    )
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "train.jsonl:3:" in err and problem in err


def test_user_mistakes_exit_2(tmp_path, data, capsys):
    code, err = run_main(
        ["train", "--model", str(tmp_path / "nothing"), "--data", str(data), "--output", str(tmp_path / "o")],
        capsys,
    )
    assert code == 2 and err.startswith("idefics2 train: error:") and err.count("\n") == 1
    code, err = run_main(
        ["train", "--model", "m", "--data", str(tmp_path / "none.jsonl"), "--output", "o"], capsys
    )
    assert code == 2 and "input file not found" in err
    with pytest.raises(SystemExit) as exit_info:  # argparse: missing --output, or two exclusive modes
        main(["train", "--model", "m", "--data", str(data)])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        main(["train", "--model", "m", "--data", str(data), "--output", "o", "--full", "--lora-rank", "4"])


def test_full_training_writes_a_complete_checkpoint_and_resumes(tmp_path, model_dir, data, capsys):
    out = tmp_path / "full"
    base = [
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--eval-data",
        str(data),
        "--output",
        str(out),
        "--full",
        "--lr",
        "1e-3",
        "--batch-size",
        "2",
        "--save-steps",
        "1",
        "--logging-steps",
        "1",
    ]
    code, err = run_main(base + ["--max-steps", "2"], capsys)
    assert code == 0, err
    assert "step 2/2" in err and "eval loss" in err and "after 2 steps" in err
    Idefics2ForConditionalGeneration.from_pretrained(out)  # model + processor in one folder
    Idefics2Processor.from_pretrained(out)
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["step"] == 2

    code, err = run_main(base + ["--max-steps", "3", "--resume"], capsys)
    assert code == 0, err
    assert "step 3/3" in err and "step 1/" not in err and "after 3 steps" in err
    code, err = run_main(base[:-8] + ["--output", str(tmp_path / "empty"), "--full", "--resume"], capsys)
    assert code == 2 and "no checkpoint to resume from" in err


def test_matmul_precision_high_trains_to_the_same_loss(tmp_path, model_dir, data, capsys):
    """`--matmul-precision high` sets torch's float32 matmul precision for the run (products may then run as
    three bfloat16 products, idefics2.modeling.bf16x3): the same losses as the default to ~1e-5."""
    import re

    import torch

    from idefics2.modeling import kernels

    losses = {}
    try:
        for precision in ("highest", "high"):
            argv = [
                "train",
                "--model",
                str(model_dir),
                "--data",
                str(data),
                "--output",
                str(tmp_path / precision),
            ]
            argv += ["--max-steps", "2", "--batch-size", "2", "--logging-steps", "1"]
            code, err = run_main(argv + ["--matmul-precision", precision], capsys)
            assert code == 0, err
            assert torch.get_float32_matmul_precision() == precision
            losses[precision] = [float(x) for x in re.findall(r"loss (\d+\.\d+)", err)]
    finally:
        torch.set_float32_matmul_precision("highest")
        kernels.forget_choices()
    assert len(losses["high"]) == len(losses["highest"]) >= 2
    assert max(abs(a - b) for a, b in zip(losses["high"], losses["highest"], strict=True)) <= 1e-4
    with pytest.raises(SystemExit) as exit_info:  # argparse: one of the two precisions
        main(["train", "--model", "m", "--data", str(data), "--output", "o", "--matmul-precision", "medium"])
    assert exit_info.value.code == 2 and "--matmul-precision" in capsys.readouterr().err
