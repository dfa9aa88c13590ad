"""Quantized weight formats as plain tensors: quantizing float weights, dequantizing them, the
compressed-tensors packing that saved checkpoints use, and AutoAWQ's "GEMM" layout. Nothing here depends on
the device or on a kernel.

The portable form (what a QuantizedLinear holds and `state_dict()` gives; a layer of N outputs, K inputs):

- int8, one scale per output channel (symmetric): `qweight` int8 [N, K], `scales` float32 [N];
  weight[n, k] = qweight[n, k] * scales[n].
- int4, one scale per group of `g` consecutive inputs: `qweight` uint8 [N, K/2], byte j of row n holding
  q[n, 2j] in its high nibble and q[n, 2j + 1] in its low nibble (q in 0..15); `scales` [N, K/g] (bfloat16
  from our quantizer, float16 from AWQ checkpoints) and, for layers read from AWQ or from older idefics2
  checkpoints only, `zeros` like `scales`;
  weight[n, k] = (q[n, k] - 8) * scales[n, k // g] (+ zeros[n, k // g]).
  This is the zero-point convention of torch's int4 kernels (CPU and CUDA), so no conversion is needed there.

Checkpoints store the zero-point-free layers in compressed-tensors' "pack-quantized" form (see
to_compressed / from_compressed): the same integers, eight int4 or four int8 values per int32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INT4_GROUP_SIZES = (32, 64, 128, 256)  # the group sizes torch's int4 kernels accept
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ: nibble i of a packed int32 holds column AWQ_ORDER[i] of 8
CHUNK_BYTES = 8 * 2**20


def group_size_for(in_features: int, requested: int) -> int:
    """The int4 group size of a layer with `in_features` inputs: `requested`, or the largest smaller kernel
    group size dividing the input width (a 160-wide layer with 128 gets 32); the whole row when none does."""
    for size in sorted((s for s in INT4_GROUP_SIZES if s <= requested), reverse=True):
        if in_features % size == 0:
            return size
    return in_features


# ---- int8 -------------------------------------------------------------------------------------------------


def _row_slices(weight: torch.Tensor):
    """Slices of rows of about CHUNK_BYTES in float32: quantizing a slice at a time keeps the temporaries
    small (a whole lm_head in float32 is hundreds of MB)."""
    step = max(1, CHUNK_BYTES // (4 * weight.shape[1]))
    return (slice(start, start + step) for start in range(0, weight.shape[0], step))


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float weight [N, K] -> (qweight int8 [N, K], scales float32 [N]), rounding to the nearest step."""
    qweight = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for rows in _row_slices(weight):
        w = weight[rows].detach().float()
        scales[rows] = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
        qweight[rows] = torch.round(w / scales[rows, None]).clamp_(-127, 127)
    return qweight, scales


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (qweight.float() * scales.float()[:, None]).to(dtype)


