"""Which fast kernels this machine can run, found by trying them once, and a switch to turn each off.

Some kernels exist only on some CPUs: oneDNN's bfloat16 linear needs bfloat16 instructions (AVX512-BF16,
AMX, or ARM's BF16), and its float16 linear needs AVX512-FP16. Asking for one that the CPU lacks raises
"could not create a primitive descriptor" at the first call. So every route is chosen by a capability
check, and a route whose check fails falls back to torch's portable kernels:

- `onednn_linear(dtype, activation)`: oneDNN's linear kernel (with the activation fused in) for this dtype;
  probed once per (dtype, activation) on a tiny product, the answer cached.
- `native_bfloat16()`: the CPU computes bfloat16 products in hardware. Without it, torch converts bfloat16
  to float32 element by element, and the bfloat16 attention routes (one head at a time, grouped decode)
  lose their advantage over sdpa.

- `int8_weight_kernel(device)`: torch's int8 weight-only product (`aten._weight_int8pack_mm`), vectorised on
  x86 (AVX2, AVX-512) for bfloat16 activations only; quantized layers call it with bfloat16 activations.
- `int4_weight_layout(device)`: the packed layout of torch's int4 weight-only kernel here: "cpu64" or "cpu32"
  (`aten._weight_int4pack_mm_for_cpu`, rows packed in blocks of 64 on AVX-512, 32 on AVX2, found by packing a
  known pattern), "tinygemm" on CUDA GPUs of compute capability 8.0 or more (`aten._weight_int4pack_mm`),
  or None where neither runs (then quantized layers dequantize their weights).

`force(route=False)` (a context manager) makes a route look unavailable, and `force(route=True)` makes it
look available without probing, so tests can take each route on any machine (the int4 route still needs the
probe to know the layout). Routes: "onednn_linear", "onednn_fused_activation", "native_bfloat16",
"int8_weight_kernel", "int4_weight_kernel", "c_kernels", "greedy_screen".

A route that runs is not always the fast one (oneDNN's float32 matrix-vector product is faster than ATen's on
AMD and slower on some Intel CPUs), so among the routes that pass their probe, `choose` keeps the one that
measures fastest on this machine, per op, weights shape and class of rows (see "Routes chosen by measured
speed" below).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from idefics2.modeling import ckernels
from idefics2.modeling.cpu import cpu_description, last_level_cache_bytes

ROUTES = (  # capabilities, each on or off
    "onednn_linear",
    "onednn_fused_activation",
    "native_bfloat16",
    "int8_weight_kernel",
    "int4_weight_kernel",
    "c_kernels",
    "greedy_screen",
)
# ops with several kernels, and their kernels in the order preferred when nothing is measured
OPS = {
    # float product: activation fused in by oneDNN or not, our C matrix-vector kernel (ckernels.c), float32
    # as three bfloat16 products (bf16x3.py: only while torch's float32 matmul precision is not "highest"),
    # torch's
    "linear": ("onednn_fused", "onednn", "c", "bf16x3", "aten"),
    # torch's weight-only kernel, our C kernel, or dequantized
    "int8": ("kernel", "c", "dequantize_bfloat16", "dequantize"),
    "int4": ("kernel", "c", "dequantize_bfloat16", "dequantize"),
    # decode attention: two grouped matmuls, our C kernel, or sdpa's kernel
    "attention": ("grouped", "c", "sdpa"),
    "rms_norm": ("c", "torch"),  # decode rows: our C kernel, or torch's ops
    "gated": ("c", "separate"),  # a decode step's act(gate(x)) * up(x): one C call, or three products
    "rope": ("c", "torch"),  # a decode step's rotary embedding and cache write: one C call, or torch's ops
    "decoder_step": ("c", "layers"),  # a decode step's every decoder layer: one C call, or each layer's ops
}
_forced: dict[str, bool | str] = {}
_epoch = [0]  # counts the changes that can change what `choose` returns for a key already chosen


def routes_epoch() -> int:
    """A number that changes whenever `choose` may give another kernel for a key it has answered before
    (`force`, `preferred`, `forget_choices`): what a caller kept from earlier choices holds while this stays
    the same."""
    return _epoch[0]


def _routes_changed() -> None:
    _unmeasured.clear()
    _epoch[0] += 1


@contextlib.contextmanager
def force(**routes: bool | str) -> Iterator[None]:
    """Within the block, each named capability route is on (True) or off (False) whatever the machine
    supports, and each named op (OPS: "linear", "int8", "int4", "attention") takes the named kernel where
    its probe passes, e.g. `force(linear="aten")`. Nothing is measured inside the block."""
    _check_forced(routes)
    before = dict(_forced)
    _forced.update(routes)
    _routes_changed()  # what the routes picked before no longer holds
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(before)
        _routes_changed()


def _check_forced(routes: dict[str, bool | str]) -> None:
    unknown = sorted(set(routes) - set(ROUTES) - set(OPS))
    if unknown:
        raise ValueError(
            f"unknown kernel route(s) {unknown}; routes: {', '.join(ROUTES)}; ops: {', '.join(OPS)}"
        )
    for op, kernel in routes.items():
        if op in OPS and kernel not in OPS[op]:
            raise ValueError(f"unknown kernel {kernel!r} for {op}; kernels: {', '.join(OPS[op])}")
        if op in ROUTES and not isinstance(kernel, bool):
            raise ValueError(f"route {op} is turned on or off (True / False), got {kernel!r}")


def onednn_linear(dtype: torch.dtype, post_op: str = "none", algorithm: str = "") -> bool:
    """Whether oneDNN's linear kernel runs here for `dtype` with this fused post-op ("none", "swish",
    "gelu" with algorithm "none" or "tanh")."""
    if _forced.get("onednn_linear") is False:
        return False
    if post_op != "none" and _forced.get("onednn_fused_activation") is False:
        return False
    if _forced.get("onednn_linear") and (post_op == "none" or _forced.get("onednn_fused_activation")):
        return True
    return _probe_onednn_linear(dtype, post_op, algorithm)


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (oneDNN's check: AVX512-BF16 / AMX / ARM BF16)."""
    if "native_bfloat16" in _forced:
        return _forced["native_bfloat16"]
    return _native_bfloat16()


