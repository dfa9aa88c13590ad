"""LoRA fine-tuning speed and memory, ours against transformers + PEFT, on the same weights, data and steps.

The "mid" random checkpoint (benchmarks/bench_generation.py, ~246M parameters) is saved once; every run loads
it in float32, applies the same initial LoRA adapter (rank 8, alpha 16, no dropout, every projection of the
decoder and the connector: idefics2.lora.DEFAULT_TARGET_MODULES) and trains on the same batches:
one split image (4 crops + the image) and a 100-300-token answer per example, lengths mixed, right-padded.
Batches are built once by our collator and fed as tensors to both, so that only the training step is
compared: forward, loss, backward, gradient clipping (1.0), AdamW (constant learning rate).

Every run is its own process (so that its peak resident set is its own), one after the other:

  transformers+peft   Idefics2ForConditionalGeneration + PeftModel(is_trainable=True), loss from labels
  ours                idefics2.training.train (the language-model head only at learned positions; the
                      frozen vision tower without an autograd graph)
  ours+ckpt           with gradient checkpointing
  ours+bf16           with bf16 autocast (CPUs with bf16 instructions, GPUs)
  ours+packing        the same examples packed into rows (each attending only to itself): fewer, fuller rows
  ours+high           torch.set_float32_matmul_precision("high"): float32 products as three bfloat16 products
                      where measured faster (idefics2.modeling.bf16x3; CPUs with bfloat16 units), as
                      `idefics2 train --matmul-precision high`

Reported per run: examples/s, trained (learned) tokens/s, peak resident set (CPU) or max allocated (CUDA),
and the losses; ratios against transformers + PEFT from the same invocation. Packing also reports the share
of padding in the rows. On a CPU shared with other work the wall-clock rates swing with the load; the
trained tokens per CPU-second (all threads of the run) do much less, and are reported next to them.

With `--config 8b` (a GPU: benchmarks/gpu.sh) every run builds the real idefics2-8b shapes with the same
seeded random weights and initial adapter in place on the device (nothing is written but the small
adapter); `--dtype bfloat16` and `--gradient-checkpointing` apply to every run (transformers: its
non-reentrant gradient checkpointing), and the peak is torch.cuda.max_memory_allocated during training.

    python benchmarks/bench_training.py                       # CPU, 4 steps of 2 examples
    python benchmarks/bench_training.py --steps 3 --runs transformers+peft ours
    python benchmarks/bench_training.py --alternate 6        # speed only, both in one process, alternating
    python benchmarks/bench_training.py --image-edge 640     # larger images (transformers pads the crops)
    python benchmarks/bench_training.py --device cuda --config 8b --dtype bfloat16 --gradient-checkpointing
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench import CONFIG_8B, PeakMemory, resident_bytes  # noqa: E402
from bench_generation import MID_CONFIG, built_in, photo_like  # noqa: E402

RUNS = ("transformers+peft", "ours", "ours+ckpt", "ours+bf16", "ours+packing", "ours+high")
LR = 1e-3
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}
WORDS = "red green blue circle square image shows a the of and with near left right top bottom small".split()


# ---- setup (parent process) --------------------------------------------------------------------------
def prepare(
    folder: Path, examples: int, batch_size: int, image_edge: int, seed: int, checkpoint: bool = True
) -> None:
    """Checkpoint and initial adapter (unless `checkpoint` is False: the runs build their own), processor and
    the batches (plain and packed) into `folder`."""
    from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Processor
    from idefics2.training import ChatCollator, ChatDataset, LoraConfig, PackedDataset, add_lora, save_adapter
    from oracle_processing import build_reference_processor

    if checkpoint:
        torch.manual_seed(seed)
        model = Idefics2ForConditionalGeneration(Idefics2Config.from_dict(MID_CONFIG))
        model.save_pretrained(folder / "model")
        config = LoraConfig(**LORA)
        add_lora(model, config)
        save_adapter(model, config, folder / "adapter")
        del model

    build_reference_processor(
        folder / "processor", do_image_splitting=True, longest_edge=image_edge, shortest_edge=image_edge // 2
    )
    collator = ChatCollator(Idefics2Processor.from_pretrained(folder / "processor"))
    rng = random.Random(seed)
    rows = []
    for i in range(examples):
        target = 100 + (200 * i) // max(1, examples - 1)  # 100 ... 300 answer tokens, mixed in the batches
        answer = " ".join(rng.choice(WORDS) for _ in range(target))
        ids = collator.tokenizer.encode(answer, add_special_tokens=False)[:target]
        user = [{"type": "image"}, {"type": "text", "text": "Describe this image in detail."}]
        messages = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": collator.tokenizer.decode(ids)},
        ]
        rows.append({"messages": messages, "images": [photo_like(rng.randint(240, 480), 640, seed=i)]})
    order = list(range(examples))
    rng.shuffle(order)
    data = ChatDataset([rows[i] for i in order], collator)
    plain = [collator(data.examples[k : k + batch_size]) for k in range(0, len(data), batch_size)]
    packed_rows = PackedDataset(data, capacity=max(len(e.input_ids) for e in data.examples) * batch_size)
    packed = [collator([packed_rows[i]]) for i in range(len(packed_rows))]
    torch.save({"plain": plain, "packed": packed}, folder / "batches.pt")


# ---- one run (child process) --------------------------------------------------------------------------
def run(name: str, folder: Path, device: torch.device, options: argparse.Namespace) -> dict:
    batches = torch.load(folder / "batches.pt", weights_only=True)[
        "packed" if name == "ours+packing" else "plain"
    ]
    dtype = getattr(torch, options.dtype)
    if name == "ours+high":
        torch.set_float32_matmul_precision("high")
    with PeakMemory(device) as loading:
        if options.config == "8b":
            model = build_in_place(name, folder, dtype, device)
        elif name == "transformers+peft":
            model = load_transformers(folder, dtype)
        else:
            model = load_ours(folder, dtype)
        model.to(device)
    loaded = resident_bytes() if device.type == "cpu" else torch.cuda.memory_allocated(device)
    with PeakMemory(device) as memory:
        start, cpu_start = time.perf_counter(), time.process_time()
        losses = (
            train_transformers(model, batches, device, options.gradient_checkpointing)
            if name == "transformers+peft"
            else train_ours(model, batches, name, folder, device, options.gradient_checkpointing)
        )
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    learned = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    examples = sum(
        int(b["segment_ids"].amax(1).sum()) if "segment_ids" in b else len(b["labels"]) for b in batches
    )
    slots = sum(b["attention_mask"].numel() for b in batches)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    peak = memory.peak if device.type == "cuda" else max(memory.peak, loading.peak)
    return {
        "run": name,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "trained_tokens_per_cpu_s": learned / cpu_seconds,
        "steps": len(batches),
        "examples_per_s": examples / seconds,
        "trained_tokens_per_s": learned / seconds,
        "peak_mb": peak / 1e6,
        "training_overhead_mb": (memory.peak - loaded) / 1e6,
        "padding": 1 - real / slots,
        "losses": losses,
    }


def load_ours(folder: Path, dtype: torch.dtype = torch.float32):
    from idefics2 import Idefics2ForConditionalGeneration
    from idefics2.training import load_adapter, mark_only_lora_trainable

    model = Idefics2ForConditionalGeneration.from_pretrained(folder / "model", dtype=dtype)
    load_adapter(model, folder / "adapter")
    mark_only_lora_trainable(model)
    return model


def build_in_place(name: str, folder: Path, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """The idefics2-8b shapes with seeded random weights and initial adapter, built on `device` (the same in
    every process): ours, or transformers' model given ours' weights, under PEFT with ours' adapter."""
    from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration
    from idefics2.training import LoraConfig, add_lora, mark_only_lora_trainable, save_adapter

    torch.manual_seed(seed)
    with built_in(dtype, device):
        model = Idefics2ForConditionalGeneration(Idefics2Config.from_dict(copy.deepcopy(CONFIG_8B)))
    torch.manual_seed(seed + 1)
    config = LoraConfig(**LORA)
    add_lora(model, config)
    mark_only_lora_trainable(model)
    if name != "transformers+peft":
        return model
    from peft import PeftModel
    from transformers import Idefics2Config as RefConfig
    from transformers import Idefics2ForConditionalGeneration as RefModel

    save_adapter(model, config, folder / "adapter-8b")
    weights = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    with torch.device(device):
        reference = RefModel._from_config(
            RefConfig(**copy.deepcopy(CONFIG_8B)), dtype=dtype, attn_implementation="sdpa"
        )
    reference.load_state_dict(weights)
    del model, weights
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return PeftModel.from_pretrained(reference, folder / "adapter-8b", is_trainable=True)


