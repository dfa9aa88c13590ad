"""Float32 matrix products on the CPU's bfloat16 units, to about 2^-16 ("bf16x3").

Each float32 operand is split into two bfloat16 halves, x = hi + lo (hi: x rounded to bfloat16, lo: the rest
rounded again; ckernels.c `idefics2_split_bf16`), and the product is hi.hi + hi.lo + lo.hi: three bfloat16
products summed in float32 by MKL's `cblas_gemm_bf16bf16f32` (bfloat16 operands, float32 accumulation and
output), the MKL that torch's own CPU library carries. Only the lo.lo term and the halves' last roundings are
dropped: each output is within ~1e-5 of the product's largest value (float32's own products: ~1e-6; one
bfloat16 product: ~1e-2). On CPUs whose bfloat16 units are fast (Intel AMX) the three products take less
time than one float32 product: 1,100 rows by a 4096 x 1024 weight in 24 ms (three products of ~5.5 ms, 2 ms
of splitting) against 28-31 ms in float32, on 2 cores of an Intel Xeon (Sapphire Rapids class).

This is what torch means by `torch.set_float32_matmul_precision("high")` ("treat each float32 number as the
sum of two bfloat16 numbers"), which torch's own CPU products do not act on; `linear` (attention.py) offers
it as one more kernel to race while that setting is "high" or "medium", never under the default "highest".
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from idefics2.modeling import ckernels

_ROW_MAJOR, _NO_TRANSPOSE, _TRANSPOSE = 101, 111, 112  # CBLAS's constants


@functools.cache
def _gemm() -> ctypes._CFuncPtr | None:
    """MKL's bfloat16 product with float32 output from torch's CPU library, or None where it has none."""
    folder = Path(torch.__file__).parent / "lib"
    try:
        library = ctypes.CDLL(str(next(folder.glob("libtorch_cpu.*"))))
        gemm = library.cblas_gemm_bf16bf16f32
    except (StopIteration, OSError, AttributeError):
        return None
    size, pointer, scalar = ctypes.c_int, ctypes.c_void_p, ctypes.c_float
    gemm.argtypes = [size] * 6 + [scalar, pointer, size, pointer, size, scalar, pointer, size]
    gemm.restype = None
    return gemm


@functools.cache
def available() -> bool:
    """Whether this torch carries MKL's bfloat16 product and the C kernels (the split) build here."""
    return _gemm() is not None and ckernels.available()


def allowed() -> bool:
    """Whether float32 products may run this way: torch's float32 matmul precision is not "highest"."""
    return torch.get_float32_matmul_precision() != "highest"


def split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo), bfloat16 tensors of t's shape with hi + lo = t to ~2^-16 of each element (t float32)."""
    t = t.contiguous()
    n = t.numel()
    hi, lo = torch.empty(2, *t.shape, dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    ckernels.library().idefics2_split_bf16(t.data_ptr(), hi.data_ptr(), lo.data_ptr(), n, threads)
    return hi, lo


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) for float32 CPU tensors, as hi.hi + hi.lo + lo.hi (see the module), outside
    autograd (as `linear`'s kernels run: under no_grad, or in a hand-written backward pass). `weight` (N, K)
    may be a transposed view of a contiguous (K, N) tensor (a backward pass's grad @ W): it is read in
    place."""
    if not available():
        raise RuntimeError("bf16x3 products need torch's MKL (cblas_gemm_bf16bf16f32) and the C kernels")
    operands = (x, weight) if bias is None else (x, weight, bias)
    if any(t.dtype != torch.float32 or not t.is_cpu for t in operands):
        raise ValueError("bf16x3.linear multiplies float32 CPU tensors")
    n, k = weight.shape
    rows = x.reshape(x.shape[:-1].numel(), k)  # (M, K)
    if weight.is_contiguous():
        stored, order, lead = weight, _TRANSPOSE, k  # (N, K): rows @ stored.T
    elif weight.t().is_contiguous():
        stored, order, lead = weight.t(), _NO_TRANSPOSE, n  # (K, N): rows @ stored
    else:
        stored, order, lead = weight.contiguous(), _TRANSPOSE, k
    m = rows.shape[0]
    if bias is not None:
        out = bias.expand(m, n).contiguous()
    else:
        out = torch.empty(m, n) if k else torch.zeros(m, n)
    if m and n and k:
        x_hi, x_lo = split(rows)
        w_hi, w_lo = split(stored)
        gemm, beta = _gemm(), 0.0 if bias is None else 1.0
        for a, b in ((x_hi, w_lo), (x_lo, w_hi), (x_hi, w_hi)):  # the small terms first
            gemm(_ROW_MAJOR, _NO_TRANSPOSE, order, m, n, k, 1.0, a.data_ptr(), k, b.data_ptr(), lead, beta,
                 out.data_ptr(), n)  # fmt: skip
            beta = 1.0
    return out.view(*x.shape[:-1], n)