@functools.cache
def _native_bfloat16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and _probe_onednn_linear(
            torch.bfloat16, "none", ""
        )
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def _probe_onednn_linear(dtype: torch.dtype, post_op: str, algorithm: str) -> bool:
    try:
        if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
            return False
        x = torch.ones(2, 16, dtype=dtype)
        weight = torch.full((8, 16), 0.5, dtype=dtype)
        out = torch.ops.mkldnn._linear_pointwise(x, weight, None, post_op, [], algorithm)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return out.shape == (2, 8) and bool(torch.isfinite(out).all())


def c_kernels() -> bool:
    """Whether our C matrix-vector kernels (idefics2.modeling.ckernels) build here and agree with torch."""
    if "c_kernels" in _forced:
        return bool(_forced["c_kernels"]) and _probe_c()
    return _probe_c()


def greedy_screen() -> bool:
    """Whether a greedy decode step on CPU with a float32 or bfloat16 head finds its tokens from the head's
    int8 copy and the few logits that copy cannot rule out (ckernels.HeadScreen, DecodeCall.argmax), where
    the whole step runs as one C call: the same tokens as the whole head's logits, from a quarter (float32)
    or half (bfloat16) of its bytes."""
    if "greedy_screen" in _forced:
        return bool(_forced["greedy_screen"]) and c_kernels()
    return c_kernels()


@functools.cache
def _probe_c() -> bool:
    if not ckernels.available():
        return False
    x = torch.arange(3 * 40, dtype=torch.float32).reshape(3, 40) / 40
    weight = torch.linspace(-1, 1, 5 * 40).reshape(5, 40)
    out = ckernels.linear(x, weight, act="silu")
    return bool(torch.allclose(out, F.silu(x @ weight.T), rtol=1e-5, atol=1e-5))


