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
"int8_weight_kernel", "int4_weight_kernel".
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

ROUTES = (
    "onednn_linear",
    "onednn_fused_activation",
    "native_bfloat16",
    "int8_weight_kernel",
    "int4_weight_kernel",
)
_forced: dict[str, bool] = {}


@contextlib.contextmanager
def force(**routes: bool) -> Iterator[None]:
    """Within the block, each named route is on (True) or off (False) whatever the machine supports."""
    unknown = sorted(set(routes) - set(ROUTES))
    if unknown:
        raise ValueError(f"unknown kernel route(s) {unknown}; routes: {', '.join(ROUTES)}")
    before = dict(_forced)
    _forced.update(routes)
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(before)


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

# Up to this many rows (tokens) a quantized layer runs torch's int8 / int4 kernel; above it, dequantizing the
# weight into a reused buffer and running the float product is faster. Measured with
# benchmarks/bench_quantized.py on the "mid" config's shapes (one thread, AMD Zen5 and limited to AVX2): the
# int8 kernel wins up to 16-32 rows, the int4 kernel up to 64, on both instruction sets.
# environment that limits oneDNN, ATen and MKL to AVX2 in a new process, as on a CPU without AVX-512 or
# bfloat16 instructions (AMD Zen3): how tests and benchmarks reach the fallback routes on any x86 machine
AVX2_ONLY_ENV = {
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}

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
