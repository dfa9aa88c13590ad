"""Where a decode step's time goes at batch 1: the weight matrix products, attention, and everything else.

Builds our "mid" model (random weights, no transformers) in float32, bfloat16 and with the decoder in int8
(and int4 with `--modes ... int4`), prefills a text prompt as long as the image prompt of bench.py
(`--prompt-tokens`,
default 360: 5 x 64 image latents plus the text), then greedily decodes `--new-tokens` with `generate`'s loop:

- step time: the median time between tokens of a run without the profiler, each token stamped as the
  generation loop that `generate` runs yields it (`generation._steps`), i.e. the step of a plain `generate`
  call; with `--streamer`, stamped by a streamer given to `generate`, which then also counts the (B,) token
  tensor that `generate` makes for a streamer at each step (~40 us a step on an Intel Xeon: the first torch
  call after a step's weights have streamed through the caches);
- products: a second run under torch.profiler; the time of the weight matrix products (oneDNN's linear,
  ATen's linear, the int8 / int4 weight-only kernels, our C products, counted once where one calls another)
  between the first and the last token, per step; inside the one-call C decoder step, which the profiler
  sees as one event, the products and attention are timed by the step itself (ckernels.step_clock);
- attention: in the same run, the decoder's attention over the cached keys and values (whichever kernel);
- overhead share: 1 - products / step time, i.e. the share of the unprofiled step spent outside the
  products (Python, casts, norms, rotary, attention, cache writes, sampling); and the same without
  attention, 1 - (products + attention) / step time: attention reads the cache, as the products read the
  weights. The profiler's own cost per op lands in the profiled step only, so it does not inflate these.
- where the decoder ran as one C call per step, all three come from one plain run instead ("timed in one
  run"): the step's own clock for its products and attention (the language-model head's product included
  where the whole step from tokens to logits is that call, ckernels.DecodeCall; else the head is timed
  around its call), the step time over the same tokens, each, and each share, the median of its values
  at the run's steps (the step time of a profiled mode is a median too); the profiled run then only lists
  the costliest other ops. Shares are the median of the repeats' shares.

Models run in turns, `--repeats` times, so the machine's load spreads over all of them; medians are printed.

    python benchmarks/bench_decode_overhead.py --threads 2
    python benchmarks/bench_decode_overhead.py --threads 1 --new-tokens 16 --repeats 1 --top 12
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generation import MID_CONFIG  # noqa: E402
from idefics2 import generation  # noqa: E402
from idefics2.modeling import ckernels, text  # noqa: E402

# profiler names of the weight matrix products; an event inside another one of these is not counted again
# (attention's own matmuls are not weight products: they call aten::matmul / bmm outside these)
PRODUCTS = {
    "aten::linear",
    "mkldnn::_linear_pointwise",
    "aten::_weight_int8pack_mm",
    "aten::_weight_int4pack_mm_for_cpu",
    "idefics2::c",  # our C kernels (idefics2.modeling.ckernels), marked by a profiler range
}
C_MARK = "idefics2::c"
C_STEP_MARK = "idefics2::decoder_step"
ATTENTION_MARK = "idefics2::attention"
TOKEN_MARK = "decode_overhead::token"
STEP_CLOCKS: list[tuple[float, float]] = []  # ckernels.step_clock() at each token of a profiled run
STAMP_BY_STREAMER = [False]  # --streamer: tokens stamped by generate's streamer, not by its loop


def build(dtype_name: str, seed: int = 0):
    from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration

    torch.manual_seed(seed)
    model = Idefics2ForConditionalGeneration(Idefics2Config.from_dict(copy.deepcopy(MID_CONFIG))).eval()
    if dtype_name == "bfloat16":
        return model.to(torch.bfloat16)
    if dtype_name in ("int8", "int4"):
        return model.quantize(dtype_name)
    return model


def step_times(model, input_ids: torch.Tensor, new_tokens: int, mark: bool = False) -> list[float]:
    """Seconds between consecutive tokens of one greedy generation (a profiler mark at each token)."""
    times: list[float] = []

    def on_token(tokens):
        if mark:
            with record_function(TOKEN_MARK):
                pass
            STEP_CLOCKS.append(ckernels.step_clock() if ckernels.available() else (0.0, 0.0))
        times.append(time.perf_counter())

    greedy(model, input_ids, new_tokens, on_token)
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def greedy(model, input_ids: torch.Tensor, new_tokens: int, on_token) -> None:
    """Exactly `new_tokens` greedy tokens, `on_token` called at each: as `generate`'s loop yields them, or
    (STAMP_BY_STREAMER) as `generate`'s streamer."""
    controls = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=2,
                    pad_token_id=0)  # fmt: skip
    with torch.inference_mode():
        if STAMP_BY_STREAMER[0]:
            model.generate(input_ids, streamer=on_token, **controls)
            return
        for tokens in generation._steps(model, input_ids, None, None, None, **controls):
            on_token(tokens)


