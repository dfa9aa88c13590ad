"""The engine's decode loop against `generate` at batch 1, in one process: the time between two tokens of one
request, with the same model and prompt, float32 and bfloat16.

    generate   model.generate on the calling thread; a streamer stamps each step's token
    engine     idefics2.serving.Engine (its loop on its own thread); the request's stream events are stamped

The two alternate (A/B) for --repeats rounds so that a machine shared with other work disturbs both alike; the
figure is the median gap between consecutive tokens over every round, and the engine's ratio to generate.
The model is the "mid" configuration of bench_generation.py (246M parameters, random weights): big enough
that a step is matrix work, small enough for a CPU.

    python benchmarks/bench_engine_loop.py --tokens 48 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generation import MID_CONFIG  # noqa: E402
from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration, pipeline  # noqa: E402
from idefics2.serving import Engine  # noqa: E402

PROMPT = "Describe a busy market street in the morning, with its sounds and colours."


def gaps(stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip(stamps, stamps[1:])]


def generate_gaps(model, processor, tokens: int) -> list[float]:
    ids = processor(text=PROMPT, return_tensors="pt")["input_ids"]
    stamps: list[float] = []
    model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, streamer=lambda _: stamps.append(
        time.perf_counter()))  # fmt: skip
    return gaps(stamps)


def engine_gaps(engine: Engine, tokens: int) -> list[float]:
    stamps = []
    for _ in engine.submit_prompt(PROMPT, max_new_tokens=tokens, min_new_tokens=tokens):
        stamps.append(time.perf_counter())
    return gaps(stamps)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per request (default: 48)")
    parser.add_argument("--repeats", type=int, default=3, help="A/B rounds per dtype (default: 3)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()
    processor = pipeline().processor  # the built-in model's tokenizer (the same vocabulary)
    torch.manual_seed(0)
    config = Idefics2Config.from_dict(copy.deepcopy(MID_CONFIG))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; {args.tokens} tokens, {args.repeats} rounds")  # fmt: skip
    print(f"{'dtype':10} {'generate ms':>12} {'engine ms':>10} {'engine / generate':>18}")
    for dtype in args.dtypes:
        model = Idefics2ForConditionalGeneration(config).to(getattr(torch, dtype)).eval()
        with Engine(model, processor, max_batch=1, max_length=256) as engine:
            generate_gaps(model, processor, 4)  # warm-up of both
            engine_gaps(engine, 4)
            measured: dict[str, list[float]] = {"generate": [], "engine": []}
            for _ in range(args.repeats):
                measured["generate"] += generate_gaps(model, processor, args.tokens)
                measured["engine"] += engine_gaps(engine, args.tokens)
        ms = {mode: 1e3 * statistics.median(values) for mode, values in measured.items()}
        print(
            f"{dtype:10} {ms['generate']:12.2f} {ms['engine']:10.2f} {ms['engine'] / ms['generate']:17.3f}x"
        )


if __name__ == "__main__":
    main()
