"""Decode at batch 1, ours against mistral.rs (a throwaway peer: `pip install mistralrs`, not a dependency),
in one process on the same "mid" random checkpoint folder, the same 480x640 image with splitting, greedy.

Each mode runs ours then mistral.rs, `--repeats` times in turns: float32, bfloat16, our int8 against
mistral.rs' in-situ Q8_0, our int4 (group 128) against its Q4K. Decode rate: 1 / the median time between
streamed tokens after the first (ours: generate's per-token callback; mistral.rs: its streamed chunks).
Both get `--threads` CPU threads (torch's; mistral.rs' RAYON_NUM_THREADS).

    python benchmarks/bench_mistralrs.py --threads 2 --new-tokens 32 --modes float32 int8
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_generation import MID_CONFIG, PROMPT, photo_like  # noqa: E402

PEER_MODES = {
    "float32": ("F32", None),
    "bfloat16": ("BF16", None),
    "int8": ("F32", "Q8_0"),
    "int4": ("F32", "Q4K"),
}


def rate(times: list[float]) -> float:
    return 1.0 / statistics.median(b - a for a, b in zip(times, times[1:], strict=False))


def ours_rate(model, processor, image, new_tokens: int) -> float:
    prompt = processor.apply_chat_template(PROMPT, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[[image]], return_tensors="pt")
    times: list[float] = []

    def on_token(_tokens) -> None:
        times.append(time.perf_counter())

    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       eos_token_id=2, pad_token_id=0, streamer=on_token)  # fmt: skip
    return rate(times)


def peer_rate(runner, image_path: Path, new_tokens: int) -> float:
    import mistralrs

    request = mistralrs.ChatCompletionRequest(
        model="idefics2",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": str(image_path)}},
                    {"type": "text", "text": "Describe this image."},
                ],
            }
        ],  # fmt: skip
        max_tokens=new_tokens,
        temperature=0.0,
        stream=True,
    )
    times = [time.perf_counter() for _chunk in runner.send_chat_completion_request(request)]
    return rate(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=list(PEER_MODES), choices=list(PEER_MODES))
    args = parser.parse_args()
    if args.threads:  # mistral.rs' CPU threads (rayon), read when it first runs
        os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    try:
        import mistralrs
    except ImportError:
        sys.exit("mistral.rs is not installed: pip install mistralrs")
    if args.threads:
        torch.set_num_threads(args.threads)

    from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Processor
    from oracle_processing import build_reference_processor

    torch.manual_seed(0)
    base = Idefics2ForConditionalGeneration(Idefics2Config.from_dict(copy.deepcopy(MID_CONFIG))).eval()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "mid"
        build_reference_processor(folder, image_seq_len=64, do_image_splitting=True)
        base.save_pretrained(folder)
        processor = Idefics2Processor.from_pretrained(folder)
        image = photo_like()
        image_path = Path(tmp) / "photo.png"
        image.save(image_path)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; mid config, {args.new_tokens} "
              f"new tokens, medians of {args.repeats}")  # fmt: skip
        print(f"{'mode':<10}{'ours tok/s':>12}{'mistral.rs tok/s':>18}{'ratio':>8}")
        for mode in args.modes:
            dtype, isq = PEER_MODES[mode]
            ours = copy.deepcopy(base)
            ours = ours.to(torch.bfloat16) if mode == "bfloat16" else ours
            ours = ours.quantize(mode) if mode in ("int8", "int4") else ours
            which = mistralrs.Which.MultimodalPlain(
                model_id=str(folder),
                arch=mistralrs.MultimodalArchitecture.Idefics2,
                dtype=getattr(mistralrs.ModelDType, dtype),
            )
            runner = mistralrs.Runner(which=which, in_situ_quant=isq, token_source="none")
            ours_rate(ours, processor, image, 4)  # warm-up
            peer_rate(runner, image_path, 4)
            mine, theirs = [], []
            for _ in range(args.repeats):
                mine.append(ours_rate(ours, processor, image, args.new_tokens))
                theirs.append(peer_rate(runner, image_path, args.new_tokens))
            a, b = statistics.median(mine), statistics.median(theirs)
            print(f"{mode:<10}{a:12.1f}{b:18.1f}{a / b:8.2f}x", flush=True)
            del runner


if __name__ == "__main__":
    main()