def timed_split(model, input_ids: torch.Tensor, new_tokens: int) -> tuple[float, ...] | None:
    """(seconds per decode step, of weight products, of attention, share of the step outside the products,
    outside products and attention) of one plain greedy generation whose decoder ran as one C call per step
    (ckernels.decoder_step clocks its products and attention; the language-model head is timed around its
    call), each the median of its values at the steps between the first and the last token; None where the
    one-call step did not run."""
    marks: list[tuple[float, float, float, float]] = []  # (time, products, attention, head) at each token
    head_seconds = [0.0]
    head = model.lm_head
    # timed through its class: a forward of the head's own (or a hook) would keep the C routes, which read
    # its weights directly, from standing in for it (attention.weights_alone)
    layer_class = type(head)
    plain_forward = layer_class.forward

    def timed_forward(self, x):
        if self is not head:
            return plain_forward(self, x)
        start = time.perf_counter()
        out = plain_forward(self, x)
        head_seconds[0] += time.perf_counter() - start
        return out

    def on_token(tokens):
        marks.append((time.perf_counter(), *ckernels.step_clock(), head_seconds[0]))

    layer_class.forward = timed_forward
    try:
        greedy(model, input_ids, new_tokens, on_token)
    finally:
        layer_class.forward = plain_forward
    if marks[-1][1] == marks[0][1]:
        return None
    # each quantity and share per step, then its median: a step that the host interrupts (another process, a
    # page fault) moves the mean of a short run by more than the overhead measured
    steps = []
    for first, second in zip(marks, marks[1:]):
        step, products, attention, head_time = (b - a for a, b in zip(first, second, strict=True))
        products += head_time
        steps.append((step, products, attention, 1 - products / step, 1 - (products + attention) / step))
    return tuple(statistics.median(s[i] for s in steps) for i in range(5))


def _marked(function, mark: str):
    """`function` inside a profiler range named `mark` (ctypes calls are invisible to the profiler)."""

    def run(*args, **kwargs):
        with record_function(mark):
            return function(*args, **kwargs)

    return run