def fastest_dtype(device: torch.device | str) -> torch.dtype:
    """The weights dtype that runs fastest on `device`: bfloat16 on GPUs that support it and on CPUs with
    bfloat16 instructions, float32 elsewhere (on an AVX2-only CPU bfloat16 products are converted element by
    element: prefill is several times slower than in float32; see benchmarks/bench_dtype.py)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if native_bfloat16() else torch.float32
    return torch.float32


# ---- weight-only quantized products -----------------------------------------------------------------------

# environment that limits oneDNN, ATen and MKL to AVX2 in a new process, as on a CPU without AVX-512 or
# bfloat16 instructions (AMD Zen3): how tests and benchmarks reach the fallback routes on any x86 machine
AVX2_ONLY_ENV = {
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}

# Where nothing is measured (IDEFICS2_KERNEL_TUNING=0, forced routes, GPUs), a quantized layer runs torch's
# int8 / int4 kernel up to this many rows (tokens), and above it dequantizes the weight into a reused buffer
# for the float product. Measured with benchmarks/bench_quantized.py on the "mid" config's shapes (one
# thread, AMD Zen5 and limited to AVX2): the int8 kernel wins up to 16-32 rows, the int4 kernel up to 64.
QUANTIZED_KERNEL_MAX_ROWS = {8: 16, 4: 64}
_VECTORISED_CPUS = ("AVX2", "AVX512")  # the int8 / int4 CPU kernels have vector code for these only


def int8_weight_kernel(device: torch.device | str) -> bool:
    """Whether `aten._weight_int8pack_mm` runs (vectorised) on this device with bfloat16 activations."""
    if "int8_weight_kernel" in _forced:
        return _forced["int8_weight_kernel"]
    return _probe_int8(torch.device(device).type)


def int4_weight_layout(device: torch.device | str) -> str | None:
    """The packed int4 layout of torch's kernel on this device ("cpu64", "cpu32", "tinygemm"), or None."""
    if _forced.get("int4_weight_kernel") is False:
        return None
    return _probe_int4(torch.device(device).type)


def _probe_device(device_type: str) -> bool:
    if device_type == "cpu":
        return torch.backends.cpu.get_cpu_capability() in _VECTORISED_CPUS
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
    return False


@functools.cache
def _probe_int8(device_type: str) -> bool:
    if not _probe_device(device_type):
        return False
    try:
        x = torch.ones(2, 32, dtype=torch.bfloat16, device=device_type)
        q = torch.full((16, 32), 3, dtype=torch.int8, device=device_type)
        scales = torch.full((16,), 0.5, dtype=torch.bfloat16, device=device_type)
        out = torch.ops.aten._weight_int8pack_mm(x, q, scales)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return out.shape == (2, 16) and bool((out.float() == 48.0).all())


