"""Quantized linear layers, one product at a time: float32 against int8 / int4 on each route, by row count.

For each weight shape and number of rows (tokens) it times our float32 product (`linear`, oneDNN where it
runs) and a QuantizedLinear of the same weight on its kernel route (torch's int8 / int4 weight-only kernels,
bfloat16 activations) and on its dequantize route (weight dequantized into the reused buffer, then the float
product: bfloat16 on CPUs with bfloat16 instructions, float32 elsewhere), prints milliseconds, and the
largest row count where the kernel beats dequantizing: the crossover that
idefics2.modeling.kernels.QUANTIZED_KERNEL_MAX_ROWS encodes.

`--emulate-avx2` runs it again in a child process limited to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2,
ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2), as on an AMD Zen3.

`--calibration` measures instead the logits error of int4 (each `--calibration-groups` size) against
float32, plain and with activation-aware calibration (model.quantize(..., calibration=...); see
idefics2.quantization.calibration), as max |diff| / max |logit| per prompt, mean and max over the prompts:
on the built-in model (trained; calibrated on 4 shapes questions, measured on 8 others) and on the "mid"
random checkpoint (calibrated on 4 rows of 128 random tokens, measured on 4 others; text only).

    python benchmarks/bench_quantized.py                       # the "mid" config's decoder shapes
    python benchmarks/bench_quantized.py --shapes 4096x14336 14336x4096 --emulate-avx2
    python benchmarks/bench_quantized.py --calibration --calibration-groups 128 32
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time

import torch

from idefics2.modeling import kernels
from idefics2.modeling.attention import linear
from idefics2.quantization import QuantizedLinear

MID_SHAPES = ["1024x1024", "2560x1024", "1024x2560", "32003x1024"]  # out x in: attention, MLP, lm_head


def time_ms(fn, min_seconds: float = 0.2) -> float:
    """The fastest of 7 batches of calls, each lasting about min_seconds / 7 (the minimum: the batch least
    disturbed by other processes on a shared machine)."""
    fn()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < min_seconds / 7 or calls < 2:
        fn()
        calls += 1
    batches = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        batches.append((time.perf_counter() - start) / calls)
    return min(batches) * 1e3


def dequantize_route(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """The layer as it runs when its kernel is not taken (bfloat16 product on CPUs with bf16 instructions)."""
    with kernels.force(int8_weight_kernel=False, int4_weight_kernel=False):
        return layer(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="*", default=MID_SHAPES, help="OUTxIN weight shapes")
    parser.add_argument("--rows", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32, 64, 256])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--emulate-avx2", action="store_true", help="run limited to AVX2 in a child process")
    parser.add_argument("--calibration", action="store_true", help="int4 logits error, plain and calibrated")
    parser.add_argument("--calibration-groups", type=int, nargs="+", default=[128, 32])
    args = parser.parse_args()
    if args.calibration:
        if args.threads:
            torch.set_num_threads(args.threads)
        return calibration_errors(args.calibration_groups)
    if args.emulate_avx2:
        command = [sys.executable, __file__, "--shapes", *args.shapes, "--rows", *map(str, args.rows)]
        command += ["--group-size", str(args.group_size)]
        command += ["--threads", str(args.threads)] if args.threads else []
        sys.exit(subprocess.run(command, env={**os.environ, **kernels.AVX2_ONLY_ENV}).returncode)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads; int8 kernel: {kernels.int8_weight_kernel('cpu')}, "
          f"int4 layout: {kernels.int4_weight_layout('cpu')}")  # fmt: skip
    torch.manual_seed(0)
    with torch.inference_mode():
        for shape in args.shapes:
            n, k = map(int, shape.split("x"))
            weight = torch.randn(n, k) * 0.02
            layers = {b: QuantizedLinear.from_float(weight, None, b, args.group_size) for b in (8, 4)}
            print(f"\n{n}x{k} (ms)    rows: " + "".join(f"{m:>9}" for m in args.rows))
            rows: dict[str, list[float]] = {}
            for m in args.rows:
                x = torch.randn(m, k)
                rows.setdefault("float32", []).append(time_ms(lambda x=x, w=weight: linear(x, w)))
                for bits, layer in layers.items():
                    kernel = layer._kernel_product
                    if kernel(x) is not None:
                        rows.setdefault(f"int{bits} kernel", []).append(time_ms(lambda x=x, f=kernel: f(x)))
                    rows.setdefault(f"int{bits} dequantize", []).append(
                        time_ms(lambda x=x, layer=layer: dequantize_route(layer, x))
                    )
            for name, values in rows.items():
                print(f"{name:<22}" + "".join(f"{v:9.3f}" for v in values))
            for bits in (8, 4):
                kernel, dequant = rows.get(f"int{bits} kernel"), rows[f"int{bits} dequantize"]
                if kernel:
                    faster = [m for m, a, b in zip(args.rows, kernel, dequant, strict=True) if a < b]
                    print(f"int{bits}: kernel faster than dequantizing up to {max(faster, default=0)} rows; "
                          f"1 row: {rows['float32'][0] / kernel[0]:.2f}x float32")  # fmt: skip


def relative_error(model, reference, prompts: list[dict]) -> list[float]:
    errors = []
    with torch.inference_mode():
        for inputs in prompts:
            got, want = model(**inputs).logits.double(), reference(**inputs).logits.double()
            errors.append(float((got - want).abs().max() / want.abs().max()))
    return errors


def calibration_errors(group_sizes: list[int]) -> None:
    """Print int4's logits error against float32, plain and calibrated, per group size and model."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_generation import MID_CONFIG
    from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Processor
    from idefics2.assets import builtin_model_dir
    from idefics2.shapes import make_dataset

    folder = builtin_model_dir()
    processor = Idefics2Processor.from_pretrained(folder)

    def shapes_inputs(example) -> dict:
        prompt = processor.apply_chat_template(example.messages(), add_generation_prompt=True)
        return dict(processor(text=prompt, images=[example.images()], return_tensors="pt"))

    torch.manual_seed(0)
    mid = Idefics2ForConditionalGeneration(Idefics2Config.from_dict(copy.deepcopy(MID_CONFIG))).eval()
    tokens = torch.randint(3, 32000, (8, 1, 128), generator=torch.Generator().manual_seed(0))
    cases = {
        "built-in": (
            Idefics2ForConditionalGeneration.from_pretrained(folder).eval(),
            [shapes_inputs(e) for e in make_dataset(1, seed=1)[:4]],
            [shapes_inputs(e) for e in make_dataset(2, seed=7)[:8]],
        ),
        "mid": (mid, list(tokens[:4]), [{"input_ids": t} for t in tokens[4:]]),
    }
    print(f"{'model':<10}{'group':>6}{'plain mean':>12}{'plain max':>11}{'calibrated mean':>17}"
          f"{'calibrated max':>16}{'calibration s':>15}")  # fmt: skip
    for name, (model, calibration, prompts) in cases.items():
        for group in group_sizes:
            plain = relative_error(copy.deepcopy(model).quantize("int4", group_size=group), model, prompts)
            start = time.perf_counter()
            calibrated = copy.deepcopy(model).quantize("int4", group_size=group, calibration=calibration)
            seconds = time.perf_counter() - start
            calibrated_errors = relative_error(calibrated, model, prompts)
            print(f"{name:<10}{group:>6}{sum(plain) / len(plain):12.4f}{max(plain):11.4f}"
                  f"{sum(calibrated_errors) / len(calibrated_errors):17.4f}{max(calibrated_errors):16.4f}"
                  f"{seconds:15.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
