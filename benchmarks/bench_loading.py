"""Peak memory (RSS) while loading a checkpoint, as a multiple of the weights' size.

Builds a random Idefics2 checkpoint of about --size-mb megabytes (float32), then loads it in a fresh Python
process and reads the kernel's high-water mark of resident memory (VmHWM) around `from_pretrained`:

    ratio = (peak RSS during loading - RSS before loading) / bytes of the weights

It also reports the RSS once every weight has been read (a forward pass touches them all), and the same
figures for a load that converts the dtype. Goal: ratio <= 1.3. Linux only (reads /proc/self/status).

`--quantize int8 int4` also loads the float32 checkpoint quantized (decoder), one tensor at a time: there
the ratio is against the quantized model's resident bytes, and the peak is also shown against the float32
weights' size.

    python benchmarks/bench_loading.py [--size-mb 300] [--folder /tmp/idefics2-bench] [--transformers]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MEASURE = r"""
import json, sys, time
import torch

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)

folder, dtype, which, quantize = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
options = {} if quantize == "none" else {"quantize": quantize}
if which == "transformers":
    from transformers import Idefics2ForConditionalGeneration
else:
    from idefics2 import Idefics2ForConditionalGeneration
before = rss("VmRSS:")
start = time.perf_counter()
model = Idefics2ForConditionalGeneration.from_pretrained(folder, dtype=getattr(torch, dtype), **options)
seconds = time.perf_counter() - start
peak = rss("VmHWM:")
after_load = rss("VmRSS:")
tensors = [*model.parameters(), *model.buffers()]
with torch.no_grad():
    checksum = sum(float(t.float().sum()) for t in tensors)  # reads every weight
touched = rss("VmRSS:")
weights = sum(t.numel() * t.element_size() for t in tensors)
print(json.dumps(dict(before=before, peak=peak, after_load=after_load, touched=touched, weights=weights,
                      seconds=seconds, finite=checksum == checksum)))
"""


def build_checkpoint(folder: Path, size_mb: int) -> int:
    """Save a random float32 Idefics2 of about size_mb megabytes; returns the weights' bytes."""
    import torch

    from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration

    hidden = 512
    per_layer = 4 * (
        3 * hidden * 4 * hidden + 2 * hidden * hidden + 2 * hidden * hidden // 4
    )  # MLP + attention
    embeddings = 4 * 2 * 32003 * hidden
    layers = max(1, (size_mb * 10**6 - embeddings) // per_layer)
    config = Idefics2Config.from_dict({
        "vision_config": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "image_size": 224, "patch_size": 14},
        "perceiver_config": {"resampler_n_latents": 16, "resampler_depth": 2, "resampler_n_heads": 8,
                             "resampler_head_dim": 64, "num_key_value_heads": 2},
        "text_config": {"vocab_size": 32003, "hidden_size": hidden, "intermediate_size": 4 * hidden,
                        "num_hidden_layers": int(layers), "num_attention_heads": 8, "num_key_value_heads": 2},
    })  # fmt: skip
    torch.manual_seed(0)
    model = Idefics2ForConditionalGeneration(config)
    model.save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def measure(folder: Path, dtype: str, which: str, quantize: str = "none") -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, str(folder), dtype, which, quantize], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=300, help="checkpoint size to build (float32)")
    parser.add_argument(
        "--folder", type=Path, default=None, help="where to build it (default: a temp folder)"
    )
    parser.add_argument("--transformers", action="store_true", help="also measure transformers' loader")
    parser.add_argument("--quantize", nargs="*", default=[], choices=["int8", "int4"],
                        help="also load it quantized (decoder) while loading")  # fmt: skip
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp) / "checkpoint"
        if not (folder / "config.json").is_file():
            build_checkpoint(folder, args.size_mb)
        file_mb = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e6
        print(f"checkpoint: {folder} ({file_mb:.0f} MB of safetensors, float32)")
        runs = [("idefics2", "float32", "none"), ("idefics2", "bfloat16", "none")]
        runs += [("idefics2", "float32", mode) for mode in args.quantize]
        if args.transformers:
            runs += [("transformers", "float32", "none")]
        float_bytes = None
        for which, dtype, quantize in runs:
            r = measure(folder, dtype, which, quantize)
            w = r["weights"]
            float_bytes = float_bytes or w
            label = dtype if quantize == "none" else quantize
            against_float = (
                f" ({(r['peak'] - r['before']) / float_bytes:4.2f}x float32)" if quantize != "none" else ""
            )
            print(
                f"{which:>12} {label:>8}: weights {w / 1e6:6.0f} MB | peak during load "
                f"{(r['peak'] - r['before']) / w:4.2f}x{against_float} | after load "
                f"{(r['after_load'] - r['before']) / w:4.2f}x"
                f" | all weights read {(r['touched'] - r['before']) / w:4.2f}x | {r['seconds']:.2f} s"
            )


if __name__ == "__main__":
    main()