def train_ours(
    model, batches: list[dict], name: str, folder: Path, device: torch.device, checkpointing: bool = False
) -> list[float]:
    from idefics2.training import LoraConfig, TrainingArguments, train

    args = TrainingArguments(
        output_dir=str(folder / f"out-{name}"),
        max_steps=len(batches),
        batch_size=1,  # one item = one prepared batch
        lr=LR,
        scheduler="constant",
        max_grad_norm=1.0,
        mixed_precision="bf16" if name == "ours+bf16" else "no",
        gradient_checkpointing=checkpointing or name == "ours+ckpt",
        shuffle=False,
        progress=False,
        overwrite_output_dir=True,
    )
    # the adapter is what a LoRA run writes at its end (as `idefics2 train --lora` does), not the whole model
    result = train(
        model, range(len(batches)), lambda items: batches[items[0]], args, device=device,
        lora_config=LoraConfig(**LORA),
    )  # fmt: skip
    return result.losses


def load_transformers(folder: Path, dtype: torch.dtype = torch.float32):
    from peft import PeftModel
    from transformers import Idefics2ForConditionalGeneration

    model = Idefics2ForConditionalGeneration.from_pretrained(
        folder / "model", dtype=dtype, attn_implementation="sdpa"
    )
    return PeftModel.from_pretrained(model, folder / "adapter", is_trainable=True)


