"""Idefics2 at idefics2-8b's shapes on CPU: ours against transformers in bfloat16 on one set of weights, then
ours with the decoder in int8 and in int4, and the rate at which each decode step reads its weights.

The "mid" checkpoint of bench.py (246M parameters, 467 MB in float32) partly stays in a large last-level
cache from one decode step to the next; at the real shapes (8.4B parameters, 16.8 GB in bfloat16) every step
streams its weights from memory, as a user's does. Memory decides the layout of the run (a 24 GB machine
holds one bfloat16 copy of the weights, not two), in two processes one after the other:

1. ours in bfloat16 with random weights built in place (seed 0); transformers' model (sdpa) built without
   its own initialization and given the very same tensors (`load_state_dict(assign=True)`: no second copy).
   A warm-up chat turn of each (our kernel choices are measured there when the choices file is cold: the
   measuring time is printed), then `--repeats` turns of each in turns: one 480x640 image with splitting and
   greedy decoding of `--new-tokens`, the read bandwidth measured after each turn;
2. ours again (the same weights), a copy of it sharing every tensor quantized to int4 (group 128), then ours
   quantized to int8 in place (its bfloat16 decoder weights freed layer by layer); the same turns.

Printed per model: prefill (vision tower, connector and prompt) seconds, decode tokens/s at batch 1
(1 / median time between tokens), the bytes of weights a step reads, the rate it reads them at and its
fraction of the measured read bandwidth; the greedy tokens ours and transformers agree on and their
logits' relative difference on the prompt (both in bfloat16); and each process's peak resident memory.

    python benchmarks/bench_cpu_8b.py --threads 2                  # ~15 minutes on a 2-core Intel Xeon
    python benchmarks/bench_cpu_8b.py --threads 2 --modes bf16     # without the quantized models
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import (  # noqa: E402
    CONFIG_8B,
    PROMPT,
    build_processors,
    chat_turn,
    logits_relative_diff,
    peak_resident_bytes,
    resident_bytes,
    weight_footprint,
)
from bench_generation import built_in, photo_like  # noqa: E402
from idefics2.modeling import ckernels, cpu, kernels  # noqa: E402


def build_ours(seed: int = 0):
    """Ours at idefics2-8b's shapes in bfloat16 on CPU, random weights built in place."""
    from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration

    start = time.perf_counter()
    torch.manual_seed(seed)
    with built_in(torch.bfloat16, "cpu"):
        ours = Idefics2ForConditionalGeneration(Idefics2Config.from_dict(copy.deepcopy(CONFIG_8B)))
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"idefics2-8b shapes, {n_params / 1e9:.2f}B parameters, random bfloat16 weights, built in "
          f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
    return ours.eval()


def build_shared(seed: int = 0):
    """(ours, transformers') in bfloat16 on CPU, holding the same weight tensors."""
    from transformers import Idefics2Config as RefConfig
    from transformers import Idefics2ForConditionalGeneration as RefModel
    from transformers.initialization import no_init_weights

    ours = build_ours(seed)
    with built_in(torch.bfloat16, "cpu"):
        ref_config = RefConfig(**copy.deepcopy(CONFIG_8B))
        with no_init_weights():  # its parameters are allocated, never written: no memory is touched
            reference = RefModel._from_config(ref_config, dtype=torch.bfloat16, attn_implementation="sdpa")
    reference.load_state_dict(ours.state_dict(), assign=True)
    ours_storage = {t.data_ptr() for t in ours.state_dict().values()}
    assert all(t.data_ptr() in ours_storage for t in reference.state_dict().values()), "weights not shared"
    return ours, reference.eval()


_highest_resident = [0]


def resident_gb() -> float:
    """This process's resident set now, in GB; the highest resident set since the last sample (the kernel's
    high-water mark, which each chat turn resets at its start) is kept for the phase's peak."""
    _highest_resident[0] = max(_highest_resident[0], peak_resident_bytes())
    return resident_bytes() / 1e9


