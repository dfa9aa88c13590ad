"""Attention kernels (sdpa and eager), boolean mask building and the shared small layers."""

from __future__ import annotations

import copy
import itertools

import torch
import torch.nn.functional as F
from torch import nn

from idefics2.modeling import bf16x3, ckernels, kernels

ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


def check_attn_implementation(name: str) -> str:
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {name!r}")
    return name


# Up to this many queries (decode steps) without autograd, attention may run as two grouped matmuls
# (grouped_matmul_attention) instead of sdpa. On CUDA always: no fallback to sdpa's math kernel (boolean
# mask + grouped kv heads) and nothing that stops graph capture. On CPU the faster of the two is measured per
# dtype, head shape and class of cached keys (kernels.choose, op "attention"); where nothing is measured,
# grouped matmuls for 16-bit floats on CPUs with bfloat16 instructions (AMD Zen5, bfloat16: 3-6x sdpa for
# one query), sdpa elsewhere. Measured on a Zen 4, one query, 16 heads over 4 kv heads of 64: float32 sdpa
# 31 / 94 / 462 us over 100 / 400 / 2,000 keys, grouped matmuls 45 / 89 / 305 us.
SMALL_QUERY = 8
_CPU_GROUPED_DECODE_DTYPES = (torch.bfloat16, torch.float16)
# classes of cached keys for the measured choice: (most keys, name); more keys: the last class, timed at
# _LONGEST_KEYS
DECODE_KEY_CLASSES = ((512, "keys<=512"), (2048, "keys<=2048"))
_LONGEST_KEYS = (8192, "keys>2048")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    scale: float,
    impl: str = "sdpa",
    dropout: float = 0.0,
    causal: bool = False,
) -> torch.Tensor:
    """Multi-head attention with grouped kv heads.

    q: (B, H, T, D); k, v: (B, Hkv, S, D) with H a multiple of Hkv; mask: bool, broadcastable to (B, H, T, S),
    True where a query may attend to a key, or None for full attention (or for plain causal attention over
    T == S positions when `causal`, which lets sdpa pick its fastest kernels). Returns (B, T, H * D).
    """
    causal = causal and mask is None
    small = q.shape[2] <= SMALL_QUERY and not torch.is_grad_enabled()
    kernel = "grouped"
    if small and not q.is_cuda:
        kernel = decode_attention_kernel(q, k) if q.is_cpu and impl == "sdpa" and dropout == 0.0 else "sdpa"
        small = kernel != "sdpa"
    if impl == "sdpa" and mask is None and not causal and _cpu_bfloat16_inference(q) and dropout == 0.0:
        out = per_head_attention(q, k, v, scale=scale)
    elif impl == "sdpa" and not small:
        n_rep = q.shape[1] // k.shape[1]
        if n_rep > 1 and mask is not None and q.is_cuda:
            # CUDA's memory-efficient kernel takes a mask but not grouped kv heads: repeat them for it
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
            n_rep = 1
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=dropout,
            scale=scale,
            is_causal=causal,
            enable_gqa=n_rep > 1,
        )
    else:
        if causal:
            mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        if small and kernel == "c":
            out = _c_attention(q, k, v, mask, scale)
        else:
            out = grouped_matmul_attention(q, k, v, mask, scale=scale, dropout=dropout)
    b, h, t, d = out.shape
    return out.transpose(1, 2).reshape(b, t, h * d)


def decode_attention_kernel(q: torch.Tensor, k: torch.Tensor) -> str:
    """ "grouped" or "sdpa": the kernel measured fastest here (kernels.choose) for a CPU attention of q's
    few queries (B, H, T, D) over k's cached keys (B, Hkv, S, D)."""
    _, heads, queries, head_dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    most, key_class = next(((n, name) for n, name in DECODE_KEY_CLASSES if keys <= n), _LONGEST_KEYS)
    return kernels.choose(
        "attention",
        (q.dtype, heads, kv_heads, head_dim, key_class),
        queries,
        lambda: decode_attention_kernels(q.dtype),
        lambda rows: _attention_bench(q.dtype, heads, kv_heads, head_dim, most, rows),
    )


def decode_attention_kernels(dtype: torch.dtype) -> list[str]:
    """The CPU kernels of decode attention, preferred first: grouped matmuls for 16-bit floats on CPUs with
    bfloat16 instructions, sdpa elsewhere; our C kernel (ckernels.attention) where it builds."""
    hardware_bfloat16 = dtype in _CPU_GROUPED_DECODE_DTYPES and kernels.native_bfloat16()
    names = ["grouped", "sdpa"] if hardware_bfloat16 else ["sdpa", "grouped"]
    if dtype in ckernels.DTYPES and kernels.c_kernels():
        names.insert(1, "c")  # never first: raced when measuring
    return names