def cpu_int4_rows(packed: torch.Tensor, block: int) -> torch.Tensor:
    """Nibble values uint8 [N, K] from `aten._convert_weight_to_int4pack_for_cpu`'s uint8 [N, K/2] output,
    for N a multiple of `block`: for each block of rows and each input k, byte j holds row j (low nibble) and
    row j + block / 2 (high nibble)."""
    n, half_k = packed.shape
    blocks = packed.view(n // block, 2 * half_k, block // 2)  # [N / block, K, block / 2]
    rows = torch.cat([blocks & 15, blocks >> 4], dim=2)  # [N / block, K, block]
    return rows.transpose(1, 2).reshape(n, 2 * half_k)


@functools.cache
def _probe_int4(device_type: str) -> str | None:
    if not _probe_device(device_type):
        return None
    n, k, group = 128, 64, 32
    values = (torch.arange(n * k, dtype=torch.int32) * 7 % 16).reshape(n, k)  # every nibble, no symmetry
    x = torch.linspace(-1, 1, 3 * k, dtype=torch.float32).reshape(3, k)
    scale_zeros = torch.stack([torch.full((k // group, n), 0.5), torch.full((k // group, n), 0.25)], dim=-1)
    expected = x @ ((values.float() - 8) * 0.5 + 0.25).t()
    try:
        if device_type == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 2)
            layout = next(
                (f"cpu{b}" for b in (64, 32) if torch.equal(cpu_int4_rows(packed, b).int(), values)), None
            )
            run = torch.ops.aten._weight_int4pack_mm_for_cpu
        else:
            nibbles = ((values[:, 0::2] << 4) | values[:, 1::2]).to(torch.uint8).to(device_type)
            packed = torch.ops.aten._convert_weight_to_int4pack(nibbles, 2)
            layout, run = "tinygemm", torch.ops.aten._weight_int4pack_mm
        out = run(
            x.to(device_type, torch.bfloat16), packed, group, scale_zeros.to(device_type, torch.bfloat16)
        )
    except (AttributeError, RuntimeError, NotImplementedError):
        return None
    close = bool(((out.float().cpu() - expected).abs() <= 0.05 * expected.abs().max()).all())  # bf16 rounding
    return layout if close else None


# ---- routes chosen by measured speed ----------------------------------------------------------------------
#
# For an op with several kernels, `choose` returns the kernel to run for one call. The first call of a weights
# shape in a class of rows (ROW_CLASSES) times every kernel whose probe passes on that shape with the class's
# representative number of rows, checks each result against the portable kernel's (a kernel that raises or
# disagrees is never chosen), and keeps the fastest. The choices are written to a JSON file, keyed by this
# machine (CPU model and flags, instruction set in use, torch version, thread count), so a second process
# measures nothing. Measuring stops for the process after TUNING_BUDGET_S seconds on decode rows' shapes, and
# after as many on prefill rows' (so that a large model's prefill, measured first, never leaves its decode
# steps unmeasured), each for every kind of weights (float32, bfloat16, int8, int4: so that the models of one
# process, e.g. a float model and its quantized copy, each measure their own shapes): the shapes left then
# take the preferred kernel (OPS' order) until a later process measures them.
#
# Environment: IDEFICS2_KERNELS="linear=aten,int8=kernel" forces kernels (as `force` does);
# IDEFICS2_KERNEL_TUNING=0 measures nothing (the preferred kernel everywhere, no file);
# IDEFICS2_KERNELS_CACHE=path moves the file (default $XDG_CACHE_HOME/idefics2/kernels.json).

ROW_CLASSES = ((1, "1"), (8, "2-8"), (32, "9-32"))  # decode rows: (most rows, name); more rows: prefill
# more rows: "prefill" up to LONG_ROWS, timed at PREFILL_ROWS; "long" past it (training batches, an image's
# crops in the vision tower, long prompts), timed at LONG_TIMED_ROWS. The kernels' order changes with the
# rows: on an Intel Xeon (AMX class, float32, 2 threads) oneDNN is ahead of torch's default product at 256
# rows and 5-50% behind it at 1,000 (up to 2x for a transposed weight, a backward pass's grad @ W)
PREFILL_ROWS = 256
LONG_ROWS = 512
LONG_TIMED_ROWS = 1024
TUNING_BUDGET_S = 10.0
TIMING_ROUNDS = 5  # samples per kernel
_HOPELESS = 3.0  # a kernel whose first sample is this many times another's takes no more samples
_TARGET_BATCH_S = 3e-4  # calls shorter than 1 ms are timed in batches of about this long
_AGREEMENT = 3e-2  # max abs difference / max abs value allowed against the portable kernel

_choices: dict[tuple, str] = {}  # (op, shape, row class, threads) -> kernel, for this process
_unmeasured: dict[tuple, str] = {}  # same key -> kernel run without measuring (forced or tuning off)
_timings: dict[tuple, dict[str, float]] = {}  # same key -> seconds per call of each kernel measured
_file_entries: dict[str, dict[str, dict]] = {}  # machine -> entry name -> {"kernel", "seconds"}, as read
_tuning_lock = threading.RLock()
# seconds measured so far in this process, by kind of rows ("decode", "prefill") and of weights (_weights_of)
_spent: dict[tuple[str, str], float] = collections.defaultdict(float)
_preferred_only: list[bool] = []  # non-empty inside `preferred()`


def row_class(rows: int) -> str:
    """The class of a product with this many rows (tokens): "1", "2-8", "9-32", "prefill" or "long"."""
    for most, name in ROW_CLASSES:
        if rows <= most:
            return name
    return "prefill" if rows <= LONG_ROWS else "long"


def class_rows(name: str) -> int:
    """The number of rows timed for a class of rows."""
    timed = {"prefill": PREFILL_ROWS, "long": LONG_TIMED_ROWS}
    timed.update((decode, most) for most, decode in ROW_CLASSES)
    return timed[name]


def choose(
    op: str,
    shape: tuple,
    rows: int,
    candidates: Callable[[], list[str]],
    bench: Callable[[int], Callable[[str], torch.Tensor]],
) -> str:
    """The kernel of `op` to run for a product of `rows` rows on weights `shape` (a tuple of dtype / str
    / int / bool / None naming the weights' shape and dtype). `candidates()` lists the kernels whose probes
    pass, preferred first; `bench(rows)` makes example inputs with that many rows and returns a function
    running one named kernel on them (called only when measuring)."""
    key = (op, shape, row_class(rows), torch.get_num_threads())
    if _forced or _preferred_only or _env_forced() or not tuning_enabled():
        chosen = _unmeasured.get(key)
        if chosen is None:  # once per key while the forced routes stay as they are
            chosen = _unmeasured[key] = _forced_choice(op, candidates())
        return chosen
    chosen = _choices.get(key)
    if chosen is None:
        chosen = _measure_choice(key, candidates, bench)
    return chosen


@contextlib.contextmanager
def preferred() -> Iterator[None]:
    """Within the block every op runs its preferred kernel that passes its probes (OPS' order), as with
    IDEFICS2_KERNEL_TUNING=0: the routes of capability alone, to compare measured choices against."""
    _preferred_only.append(True)
    _routes_changed()
    try:
        yield
    finally:
        _preferred_only.pop()
        _routes_changed()


def _forced_choice(op: str, names: list[str]) -> str:
    wanted = _forced.get(op, _env_forced().get(op))
    return wanted if wanted in names else names[0]


@functools.cache
def _env_forced() -> dict[str, str]:
    text = os.environ.get("IDEFICS2_KERNELS", "").strip()
    routes: dict[str, bool | str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        op, sep, kernel = item.partition("=")
        if not sep:
            raise ValueError(f"IDEFICS2_KERNELS: {item!r} is not op=kernel (e.g. linear=aten)")
        routes[op.strip()] = kernel.strip()
    if set(routes) & set(ROUTES):
        raise ValueError(f"IDEFICS2_KERNELS names ops ({', '.join(OPS)}), not capability routes")
    _check_forced(routes)
    return routes


@functools.cache
def tuning_enabled() -> bool:
    """Whether kernels are measured (IDEFICS2_KERNEL_TUNING is not "0")."""
    return os.environ.get("IDEFICS2_KERNEL_TUNING", "1").strip() != "0"


def forget_choices() -> None:
    """Drop this process's choices and re-read the environment (tests; after changing IDEFICS2_KERNELS)."""
    with _tuning_lock:
        _choices.clear()
        _routes_changed()
        _timings.clear()
        _file_entries.clear()
        _spent.clear()
        _env_forced.cache_clear()
        tuning_enabled.cache_clear()


def choices() -> dict[tuple, tuple[str, dict[str, float]]]:
    """This process's choices: (op, shape, row class, threads) -> (kernel, seconds per call of each kernel
    measured, empty where nothing was measured), in the order they were first made."""
    made = {key: (kernel, {}) for key, kernel in _unmeasured.items()}
    made.update((key, (kernel, dict(_timings.get(key, {})))) for key, kernel in _choices.items())
    return made


def measured_within(op: str, shape: tuple, rows: int, kernel: str, ratio: float) -> bool:
    """Whether `kernel` was measured for `op` on `shape` in the class of `rows` (by this process or read
    from the choices file) at most `ratio` times the fastest kernel's time there; False where nothing was
    measured (kernels forced, preferred or tuning off). For a caller that saves other work by running that
    kernel itself, where the race's winner is only a little faster."""
    if _forced or _preferred_only or _env_forced() or not tuning_enabled():
        return False
    times = _timings.get((op, shape, row_class(rows), torch.get_num_threads()), {})
    return kernel in times and times[kernel] <= ratio * min(times.values())


def measuring_seconds() -> float:
    """Seconds this process has spent measuring kernels."""
    return sum(_spent.values())


def _measure_choice(
    key: tuple, candidates: Callable[[], list[str]], bench: Callable[[int], Callable[[str], torch.Tensor]]
) -> str:
    with _tuning_lock:
        if key in _choices:
            return _choices[key]
        names = candidates()
        if len(names) == 1:
            _choices[key] = names[0]
            return names[0]
        machine = machine_key(key[3])
        if machine not in _file_entries:
            _file_entries[machine] = _read_cache(machine)
        saved = _file_entries[machine].get(_entry_name(key), {})
        # a choice made among other candidates (an older version, a route that probes otherwise now) is
        # measured again
        if saved.get("kernel") in names and saved.get("candidates") == sorted(names):
            seconds = saved.get("seconds")
            _choices[key], _timings[key] = saved["kernel"], seconds if isinstance(seconds, dict) else {}
            return _choices[key]
        kind = ("prefill" if key[2] in ("prefill", "long") else "decode", _weights_of(key[0], key[1]))
        if _spent[kind] >= TUNING_BUDGET_S:
            _choices[key] = names[0]  # for this process only: a later one measures it
            return names[0]
        spent, start = _spent[kind], time.perf_counter()
        times = fastest(names, bench(class_rows(key[2])), measure, OPS[key[0]][-1])
        _spent[kind] = spent + time.perf_counter() - start  # what the ops it runs measured counted once
        chosen = min(times, key=times.get) if times else names[0]
        _choices[key], _timings[key] = chosen, times
        _write_cache(machine, key, chosen, times, names)
        return chosen


def _weights_of(op: str, shape: tuple) -> str:
    """The kind of weights that `op`'s kernels read on `shape`, as the measuring budget counts them: "int8",
    "int4", or the float dtype's name ("float32", "bfloat16"); for ops that read no weights, the
    activations' dtype."""
    if op in ("int8", "int4"):
        return op
    # gated: (activations, weights, ...); decoder_step: (..., each weight format, "int4g128" for int4)
    name = describe(shape[1] if op == "gated" else shape[-1] if op == "decoder_step" else shape[0])
    return "int4" if name == "uint8" or name.startswith("int4") else name


def fastest(
    names: list[str],
    run: Callable[[str], torch.Tensor],
    timer: Callable[[Callable[[], object]], float],
    reference: str,
) -> dict[str, float]:
    """Seconds per call of each kernel in `names` that runs and agrees with the `reference` kernel (the
    portable one); a kernel that raises or disagrees is left out. The kernels are timed in turns,
    TIMING_ROUNDS samples of `timer` each, and each keeps its fastest sample: on a busy machine a sample
    that another process interrupted is slower, never faster, and turns spread such interruptions over every
    kernel. A kernel whose first sample is over _HOPELESS times the best first sample keeps that one sample
    (a dequantized product at one row can be 80x the int4 kernel's time: its rounds would cost seconds on
    idefics2-8b's shapes and could not change the choice)."""
    with torch.no_grad():
        expected = run(reference).float()
        scale = float(expected.abs().max()) or 1.0
        agreeing = []
        for name in names:
            try:  # (the reference agrees with itself: often the slowest, it is not run again for that)
                out = expected if name == reference else run(name).float()
            except (RuntimeError, NotImplementedError):
                continue
            if out.shape == expected.shape and float((out - expected).abs().max()) <= _AGREEMENT * scale:
                agreeing.append(name)
        times = dict.fromkeys(agreeing, float("inf"))
        for round_ in range(TIMING_ROUNDS):
            for name in agreeing:
                times[name] = min(times[name], timer(lambda name=name: run(name)))
            if round_ == 0:  # a kernel this far behind another's first sample cannot win: not timed again
                agreeing = [name for name in agreeing if times[name] <= _HOPELESS * min(times.values())]
    return times


def measure(call: Callable[[], object]) -> float:
    """One sample of the seconds per call of `call`: one call timed alone when it takes over 1 ms, else a
    batch of calls lasting about _TARGET_BATCH_S (the clock's resolution and call overheads averaged out)."""
    start = time.perf_counter()
    call()
    once = time.perf_counter() - start
    if once > 1e-3:
        return once
    per_batch = max(1, min(256, int(_TARGET_BATCH_S / max(once, 1e-7))))
    start = time.perf_counter()
    for _ in range(per_batch):
        call()
    return (time.perf_counter() - start) / per_batch


# ---- the file of choices ----------------------------------------------------------------------------------


def cache_path() -> Path:
    """Where the choices are kept: IDEFICS2_KERNELS_CACHE, else $XDG_CACHE_HOME/idefics2/kernels.json."""
    if os.environ.get("IDEFICS2_KERNELS_CACHE"):
        return Path(os.environ["IDEFICS2_KERNELS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "idefics2" / "kernels.json"


@functools.cache
def _machine_base() -> str:
    cpu = cpu_description()
    flags = hashlib.sha1(" ".join(cpu["flags"]).encode()).hexdigest()[:12]
    isa = cpu["capability"] + (
        " onednn " + os.environ["ONEDNN_MAX_CPU_ISA"] if "ONEDNN_MAX_CPU_ISA" in os.environ else ""
    )
    # our C kernels' source: choices made against another version of them are measured again
    c_source = hashlib.sha1(ckernels.SOURCE.read_bytes()).hexdigest()[:12]
    return f"{cpu['model']} | flags {flags} | {isa} | torch {torch.__version__} | c kernels {c_source}"


def machine_key(threads: int | None = None) -> str:
    """The key of this machine's choices: CPU model and flags, instruction sets in use, torch version, our C
    kernels' source and thread count (a choice measured under other conditions is not reused)."""
    threads = torch.get_num_threads() if threads is None else threads
    return f"{_machine_base()} | {threads} threads"


def _entry_name(key: tuple) -> str:
    op, shape, rows = key[:3]
    return "|".join([op, *(describe(part) for part in shape), rows])


def describe(part: object) -> str:
    """A part of a weights shape key as text: dtypes without "torch."."""
    return str(part).removeprefix("torch.")


def _read_file() -> dict:
    try:
        with open(cache_path()) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_cache(machine: str) -> dict[str, dict]:
    entries = _read_file().get(machine, {})
    if not isinstance(entries, dict):
        return {}
    return {name: entry for name, entry in entries.items() if isinstance(entry, dict)}


def _write_cache(machine: str, key: tuple, kernel: str, times: dict[str, float], names: list[str]) -> None:
    """Add one choice to the file (read again first: other processes may have added theirs); a file that
    cannot be written only costs measuring again next time."""
    path = cache_path()
    data = _read_file()
    entry = {"kernel": kernel, "seconds": times, "candidates": sorted(names)}
    data.setdefault(machine, {})[_entry_name(key)] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(f.name, path)
    except OSError:
        pass


# ---- memory bandwidth -------------------------------------------------------------------------------------


def streaming_copies(nbytes: int, rows: int) -> int:
    """How many copies of `nbytes` of weights a timing of a `rows`-row product cycles through: for decode
    classes enough to span twice the last-level cache (at most 64, at most 256 MiB), so each call reads its
    weights from memory as a decode step does, not from a cache warmed by the previous call; one for
    prefill, which computes far longer than it reads."""
    if rows > ROW_CLASSES[-1][0]:
        return 1
    wanted = -(-2 * (last_level_cache_bytes() or 32 * 2**20) // max(nbytes, 1))
    return max(1, min(64, wanted, 256 * 2**20 // max(nbytes, 1)))


def read_bandwidth(nbytes: int | None = None, repeats: int = 5, device: torch.device | str = "cpu") -> float:
    """Bytes per second at which `device` streams a buffer of `nbytes` from its memory (default: on CPUs
    4x the last-level cache, at least 256 MiB; on GPUs 1 GiB), with torch's threads: the fastest of `repeats`
    sums over it (on a shared machine other processes only ever slow a sample down). The ceiling of a decode
    step, which reads every weight once. The one measure of it: `idefics2 kernels` and the benchmarks call
    this."""
    device = torch.device(device)
    if nbytes is None:
        least = 2**30 if device.type == "cuda" else 256 * 2**20
        nbytes = max(least, 4 * (last_level_cache_bytes() or 0))
    buffer = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    buffer.sum()  # pages touched, threads started
    best = float("inf")
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        buffer.sum()
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
