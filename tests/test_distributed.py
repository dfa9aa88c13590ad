"""`idefics2 train` under torchrun: 2 CPU processes (gloo) train one LoRA adapter, each from its own shard.

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
            user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Color?"}]}
            answer = {"role": "assistant", "content": f"It is {name}."}
            f.write(json.dumps({"messages": [user, answer], "images": [f"{i}.png"]}) + "\n")
    return folder / "train.jsonl"


def build_model_folder(folder: Path) -> Path:
    """A random tiny checkpoint (transformers-saved) with a processor (4 image tokens, images <= 56 px)."""
    from oracle_model import build_reference_checkpoint
    from oracle_processing import build_reference_processor

    build_reference_checkpoint(folder)
    build_reference_processor(folder, image_seq_len=4, longest_edge=56, shortest_edge=28)
    return folder


def train_args(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    args = "--lora-rank 4 --lora-dropout 0 --max-steps 3 --batch-size 1 --grad-accum 2 --lr .01 --no-progress"
    paths = ["--model", str(model), "--data", str(data), "--output", str(output)]
    return ["train", *paths, *args.split(), *extra]


def torchrun(output: Path, argv: list[str]) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*launcher, __file__, str(output), *argv]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_process_torchrun_gives_identical_weights(tmp_path):
    model_dir = build_model_folder(tmp_path / "model")
    data = write_dataset(tmp_path / "data")

    ddp = tmp_path / "ddp"
    torchrun(ddp, train_args(model_dir, data, ddp))
    rank0, rank1 = (load_file(ddp / f"rank{r}.safetensors") for r in (0, 1))
    lora = [name for name in rank0 if "lora_B" in name]
    diff = max_diff(rank0, rank1)
    print(f"DDP: max weight difference between the ranks {diff:.1e}")
    assert diff == 0
    assert lora and all(rank0[n].abs().max() > 0 for n in lora)  # the adapter was trained
    adapter = load_file(ddp / "adapter_model.safetensors")

    # Each rank read half of each step's examples: together they equal one process with twice the batch.
    from idefics2 import cli

    single = tmp_path / "single"
    args = train_args(model_dir, data, single)
    args[args.index("--batch-size") + 1] = "2"
    assert cli.main(args) == 0
    alone = load_file(single / "adapter_model.safetensors")
    diff = max_diff(alone, adapter)
    mean = sum((alone[k] - adapter[k]).abs().sum().item() for k in alone) / sum(
        t.numel() for t in alone.values()
    )
    print(f"DDP (2 x batch 1) vs 1 process (batch 2): adapter difference max {diff:.1e}, mean {mean:.1e}")
    # The two sum their gradients in another order (rows of one batch against an all-reduce), and AdamW's
    # first steps divide each gradient by its own size: an element whose gradient is at rounding level moves
    # by a rounding-sized fraction of lr (0.01). A rank's examples lost or weighted wrongly would move every
    # weight (mean differences of 1e-4 and more); rounding moves a few elements a little.
    assert mean <= 1e-6 and diff <= 1e-4

    # The same run with the model sharded (FSDP), checkpointing on the way.
    fsdp = tmp_path / "fsdp"
    torchrun(fsdp, train_args(model_dir, data, fsdp, "--fsdp", "--save-steps", "2"))
    assert max_diff(load_file(fsdp / "rank0.safetensors"), load_file(fsdp / "rank1.safetensors")) == 0
    diff = max_diff(load_file(fsdp / "adapter_model.safetensors"), adapter)
    print(f"FSDP vs DDP: max adapter difference {diff:.1e}")
    assert diff <= 1e-5
    assert sorted(p.name for p in (fsdp / "checkpoint-2").glob("rng_state_*.json")) == [
        "rng_state_0.json",
        "rng_state_1.json",
    ]


def _worker(output: str, argv: list[str]) -> int:
    """One torchrun rank: the real command, plus a dump of the (full) weights this rank ends with."""
    import idefics2.training as training
    from idefics2 import cli

    real_train = training.train

    def train_and_dump(model, *args, **kwargs):
        result = real_train(model, *args, **kwargs)
        named = model.named_parameters()
        weights = {n: p.full_tensor() if hasattr(p, "full_tensor") else p for n, p in named}
        save_file(
            {n: p.detach().contiguous() for n, p in weights.items()},
            str(Path(output) / f"rank{torch.distributed.get_rank()}.safetensors"),
        )
        return result

    training.train = train_and_dump
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1], sys.argv[2:]))