def _c_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """ckernels.attention, or the grouped matmuls for a mask that differs between heads (C takes one)."""
    if mask is None:
        mask = torch.ones(1, 1, q.shape[2], k.shape[2], dtype=torch.bool)
    elif mask.dim() < 4:
        mask = mask.expand(1, 1, *mask.shape[-2:])
    elif mask.shape[1] != 1:
        return grouped_matmul_attention(q, k, v, mask, scale=scale)
    return ckernels.attention(q, k, v, mask, scale)


def attention_with(
    kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Attention (B, H, T, D) by the named kernel of `decode_attention_kernels`."""
    if kernel == "grouped":
        return grouped_matmul_attention(q, k, v, mask, scale=scale)
    if kernel == "c":
        return _c_attention(q, k, v, mask, scale)
    enable_gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)


def _attention_bench(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, keys: int, rows: int):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, rows, head_dim, generator=generator).to(dtype)
    k, v = (torch.randn(1, kv_heads, keys, head_dim, generator=generator).to(dtype) for _ in range(2))
    mask = torch.ones(1, 1, rows, keys, dtype=torch.bool)
    return lambda kernel: attention_with(kernel, q, k, v, mask, head_dim**-0.5)


def grouped_matmul_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    scale: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """softmax(q k^T * scale) v with the softmax in float32 (or wider); the n_rep query heads that share a kv
    head are stacked along the query axis, so k and v are read once and never repeated. Returns (B, H, T, D).
    """
    b, h, t, d = q.shape
    h_kv, s = k.shape[1], k.shape[2]
    n_rep = h // h_kv
    qg = q.reshape(b, h_kv, n_rep * t, d)  # query head kv * n_rep + r uses kv head kv
    scores = torch.matmul(qg, k.transpose(-1, -2)).view(b, h_kv, n_rep, t, s) * scale
    softmax_dtype = torch.promote_types(q.dtype, torch.float32)
    if mask is not None:
        if mask.dim() == 4:  # heads axis (1 or H) -> (1, 1) or (Hkv, n_rep)
            heads = (1, 1) if mask.shape[1] == 1 else (h_kv, n_rep)
            mask = mask.reshape(mask.shape[0], *heads, *mask.shape[2:])
        scores = scores.to(softmax_dtype).masked_fill(~mask, torch.finfo(softmax_dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=softmax_dtype).to(q.dtype)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    out = torch.matmul(probs.view(b, h_kv, n_rep * t, s), v)  # (B, Hkv, n_rep * T, D)
    return out.view(b, h, t, d)


# Query rows per block in per_head_attention: its score buffers hold this many rows x keys.
PER_HEAD_QUERY_BLOCK = 1024


def _cpu_bfloat16_inference(q: torch.Tensor) -> bool:
    """bfloat16 inference on a CPU that multiplies bfloat16 in hardware: there, per_head_attention is about
    twice as fast as sdpa; without those instructions (AVX2 only) it is ~30x slower, so sdpa is kept."""
    return (
        q.device.type == "cpu"
        and q.dtype == torch.bfloat16
        and not torch.is_grad_enabled()
        and kernels.native_bfloat16()
    )


def per_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float) -> torch.Tensor:
    """Full (unmasked) attention one head at a time, as two plain matrix products with the softmax in
    float32 between them: for bfloat16 on CPU about twice as fast as sdpa's kernel (which gains nothing from
    bfloat16 here), with the rounding of transformers' eager path (scores and probabilities in bfloat16).
    The scores of a block live in two buffers allocated once per call, so no block allocates memory.

    q: (B, H, T, D); k, v: (B, Hkv, S, D) with H a multiple of Hkv. Returns (B, H, T, D).
    """
    b, h, t, _ = q.shape
    n_rep = h // k.shape[1]
    block = min(t, PER_HEAD_QUERY_BLOCK)
    low = q.new_empty(block, k.shape[2])  # scores, then probabilities, in q's dtype
    wide = torch.empty(block, k.shape[2], dtype=torch.promote_types(q.dtype, torch.float32))
    out = torch.empty_like(q)
    for i in range(b):
        for head in range(h):
            keys, values = k[i, head // n_rep], v[i, head // n_rep]  # (S, D)
            for start in range(0, t, block):
                rows = min(block, t - start)
                scores, work = low[:rows], wide[:rows]
                torch.mm(q[i, head, start : start + rows], keys.t(), out=scores)
                work.copy_(scores).mul_(scale)
                torch.ops.aten._softmax.out(work, -1, False, out=work)  # in place, row by row
                scores.copy_(work)
                torch.mm(scores, values, out=out[i, head, start : start + rows])
    return out


def key_padding_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, S) 0/1 key mask -> bool (B, 1, 1, S), or None when every key is real (full attention)."""
    if mask is None:
        return None
    mask = mask.bool()
    if bool(mask.all()):
        return None
    return mask[:, None, None, :]


