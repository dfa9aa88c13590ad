"""QuantizedLinear: a linear layer with an int8 or int4 weight, computed by the fastest route the device has.

Routes (chosen per call among those the device supports, by measured speed on CPUs: see
idefics2.modeling.kernels.choose):

- **kernel** (few rows: decode steps): torch's weight-only kernels, int8 `_weight_int8pack_mm` and int4
  `_weight_int4pack_mm_for_cpu` / `_weight_int4pack_mm` (CUDA tinygemm), with bfloat16 activations (the
  only ones their x86 code is vectorised for; the result is cast back to the input's dtype).
- **dequantize** (many rows: prefill, vision tower, perceiver; or where no kernel runs): the weight is
  dequantized, a slice of rows at a time, into a float buffer reused by every layer (one per thread and
  dtype, at most WORKSPACE_BYTES), and multiplied with the ordinary float product; in bfloat16 for float32
  inputs on CPUs with bfloat16 instructions (twice as fast there, and the activations' rounding of the
  kernel route), in the input's dtype elsewhere.
- **training** (autograd on): the same dequantized product inside an autograd function that keeps nothing
  for the backward pass but the layer and dequantizes again there, so gradients flow to the input (and to
  LoRA adapters) while the frozen quantized weight never gets a float copy that lives across the step.

A layer holds its weight once. int4 weights live in the device kernel's packed layout once the layer is on
a device that has one (the CPU layout depends on the instruction set, so it is made when loading, never
saved); `state_dict()` always gives the portable form of idefics2.quantization.formats, which
`save_pretrained` stores in compressed-tensors' form.
"""

from __future__ import annotations

import copy
import functools
import itertools
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from idefics2.modeling import ckernels, kernels
from idefics2.modeling.attention import activation, linear, linear_with, weights_alone
from idefics2.quantization.formats import (
    INT4_GROUP_SIZES,
    dequantize_int4,
    dequantize_int8,
    pack_nibbles,
    quantize_int4,
    quantize_int8,
    unpack_nibbles,
)

BITS = (8, 4)
WORKSPACE_BYTES = 64 * 2**20  # the dequantize route works on slices of rows that fit in this many bytes
_PAD_ROWS = 64  # packed int4 weights have their rows padded to a multiple of this (the kernels' blocks)
_workspaces = threading.local()
_layout_lock = threading.Lock()  # held while a layer's int4 weight moves to the C kernels' layout


def workspace(numel: int, dtype: torch.dtype, device: torch.device, use: str = "weight") -> torch.Tensor:
    """A flat buffer of `numel` elements, reused by every call on this thread for this use, dtype and device
    (a fresh buffer per call would cost page faults on every layer)."""
    buffers = _workspaces.__dict__.setdefault("buffers", {})
    key = (use, dtype, device)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: written in place inside inference mode or not
            buffer = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


