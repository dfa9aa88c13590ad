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

`force(route=False)` (a context manager) makes a route look unavailable, and `force(route=True)` makes it
look available without probing, so tests can take each route on any machine. Routes: "onednn_linear",
"onednn_fused_activation", "native_bfloat16".
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

ROUTES = ("onednn_linear", "onednn_fused_activation", "native_bfloat16")
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