def causal_mask(
    attention_mask: torch.Tensor,
    cache_position: torch.Tensor,
    sliding_window: int | None,
) -> torch.Tensor:
    """Decoder mask by slot: (B, S) 0/1 key padding, (T,) query slots -> bool (B, 1, T, S).

    A query at slot q sees key slot s when the key is real, s <= q, and q - s < sliding_window (if set).
    It always sees its own slot, so rows of padding queries are never empty (no NaN).
    """
    key_slot = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    query_slot = cache_position.to(attention_mask.device)[:, None]
    allowed = key_slot[None, :] <= query_slot  # (T, S)
    if sliding_window is not None:
        allowed = allowed & (key_slot[None, :] > query_slot - sliding_window)
    allowed = allowed[None, None] & attention_mask.bool()[:, None, None, :]  # (B, 1, T, S)
    return allowed | (key_slot[None, :] == query_slot)[None, None]


# Activations oneDNN can apply inside its linear kernel: config name -> (post-op, algorithm).
_FUSABLE = {
    "silu": ("swish", ""),
    "swish": ("swish", ""),
    "gelu": ("gelu", "none"),
    "gelu_pytorch_tanh": ("gelu", "tanh"),
    "gelu_new": ("gelu", "tanh"),
}


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, act: str | None = None
) -> torch.Tensor:
    """act(x @ weight.T + bias) (no activation when act is None).

    On CPU under no_grad / inference_mode (and in training's hand-written backward passes, which run
    without autograd) this runs the kernel measured fastest here for this weight (its shape, dtype, and
    whether it is a transposed view, as a backward pass's grad @ W multiplies by) and number of rows
    (idefics2.modeling.kernels.choose): oneDNN's linear kernel where the CPU supports it for the dtype, with
    the activation fused in or not, our C matrix-vector kernel for decode rows, or torch's default product.
    Which wins depends on the CPU and the rows: on AMD Zen 4/5 oneDNN (2-2.5x for prefill in float32), on
    an Intel Xeon torch's default product past ~500 rows (up to 2x for a transposed weight). Elsewhere, and
    for products autograd differentiates, torch's default kernels.
    """
    if (
        x.is_cpu
        and weight.dtype == x.dtype
        and (bias is None or bias.dtype == x.dtype)
        and not torch.is_grad_enabled()
    ):
        kernel = linear_kernel(x.dtype, x.numel() // weight.shape[1], weight, bias, act)
        return linear_with(kernel, x, weight, bias, act)
    out = F.linear(x, weight, bias)
    return out if act is None else activation(act)(out)


def linear_kernel(
    dtype: torch.dtype, rows: int, weight: torch.Tensor, bias: torch.Tensor | None, act: str | None
) -> str:
    """The kernel that `linear` runs on CPU for `rows` rows of `dtype` inputs (measured once, see there)."""
    plain = weight.is_contiguous()
    return kernels.choose(
        "linear",
        _linear_shape(dtype, weight, bias, act, rows),
        rows,
        lambda: [name for name in linear_kernels(dtype, act, rows) if plain or name != "c"],
        lambda rows: _linear_bench(weight, bias, act, rows),
    )


def _linear_shape(
    dtype: torch.dtype, weight: torch.Tensor, bias: torch.Tensor | None, act: str | None, rows: int = 1
) -> tuple:
    """The shape key under which `linear`'s kernels are chosen (kernels.choose) for `rows` rows."""
    n, k = weight.shape
    layout = () if weight.is_contiguous() else ("transposed",) if weight.t().is_contiguous() else ("strided",)
    # past decode rows, while three bfloat16 products may stand in for float32: another set of kernels
    precision = ("bf16x3",) if rows > ckernels.MAX_ROWS and _bf16x3_allowed(dtype) else ()
    return (dtype, n, k, bias is not None, act, *layout, *precision)


def _bf16x3_allowed(dtype: torch.dtype) -> bool:
    """Whether a float32 product may run as three bfloat16 products (bf16x3.py) here: torch's float32
    matmul precision is not "highest", this CPU multiplies bfloat16 in hardware, and the kernel loads."""
    return dtype == torch.float32 and bf16x3.allowed() and kernels.native_bfloat16() and bf16x3.available()


def linear_kernels(dtype: torch.dtype, act: str | None, rows: int = 1) -> list[str]:
    """The CPU kernels of `linear` whose probes pass for this dtype and activation, preferred first, for
    products of `rows` rows (our C kernel only for decode steps: up to ckernels.MAX_ROWS rows)."""
    names = ["aten"]
    if kernels.onednn_linear(dtype):
        names.insert(0, "onednn")
        post_op, algorithm = _FUSABLE.get(act, ("none", ""))
        if post_op != "none" and kernels.onednn_linear(dtype, post_op, algorithm):
            names.insert(0, "onednn_fused")
    if dtype in ckernels.DTYPES and rows <= ckernels.MAX_ROWS and kernels.c_kernels():
        names.append("c")  # raced when measuring; torch's kernels preferred where nothing is measured
    if rows > ckernels.MAX_ROWS and _bf16x3_allowed(dtype):
        names.insert(-1, "bf16x3")  # for prefill and training rows: at decode rows it never wins
    return names


def linear_with(
    kernel: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str | None
) -> torch.Tensor:
    """act(x @ weight.T + bias) by the named kernel of `linear_kernels`."""
    if kernel == "aten":
        out = F.linear(x, weight, bias)
    elif kernel == "bf16x3":
        out = bf16x3.linear(x, weight, bias)
    elif kernel == "c":
        fused = act if act in ckernels.ACTIVATIONS else None
        out = ckernels.linear(x, weight, bias=bias, act=fused)
        if fused is not None:
            return out
    else:
        post_op, algorithm = _FUSABLE[act] if kernel == "onednn_fused" else ("none", "")
        out = torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, post_op, [], algorithm)
        if kernel == "onednn_fused":
            return out
    return out if act is None else activation(act)(out)


