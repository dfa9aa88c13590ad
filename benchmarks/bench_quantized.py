"""Quantized linear layers, one product at a time: float32 against int8 / int4 on each route, by row count.

For each weight shape and number of rows (tokens) it times our float32 product (`linear`, oneDNN where it
runs) and a QuantizedLinear of the same weight on its kernel route (torch's int8 / int4 weight-only kernels,
bfloat16 activations) and on its dequantize route (weight dequantized into the reused buffer, then the float
product: bfloat16 on CPUs with bfloat16 instructions, float32 elsewhere), prints milliseconds, and the
largest row count where the kernel beats dequantizing: the crossover that
idefics2.modeling.kernels.QUANTIZED_KERNEL_MAX_ROWS encodes.

`--emulate-avx2` runs it again in a child process limited to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2,
ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2), as on an AMD Zen3.

    python benchmarks/bench_quantized.py                       # the "mid" config's decoder shapes
    python benchmarks/bench_quantized.py --shapes 4096x14336 14336x4096 --emulate-avx2
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
