"""Idefics2 speed, ours against transformers, in one process on the same weights and inputs.

One chat turn with one 480x640 image (image splitting on: 4 crops + the image) on random weights, greedy
decoding of a fixed number of tokens. Each repeat runs transformers (sdpa) then ours, back to back, so both
see the same machine load; the table shows medians over the repeats. Rows:

  preprocessing     chat template + processor (text and image) -> tensors
  prefill           tensors in -> first new token out (vision tower + connector + prompt)
  time to first tok preprocessing + prefill
  decode b1 / bN    new tokens per second after the first (CPU: 1 / median step time; CUDA: over the whole
                    decode, without waiting for each token; batch N: N text prompts)
  chat latency      end to end: messages + image in -> reply text out (preprocessing + prefill + decode)
  peak memory       peak above the level before the chat turn (CPU: resident set; CUDA: allocated bytes)

plus the decode bandwidth achieved (weight bytes read per step x steps per second) against the machine's
read bandwidth measured right after each run (idefics2.modeling.kernels.read_bandwidth, as `idefics2
kernels` measures it: the fastest of five sums over a buffer of 4x the last-level cache, at least 256 MiB;
median of the per-run fractions), and our bfloat16 mode
(prefill and decode, logits' relative difference to float32).

`--quantize int8 int4` adds our model with its decoder quantized (idefics2.quantization), with the weights'
resident bytes against float32 (the quantized layers, the bytes a decode step reads, the whole model) and the
logits' relative difference to float32; int4 once per `--int4-group-sizes` (default 128), each with its
error against a float32 model holding the int4 weights dequantized (the kernels' own error: the format's
rounding is not in it).

The decode-limit table gives, per model, decode tokens/s at batch 1, the weight bytes one step reads,
the rate at which those bytes are read (GB/s) and its fraction of this machine's measured read bandwidth.

    python benchmarks/bench.py                                   # CPU, "mid" config (~246M parameters)
    python benchmarks/bench.py --repeats 1 --new-tokens 8        # quicker
    python benchmarks/bench.py --device cuda --config 8b         # GPU, real idefics2-8b shapes, bf16
    python benchmarks/bench.py --quantize int8 int4 --no-bf16   # CPU: quantized decoder against float32
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_generation import (  # noqa: E402
    MID_CONFIG,
    PROMPT,
    built_in,
    decode_weight_bytes,
    photo_like,
    sync,
)
from idefics2.modeling import ckernels, kernels  # noqa: E402

# The hub idefics2-8b shapes (vision SigLIP-so400m, perceiver 64 latents, Mistral-7B decoder).
CONFIG_8B = {
    "image_token_id": 32001,
    "tie_word_embeddings": False,
    "vision_config": {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "image_size": 980,
        "patch_size": 14,
    },
    "perceiver_config": {
        "hidden_size": 4096,
        "resampler_n_latents": 64,
        "resampler_depth": 3,
        "resampler_n_heads": 16,
        "resampler_head_dim": 96,
        "num_key_value_heads": 4,
    },
    "text_config": {
        "model_type": "mistral",
        "vocab_size": 32003,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "pad_token_id": 0,
    },
}
CONFIGS = {"mid": MID_CONFIG, "8b": CONFIG_8B}


def text_prompts(n: int) -> list[str]:
    return [f"Question {i}: name {i % 7 + 2} colours that go well with a grey sofa." for i in range(n)]


# ---- memory --------------------------------------------------------------------------------------------


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_resident() -> None:
    """Set this process's peak resident set (the kernel's VmHWM) back to its current size (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_resident_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocated bytes, or the CPU resident set's high-water mark
    (the heap's free memory is handed back to the system at entry, so an earlier run's freed blocks do not
    hide this run's peak; malloc keeps its usual settings, so timings are those a user gets)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        libc = _libc()
        if libc is not None:
            libc.malloc_trim(0)
        reset_peak_resident()
        self.base = resident_bytes()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = peak_resident_bytes()

    @property
    def megabytes(self) -> float:
        return (self.peak - self.base) / 1e6


# ---- models ----------------------------------------------------------------------------------------------


def build_models(config: dict, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """(ours, transformers') on the same random weights, built in place on `device` (no download, no disk)."""
    from transformers import Idefics2Config as RefConfig
    from transformers import Idefics2ForConditionalGeneration as RefModel

    from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration

    torch.manual_seed(seed)
    with built_in(dtype, device):
        ours = Idefics2ForConditionalGeneration(Idefics2Config.from_dict(copy.deepcopy(config)))
        ref_config = RefConfig(**copy.deepcopy(config))
        ref_config._attn_implementation = "sdpa"
        reference = RefModel._from_config(ref_config, dtype=dtype, attn_implementation="sdpa")
    reference.load_state_dict(ours.state_dict())
    return ours.eval(), reference.eval()


def build_processors(folder: Path):
    from transformers import Idefics2Processor as RefProcessor

    from idefics2 import Idefics2Processor
    from oracle_processing import build_reference_processor

    build_reference_processor(folder, image_seq_len=64, do_image_splitting=True)
    return Idefics2Processor.from_pretrained(folder), RefProcessor.from_pretrained(folder)


# ---- one chat turn ---------------------------------------------------------------------------------------


class TokenClock:
    """Time of every new token; a streamer for transformers (put/end, prompt first) and ours (callable).

    On CPU each token's time is exact and the decode rate is 1 / the median time between tokens (robust to
    other processes' bursts). On CUDA only the first token is waited for: waiting for every token would
    stall the GPU while the host does its per-token bookkeeping, so the rate there is the tokens after the
    first over the time from the first to the end of generation (`finish`).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []
        self.start = time.perf_counter()
        self.finished_at = 0.0
        self.each_token = device.type != "cuda"
        self._prompt_seen = False

    def put(self, value):
        if self._prompt_seen:
            self(value)
        self._prompt_seen = True

    def end(self):
        pass

    def __call__(self, tokens):
        if self.each_token or not self.times:
            sync(self.device)
        self.times.append(time.perf_counter())

    def finish(self) -> None:
        sync(self.device)
        self.finished_at = time.perf_counter()

    def prefill_s(self) -> float:
        return self.times[0] - self.start

    def decode_tokens_per_s(self) -> float:
        if self.each_token:
            return 1.0 / statistics.median(b - a for a, b in zip(self.times, self.times[1:], strict=False))
        return (len(self.times) - 1) / (self.finished_at - self.times[0])


def chat_turn(
    model, processor, image, new_tokens: int, device: torch.device, ours: bool, tokens: list | None = None
) -> dict:
    """Time one turn: template + processing, prefill, decode, detokenize; and its peak memory. `tokens`: a
    list the new token ids are appended to."""
    clock = TokenClock(device)
    with PeakMemory(device) as memory, torch.inference_mode():
        sync(device)
        start = time.perf_counter()
        prompt = processor.apply_chat_template(PROMPT, add_generation_prompt=True)
        if ours and device.type == "cuda":
            inputs = processor(
                text=prompt, images=[[image]], return_tensors="pt", backend="torch", device=device
            )
        else:
            inputs = processor(text=prompt, images=[[image]], return_tensors="pt").to(device)
        sync(device)
        clock.start = processed = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=2, pad_token_id=0, streamer=clock)  # fmt: skip
        clock.finish()
        text = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        end = time.perf_counter()
    assert len(clock.times) == new_tokens and text, (len(clock.times), text)
    if tokens is not None:
        tokens.extend(out[0, inputs["input_ids"].shape[1] :].tolist())
    return {
        "preprocessing_s": processed - start,
        "prefill_s": clock.prefill_s(),
        "ttft_s": processed - start + clock.prefill_s(),
        "decode_b1_tok_s": clock.decode_tokens_per_s(),
        "chat_latency_s": end - start,
        "peak_memory_mb": memory.megabytes,
    }


def batch_decode_rate(model, inputs: dict, new_tokens: int, device: torch.device) -> float:
    """Tokens per second summed over the rows of a text-only batch."""
    clock = TokenClock(device)
    with torch.inference_mode():
        clock.start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       eos_token_id=2, pad_token_id=0, streamer=clock)  # fmt: skip
    clock.finish()
    return clock.decode_tokens_per_s() * inputs["input_ids"].shape[0]


def logits_relative_diff(fast, slow, inputs: dict) -> float:
    """max |fast - slow| / max |slow| over the prompt's logits."""
    with torch.inference_mode():
        a = fast(**inputs).logits.double()
        b = slow(**inputs).logits.double()
    return ((a - b).abs().max() / b.abs().max()).item()


# ---- report ----------------------------------------------------------------------------------------------

ROWS = [  # key, label, unit, higher is better
    ("preprocessing_s", "preprocessing", "s", False),
    ("prefill_s", "prefill (vision+connector+prompt)", "s", False),
    ("ttft_s", "time to first token", "s", False),
    ("decode_b1_tok_s", "decode batch 1", "tok/s", True),
    *((f"decode_b{n}_tok_s", f"decode batch {n}", "tok/s", True) for n in (2, 4, 8, 16, 32, 64)),
    ("chat_latency_s", "chat latency", "s", False),
    ("peak_memory_mb", "peak memory", "MB", False),
]


def median_of(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def print_table(results: dict[str, dict], names: list[str]) -> None:
    ref = results["transformers"]
    header = f"{'':36}" + "".join(f"{n:>16}" for n in names) + f"{'ours / ref':>12}"
    print(header)
    for key, label, unit, higher in ROWS:
        if key not in ref:
            continue
        cells = "".join(f"{results[n][key]:16.3f}" if key in results[n] else f"{'-':>16}" for n in names)
        ours = results["ours"][key]
        ratio = ours / ref[key] if higher else ref[key] / max(ours, 1e-9)
        print(f"{label + ' (' + unit + ')':36}{cells}{ratio:11.2f}x")
    print("(ours / ref: speed-up, or memory saving for peak memory; > 1 means ours is better)")


def tensor_bytes(modules) -> int:
    """Resident bytes of the parameters and buffers of these modules (each tensor once), with the kernel
    scales quantized layers keep beside their portable ones."""
    from idefics2.quantization import QuantizedLinear

    seen, total = set(), 0
    for module in modules:
        for sub in module.modules():
            tensors = [*sub.parameters(recurse=False), *sub.buffers(recurse=False)]
            if isinstance(sub, QuantizedLinear) and sub.kernel_scales is not None:
                tensors.append(sub.kernel_scales)
            for t in tensors:
                if id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
    return total


def weight_footprint(model) -> dict[str, int]:
    """Bytes of the decoder's linear layers (the part quantization targets), of what one decode step reads
    (decoder layers, final norm, lm_head) and of the whole model."""
    text = model.model.text_model
    linears = [m for layer in text.layers for m in layer.modules() if hasattr(m, "in_features")]
    return {
        "decoder_linear_bytes": tensor_bytes([*linears, model.lm_head]),
        "decode_step_bytes": tensor_bytes([text.layers, text.norm, model.lm_head]),
        "model_bytes": tensor_bytes([model]),
    }


def routes_of(name: str):
    """The kernel routes a model's runs take: measured (the default), or the preferred ones alone."""
    return kernels.preferred() if name == "ours preferred" else contextlib.nullcontext()


def quantized_names(modes: list[str], int4_group_sizes: list[int]) -> list[str]:
    """Model names of the quantized runs: "int8", "int4" (group 128) and "int4 gN" for other group sizes."""
    names = []
    for mode in modes:
        if mode == "int4":
            names += [f"int4 g{g}" if g != 128 else "int4" for g in int4_group_sizes]
        else:
            names.append(mode)
    return names


def dequantized_twin(float_model, quantized_model):
    """A float32 copy of `float_model` whose quantized layers hold `quantized_model`'s weights dequantized:
    the model a quantized model computes exactly, but for its kernels' rounding."""
    from idefics2.quantization import QuantizedLinear

    twin = copy.deepcopy(float_model)
    layers = dict(twin.named_modules())
    with torch.no_grad():
        for name, layer in quantized_model.named_modules():
            if isinstance(layer, QuantizedLinear):
                layers[name].weight.copy_(layer.dequantized_weight(torch.float32))
    return twin


def print_decode_limits(results: dict, models: dict) -> None:
    """Per model: decode tok/s at batch 1, weight bytes per step, the rate they are read at, and its
    fraction of the read bandwidth measured beside each run."""
    print(f"{'decode batch 1':<22}{'tok/s':>9}{'MB/token':>10}{'GB/s':>8}{'of bandwidth':>14}")
    for name in models:
        r = results[name]
        step = r["decode_step_mb"] * 1e6
        rate = step * r["decode_b1_tok_s"] / 1e9
        print(f"{name:<22}{r['decode_b1_tok_s']:9.1f}{step / 1e6:10.1f}{rate:8.2f}"
              f"{r['decode_bandwidth_fraction']:14.0%}")  # fmt: skip
    bandwidth = statistics.median(results[name]["read_bandwidth_gbs"] for name in models)
    print(f"(read bandwidth measured after each run, median {bandwidth:.1f} GB/s)")


def step_bytes_of(name: str, model, float32_step_bytes: int, screened: bool = False) -> int:
    """Bytes of weights one decode step of this model reads; `screened`: its greedy steps read the head's
    int8 copy (and its scales and bounds, ckernels.HeadScreen) instead of the float head."""
    if name.startswith("ours int"):
        return weight_footprint(model)["decode_step_bytes"]
    step = float32_step_bytes // 2 if name == "ours bf16" else float32_step_bytes
    head = model.lm_head.weight
    vocab, dim = head.shape
    return step - (head.numel() * head.element_size() - vocab * (dim + 16) if screened else 0)


def goals(results: dict, summary: dict, device: torch.device) -> dict[str, tuple[float, bool]]:
    """The issue's targets, each as (measured value, met)."""
    ref, ours = results["transformers"], results["ours"]
    out = {}
    if device.type == "cuda":
        out["decode b1 >= 150 tok/s"] = (ours["decode_b1_tok_s"], ours["decode_b1_tok_s"] >= 150)
        ratio = ours["decode_b1_tok_s"] / ref["decode_b1_tok_s"]
        out["decode b1 >= 4x transformers"] = (ratio, ratio >= 4)
        if "ours compiled" in results:
            compiled = results["ours compiled"]["decode_b1_tok_s"]
            out["compiled: decode b1 >= 150 tok/s"] = (compiled, compiled >= 150)
            ratio = compiled / ref["decode_b1_tok_s"]
            out["compiled: decode b1 >= 4x transformers"] = (ratio, ratio >= 4)
        out["time to first token <= 0.120 s"] = (ours["ttft_s"], ours["ttft_s"] <= 0.120)
        if "decode_b16_tok_s" in ours:
            ratio = ours["decode_b16_tok_s"] / ours["decode_b1_tok_s"]
            out["batch 16 throughput >= 8x batch 1"] = (ratio, ratio >= 8)
        return out
    # the CPU goals of the CPU-routes issue (2 threads)
    ratio = ours["decode_b1_tok_s"] / ref["decode_b1_tok_s"]
    out["float32 decode b1 >= 1.4x transformers"] = (ratio, ratio >= 1.4)
    fraction = summary["decode_bandwidth_fraction"]["ours"]
    out["float32 decode >= 70% of read bandwidth"] = (fraction, fraction >= 0.7)
    ratio = ref["prefill_s"] / ours["prefill_s"]
    out["float32 prefill >= 1.5x transformers"] = (ratio, ratio >= 1.5)
    if "bf16" in summary:
        ratio = results["ours bf16"]["decode_b1_tok_s"] / ours["decode_b1_tok_s"]
        out["bf16 decode b1 >= 1.7x our float32 (bf16 in hardware)"] = (ratio, ratio >= 1.7)
        speedup = summary["bf16"]["prefill_speedup_vs_float32"]
        out["bf16 prefill >= 1.5x our float32"] = (speedup, speedup >= 1.5)
    for mode, limit in (("int8", 0.3), ("int4", 0.17)):
        if f"ours {mode}" not in results:
            continue
        quantized = results[f"ours {mode}"]
        if mode == "int8":
            ratio = quantized["decode_b1_tok_s"] / ref["decode_b1_tok_s"]
            out["int8 decode b1 >= 3x transformers float32"] = (ratio, ratio >= 3)
            ratio = quantized["decode_b1_tok_s"] / ours["decode_b1_tok_s"]
            out["int8 decode b1 >= 1.8x our float32"] = (ratio, ratio >= 1.8)
        ratio = ours["prefill_s"] / quantized["prefill_s"]
        out[f"{mode} prefill no slower than our float32 (ratio >= 1)"] = (ratio, ratio >= 1.0)
        ratio = summary["quantized"][mode]["decoder_linear_bytes_ratio"]
        out[f"{mode} decoder weights resident <= {limit}x float32"] = (ratio, ratio <= limit)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", choices=sorted(CONFIGS), default="mid")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="main dtype (default: float32 on CPU, bfloat16 on CUDA)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[8], choices=[2, 4, 8, 16, 32, 64],
                        help="text-only batches whose decode rate is measured too")  # fmt: skip
    parser.add_argument("--no-bf16", action="store_true", help="skip our extra bfloat16 run (CPU)")
    parser.add_argument("--compile", action="store_true",
                        help="CUDA: also run ours with compiled decode steps (chat turn only)")  # fmt: skip
    parser.add_argument("--quantize", nargs="*", default=[], choices=["int8", "int4"],
                        help="also run ours with the decoder quantized (float32 elsewhere)")  # fmt: skip
    parser.add_argument("--preferred-routes", action="store_true",
                        help="also run ours with the preferred kernels (nothing measured)")  # fmt: skip
    parser.add_argument("--int4-group-sizes", type=int, nargs="+", default=[128], choices=[32, 64, 128, 256],
                        help="int4: one model per group size")  # fmt: skip
    parser.add_argument("--json", default="bench_results.json", help="where to write the results")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))

    ours, reference = build_models(CONFIGS[args.config], dtype, device)
    models = {"transformers": reference, "ours": ours}
    if device.type == "cpu" and dtype == torch.float32 and not args.no_bf16:
        models["ours bf16"] = copy.deepcopy(ours).to(torch.bfloat16)
    if args.preferred_routes:
        models["ours preferred"] = ours  # the same weights; run inside kernels.preferred()
    for mode in quantized_names(args.quantize, args.int4_group_sizes):
        bits, _, group = mode.partition(" g")
        models[f"ours {mode}"] = copy.deepcopy(ours).quantize(bits, group_size=int(group or 128))
    if device.type == "cuda" and args.compile:
        models["ours compiled"] = ours  # the same weights; compile_decode is switched on for its runs
    with tempfile.TemporaryDirectory() as tmp:
        our_processor, ref_processor = build_processors(Path(tmp))
    processors = {name: ref_processor if name == "transformers" else our_processor for name in models}

    image = photo_like()
    batches: dict[str, dict[int, dict]] = {name: {} for name in models}
    for name, processor in processors.items():
        processor.tokenizer.padding_side = "left"
        for n in args.batch_sizes:
            batches[name][n] = processor(text=text_prompts(n), padding=True, return_tensors="pt").to(device)

    step_bytes = decode_weight_bytes(ours)
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} CPU threads, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"config {args.config}: {n_params / 1e6:.0f}M parameters, random weights, {dtype}; "
          f"decode reads {step_bytes / 1e6:.0f} MB of weights per step")  # fmt: skip

    for name, model in models.items():  # warm-up (first-call allocations, kernel selection, compilation)
        ours.compile_decode = name == "ours compiled"
        with routes_of(name):
            chat_turn(model, processors[name], image, 2, device, ours=name != "transformers")
    print(f"kernels measured during the warm-up: {kernels.measuring_seconds():.2f} s "
          f"(choices in {kernels.cache_path()})")  # fmt: skip
    runs: dict[str, list[dict]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            ours.compile_decode = name == "ours compiled"
            screened_before = ckernels.screen_counts()[0] if ckernels.available() else 0
            with routes_of(name):
                run = chat_turn(
                    model, processors[name], image, args.new_tokens, device, ours=name != "transformers"
                )
            screened = ckernels.available() and ckernels.screen_counts()[0] > screened_before
            # the read bandwidth right after the decode it is compared with: on a shared host it drifts (this
            # project's VM reads 42-48 GB/s for a while, then ~80 GB/s for a while)
            run["read_bandwidth_gbs"] = kernels.read_bandwidth(device=device) / 1e9
            weight_bytes = step_bytes_of(name, model, step_bytes, screened)
            run["decode_step_mb"] = weight_bytes / 1e6
            run["decode_bandwidth_fraction"] = (
                weight_bytes * run["decode_b1_tok_s"] / 1e9 / run["read_bandwidth_gbs"]
            )
            for n, inputs in batches[name].items() if name != "ours compiled" else ():
                with routes_of(name):
                    run[f"decode_b{n}_tok_s"] = batch_decode_rate(model, inputs, args.new_tokens, device)
            runs[name].append(run)
            print(f"  {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in run.items()), flush=True)
    results = {name: median_of(r) for name, r in runs.items()}

    print(f"\nmedians of {args.repeats} interleaved repeats, {args.new_tokens} new tokens; "
          f"load average now {os.getloadavg()[0]:.1f} (other processes share these cores)\n")  # fmt: skip
    print_table(results, list(models))
    summary = {
        "config": args.config,
        "device": str(device),
        "dtype": str(dtype),
        "threads": torch.get_num_threads(),
        "parameters": n_params,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "decode_weight_bytes": step_bytes,
        "results": results,
        "runs": runs,
        "decode_bandwidth_fraction": {name: results[name]["decode_bandwidth_fraction"] for name in models},
    }
    if "ours bf16" in models:
        with torch.inference_mode():
            prompt = our_processor.apply_chat_template(PROMPT, add_generation_prompt=True)
            inputs = our_processor(text=prompt, images=[[image]], return_tensors="pt")
        diff = logits_relative_diff(models["ours bf16"], ours, dict(inputs))
        speedup = results["ours"]["prefill_s"] / results["ours bf16"]["prefill_s"]
        summary["bf16"] = {"logits_relative_diff": diff, "prefill_speedup_vs_float32": speedup}
        print(f"bf16: prefill {speedup:.2f}x our float32 prefill; logits relative difference to float32 "
              f"{diff:.2e}")  # fmt: skip
    print()
    print_decode_limits(results, models)
    if args.quantize:
        with torch.inference_mode():
            prompt = our_processor.apply_chat_template(PROMPT, add_generation_prompt=True)
            inputs = dict(our_processor(text=prompt, images=[[image]], return_tensors="pt").to(device))
        float_footprint = weight_footprint(ours)
        summary["quantized"] = {}
        for mode in quantized_names(args.quantize, args.int4_group_sizes):
            model = models[f"ours {mode}"]
            footprint = weight_footprint(model)
            entry = {key: footprint[key] for key in footprint}
            entry.update({f"{key}_ratio": footprint[key] / float_footprint[key] for key in footprint})
            entry["logits_relative_diff"] = logits_relative_diff(model, ours, inputs)
            entry["kernel_relative_diff"] = logits_relative_diff(model, dequantized_twin(ours, model), inputs)
            entry["decode_speedup_vs_float32"] = (
                results[f"ours {mode}"]["decode_b1_tok_s"] / results["ours"]["decode_b1_tok_s"]
            )
            speedup = results["ours"]["prefill_s"] / results[f"ours {mode}"]["prefill_s"]
            entry["prefill_speedup_vs_float32"] = speedup
            summary["quantized"][mode] = entry
            e, linear_mb = entry, footprint["decoder_linear_bytes"] / 1e6
            print(
                f"{mode}: decode b1 {e['decode_speedup_vs_float32']:.2f}x our float32, "
                f"prefill {speedup:.2f}x; "
                f"resident bytes vs float32: decoder linear layers {e['decoder_linear_bytes_ratio']:.3f}x "
                f"({linear_mb:.0f} MB), decode step {e['decode_step_bytes_ratio']:.3f}x, whole model "
                f"{e['model_bytes_ratio']:.3f}x; logits relative difference {e['logits_relative_diff']:.2e} "
                f"(against the dequantized weights in float32: {e['kernel_relative_diff']:.2e})"
            )
    summary["goals"] = goals(results, summary, device)
    for goal, (value, met) in summary["goals"].items():
        print(f"goal {goal}: {value:.2f} -> {'met' if met else 'NOT met'}")
    Path(args.json).write_text(json.dumps(summary, indent=1))
    print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
