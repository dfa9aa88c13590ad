"""Processor throughput: transformers' Idefics2Processor (PIL image processor) against ours (pil and torch
backends) on a batch of 16 photo-like 1-4 MP images with image splitting on.

    python benchmarks/bench_processing.py [--repeats 5] [--device cuda]

The runs are interleaved (reference, ours pil, ours torch, reference, ...) so that a busy machine slows
them alike; the best and median wall times are printed with the speed-up over the reference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from idefics2 import Idefics2Processor  # noqa: E402
from oracle_processing import build_reference_processor  # noqa: E402

# (width, height): 1.2 to 4 MP, landscape, portrait and square.
SIZES = [
    (1280, 960), (1600, 1200), (2048, 1536), (2304, 1728), (1920, 1080), (1080, 1920), (2000, 2000),
    (1500, 1000), (1000, 1500), (2560, 1440), (1440, 2560), (1200, 1200), (1800, 1350), (2100, 1400),
    (1024, 1280), (2400, 1600),
]  # fmt: skip


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """Smooth gradients, blurred shapes and sensor-like noise."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    waves = 0.5 * (1 + np.sin(xs / 97 + ys / 53))
    colors = rng.uniform(0, 255, size=(3, 3))
    base = np.stack([c[0] * xs / width + c[1] * ys / height + c[2] * waves for c in colors], axis=-1)
    image = Image.fromarray(np.clip(base / 2, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(50, width // 2)), y0 + int(rng.integers(50, height // 2))
        draw.ellipse([x0, y0, x1, y1], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    image = image.filter(ImageFilter.GaussianBlur(3))
    noisy = np.asarray(image).astype(np.int16) + rng.normal(0, 6, size=(height, width, 3)).astype(np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--device", default=None, help="also time the torch backend on this device, e.g. cuda"
    )
    args = parser.parse_args()

    from transformers import Idefics2Processor as Reference

    images = [photo_like(w, h, seed) for seed, (w, h) in enumerate(SIZES)]
    texts = ["User:<image>Describe this photo.<end_of_utterance>\nAssistant:"] * len(images)
    batch = [[image] for image in images]
    with tempfile.TemporaryDirectory() as folder:
        build_reference_processor(folder, do_image_splitting=True)
        reference = Reference.from_pretrained(folder)
        ours = Idefics2Processor.from_pretrained(folder)

    common = {"text": texts, "images": batch, "padding": True, "return_tensors": "pt"}
    runs = {
        "transformers (PIL)": lambda: reference(**common),
        "ours, pil backend": lambda: ours(**common),
        "ours, torch backend": lambda: ours(**common, backend="torch"),
    }
    if args.device:

        def on_device():
            out = ours(**common, backend="torch", device=args.device)
            torch.cuda.synchronize() if args.device.startswith("cuda") else None
            return out

        runs[f"ours, torch backend, {args.device}"] = on_device

    megapixels = sum(w * h for w, h in SIZES) / 1e6
    shape = tuple(runs["ours, torch backend"]()["pixel_values"].shape)
    print(f"{len(images)} images, {megapixels:.1f} MP, splitting on, pixel_values {shape}")
    print(f"torch threads: {torch.get_num_threads()}; best / median of {args.repeats} interleaved runs")
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    reference_best = min(times["transformers (PIL)"])
    reference_median = statistics.median(times["transformers (PIL)"])
    for name, values in times.items():
        best, median = min(values), statistics.median(values)
        print(
            f"{name:<32} best {best:6.3f} s  median {median:6.3f} s   "
            f"speed-up {reference_best / best:5.2f}x (best) {reference_median / median:5.2f}x (median)"
        )


if __name__ == "__main__":
    main()
