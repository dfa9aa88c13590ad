"""`idefics2 train` under torchrun: 2 CPU processes (gloo) train the same LoRA adapter from their own shards.

Run by pytest, this file launches itself under torchrun; each rank then runs the real command and also dumps
the weights it ends with, so the test can check that both ranks hold identical weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

N_EXAMPLES = 6


def write_dataset(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    colors = [("red", (230, 20, 20)), ("green", (20, 200, 40)), ("blue", (30, 40, 220))]
    with open(folder / "train.jsonl", "w") as f:
        for i in range(N_EXAMPLES):
            name, rgb = colors[i % 3]
            Image.new("RGB", (28 + 2 * i, 28), rgb).save(folder / f"{i}.png")
            example = {
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Color?"}]},
                    {"role": "assistant", "content": f"It is {name}."},
                ],
                "images": [f"{i}.png"],
            }
            f.write(json.dumps(example) + "\n")
    return folder / "train.jsonl"


def build_model_folder(folder: Path) -> Path:
    from oracle_model import build_reference_checkpoint
    from oracle_processing import build_reference_processor

    build_reference_checkpoint(folder)
    build_reference_processor(folder, image_seq_len=4, longest_edge=56, shortest_edge=28)
    return folder


def train_args(model: Path, data: Path, output: Path) -> list[str]:
    return [
        "train",
        "--model",
        str(model),
        "--data",
        str(data),
        "--output",
        str(output),
        "--lora-rank",
        "4",
        "--lora-dropout",
        "0",
        "--max-steps",
        "3",
        "--batch-size",
        "1",
        "--grad-accum",
        "2",
        "--lr",
        "1e-2",
        "--no-progress",
    ]


def test_two_process_torchrun_gives_identical_weights(tmp_path):
    model_dir = build_model_folder(tmp_path / "model")
    data = write_dataset(tmp_path / "data")
    output = tmp_path / "out"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        __file__,
        str(output),
        *train_args(model_dir, data, output),
    ]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]

    rank0, rank1 = (load_file(output / f"rank{r}.safetensors") for r in (0, 1))
    lora = [name for name in rank0 if "lora_" in name]
    assert lora and rank0.keys() == rank1.keys()
    diff = max((rank0[n] - rank1[n]).abs().max().item() for n in rank0)
    print(f"DDP: max weight difference between the ranks {diff:.1e}")
    assert diff == 0
    assert any(rank0[n].abs().max() > 0 for n in lora if "lora_B" in n)  # the adapter was trained
    assert (output / "adapter_model.safetensors").is_file() and (output / "adapter_config.json").is_file()

    # Each rank read half of each step's examples: together they equal one process with twice the batch.
    from idefics2 import cli

    single = tmp_path / "single"
    args = train_args(model_dir, data, single)
    args[args.index("--batch-size") + 1] = "2"
    assert cli.main(args) == 0
    expected = load_file(single / "adapter_model.safetensors")
    got = load_file(output / "adapter_model.safetensors")
    close = max((expected[n] - got[n]).abs().max().item() for n in expected)
    print(f"DDP (2 x batch 1) vs 1 process (batch 2): max adapter difference {close:.1e}")
    assert close <= 1e-4


def _worker(output: str, argv: list[str]) -> int:
    """One torchrun rank: the real command, plus a dump of the weights this rank ends with."""
    import idefics2.training as training
    from idefics2 import cli

    real_train = training.train

    def train_and_dump(model, *args, **kwargs):
        result = real_train(model, *args, **kwargs)
        rank = torch.distributed.get_rank()
        save_file(
            {n: p.detach().contiguous() for n, p in model.named_parameters()},
            str(Path(output) / f"rank{rank}.safetensors"),
        )
        return result

    training.train = train_and_dump
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1], sys.argv[2:]))