# ---- int4 -------------------------------------------------------------------------------------------------


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """values in 0..15, [N, K] (K even) -> uint8 [N, K/2], even columns in the high nibble."""
    v = values.to(torch.uint8)
    return ((v[:, 0::2] << 4) | v[:, 1::2]).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 [N, K] in 0..15 (the inverse of pack_nibbles)."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).reshape(packed.shape[0], -1)


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float weight [N, K] -> (qweight uint8 [N, K/2], scales bf16 [N, K/g]), without zero points.

    Each group's step is the smallest that keeps its largest weight within 7.5 steps and its smallest within
    -8.5 (so every weight is within half a step of the grid -8..7); it is rounded up to bfloat16 first and the
    integers chosen for the rounded step, so that the stored numbers are the ones the grid was fitted with
    (and (q - 8) * step is exact in float32).
    """
    n, k = weight.shape
    if k % group_size or k % 2:
        raise ValueError(
            f"int4 needs an even input width divisible by the group size, got {k} and {group_size}"
        )
    qweight = torch.empty(n, k // 2, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(n, k // group_size, dtype=torch.bfloat16, device=weight.device)
    for rows in _row_slices(weight):
        w = weight[rows].detach().float().reshape(-1, k // group_size, group_size)
        step = torch.maximum(w.amax(dim=-1) / 7.5, w.amin(dim=-1) / -8.5).clamp(min=1e-8)
        rounded = step.to(torch.bfloat16)  # up, never down: the range must still fit
        scales[rows] = torch.where(rounded.float() < step, torch.nextafter(rounded, rounded + 1), rounded)
        s = scales[rows].float()[..., None]
        qweight[rows] = pack_nibbles(torch.round(w / s + 8.0).clamp_(0, 15).reshape(-1, k))
    return qweight, scales


def dequantize_int4(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    q = unpack_nibbles(qweight).float()
    n, k = q.shape
    groups = scales.shape[1]
    w = (q.reshape(n, groups, k // groups) - 8.0) * scales.float()[..., None]
    if zeros is not None:
        w += zeros.float()[..., None]
    return w.reshape(n, k).to(dtype)


# ---- compressed-tensors "pack-quantized" ------------------------------------------------------------------
# Value i of a row lies in bits [b * i, b * (i + 1)) of the row's int32 words (b = 4 or 8 bits; little-endian
# words, so on the little-endian hosts torch runs on, byte j holds values 2j (low nibble) and 2j + 1 for int4,
# value j for int8), each stored as q + 2^(b-1) (q signed: -8..7, -128..127). Rows are padded with zeros to a
# whole number of words.


def to_compressed(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """The portable qweight (int8 [N, K] or int4 uint8 [N, K/2]) -> compressed-tensors' weight_packed, int32
    [N, ceil(K * bits / 32)]."""
    if bits == 8:
        values = qweight.view(torch.uint8) ^ 0x80  # q + 128
    else:
        values = (qweight << 4) | (qweight >> 4)  # even columns to the low nibble
    pad = -values.shape[1] % 4
    return F.pad(values, (0, pad)).contiguous().view(torch.int32)


def from_compressed(weight_packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """compressed-tensors' weight_packed int32 [N, W] -> the portable qweight of a layer with `in_features`
    inputs (a copy)."""
    values = weight_packed.contiguous().view(torch.uint8)[:, : in_features * bits // 8]
    if bits == 8:
        return (values ^ 0x80).view(torch.int8)
    return (values << 4) | (values >> 4)


# ---- AutoAWQ "GEMM" checkpoints ---------------------------------------------------------------------------


def _awq_columns(packed: torch.Tensor) -> torch.Tensor:
    """AutoAWQ int32 [R, C/8] (8 nibbles per int32 along the columns, in AWQ_ORDER) -> uint8 [R, C]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed.to(torch.int32)[..., None] >> shifts) & 15  # [R, C/8, 8]: nibble i
    columns = torch.empty_like(nibbles)
    columns[..., list(AWQ_ORDER)] = nibbles  # nibble i is column AWQ_ORDER[i] of its group of 8
    return columns.reshape(packed.shape[0], -1).to(torch.uint8)


def awq_to_int4(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An AutoAWQ GEMM layer -> the portable int4 tensors (qweight, scales, zeros).

    AutoAWQ stores the transposed problem: qweight int32 [K, N/8], qzeros int32 [K/g, N/8] (integer zero
    points), scales float16 [K/g, N], and weight[n, k] = (q[k, n] - z[k // g, n]) * s[k // g, n]. In the
    portable form that zero point becomes the float `(8 - z) * s`.
    """
    q = _awq_columns(qweight).t()  # [N, K]
    z = _awq_columns(qzeros).t().float()  # [N, K/g]
    s = scales.t().contiguous()  # [N, K/g]
    zeros = ((8.0 - z) * s.float()).to(s.dtype)
    return pack_nibbles(q), s, zeros.contiguous()