def _linear_bench(weight: torch.Tensor, bias: torch.Tensor | None, act: str | None, rows: int):
    x = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
    copies = kernels.streaming_copies(weight.numel() * weight.element_size(), rows)
    weights = itertools.cycle([weight, *(weight.clone() for _ in range(copies - 1))])
    return lambda kernel: linear_with(kernel, x, next(weights), bias, act)


def weights_alone(layer: nn.Module) -> bool:
    """Whether `layer`'s output is its class's product of its own weights: no hook watches it and no LoRA
    adapter (idefics2.lora, which gives the layer its own forward) adds to it. Only then may a kernel that
    reads its weights directly (the C decode step, the gated product) stand in for its forward."""
    return not (layer._forward_hooks or layer._forward_pre_hooks or "forward" in layer.__dict__)


class Linear(nn.Linear):
    """nn.Linear (same parameters, names and hooks) computed with `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def forward_activated(self, x: torch.Tensor, act: str) -> torch.Tensor:
        """act(self(x)), the activation fused into the kernel unless hooks (e.g. LoRA) watch this layer."""
        if self._forward_hooks or self._forward_pre_hooks:
            return activation(act)(self(x))
        return linear(x, self.weight, self.bias, act)

    def c_operands(self, dtype: torch.dtype, layout: str = "held") -> tuple[torch.Tensor, None] | None:
        """(weight, scales) for the C kernels (ckernels.gated, ckernels.decoder_step) with inputs of `dtype`,
        or None where this layer cannot go there (a bias, another dtype, a hook, a LoRA adapter). `layout`:
        see QuantizedLinear.c_operands (a float weight has one)."""
        plain = self.bias is None and weights_alone(self)
        return (self.weight, None) if plain and self.weight.dtype == dtype else None

    def c_chosen(self, dtype: torch.dtype, rows: int, within: float = 1.0) -> bool:
        """Whether this layer's forward on `rows` CPU rows of `dtype` inputs (under no_grad) runs the C kernel
        with c_operands(dtype): what a caller doing that product in C itself computes the same. With
        `within` > 1, also where the C kernel was measured at most `within` times the chosen kernel's time
        (for a caller whose own C call saves more than that difference)."""
        if self.c_operands(dtype) is None or not self.weight.is_cpu:
            return False
        if linear_kernel(dtype, rows, self.weight, None, None) == "c":
            return True
        shape = _linear_shape(dtype, self.weight, None, None)
        return within > 1.0 and kernels.measured_within("linear", shape, rows, "c", within)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in the wider of float32 and the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm: x * rsqrt(mean(x^2) + eps) as one fused kernel on CUDA (a decode step of the 8b
        # shapes on an H100: 8.29 ms instead of 8.69 ms with the five separate operations)
        if (
            x.is_cpu
            and not torch.is_grad_enabled()
            and x.dtype in ckernels.DTYPES
            and self.weight.dtype == x.dtype
            and x.numel() <= ckernels.MAX_ROWS * x.shape[-1]
            and kernels.c_kernels()
        ):
            rows = x.numel() // x.shape[-1]
            kernel = kernels.choose(
                "rms_norm", (x.dtype, x.shape[-1]), rows, lambda: ["torch", "c"], self._bench
            )
            if kernel == "c":
                return ckernels.rms_norm(x, self.weight, self.eps)
        return self._torch_forward(x)

    def _torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        normed = F.rms_norm(x.to(torch.promote_types(dtype, torch.float32)), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(dtype)

    def _bench(self, rows: int):
        x = torch.randn(rows, self.weight.shape[0], generator=torch.Generator().manual_seed(0))
        x = x.to(self.weight.dtype)

        def run(kernel: str) -> torch.Tensor:
            return ckernels.rms_norm(x, self.weight, self.eps) if kernel == "c" else self._torch_forward(x)

        return run


def activation(name: str):
    """The activation function called `name` in a config."""
    if name in ("silu", "swish"):
        return F.silu
    if name == "gelu":
        return F.gelu
    if name in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "relu":
        return F.relu
    raise ValueError(f"unsupported activation {name!r}")


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), without biases (Mistral MLP, modality projection, perceiver MLP)."""

    def __init__(self, dim: int, hidden: int, out_dim: int, act: str) -> None:
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=False)
        self.up_proj = Linear(dim, hidden, bias=False)
        self.down_proj = Linear(hidden, out_dim, bias=False)
        self.act = act
        activation(act)  # unsupported names fail here, at construction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._c_gated(x):
            rows, (n, k) = x.numel() // x.shape[-1], self.gate_proj.weight.shape
            weight_dtype = self.gate_proj.c_operands(x.dtype)[0].dtype
            kernel = kernels.choose(
                "gated",
                (x.dtype, weight_dtype, n, k, self.act),
                rows,
                lambda: ["separate", "c"],
                lambda rows: self._gated_bench(x.dtype, rows),
            )
            return self.down_proj(self._gated_with(kernel, x, self.gate_proj, self.up_proj))
        return self.down_proj(self._gated_with("separate", x, self.gate_proj, self.up_proj))

    def _c_gated(self, x: torch.Tensor) -> bool:
        """Whether a decode step's act(gate(x)) * up(x) can be one ckernels.gated call: CPU inference of at
        most ckernels.MAX_ROWS rows, gate and up plain layers (float, int8, or int4 in the portable layout)
        of one weights dtype."""
        if not (
            x.is_cpu
            and not torch.is_grad_enabled()
            and self.act in ckernels.ACTIVATIONS
            and x.numel() <= ckernels.MAX_ROWS * x.shape[-1]
            and kernels.c_kernels()
        ):
            return False
        operands = [getattr(layer, "c_operands", lambda dtype: None)(x.dtype) for layer in self.gated]
        return (
            None not in operands
            and operands[0][0].dtype == operands[1][0].dtype
            and ckernels.supports(x, operands[0][0], self.act)
        )

    @property
    def gated(self) -> tuple[nn.Module, nn.Module]:
        return self.gate_proj, self.up_proj

    def _gated_with(self, kernel: str, x: torch.Tensor, gate: nn.Module, up: nn.Module) -> torch.Tensor:
        if kernel == "c":
            (gate_weight, gate_scales), (up_weight, up_scales) = (
                layer.c_operands(x.dtype) for layer in (gate, up)
            )
            return ckernels.gated(x, gate_weight, up_weight, self.act, gate_scales, up_scales)
        return gate.forward_activated(x, self.act) * up(x)

    def _gated_bench(self, dtype: torch.dtype, rows: int):
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(rows, self.gate_proj.in_features, generator=generator).to(dtype)
        tensors = [t for layer in self.gated for t in layer.state_dict().values()]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        copies = kernels.streaming_copies(nbytes, rows)
        pairs = itertools.cycle([self.gated, *(copy.deepcopy(self.gated) for _ in range(copies - 1))])
        return lambda kernel: self._gated_with(kernel, x, *next(pairs))
