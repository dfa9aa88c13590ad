"""Generation speed: transformers (sdpa, float32) vs idefics2 (float32) on a ~240M-parameter Idefics2.

One 480x640 image with splitting (4 crops + the image) and a chat prompt; random weights, greedy decoding of
a fixed number of tokens. Both implementations get the same inputs and run alternately in one process.
Reports prefill seconds (prompt in -> first new token out), decode tokens/s (1 / median time per later
token), the decode "bandwidth achieved" (bytes of weights read per decode step x tokens/s) and the
machine's memory read bandwidth measured here.

    python benchmarks/bench_generation.py [--new-tokens 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from idefics2.modeling import kernels  # noqa: E402

MID_CONFIG = {
    "image_token_id": 32001,
    "tie_word_embeddings": False,
    "vision_config": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 10,
        "num_attention_heads": 12,
        "image_size": 980,
        "patch_size": 14,
    },
    "perceiver_config": {
        "hidden_size": 1024,
        "resampler_n_latents": 64,
        "resampler_depth": 1,
        "resampler_n_heads": 16,
        "resampler_head_dim": 64,
        "num_key_value_heads": 4,
    },
    "text_config": {
        "model_type": "mistral",
        "vocab_size": 32003,
        "hidden_size": 1024,
        "intermediate_size": 2560,
        "num_hidden_layers": 8,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "sliding_window": None,
        "pad_token_id": 0,
    },
}
PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]


def photo_like(height: int = 480, width: int = 640, seed: int = 0) -> Image.Image:
    """Smooth colour gradients plus noise: compresses and resizes like a photo, not like flat colour."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [np.sin(6 * x + 3 * c) * np.cos(4 * y - c) for c in range(3)]
    base = (np.stack(channels, -1) + 1) * 110 + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


@contextlib.contextmanager
def built_in(dtype: torch.dtype, device: torch.device | str):
    """Within the block new tensors (a model built in place) are of `dtype` on `device`."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(default)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights one decode step reads: decoder layers, final norm and lm_head (one embedding row
    and the vision side are not read)."""
    text = model.model.text_model
    tensors = [*text.layers.parameters(), *text.norm.parameters(), model.lm_head.weight]
    return sum(t.numel() * t.element_size() for t in tensors)


class StepClock:
    """Wall and process-CPU timestamps of every step; fits transformers' streamer protocol (put/end) and our
    callback. CPU time is less sensitive than wall time to other processes sharing the cores."""

    def __init__(self):
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.start = (time.perf_counter(), time.process_time())
        self._prompt_seen = False

    def put(self, value):  # transformers: first the prompt, then each new token
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self(value)

    def end(self):
        pass

    def __call__(self, tokens):  # idefics2
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def prefill_s(self, clock: str = "wall") -> float:
        times, start = (self.wall, self.start[0]) if clock == "wall" else (self.cpu, self.start[1])
        return times[0] - start

    def decode_tokens_per_s(self, clock: str = "wall") -> float:
        """1 / median time between consecutive new tokens (robust to other processes' bursts)."""
        times = self.wall if clock == "wall" else self.cpu
        gaps = sorted(b - a for a, b in zip(times, times[1:], strict=False))
        return 1.0 / gaps[len(gaps) // 2]


def run(generate, streamer_kw: str, inputs: dict, new_tokens: int) -> StepClock:
    with torch.no_grad():
        clock = StepClock()
        generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                 eos_token_id=2, pad_token_id=0, **{streamer_kw: clock})  # fmt: skip
    assert len(clock.wall) == new_tokens, len(clock.wall)
    return clock


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import Idefics2Config as RefConfig
    from transformers import Idefics2ForConditionalGeneration as RefModel

    from idefics2 import Idefics2ForConditionalGeneration, Idefics2Processor
    from oracle_processing import build_reference_processor

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        RefModel._from_config(RefConfig(**MID_CONFIG), dtype=torch.float32).save_pretrained(folder)
        build_reference_processor(folder, image_seq_len=64, do_image_splitting=True)
        reference = RefModel.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32).eval()
        ours = Idefics2ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
        processor = Idefics2Processor.from_pretrained(folder)

    prompt = processor.apply_chat_template(PROMPT, add_generation_prompt=True)
    inputs = dict(processor(text=prompt, images=[[photo_like()]], return_tensors="pt"))
    n_params = sum(p.numel() for p in ours.parameters())
    step_bytes = decode_weight_bytes(ours)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"model: {n_params / 1e6:.0f}M parameters (float32, random weights); decode reads "
          f"{step_bytes / 1e6:.0f} MB of weights per step")  # fmt: skip
    print(
        f"prompt: {inputs['input_ids'].shape[1]} tokens, pixel_values {tuple(inputs['pixel_values'].shape)}"
    )

    results = {"transformers": [], "idefics2": []}
    for _ in range(args.repeats):  # alternate so both see the same machine load
        results["transformers"].append(run(reference.generate, "streamer", inputs, args.new_tokens))
        results["idefics2"].append(run(ours.generate, "streamer", inputs, args.new_tokens))
    bandwidth = kernels.read_bandwidth() / 1e9
    print(f"load average after the runs: {os.getloadavg()[0]:.1f} (other processes share these cores)")

    for clock in ("wall", "cpu"):
        summary = {}
        print(f"\n[{clock} time]{'':3}{'prefill s':>11}{'decode tok/s':>14}{'bandwidth GB/s':>16}")
        for name, clocks in results.items():
            prefill = min(c.prefill_s(clock) for c in clocks)
            decode = max(c.decode_tokens_per_s(clock) for c in clocks)
            summary[name] = (prefill, decode)
            print(f"{name:14}{prefill:11.2f}{decode:14.2f}{step_bytes * decode / 1e9:16.2f}")
            runs = ", ".join(f"{c.prefill_s(clock):.2f}s/{c.decode_tokens_per_s(clock):.2f}" for c in clocks)
            print(f"{'':14}runs (prefill/decode): {runs}")
        (ref_prefill, ref_decode), (our_prefill, our_decode) = summary["transformers"], summary["idefics2"]
        print(f"prefill speed-up {ref_prefill / our_prefill:.2f}x (goal >= 1.5x)")
        print(f"decode speed-up  {our_decode / ref_decode:.2f}x (goal >= 2x)")
        print(
            f"decode bandwidth: ours {step_bytes * our_decode / 1e9 / bandwidth:.0%}, transformers "
            f"{step_bytes * ref_decode / 1e9 / bandwidth:.0%} of the measured read bandwidth"
        )
    print(f"\nmemory read bandwidth {bandwidth:.2f} GB/s (sum of a 1 GiB tensor, best of 5)")


if __name__ == "__main__":
    main()
