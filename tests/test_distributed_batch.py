"""`idefics2 batch` under torchrun: 2 CPU processes (gloo) split the lines, and one output file holds every
line once, in input order, as one process writes it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image

from idefics2.cli import main
from test_distributed import build_model_folder


def test_two_processes_write_one_output_in_input_order(tmp_path, capsys):
    model = build_model_folder(tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(data / "red.png")
    lines = [json.dumps({"id": i, "prompt": f"Question number {i}?", "images": ["red.png"] if i % 2 else [],
                         "max_new_tokens": 2 + i % 4}) for i in range(9)]  # fmt: skip
    lines.insert(4, "{broken json")
    (data / "in.jsonl").write_text("\n".join(lines) + "\n")
    flags = ["--model", str(model), "--input", str(data / "in.jsonl"), "--max-new-tokens", "3",
             "--dtype", "float32", "--no-progress"]  # fmt: skip

    assert main(["batch", *flags, "--output", str(tmp_path / "one.jsonl")]) == 0
    capsys.readouterr()

    script = shutil.which("idefics2")
    command = [script] if script else [sys.executable, "-m", "idefics2.cli"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    if script:
        launcher.append("--no-python")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [*launcher, *command, "batch", *flags, "--output", str(tmp_path / "two.jsonl")],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "wrote 10 results" in run.stderr and "(1 error(s))" in run.stderr
    one = (tmp_path / "one.jsonl").read_text().splitlines()
    two = (tmp_path / "two.jsonl").read_text().splitlines()
    assert two == one
    assert [json.loads(line)["id"] for line in two] == [0, 1, 2, 3, None, 4, 5, 6, 7, 8]
    assert not list(Path(tmp_path).glob("two.jsonl.part-*"))
