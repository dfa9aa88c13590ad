"""`idefics2 kernels`: this CPU's features and read bandwidth, and the kernel chosen for each product of a
model and for its decode attention (measured now, or read from the file of earlier choices), with its time
and the others'."""

from __future__ import annotations

import argparse
import time
from functools import partial

from idefics2.cli.common import add_model_options
from idefics2.settings import load_pipeline, positive_int

DECODER_PREFIXES = ("model.text_model.", "lm_head")  # layers that run decode steps; the rest: prefill only
# layers whose weights a LoRA run's backward pass multiplies by (grad @ W: a transposed weight, long rows)
TRAINED_PREFIXES = (*DECODER_PREFIXES, "model.connector.")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "kernels",
        help="this CPU's features, read bandwidth, and the kernel chosen for each product",
        description="Print this CPU's features, its measured read bandwidth, and for each weights shape of "
        "the model and each class of rows (decode 1, 2-8, 9-32; prefill up to 512, long past it) the kernel "
        "chosen and the time per call of each kernel measured. Choices are measured once per machine and "
        "kept in a file (IDEFICS2_KERNELS_CACHE; delete it to measure again).",
    )
    add_model_options(p)
    p.add_argument("--threads", type=positive_int, metavar="N", help="torch threads (default: torch's)")
    p.add_argument(
        "--bandwidth-mib",
        type=positive_int,
        metavar="MIB",
        help="size of the buffer read to measure bandwidth (default: 4x the last-level cache, >= 256)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from idefics2.modeling import ckernels, cpu, kernels

    if args.threads:
        torch.set_num_threads(args.threads)
    facts = cpu.cpu_description()
    print(f"cpu: {facts['model']}")
    print(f"features: {' '.join(facts['features']) or '-'}; torch uses {facts['capability']}")
    print(f"threads: {torch.get_num_threads()}; torch {torch.__version__}")
    nbytes = args.bandwidth_mib * 2**20 if args.bandwidth_mib else None
    print(f"read bandwidth: {kernels.read_bandwidth(nbytes) / 1e9:.1f} GB/s")
    print(f"C kernels: {ckernels.origin()}")
    pipe = load_pipeline(args)
    start, spent = time.perf_counter(), kernels.measuring_seconds()
    keys = run_every_product(pipe.model)
    took = time.perf_counter() - start
    if kernels.tuning_enabled():
        measured = kernels.measuring_seconds() - spent
        print(f"choices: {kernels.cache_path()} (measured now: {measured:.2f} s, {took:.2f} s in all)")
    else:
        print("choices: not measured (IDEFICS2_KERNEL_TUNING=0): the preferred kernel of each op")
    table = kernels.choices()
    print(f"{'op':<12} {'weights':<40} {'rows':<8} {'kernel':<20} {'time':>10}  others")
    for key in keys:
        op, shape, rows = key[:3]
        dtype, n, k = (*shape, None)[:3]
        kernel, times = table[key]
        suffix = "".join(f" {part}" for part in shape[4:] if part) if op == "linear" else ""
        if op in ("int8", "int4"):
            suffix = f" g{shape[3]}" if op == "int4" else ""
        weights = f"{kernels.describe(dtype)} {n}x{k}{suffix}"
        if op == "attention":  # heads, kv heads, head size, class of cached keys
            weights = f"{kernels.describe(dtype)} {n}/{k}x{shape[3]} {shape[4]}"
        if op == "gated":  # activations' dtype, weights' dtype, hidden size, input size, activation
            weights = f"{kernels.describe(dtype)} {kernels.describe(n)} 2x{k}x{shape[3]} {shape[4]}"
        if op == "rms_norm":  # dtype, width
            weights = f"{kernels.describe(dtype)} {n}"
        if op == "rope":  # dtype, heads, kv heads, head size
            weights = f"{kernels.describe(dtype)} {n}/{k}x{shape[3]}"
        if op == "decoder_step":  # dtype, hidden size, MLP width, heads, layers, weight formats
            formats = "+".join(shape[5:])
            weights = f"{kernels.describe(dtype)} {shape[4]}x({n}, {k}, {shape[3]}h) {formats}"
        mine = f"{times[kernel] * 1e6:.1f} us" if kernel in times else "-"
        others = ", ".join(f"{name} {t * 1e6:.1f} us" for name, t in times.items() if name != kernel)
        print(f"{op:<12} {weights:<40} {rows:<8} {kernel:<20} {mine:>10}  {others}")
    for most, name in kernels.ROW_CLASSES[:2]:
        print(f"decode step, {name} row{'s' if most > 1 else ''}: {_decode_route(pipe.model, most)}")
    return 0


def _decode_route(model, rows: int) -> str:
    """How a decode step of `rows` rows runs with the kernels chosen: whole in one C call from token ids to
    logits (ckernels.DecodeCall), its greedy steps reading the head's int8 copy where the head is float, or
    as calls from Python."""
    import torch

    from idefics2.decoding.runner import ModelRunner
    from idefics2.modeling import ckernels, kernels

    if model.lm_head.weight.device.type != "cpu":
        return "on the device (not one C call)"
    runner = ModelRunner(model, rows, 8)
    with torch.inference_mode():
        whole = model.c_decode_logits([1] * rows, [0] * rows, runner.cache.decode_view(0, rows)) is not None
    if not whole:
        return "calls from Python (the decoder step's or each layer's, then the head's)"
    route = "one C call from token ids to logits (embedding, every layer, final norm, head)"
    head = model.lm_head  # a float head (a quantized one is no nn.Linear)
    if kernels.greedy_screen() and isinstance(head, torch.nn.Linear) and head.weight.dtype in ckernels.DTYPES:
        return route + "; greedy steps read the head's int8 copy and pick their tokens in C"
    return route + "; greedy steps pick their tokens in C"


def run_every_product(model) -> list[tuple]:
    """Run each distinct weights shape of `model`'s linear layers once per class of rows it meets (decode
    classes for the decoder's layers, prefill and long rows for all, and a training backward pass's grad @ W
    for the layers LoRA trains through), which makes `kernels.choose` measure (or read) its choice; returns
    the keys of those choices, in the model's order."""
    import torch

    from idefics2.modeling import kernels
    from idefics2.modeling.attention import Linear, linear
    from idefics2.quantization import QuantizedLinear

    activations = {}
    for name, module in model.named_modules():
        act = getattr(module, "act", None)
        for child in ("gate_proj", "fc1"):
            if isinstance(act, str) and hasattr(module, child):
                activations[f"{name}.{child}"] = act
    keys, seen = [], set()
    with torch.inference_mode():
        for name, layer in model.named_modules():
            if not isinstance(layer, Linear | QuantizedLinear) or layer.weight.device.type != "cpu":
                continue
            classes = [*(n for _, n in kernels.ROW_CLASSES), "prefill", "long"]
            if not name.startswith(DECODER_PREFIXES):
                classes = ["prefill", "long"]
            act = activations.get(name)
            products = []
            for rows_class in classes:
                x = torch.zeros(kernels.class_rows(rows_class), layer.in_features, dtype=layer.weight.dtype)
                products.append(partial(layer.forward_activated, x, act) if act else partial(layer, x))
            if isinstance(layer, Linear) and name.startswith(TRAINED_PREFIXES):
                grad = torch.zeros(kernels.class_rows("long"), layer.out_features, dtype=layer.weight.dtype)
                products.append(partial(linear, grad, layer.weight.t()))
            for product in products:
                before = kernels.choices().keys()
                product()
                for key in kernels.choices().keys() - before - seen:
                    seen.add(key)
                    keys.append(key)
        keys += _decode_step_choices(model, seen)
        keys += _decode_attention_choices(model, seen)
        keys += _whole_step_choices(model, seen)
    return keys


def _whole_step_choices(model, seen: set) -> list[tuple]:
    """Run whole decode steps of the decoder (rows of the first two decode classes, one cached slot each),
    which makes the remaining ops of a step (the rotary-and-cache write, the one-call decoder step) be
    measured (or read); returns the new choices' keys."""
    from idefics2.decoding.runner import ModelRunner
    from idefics2.modeling import kernels

    if model.lm_head.weight.device.type != "cpu":
        return []
    keys = []
    for most, _ in kernels.ROW_CLASSES[:2]:
        before = kernels.choices().keys()
        ModelRunner(model, most, 8).decode([1] * most, [0] * most)
        for key in kernels.choices().keys() - before - seen:
            seen.add(key)
            keys.append(key)
    return keys


def _decode_step_choices(model, seen: set) -> list[tuple]:
    """Run the decoder's gated MLPs and norms on decode rows, which makes their kernels (one C call or
    torch's ops) be measured (or read); returns the new choices' keys."""
    import torch

    from idefics2.modeling import kernels
    from idefics2.modeling.attention import GatedMLP, RMSNorm

    keys = []
    dtype = model.dtype
    for name, module in model.named_modules():
        if not isinstance(module, GatedMLP | RMSNorm) or not name.startswith(DECODER_PREFIXES):
            continue
        width = module.gate_proj.in_features if isinstance(module, GatedMLP) else module.weight.shape[0]
        for most, _ in kernels.ROW_CLASSES[:2]:  # the classes of a decode step
            before = kernels.choices().keys()
            module(torch.zeros(most, width, dtype=dtype))
            for key in kernels.choices().keys() - before - seen:
                seen.add(key)
                keys.append(key)
    return keys


def _decode_attention_choices(model, seen: set) -> list[tuple]:
    """Run the decoder's attention for one query over each class of cached keys on CPU, which makes the
    decode attention kernel be measured (or read); returns the new choices' keys."""
    import torch

    from idefics2.modeling import attention, kernels

    text = model.config.text_config
    dtype = model.model.text_model.embed_tokens.weight.dtype
    if model.model.text_model.embed_tokens.weight.device.type != "cpu":
        return []
    keys = []
    lengths = [most for most, _ in attention.DECODE_KEY_CLASSES] + [attention.DECODE_KEY_CLASSES[-1][0] + 1]
    for length in lengths:
        q = torch.zeros(1, text.num_attention_heads, 1, text.head_dim, dtype=dtype)
        k = torch.zeros(1, text.num_key_value_heads, length, text.head_dim, dtype=dtype)
        mask = torch.ones(1, 1, 1, length, dtype=torch.bool)
        before = kernels.choices().keys()
        attention.attention(q, k, k, mask, scale=text.head_dim**-0.5)
        for key in kernels.choices().keys() - before - seen:
            seen.add(key)
            keys.append(key)
    return keys