def product_time_per_step(model, input_ids: torch.Tensor, new_tokens: int) -> tuple[float, float, Counter]:
    """(seconds of weight products per decode step, of attention, seconds per step of every other op by
    name) from a profiled generation, over the steps between the first and the last token."""
    plain = (ckernels.linear, ckernels.linear_int4, ckernels.gated, text.attention, ckernels.decoder_step,
             ckernels.DecodeCall.__call__)  # fmt: skip
    ckernels.linear, ckernels.linear_int4, ckernels.gated = (_marked(f, C_MARK) for f in plain[:3])
    text.attention = _marked(plain[3], ATTENTION_MARK)
    ckernels.decoder_step, ckernels.DecodeCall.__call__ = (_marked(f, C_STEP_MARK) for f in plain[4:])
    STEP_CLOCKS.clear()
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step_times(model, input_ids, new_tokens, mark=True)
    finally:
        (ckernels.linear, ckernels.linear_int4, ckernels.gated, text.attention, ckernels.decoder_step,
         ckernels.DecodeCall.__call__) = plain  # fmt: skip
    events = prof.events()
    marks = sorted(e.time_range.start for e in events if e.name == TOKEN_MARK)
    first, last = marks[0], marks[-1]
    steps = len(marks) - 1
    products, attention, others = 0.0, 0.0, Counter()
    counted = PRODUCTS | {ATTENTION_MARK}
    for event in events:
        start = event.time_range.start
        if not first <= start < last or event.name == TOKEN_MARK:
            continue
        parent, nested = event.cpu_parent, False
        while parent is not None:
            if parent.name in counted:
                nested = True
                break
            parent = parent.cpu_parent
        if nested:
            continue
        if event.name in PRODUCTS:
            products += event.time_range.elapsed_us() / 1e6
        elif event.name == ATTENTION_MARK:
            attention += event.time_range.elapsed_us() / 1e6
        elif event.cpu_parent is None:  # top-level ops only: their children are inside their time
            others[event.name] += event.time_range.elapsed_us() / 1e6
    # inside the one-call decoder step (ckernels.decoder_step, or DecodeCall with the head too) the
    # profiler sees one event: its own clock splits it, and the rest of that call (norms, rotary, residual
    # adds) counts as other
    step_products, step_attention = (STEP_CLOCKS[-1][i] - STEP_CLOCKS[0][i] for i in range(2))
    if step_products or step_attention:
        others[C_STEP_MARK] -= step_products + step_attention
    products += step_products
    attention += step_attention
    return products / steps, attention / steps, Counter({k: v / steps for k, v in others.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=360)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["float32", "bfloat16", "int8"],
                        choices=["float32", "bfloat16", "int8", "int4"])  # fmt: skip
    parser.add_argument("--top", type=int, default=0, help="print the N costliest other top-level ops")
    parser.add_argument("--streamer", action="store_true",
                        help="stamp tokens by a streamer given to generate (counts its tensor)")  # fmt: skip
    args = parser.parse_args()
    STAMP_BY_STREAMER[0] = args.streamer
    if args.threads:
        torch.set_num_threads(args.threads)

    models = {mode: build(mode) for mode in args.modes}
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 32000, (1, args.prompt_tokens), generator=generator)
    for model in models.values():  # warm-up: first-call allocations and kernel choices
        step_times(model, input_ids, 4)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; mid config, batch 1, prompt "
          f"{args.prompt_tokens} tokens, {args.new_tokens} new tokens, medians of {args.repeats}; tokens "
          f"stamped by {'a streamer' if args.streamer else 'the generation loop'}")  # fmt: skip
    rows: dict[str, list[tuple[float, ...]]] = {mode: [] for mode in models}
    others: dict[str, Counter] = {mode: Counter() for mode in models}
    timed = {mode: False for mode in models}
    for _ in range(args.repeats):
        for mode, model in models.items():
            split = timed_split(model, input_ids, args.new_tokens) if ckernels.available() else None
            timed[mode] = split is not None
            if split is None:
                step = statistics.median(step_times(model, input_ids, args.new_tokens))
            products, attention, rest = product_time_per_step(model, input_ids, args.new_tokens)
            if split is None:
                split = (step, products, attention, 1 - products / step, 1 - (products + attention) / step)
            rows[mode].append(split)
            others[mode].update(rest)
    print(f"{'mode':<10}{'step ms':>9}{'products ms':>13}{'attention ms':>14}{'other ms':>10}"
          f"{'outside products':>18}{'outside both':>14}{'tok/s':>8}  split")  # fmt: skip
    for mode, samples in rows.items():
        step, products, attention, outside, outside_both = (statistics.median(s[i] for s in samples)
                                                            for i in range(5))  # fmt: skip
        print(f"{mode:<10}{step * 1e3:9.2f}{products * 1e3:13.2f}{attention * 1e3:14.2f}"
              f"{(step - products - attention) * 1e3:10.2f}{max(0.0, outside):18.1%}"
              f"{max(0.0, outside_both):14.1%}{1 / step:8.1f}  "
              f"{'timed in one run' if timed[mode] else 'profiled'}")  # fmt: skip
    for mode in models if args.top else ():
        print(f"\n{mode}: costliest other top-level ops, ms per step (profiled, so inflated)")
        for name, seconds in others[mode].most_common(args.top):
            print(f"  {name:<48}{seconds / args.repeats * 1e3:8.3f}")


if __name__ == "__main__":
    main()
