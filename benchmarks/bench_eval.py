"""Evaluation throughput: `idefics2 eval`'s engine path (continuous batching) against a plain loop over
`generate`, one item at a time (the way lmms-eval drives a transformers model, batch size 1), on the same
shapes-world items with the built-in model, in one process, alternating. Images are drawn once beforehand;
both paths ask the same prompts greedily with the same token limit (the engine without its image-feature
cache, which would serve the repeats' images from memory). Reports items/s of each (best of the
repeats), their ratio, and how many answers the two agree on.

    python benchmarks/bench_eval.py [--per-type 10] [--max-batch 32] [--repeats 2] [--dtype float32]
        [--model DIR_OR_REPO] [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import torch

import idefics2
from idefics2.data import read_rows
from idefics2.evaluation.metrics import METRICS
from idefics2.evaluation.runner import answer_items, prepare
from idefics2.generation import generate
from idefics2.processing.chat import user_turn
from idefics2.serving import Engine
from idefics2.settings import weights_dtype
from idefics2.shapes import make_dataset


def shapes_items(per_type: int, seed: int) -> list:
    examples = make_dataset(per_type, seed)
    rows = read_rows(
        [
            {"id": i, "prompt": e.question, "images": e.images(), "answer": e.answer}
            for i, e in enumerate(examples)
        ]
    )
    return list(prepare(rows, METRICS["exact"], "{question}", None))


def engine_answers(engine: Engine, items: list, max_new_tokens: int) -> list[str]:
    controls = {"max_new_tokens": max_new_tokens, "do_sample": False}
    records = answer_items(engine, items, METRICS["exact"], controls, progress=False)
    return [r["prediction"] for r in records]


def loop_answers(pipe, items: list, max_new_tokens: int) -> list[str]:
    """One item at a time: chat template, processor, generate, decode."""
    model, processor = pipe.model, pipe.processor
    dtype = next(model.parameters()).dtype
    answers = []
    for item in items:
        text = processor.apply_chat_template(
            [user_turn(item.prompt, len(item.images))], add_generation_prompt=True
        )
        inputs = processor(text=[text], images=[item.images], return_tensors="pt").to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.no_grad():
            out = generate(
                model, **inputs, max_new_tokens=max_new_tokens, do_sample=False, tokenizer=processor
            )
        new = out[0, inputs["input_ids"].shape[1] :]
        answers.append(processor.decode(new, skip_special_tokens=True).strip())
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-type", type=int, default=10, help="questions per type (7 types)")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--model", help="checkpoint folder or hub id (default: the built-in model)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--prefill-chunk", type=int, default=512, help="the engine's budget (eval's default)")
    parser.add_argument("--vision-chunk", type=int, default=1024, help="the engine's budget (eval's default)")
    args = parser.parse_args()

    pipe = idefics2.pipeline(args.model, dtype=weights_dtype(args.dtype, args.device), device=args.device)
    items = shapes_items(args.per_type, seed=11)
    print(f"{len(items)} items, {args.model or 'built-in model'} ({next(pipe.model.parameters()).dtype}), "
          f"{torch.get_num_threads()} threads, max_batch {args.max_batch}, prefill/vision chunks "
          f"{args.prefill_chunk}/{args.vision_chunk}")  # fmt: skip
    timings: dict[str, list[float]] = {"generate loop": [], "eval engine": []}
    # no image-feature cache: each repeat asks about the same images, which a real evaluation sees once
    budgets = {"prefill_chunk": args.prefill_chunk, "vision_chunk": args.vision_chunk}
    with Engine(pipe.model, pipe.processor, max_batch=args.max_batch, image_cache_mb=0, **budgets) as engine:
        engine_answers(engine, items[:4], args.max_new_tokens)  # warm-up: both paths
        loop_answers(pipe, items[:2], args.max_new_tokens)
        for _ in range(args.repeats):
            start = time.perf_counter()
            looped = loop_answers(pipe, items, args.max_new_tokens)
            timings["generate loop"].append(time.perf_counter() - start)
            start = time.perf_counter()
            batched = engine_answers(engine, items, args.max_new_tokens)
            timings["eval engine"].append(time.perf_counter() - start)
    rates = {name: len(items) / min(seconds) for name, seconds in timings.items()}
    for name, rate in rates.items():
        print(f"{name:<14} {rate:8.1f} items/s   (best of {args.repeats}: {min(timings[name]):.2f} s)")
    print(f"ratio          {rates['eval engine'] / rates['generate loop']:8.2f}x")
    agree = sum(a == b for a, b in zip(looped, batched, strict=True))
    print(f"answers agree  {agree}/{len(items)}")


if __name__ == "__main__":
    main()