def sharing_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose parameters and buffers are `model`'s own tensors (new modules, no new
    memory): quantizing it replaces its layers and leaves `model`'s alone."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def step_bytes(model, screened: bool) -> int:
    """Bytes of weights one decode step reads (decoder layers, final norm, head: bench.weight_footprint);
    `screened`: its greedy steps read the float head's int8 copy instead (ckernels.HeadScreen)."""
    footprint = weight_footprint(model)["decode_step_bytes"]
    if not screened:  # (only a float head has the int8 copy: a quantized head is read as it is)
        return footprint
    head = model.lm_head.weight
    vocab, dim = head.shape
    return footprint - head.numel() * head.element_size() + vocab * (dim + 16)


def run_turns(models: dict, image, args) -> tuple[dict[str, list[dict]], dict[str, list[int]]]:
    """A warm-up turn of each model, then `args.repeats` timed turns of each, in turns: (runs, the new tokens
    of each model's last turn)."""
    with tempfile.TemporaryDirectory() as tmp:
        our_processor, ref_processor = build_processors(Path(tmp))
    cpu_device = torch.device("cpu")
    runs: dict[str, list[dict]] = {name: [] for name in models}
    tokens: dict[str, list[int]] = {}
    for name, model in models.items():  # warm-up: first calls, kernel choices
        processor = ref_processor if name == "transformers" else our_processor
        before, start = kernels.measuring_seconds(), time.perf_counter()
        chat_turn(model, processor, image, 2, cpu_device, ours=name != "transformers")
        print(f"  {name}: warm-up turn {time.perf_counter() - start:.1f} s, of which measuring kernels "
              f"{kernels.measuring_seconds() - before:.1f} s; resident {resident_gb():.1f} GB",
              flush=True)  # fmt: skip
    for _ in range(args.repeats):
        for name, model in models.items():
            processor = ref_processor if name == "transformers" else our_processor
            tokens[name] = []
            screened_before = ckernels.screen_counts()[0] if ckernels.available() else 0
            run = chat_turn(model, processor, image, args.new_tokens, cpu_device,
                            ours=name != "transformers", tokens=tokens[name])  # fmt: skip
            resident_gb()  # (the turn's high-water mark, before the bandwidth measure's buffer)
            run["read_bandwidth_gbs"] = kernels.read_bandwidth() / 1e9
            screened = ckernels.available() and ckernels.screen_counts()[0] > screened_before
            run["decode_step_mb"] = step_bytes(model, screened and name != "transformers") / 1e6
            run["decode_gbs"] = run["decode_step_mb"] * run["decode_b1_tok_s"] / 1e3
            run["bandwidth_fraction"] = run["decode_gbs"] / run["read_bandwidth_gbs"]
            runs[name].append(run)
            print(f"  {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in run.items()), flush=True)
    return runs, tokens


def bf16_phase(args) -> dict:
    """Transformers and ours in bfloat16 on the same tensors."""
    ours, reference = build_shared()
    image = photo_like()
    runs, tokens = run_turns({"transformers": reference, "ours bf16": ours}, image, args)
    first, second = tokens["transformers"], tokens["ours bf16"]
    agree = next((i for i, (a, b) in enumerate(zip(first, second, strict=True)) if a != b), len(first))
    with tempfile.TemporaryDirectory() as tmp:
        processor, _ = build_processors(Path(tmp))
    with torch.inference_mode():
        prompt = processor.apply_chat_template(PROMPT, add_generation_prompt=True)
        inputs = dict(processor(text=prompt, images=[[image]], return_tensors="pt"))
    diff = logits_relative_diff(ours, reference, inputs)
    print(f"ours and transformers (bfloat16): the first {agree} of {len(first)} greedy tokens agree; logits "
          f"relative difference on the prompt {diff:.2e}", flush=True)  # fmt: skip
    return {"runs": runs, "tokens": tokens, "greedy_tokens_agreeing": agree, "logits_relative_diff": diff}


def quantized_phase(args) -> dict:
    """Ours with the decoder in int4 (a copy sharing the other tensors) and in int8 (in place)."""
    ours = build_ours()
    models = {}
    if "int4" in args.modes:
        start = time.perf_counter()
        models["ours int4"] = sharing_copy(ours).quantize("int4", group_size=128)
        print(f"int4 (group 128) in {time.perf_counter() - start:.0f} s; "
              f"resident {resident_gb():.1f} GB", flush=True)  # fmt: skip
    if "int8" in args.modes:
        start = time.perf_counter()
        models["ours int8"] = ours.quantize(
            "int8"
        )  # in place: its bfloat16 decoder weights go, layer by layer
        print(
            f"int8 in {time.perf_counter() - start:.0f} s; resident {resident_gb():.1f} GB",
            flush=True,
        )
    del ours
    gc.collect()
    runs, tokens = run_turns(dict(sorted(models.items())), photo_like(), args)
    return {"runs": runs, "tokens": tokens}


PHASES = {"bf16": bf16_phase, "quantized": quantized_phase}


def print_summary(runs: dict[str, list[dict]], args) -> dict[str, float]:
    """The medians' table and the ratios; returns the ratios."""
    medians = {
        name: {key: statistics.median(run[key] for run in r) for key in r[0]} for name, r in runs.items()
    }
    print(f"\nidefics2-8b shapes, medians of {args.repeats} repeats, {args.new_tokens} new tokens")
    print(f"{'':16}{'prefill s':>11}{'decode tok/s':>14}{'MB/token':>10}{'GB/s':>8}{'of bandwidth':>14}"
          f"{'read GB/s':>11}")  # fmt: skip
    for name, m in medians.items():
        print(f"{name:16}{m['prefill_s']:11.2f}{m['decode_b1_tok_s']:14.3f}{m['decode_step_mb']:10.0f}"
              f"{m['decode_gbs']:8.1f}{m['bandwidth_fraction']:14.0%}"
              f"{m['read_bandwidth_gbs']:11.1f}")  # fmt: skip
    ratios, decode = {}, {name: m["decode_b1_tok_s"] for name, m in medians.items()}
    if "transformers" in medians:
        ratios["our bf16 decode / transformers bf16"] = decode["ours bf16"] / decode["transformers"]
        ratios["our bf16 prefill / transformers bf16"] = (
            medians["transformers"]["prefill_s"] / medians["ours bf16"]["prefill_s"]
        )
    for mode in ("int8", "int4"):
        for base in ("ours bf16", "transformers"):
            if f"ours {mode}" in decode and base in decode:
                ratios[f"our {mode} decode / {base.replace('ours', 'our')}"] = (
                    decode[f"ours {mode}"] / decode[base]
                )
    for label, value in ratios.items():
        print(f"{label}: {value:.2f}x")
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=8)
    modes = ["bf16", "int8", "int4"]
    parser.add_argument("--modes", nargs="+", default=modes, choices=modes)
    parser.add_argument("--json", default="bench_cpu_8b_results.json", help="where to write the results")
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)  # (a child process's part)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.phase:  # one part, in a process of its own: its memory is the machine's again when it ends
        result = PHASES[args.phase](args)
        resident_gb()
        result["peak_resident_gb"] = _highest_resident[0] / 1e9
        result["measuring_s"] = kernels.measuring_seconds()
        Path(args.json).write_text(json.dumps(result))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu.cpu_description()['model']}; "
          f"kernel choices in {kernels.cache_path()}", flush=True)  # fmt: skip
    phases = (["bf16"] if "bf16" in args.modes else []) + (
        ["quantized"] if {"int8", "int4"} & set(args.modes) else []
    )
    summary: dict = {"cpu": cpu.cpu_description()["model"], "threads": torch.get_num_threads(),
                     "new_tokens": args.new_tokens, "repeats": args.repeats, "phases": {}}  # fmt: skip
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for phase in phases:
            out = Path(tmp) / f"{phase}.json"
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--phase", phase, "--json", str(out)],
                           check=True)  # fmt: skip
            result = json.loads(out.read_text())
            runs.update(result.pop("runs"))
            summary["phases"][phase] = result
            print(f"({phase}: peak resident memory {result['peak_resident_gb']:.1f} GB, kernels measured "
                  f"{result['measuring_s']:.1f} s)", flush=True)  # fmt: skip
    summary["runs"] = runs
    summary["ratios"] = print_summary(runs, args)
    print(f"load average {os.getloadavg()[0]:.1f}")
    Path(args.json).write_text(json.dumps(summary, indent=1))
    print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
