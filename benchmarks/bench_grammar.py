"""Cost of structured output per decode step: generation under a JSON schema vs free generation.

The "mid" config of bench_generation.py (~246M parameters, the real 32k Mistral-7B vocabulary built as the
tests build it), random weights, float32, greedy, a short text prompt; batch 1 and batch 8 (every row with
its own grammar state). The constrained rows follow an invoice-like schema (nested objects, an array of at
least 20 items, bounded strings, a date pattern, bounded integers and numbers), long enough that no row
completes within --new-tokens; the free rows are forced to the same length with min_new_tokens. Runs
alternate so both see the same machine load. Prints the median and mean time per decode step, their ratio
(goal: constrained at most 1.10x free), and the time spent in the grammar per step (masks + advancing the
states), and the one-time costs (token table, compilation).

    python benchmarks/bench_grammar.py [--new-tokens 48] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generation import MID_CONFIG  # noqa: E402

ITEM = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
        "price": {"type": "number", "minimum": 0, "maximum": 1000, "multipleOf": 0.01},
        "taxable": {"type": "boolean"},
    },
    "required": ["name", "quantity", "price", "taxable"],
    "additionalProperties": False,
}
SCHEMA = {
    "type": "object",
    "properties": {
        "vendor": {"type": "string", "maxLength": 40},
        "date": {"type": "string", "pattern": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
        "items": {"type": "array", "items": ITEM, "minItems": 20},
    },
    "required": ["vendor", "date", "items"],
    "additionalProperties": False,
}
PROMPT = "Read the invoice and give its fields as JSON."


class GrammarClock:
    """Wraps the grammar state's mask and advance (what the decode core calls for a constrained row) to add
    up the time spent in them."""

    def __init__(self):
        from idefics2.constrained import GrammarState

        self.module, self.seconds = GrammarState, 0.0
        self.originals = {name: getattr(GrammarState, name) for name in ("mask_", "advance")}

    def __enter__(self):
        for name, function in self.originals.items():
            setattr(self.module, name, self.timed(function))
        return self

    def __exit__(self, *exc):
        for name, function in self.originals.items():
            setattr(self.module, name, function)

    def timed(self, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return wrapper


def run(model, processor, batch: int, new_tokens: int, constrained: bool) -> dict:
    chat = [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    inputs = dict(processor(text=[prompt] * batch, return_tensors="pt"))
    stamps: list[float] = []
    controls = {"json_schema": SCHEMA} if constrained else {"min_new_tokens": new_tokens}
    with GrammarClock() as clock, torch.no_grad():
        model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, tokenizer=processor,
                       streamer=lambda tokens: stamps.append(time.perf_counter()), **controls)  # fmt: skip
    if len(stamps) != new_tokens:
        raise RuntimeError(f"{len(stamps)} steps instead of {new_tokens}: a row finished early")
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {
        "median": statistics.median(gaps),
        "mean": statistics.fmean(gaps),
        "grammar": clock.seconds / new_tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from idefics2 import Idefics2ForConditionalGeneration, Idefics2Processor
    from idefics2.config import Idefics2Config
    from idefics2.constrained import compile_grammar
    from oracle_processing import build_reference_processor

    torch.manual_seed(0)
    model = Idefics2ForConditionalGeneration(Idefics2Config.from_dict(MID_CONFIG)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        build_reference_processor(tmp)
        processor = Idefics2Processor.from_pretrained(tmp)
    start = time.perf_counter()
    compile_grammar(processor, json_schema={"type": "object"})
    table_s = time.perf_counter() - start
    start = time.perf_counter()
    compile_grammar(processor, json_schema=SCHEMA)
    compile_s = time.perf_counter() - start
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"model: {n_params / 1e6:.0f}M parameters (float32, random weights), "
        f"vocabulary {len(processor.tokenizer)}"
    )
    print(f"one-time: token table {table_s * 1e3:.0f} ms (first grammar), invoice schema compiled in "
          f"{compile_s * 1e3:.1f} ms")  # fmt: skip

    for batch in (1, 8):
        results: dict[str, list[dict]] = {"free": [], "schema": []}
        run(model, processor, batch, 4, constrained=False)  # warm-up
        for _ in range(args.repeats):
            results["free"].append(run(model, processor, batch, args.new_tokens, constrained=False))
            results["schema"].append(run(model, processor, batch, args.new_tokens, constrained=True))
        free = {k: min(r[k] for r in results["free"]) for k in ("median", "mean")}
        schema = {k: min(r[k] for r in results["schema"]) for k in ("median", "mean", "grammar")}
        print(
            f"\nbatch {batch}, {args.new_tokens} new tokens, best of {args.repeats} runs (ms per decode step)"
        )
        print(f"  free:        median {free['median'] * 1e3:7.2f}   mean {free['mean'] * 1e3:7.2f}")
        print(f"  JSON schema: median {schema['median'] * 1e3:7.2f}   mean {schema['mean'] * 1e3:7.2f}   "
              f"grammar {schema['grammar'] * 1e3:.3f} (masks + advancing {batch} states)")  # fmt: skip
        print(f"  constrained / free: median {schema['median'] / free['median']:.3f}x, "
              f"mean {schema['mean'] / free['mean']:.3f}x (goal <= 1.10x)")  # fmt: skip
    print(f"\nload average after the runs: {os.getloadavg()[0]:.1f} (other processes share these cores)")


if __name__ == "__main__":
    main()