def train_transformers(
    model, batches: list[dict], device: torch.device, checkpointing: bool = False
) -> list[float]:
    """The usual loop: loss from labels, backward, clip, AdamW (as Trainer / SFTTrainer run it)."""
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    losses = []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


# ---- report -------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps (batches) per run")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--image-edge", type=int, default=224, help="longest image edge after resizing")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    parser.add_argument("--config", choices=("mid", "8b"), default="mid", help="model shapes (8b: a GPU)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weights")
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="activation checkpointing in every run"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each run")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument(
        "--alternate",
        type=int,
        metavar="ROUNDS",
        help="instead: speed only (mid shapes, float32), ours and transformers + PEFT in one process, their "
        "steps alternating for ROUNDS rounds, so that both see the same load on a shared machine",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run(args.child, Path(args.folder), torch.device(args.device), args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        examples = args.steps * args.batch_size
        prepare(folder, examples, args.batch_size, args.image_edge, seed=0, checkpoint=args.config == "mid")
        if args.alternate:
            alternate(folder, torch.device(args.device), args.alternate)
            return
        results = {}
        for name in args.runs:
            command = [sys.executable, __file__, "--child", name, "--folder", tmp, "--device", args.device]
            command += ["--threads", str(args.threads), "--config", args.config, "--dtype", args.dtype]
            command += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
            out = subprocess.run(command, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
            r = results[name]
            print(
                f"{name}: {r['seconds']:.1f} s ({r['cpu_seconds']:.1f} CPU-s), "
                f"losses {[round(x, 5) for x in r['losses']]}",
                file=sys.stderr,
            )
    report(results, args)


def alternate(folder: Path, device: torch.device, rounds: int) -> None:
    """Per round, one training step of each on the same batch, the first (ours: the trainer's objective,
    optimizer and clipping, with torch's float32 matmul precision "highest" and then "high"; transformers +
    PEFT: train_transformers' step); prints every step's time, the ratio per round and that of the fastest
    steps (the least disturbed by other work)."""
    import contextlib

    from idefics2.training.trainer import TokenLoss, TrainingArguments, build_optimizer

    batches = torch.load(folder / "batches.pt", weights_only=True)["plain"]
    ours, theirs = load_ours(folder).to(device).train(), load_transformers(folder).to(device).train()
    optimizer, _ = build_optimizer(ours, TrainingArguments(output_dir=str(folder / "alternate"), lr=LR))
    ours_params = [p for p in ours.parameters() if p.requires_grad]
    their_params = [p for p in theirs.parameters() if p.requires_grad]
    their_optimizer = torch.optim.AdamW(their_params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    def our_step(batch: dict) -> float:
        loss, _ = TokenLoss().summed(ours, batch, device, contextlib.nullcontext())
        (loss / TokenLoss().units(batch)).backward()
        torch.nn.utils.clip_grad_norm_(ours_params, 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item() / TokenLoss().units(batch)

    def their_step(batch: dict) -> float:
        loss = theirs(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(their_params, 1.0)
        their_optimizer.step()
        their_optimizer.zero_grad(set_to_none=True)
        return loss.item()

    steps = (
        ("ours", our_step, "highest"),
        ("ours+high", our_step, "high"),
        ("transformers+peft", their_step, "highest"),
    )
    ratios, fastest = {"ours": [], "ours+high": []}, {}
    for i in range(rounds):
        batch = batches[0]
        seconds = {}
        for name, step, precision in steps:
            torch.set_float32_matmul_precision(precision)
            start = time.perf_counter()
            loss = step(batch)
            seconds[name] = time.perf_counter() - start
            fastest[name] = min(fastest.get(name, math.inf), seconds[name])
            print(f"round {i}: {name} {seconds[name]:.2f} s, loss {loss:.6f}")
        for name in ratios:
            ratios[name].append(seconds["transformers+peft"] / seconds[name])
    base = fastest["transformers+peft"]
    for name, theirs_over_ours in ratios.items():
        median = sorted(theirs_over_ours)[len(theirs_over_ours) // 2]
        rounds_text = ", ".join(f"{r:.2f}" for r in theirs_over_ours)
        print(f"{name} speed-up per round: {rounds_text} (median {median:.2f})")
        mine = fastest[name]
        print(f"fastest steps: {name} {mine:.2f} s, transformers+peft {base:.2f} s: {base / mine:.2f}x")


def report(results: dict, args) -> None:
    base = results.get("transformers+peft")
    print(
        f"{args.steps} steps x {args.batch_size} examples, one split image + 100-300-token answer each, "
        f"{args.config} shapes, {args.dtype} weights"
        + (", gradient checkpointing" if args.gradient_checkpointing else "")
        + f", {args.device}"
        + (f" ({args.threads} threads)" if args.device == "cpu" else "")
    )
    peak = "peak MB" if args.device == "cpu" else "max alloc MB"
    header = f"{'run':<18} {'examples/s':>10} {'tokens/s':>9} {'x':>6} {'tok/cpu-s':>9} {'x':>6}"
    header += f" {peak:>8} {'x':>6}"
    print(header + f" {'training MB':>11} {'padding':>8} final loss")
    for name, r in results.items():
        speed = f"{r['trained_tokens_per_s'] / base['trained_tokens_per_s']:.2f}" if base else "-"
        work = f"{r['trained_tokens_per_cpu_s'] / base['trained_tokens_per_cpu_s']:.2f}" if base else "-"
        memory = f"{r['peak_mb'] / base['peak_mb']:.2f}" if base else "-"
        print(
            f"{name:<18} {r['examples_per_s']:>10.3f} {r['trained_tokens_per_s']:>9.1f} {speed:>6} "
            f"{r['trained_tokens_per_cpu_s']:>9.1f} {work:>6} "
            f"{r['peak_mb']:>8.0f} {memory:>6} {r['training_overhead_mb']:>11.0f} "
            f"{100 * r['padding']:>7.1f}% {r['losses'][-1]:.6f}"
        )
    if base and "ours" in results:
        diff = max(abs(a - b) for a, b in zip(results["ours"]["losses"], base["losses"], strict=True))
        print(f"ours vs transformers+peft: largest per-step loss difference {diff:.2e} ({args.dtype})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