class QuantizedLinear(nn.Module):
    """y = x @ W.T + b with W stored as int8 (per output channel) or int4 (per group of inputs).

    Buffers (portable form): `qweight`, `scales` and, for int4 layers with zero points (`zero_points=True`:
    those read from AWQ or older idefics2 checkpoints), `zeros`; `bias` is a float parameter.
    `weight` is a stand-in with the float weight's shape, dtype and device (for code that asks a layer for
    those) holding no values: `dequantized_weight()` gives the values.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int | None = None,
        bias: bool = False,
        *,
        dtype: torch.dtype = torch.float32,
        scale_dtype: torch.dtype = torch.bfloat16,
        zero_points: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if bits not in BITS:
            raise ValueError(f"bits must be 8 or 4, got {bits!r}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        n, k = out_features, in_features
        if bits == 8:
            self.group_size = k
            self.register_buffer("qweight", torch.empty(n, k, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(n, dtype=torch.float32, device=device))
            self.zeros: torch.Tensor | None = None
        else:
            if group_size is None or k % group_size or k % 2:
                raise ValueError(
                    f"int4 needs an even input width divisible by the group size: {k}, {group_size}"
                )
            self.group_size = group_size
            self.register_buffer("qweight", torch.empty(n, k // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.empty(n, k // group_size, dtype=scale_dtype, device=device))
            if zero_points:
                self.register_buffer("zeros", torch.empty_like(self.scales))
            else:
                self.zeros = None
        self.bias = nn.Parameter(torch.empty(n, dtype=dtype, device=device)) if bias else None
        # the float dtype and device of the layer's inputs and outputs; converted by .to() like any float
        self.register_buffer("_standin", torch.full((1,), float("nan"), dtype=dtype, device=device), False)
        self.packing: str | None = None  # None: qweight is portable; else the kernel layout it is packed in
        self.kernel_scales: torch.Tensor | None = None  # the kernel's bfloat16 scales (and zeros), if any
        self._c_scales: tuple[torch.Tensor, torch.Tensor] | None = None  # (scales, their float32 copy)

    # ---- construction ------------------------------------------------------------------------------------

    @classmethod
    def from_float(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, bits: int, group_size: int | None = None
    ) -> QuantizedLinear:
        """Quantize a float weight [N, K] (and keep the bias as it is)."""
        n, k = weight.shape
        layer = cls(k, n, bits, group_size, bias is not None, dtype=weight.dtype, device="meta")
        quantized = quantize_int8(weight) if bits == 8 else quantize_int4(weight, group_size)
        tensors = dict(zip(("qweight", "scales"), quantized, strict=True))
        layer.set_tensors(tensors, bias=bias, dtype=weight.dtype)
        return layer

    def set_tensors(
        self, tensors: dict[str, torch.Tensor], *, bias: torch.Tensor | None = None, dtype: torch.dtype
    ) -> None:
        """Take the portable tensors (`qweight`, `scales`, `zeros`) as they are (names and shapes checked by
        the caller) and pack them for their device's kernel."""
        device = tensors["qweight"].device
        for name, tensor in tensors.items():
            setattr(self, name, tensor)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().to(device=device, dtype=dtype), requires_grad=False)
        self._standin = torch.full((1,), float("nan"), dtype=dtype, device=device)
        self.packing = None
        self.pack_for_device()

    # ---- the device's layout -----------------------------------------------------------------------------

    def pack_for_device(self) -> None:
        """Put the weight in the layout of this device's kernel (int4), and make the kernel's scales."""
        self.kernel_scales = None
        if self.qweight.is_meta:
            return
        device = self.qweight.device
        if self.bits == 8:  # unit scales: the real ones multiply the output in float32
            self.kernel_scales = torch.ones(self.out_features, dtype=torch.bfloat16, device=device)
            return
        layout = kernels.int4_weight_layout(device)
        k = self.in_features
        if layout is None or self.group_size not in INT4_GROUP_SIZES or (layout == "tinygemm" and k % 32):
            return
        n = self.out_features
        rows = -(-n // _PAD_ROWS) * _PAD_ROWS
        portable = F.pad(self.qweight, (0, 0, 0, rows - n))  # [rows, K / 2]
        if layout == "tinygemm":
            inner_k_tiles = 8 if k % 128 == 0 else 4 if k % 64 == 0 else 2
            packed = torch.ops.aten._convert_weight_to_int4pack(portable, inner_k_tiles)
        else:
            # blocks of 64 rows are packed independently and stored one after the other, so slices of rows
            # are packed one at a time (the kernel's input is int32: 8x the packed size)
            packed = torch.empty(portable.shape, dtype=torch.uint8, device=portable.device)
            step = max(_PAD_ROWS, WORKSPACE_BYTES // 4 // (4 * k) // _PAD_ROWS * _PAD_ROWS)
            for start in range(0, rows, step):
                values = unpack_nibbles(portable[start : start + step]).int()
                packed[start : start + step] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 2)
        zeros = torch.zeros_like(self.scales) if self.zeros is None else self.zeros
        scale_zeros = torch.stack([self.scales, zeros], dim=-1).to(torch.bfloat16)  # [N, K/g, 2]
        scale_zeros = F.pad(scale_zeros, (0, 0, 0, 0, 0, rows - n))
        self.kernel_scales = scale_zeros.transpose(0, 1).contiguous()  # [K/g, rows, 2]
        self.qweight, self.packing = packed, layout

    def nibbles(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The int4 values (uint8 in 0..15) of weight rows [start, stop), whatever the layout holding them."""
        stop = self.out_features if stop is None else stop
        if self.packing is None:
            return unpack_nibbles(self.qweight[start:stop])
        if self.packing.startswith("cpu"):
            block = int(self.packing[3:])
            first, last = start // block * block, -(-stop // block) * block
            rows = kernels.cpu_int4_rows(self.qweight[first:last], block)
            return rows[start - first : stop - first]
        return self._nibbles_from_kernel()[start:stop]

    def _nibbles_from_kernel(self) -> torch.Tensor:
        """Read a packed layout back through the kernel itself: with unit scales and zero offsets it returns
        q - 8 exactly (small integers are exact in bfloat16), whatever the layout."""
        k = self.in_features
        rows = self.kernel_scales.shape[1]
        unit = torch.zeros_like(self.kernel_scales)
        unit[..., 0] = 1.0
        identity = torch.eye(k, dtype=torch.bfloat16, device=self.qweight.device)
        run = (
            torch.ops.aten._weight_int4pack_mm
            if self.packing == "tinygemm"
            else (torch.ops.aten._weight_int4pack_mm_for_cpu)
        )
        values = run(identity, self.qweight, self.group_size, unit)  # [K, rows] = (q - 8).T
        return (values.t()[:rows] + 8).round().to(torch.uint8)

    def _unpack(self) -> None:
        """Back to the portable layout (before a device change or loading new values)."""
        if self.packing is not None:
            self.qweight, self.packing, self.kernel_scales = pack_nibbles(self.nibbles()), None, None

    def _apply(self, fn, recurse: bool = True):
        # .to(device) and .to(dtype) go through here: the portable form moves, the float stand-in and bias
        # follow the float conversions, and the scales keep their own dtype (a bfloat16 model keeps exact
        # float32 int8 scales; a float16 model keeps bfloat16 int4 scales and zeros)
        moves = fn(self._standin).device != self.qweight.device
        if moves:  # a packed layout belongs to its device: unpack here, pack again there
            self._unpack()
        scale_dtypes = {
            name: getattr(self, name).dtype for name in ("scales", "zeros") if getattr(self, name) is not None
        }
        super()._apply(fn, recurse)
        for name, dtype in scale_dtypes.items():
            setattr(self, name, getattr(self, name).to(dtype))
        if moves or self.bits == 8:
            self.pack_for_device()
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.packing is not None:
            destination[prefix + "qweight"] = pack_nibbles(self.nibbles())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        loads = any(prefix + name in state_dict for name in ("qweight", "scales", "zeros"))
        if loads:
            self._unpack()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if loads:
            self.pack_for_device()

    # ---- values ------------------------------------------------------------------------------------------

    @property
    def weight(self) -> torch.Tensor:
        """A stand-in [N, K] with the float weight's dtype and device; it holds no values (NaN)."""
        return self._standin.expand(self.out_features, self.in_features)

    @property
    def dtype(self) -> torch.dtype:
        return self._standin.dtype

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight [N, K] that every route computes with."""
        dtype = dtype or self.dtype
        if self.bits == 8:
            return dequantize_int8(self.qweight, self.scales, dtype)
        return dequantize_int4(pack_nibbles(self.nibbles()), self.scales, self.zeros, dtype)

    def _dequantize_rows(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Weight rows [start, stop) written into `out` [stop - start, K] (float). int8 writes the integers
        alone (exact in any float dtype): its scales multiply the product's output columns instead. int4
        writes (q - 8) * scale (+ zero) per group, each step in float32, as `dequantized_weight()`: in one C
        pass from the portable layout on CPU (idefics2.modeling.ckernels.dequantize_int4), else through a
        float32 copy of the nibbles."""
        if self.bits == 8:
            return out.copy_(self.qweight[start:stop])
        zeros = None if self.zeros is None else self.zeros[start:stop]
        portable = self.packing is None and self.qweight.is_cpu
        if portable and out.dtype in ckernels.DTYPES and out.is_contiguous() and kernels.c_kernels():
            return ckernels.dequantize_int4(self.qweight[start:stop], self.scales[start:stop], zeros, out)
        rows = stop - start
        full = (
            out if out.dtype == torch.float32 else workspace(out.numel(), torch.float32, out.device, "int4")
        )
        full = full.view(rows, self.in_features)
        full.copy_(self.nibbles(start, stop))
        groups = full.view(rows, -1, self.group_size)
        groups.sub_(8.0).mul_(self.scales[start:stop].float()[..., None])
        if zeros is not None:
            groups.add_(zeros.float()[..., None])
        return out if full is out else out.copy_(full)

    # ---- forward -----------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._compute(x, None)

    def forward_activated(self, x: torch.Tensor, act: str) -> torch.Tensor:
        """act(self(x)); the activation fused into the float product unless hooks (LoRA) watch the layer."""
        if self._forward_hooks or self._forward_pre_hooks:
            return activation(act)(self(x))
        return self._compute(x, act)

    def _compute(self, x: torch.Tensor, act: str | None) -> torch.Tensor:
        if torch.is_grad_enabled() and (
            x.requires_grad or (self.bias is not None and self.bias.requires_grad)
        ):
            out = _DequantizedProduct.apply(x, self.bias, self)
            return out if act is None else activation(act)(out)
        rows = x.numel() // self.in_features
        if x.is_cpu:
            if self.bits == 4 and self.packing is not None and kernels.row_class(rows) in ("prefill", "long"):
                self._move_where_decode_goes(x.dtype)
            kernel = self._cpu_kernel(x.dtype, rows)
        else:
            kernel = self.kernel_names(x.device, x.dtype, rows)[0]
        return self.product_with(kernel, x, act)

    def _move_where_decode_goes(self, dtype: torch.dtype) -> None:
        """Before a product of prefill rows of an int4 layer in the device kernel's layout: where its decode
        steps take the C kernel, which moves it to the portable layout at their first call, move now: the
        weight then dequantizes in C (1/10 of the time from the device kernel's layout on 14336x4096), and
        the prefill's kernel is chosen in the layout it will run in (the device kernel is no candidate there,
        so nothing is raced). Not from product_with, which the races call on copies inside a measurement."""
        if self.c_chosen(dtype, 1):
            self._c_int4_operands()

    def _cpu_kernel(self, dtype: torch.dtype, rows: int) -> str:
        return kernels.choose(
            f"int{self.bits}",
            self._kernel_shape(dtype),
            rows,
            lambda: self.kernel_names(torch.device("cpu"), dtype, rows),
            lambda bench_rows: self._bench(dtype, bench_rows),
        )

    def _kernel_shape(self, dtype: torch.dtype) -> tuple:
        return (dtype, self.out_features, self.in_features, self.group_size)

    def c_chosen(self, dtype: torch.dtype, rows: int, within: float = 1.0) -> bool:
        """Whether this layer's forward on `rows` CPU rows of `dtype` inputs (under no_grad) runs the C kernel
        with c_operands(dtype, "move"): what a caller doing that product in C itself computes the same. With
        `within` > 1, also where the C kernel was measured at most `within` times the chosen kernel's time
        (for a caller whose own C call saves more than that difference)."""
        if not self.qweight.is_cpu or self.c_operands(dtype, "check") is None:
            return False
        kernel = self._cpu_kernel(dtype, rows)
        if kernel == "kernel" and self.bits == 4 and self.packing is None:  # see product_with
            kernel = "c" if "c" in self.kernel_names(torch.device("cpu"), dtype, rows) else ""
        if kernel == "c":
            return True
        op, shape = f"int{self.bits}", self._kernel_shape(dtype)
        return within > 1.0 and kernels.measured_within(op, shape, rows, "c", within)

    def c_operands(
        self, dtype: torch.dtype, layout: str = "held"
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(int8 weight, float32 scales), or (int4 nibbles, float32 group scales) in the portable layout, for
        the C kernels (ckernels.gated, ckernels.decoder_step) with inputs of `dtype`; None where this layer
        cannot go there (zero points, a bias, a hook, a LoRA adapter). An int4 weight held in the device
        kernel's layout gives None (`layout="held"`), moves to the portable layout (`"move"`, as the layer's
        own first C product does), gives a portable copy, the layer unchanged (`"copy"`), or gives itself
        (`"check"`: to know that it can go there, not to compute with)."""
        plain = self.bias is None and weights_alone(self)
        if not plain or dtype not in ckernels.DTYPES:
            return None
        if self.bits == 8:
            return self.qweight, self.scales
        fits = self.group_size % ckernels.INT4_GROUP_MULTIPLE == 0 and self.zeros is None
        if not fits or not self.qweight.is_cpu or (self.packing is not None and layout == "held"):
            return None
        if self.packing is not None and layout == "check":
            return self.qweight, self.scales
        if self.packing is not None and layout == "copy":
            return pack_nibbles(self.nibbles()), self.scales.float()
        return self._c_int4_operands()

    def kernel_names(self, device: torch.device, dtype: torch.dtype, rows: int) -> list[str]:
        """The kernels of this layer that run on `device` for inputs of `dtype`, preferred first for `rows`
        rows when nothing is measured (see kernels.OPS): the int8 / int4 kernel up to
        QUANTIZED_KERNEL_MAX_ROWS rows, else the dequantized product, in bfloat16 for float32 inputs on CPUs
        with bfloat16 instructions (the activations' rounding of the kernel route). "dequantize" is last."""
        if self.bits == 8:
            has_kernel = kernels.int8_weight_kernel(device)
        else:
            has_kernel = self.packing is not None and kernels.int4_weight_layout(device) == self.packing
        low = device.type == "cpu" and dtype == torch.float32 and kernels.native_bfloat16()
        names = ["dequantize_bfloat16", "dequantize"] if low else ["dequantize"]
        if device.type == "cpu" and dtype in ckernels.DTYPES and rows <= ckernels.MAX_ROWS:
            int4_fits = self.zeros is None and self.group_size % ckernels.INT4_GROUP_MULTIPLE == 0
            if (self.bits == 8 or int4_fits) and kernels.c_kernels():
                names.append("c")  # raced when measuring; torch's routes preferred where nothing is measured
        if has_kernel:
            names.insert(0 if rows <= kernels.QUANTIZED_KERNEL_MAX_ROWS[self.bits] else 1, "kernel")
        return names

    def product_with(self, kernel: str, x: torch.Tensor, act: str | None = None) -> torch.Tensor:
        """act(x @ W.T + b) by the named kernel of `kernel_names`."""
        if kernel == "c":  # int8 rows times float32 scales (int4: group scales), bias and activation
            fused = act if act in ckernels.ACTIVATIONS else None
            if self.bits == 8:
                out = ckernels.linear(x, self.qweight, self.scales, self.bias, fused)
            else:
                out = ckernels.linear_int4(x, *self._c_int4_operands(), self.group_size, self.bias, fused)
            return out if act is None or fused is not None else activation(act)(out)
        if kernel == "kernel" and self.bits == 4 and self.packing is None:
            # the layer went to the C kernels' layout since this choice was made: their product where it runs
            # (decode rows), else the preferred dequantized product (in bfloat16 where the CPU has it)
            names = self.kernel_names(x.device, x.dtype, x.numel() // self.in_features)
            kernel = "c" if "c" in names else names[0]
        if kernel != "kernel":
            low = kernel == "dequantize_bfloat16"
            return self.dequantized_product(x, act, torch.bfloat16 if low else None)
        out = self._kernel_product(x)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out if act is None else activation(act)(out)

    def _c_int4_operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(portable nibbles, float32 scales) for the C int4 kernel. The first call moves the weight from the
        device kernel's layout to the portable one (the layer holds one layout: from then on its other routes
        read that one) and keeps a float32 copy of the scales (1/16 of the weight's bytes at group 128)."""
        if self.packing is not None:
            with _layout_lock:  # another thread's first call may be moving it too
                self._unpack()
        if self._c_scales is None or self._c_scales[0] is not self.scales:
            self._c_scales = (self.scales, self.scales.float().contiguous())
        return self.qweight, self._c_scales[1]

    def _bench(self, dtype: torch.dtype, rows: int):
        x = torch.randn(rows, self.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
        nbytes = sum(t.numel() * t.element_size() for t in (self.qweight, self.scales))
        copies = kernels.streaming_copies(nbytes, rows)
        layers: dict[str, Iterator[QuantizedLinear]] = {}  # copies per kernel: the C one changes the layout

        def run(kernel: str) -> torch.Tensor:
            if kernel not in layers:
                first = copy.deepcopy(self)
                if kernel == "c" and self.bits == 4:
                    # the layout moves now, not inside a timed call, and once: the other copies are its clones
                    # (moving one of idefics2-8b's 14336x4096 weights takes ~0.12 s, cloning it ~5 ms)
                    first._c_int4_operands()
                layers[kernel] = itertools.cycle([first, *(copy.deepcopy(first) for _ in range(copies - 1))])
            return next(layers[kernel]).product_with(kernel, x)

        return run

    def _kernel_product(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T on the device's int8 / int4 kernel (bfloat16 activations)."""
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        if self.bits == 8:  # bfloat16 product times float32 scales: one kernel, the result in float32
            out = torch.mul(
                torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.kernel_scales), self.scales
            )
        else:
            run = (
                torch.ops.aten._weight_int4pack_mm
                if self.packing == "tinygemm"
                else (torch.ops.aten._weight_int4pack_mm_for_cpu)
            )
            out = run(x2, self.qweight, self.group_size, self.kernel_scales)[:, : self.out_features]
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def dequantized_product(
        self, x: torch.Tensor, act: str | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """act(x @ W.T + b) with W dequantized into the shared buffer, a slice of output rows at a time;
        computed in `dtype` (default: x's), returned in x's dtype."""
        n, k = self.out_features, self.in_features
        dtype = dtype or x.dtype
        x2 = x.reshape(-1, k).to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        step = max(_PAD_ROWS, WORKSPACE_BYTES // (k * x2.element_size()) // _PAD_ROWS * _PAD_ROWS)
        buffer = workspace(min(step, n) * k, dtype, x.device)
        scaled_after = self.bits == 8  # int8: x @ q.T, then each output column times its scale
        fused_bias, fused_act = (None, None) if scaled_after else (bias, act)
        # decode rows (this route as another's reference, or where no other runs): torch's product as it is;
        # measuring kernels for the weight's slices would cost more than the product
        product = linear if x2.shape[0] > ckernels.MAX_ROWS else functools.partial(linear_with, "aten")
        if step >= n:
            out = product(x2, self._dequantize_rows(0, n, buffer.view(n, k)), fused_bias, fused_act)
        else:
            out = x2.new_empty(x2.shape[0], n)
            for start in range(0, n, step):
                stop = min(start + step, n)
                weight = self._dequantize_rows(start, stop, buffer[: (stop - start) * k].view(-1, k))
                part_bias = None if fused_bias is None else fused_bias[start:stop]
                out[:, start:stop] = product(x2, weight, part_bias, fused_act)
        if scaled_after:  # in float32 (or wider): the scales stay exact
            out = out.to(torch.promote_types(dtype, torch.float32)).mul_(self.scales)
            out = out if bias is None else out.add_(bias)
            out = out if act is None else activation(act)(out)
        return out.to(x.dtype).reshape(*x.shape[:-1], n)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        group += ", zero_points=True" if self.zeros is not None else ""
        packing = f", packing={self.packing}" if self.packing else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}{group}, "
            f"bias={self.bias is not None}{packing}"
        )


class _DequantizedProduct(torch.autograd.Function):
    """x @ W.T + b for a frozen quantized W: nothing but the layer is kept for backward, where W is
    dequantized again to give the input's gradient (and the bias's, when it trains)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        ctx.has_bias = bias is not None
        ctx.x_shape = x.shape
        return layer.dequantized_product(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        layer = ctx.layer
        grad_x = grad_bias = None
        grad2 = grad_out.reshape(-1, layer.out_features)
        if ctx.needs_input_grad[0]:
            weight = layer.dequantized_weight(grad_out.dtype)
            grad_x = (grad2 @ weight).reshape(ctx.x_shape)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad2.sum(dim=0)
        return grad_x, grad_bias, None
