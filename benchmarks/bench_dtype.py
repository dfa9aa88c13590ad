"""Which dtype is fastest on this CPU: our float32 against our bfloat16, one chat turn on the "mid" config.

Runs the same chat turn as bench.py (one 480x640 image, image splitting on, greedy) with float32 and with
bfloat16 weights, alternately, and prints prefill, decode batch 1 and whole-turn latency for each, the kernel
routes taken (see idefics2.modeling.kernels) and the dtype `--dtype auto` picks on this machine.

`--emulate-avx2` runs it again in a child process whose oneDNN and ATen kernels are limited to AVX2
(ONEDNN_MAX_CPU_ISA=AVX2, ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2): the instruction set of a
CPU without AVX-512 and bfloat16 instructions, such as AMD Zen3, on a machine that has them. Memory bandwidth
and clocks stay this machine's.

    python benchmarks/bench_dtype.py [--repeats 3] [--new-tokens 24] [--emulate-avx2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import build_processors, chat_turn  # noqa: E402
from bench_generation import MID_CONFIG, photo_like  # noqa: E402


def build_model(dtype: torch.dtype):
    import copy

    from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration

    torch.manual_seed(0)
    model = Idefics2ForConditionalGeneration(Idefics2Config.from_dict(copy.deepcopy(MID_CONFIG)))
    return model.to(dtype).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--emulate-avx2", action="store_true", help="run limited to AVX2 in a child process")
    args = parser.parse_args()
    from idefics2.modeling import kernels
    from idefics2.modeling.kernels import fastest_dtype

    if args.emulate_avx2:
        env = {**os.environ, **kernels.AVX2_ONLY_ENV}
        command = [sys.executable, __file__, "--repeats", str(args.repeats)]
        command += ["--new-tokens", str(args.new_tokens)]
        sys.exit(subprocess.run(command, env=env).returncode)

    device = torch.device("cpu")
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"bfloat16 instructions: {kernels.native_bfloat16()}; oneDNN linear float32 / bfloat16: "
          f"{kernels.onednn_linear(torch.float32)} / {kernels.onednn_linear(torch.bfloat16)}")  # fmt: skip
    image = photo_like()
    models = {"float32": build_model(torch.float32), "bfloat16": build_model(torch.bfloat16)}
    with tempfile.TemporaryDirectory() as folder:
        processor, _ = build_processors(Path(folder))
    runs: dict[str, list[dict]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            runs[name].append(chat_turn(model, processor, image, args.new_tokens, device, ours=True))
    rows = [("prefill_s", "prefill", "s"), ("decode_b1_tok_s", "decode batch 1", "tok/s"),
            ("chat_latency_s", "chat latency", "s")]  # fmt: skip
    print(f"{'':<16}{'float32':>12}{'bfloat16':>12}{'bf16 / f32':>12}")
    for key, label, unit in rows:
        f32 = statistics.median(r[key] for r in runs["float32"])
        bf16 = statistics.median(r[key] for r in runs["bfloat16"])
        speedup = bf16 / f32 if unit == "tok/s" else f32 / bf16
        print(f"{label:<16}{f32:>10.3f} {unit:<1}{bf16:>10.3f} {unit:<1}{speedup:>11.2f}x")
    print(f"--dtype auto picks {fastest_dtype('cpu')} here")


if __name__ == "__main__":
    main()
