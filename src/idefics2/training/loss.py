"""Log-probabilities of target tokens straight from hidden states and the language-model head, a chunk of
positions at a time: the (N, vocab) logits and their gradient never exist whole.

Training needs log p(target) only at the N positions whose next token is learned. Computed the plain way
(`lm_head(hidden)`, then log-softmax) autograd keeps the float32 (N, vocab) logits, the log-softmax output
and, in the backward pass, a gradient of the same size: three copies of N x 32k floats. Here each chunk of
positions makes its logits, takes what it needs and frees them:

- forward: per chunk, logits = hidden @ W.T, their log-sum-exp and the targets' log-probabilities;
- the gradient of log p(t) with respect to the logits is onehot(t) - softmax. When no weight of the head is
  trained (LoRA, QLoRA: the head is frozen) it is multiplied into the head's weight already in the forward
  pass, chunk by chunk, leaving (N, hidden) per input: the backward pass only scales it, and nothing is
  computed twice;
- so are the weights' gradients when a weight is trained (full fine-tuning, or LoRA on the head itself) and
  the result is the sum of the log-probabilities (the token loss: one scalar scales every gradient). When
  per-token values are wanted (DPO weighs each sequence differently) the backward pass recomputes each
  chunk's logits from the saved log-sum-exp and accumulates the weights' gradients chunk by chunk.

The head may carry a LoRA adapter (its low-rank path is one more (input, weight) pair of the same sum of
products), a bias, or quantized weights (used dequantized). The result equals log_softmax(lm_head(hidden))
at the targets, to the rounding of the products.
"""

from __future__ import annotations

import torch
from torch import nn

from idefics2.lora import linear_product
from idefics2.quantization import QuantizedLinear

# logits per chunk: 4M values (16 MB in float32), e.g. 131 positions of a 32k vocabulary
CHUNK_ELEMENTS = 1 << 22


def target_logprobs(
    hidden: torch.Tensor,
    lm_head: nn.Module,
    targets: torch.Tensor,
    chunk_rows: int | None = None,
    *,
    summed: bool = False,
) -> torch.Tensor:
    """(N,) log-softmax of lm_head(hidden) (N, vocab) at targets (N,), in float32 or wider, computed
    `chunk_rows` positions at a time (default: equal chunks of at most CHUNK_ELEMENTS logits each, so that no
    short last chunk reads the whole head's weight for a few rows); with `summed`, their sum (a scalar): then
    every gradient, a trained head's included, is made in the forward pass.

    Under autocast the products run in the autocast dtype, as lm_head(hidden) would. `lm_head` is a linear
    layer (nn.Linear or QuantizedLinear), with or without a LoRA adapter; it is read, not called.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"hidden must be (N, dim) and targets (N,), got {tuple(hidden.shape)} and {tuple(targets.shape)}"
        )
    operands = head_operands(hidden, lm_head)
    vocab = operands[1].shape[0]
    if chunk_rows is None:
        most = max(1, CHUNK_ELEMENTS // vocab)
        chunks = max(1, -(-hidden.shape[0] // most))
        chunk_rows = -(-hidden.shape[0] // chunks) or 1
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = hidden.dtype
    return _TargetLogprobs.apply(targets.to(hidden.device), chunk_rows, compute_dtype, summed, *operands)


def head_operands(hidden: torch.Tensor, lm_head: nn.Module) -> list[torch.Tensor]:
    """[input, weight, input, weight, ...] whose products sum to lm_head(hidden): the head's weight; its
    bias as a column against ones; its LoRA adapter as (scaling * A(dropout(hidden)), B)."""
    if isinstance(lm_head, QuantizedLinear):
        weight = lm_head.dequantized_weight()
    elif isinstance(lm_head, nn.Linear):
        weight = lm_head.weight
    else:
        raise TypeError(f"the language-model head must be a linear layer, got {type(lm_head).__name__}")
    operands = [hidden, weight]
    if lm_head.bias is not None:
        operands += [hidden.new_ones(hidden.shape[0], 1), lm_head.bias[:, None]]
    if hasattr(lm_head, "lora_A") and not lm_head.lora_disabled:
        low_rank = lm_head.lora_A(lm_head.lora_dropout(hidden).to(lm_head.lora_A.weight.dtype))
        operands += [low_rank * lm_head.lora_scaling, lm_head.lora_B.weight]
    return operands


def _chunk_logits(
    inputs: list[torch.Tensor], weights: list[torch.Tensor], rows: slice, out_dtype: torch.dtype
) -> torch.Tensor:
    """(chunk, vocab) in out_dtype: the sum over k of inputs[k][rows] @ weights[k].T, each product in the
    weights' dtype."""
    logits = None
    for x, w in zip(inputs, weights, strict=True):
        part = linear_product(x[rows].to(w.dtype), w).to(out_dtype)
        logits = part if logits is None else logits.add_(part)
    return logits


class _TargetLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, targets, chunk_rows, compute_dtype, summed, *operands):
        inputs, weights = list(operands[0::2]), list(operands[1::2])
        input_needs, weight_needs = ctx.needs_input_grad[4::2], ctx.needs_input_grad[5::2]
        out_dtype = torch.promote_types(compute_dtype, torch.float32)
        n = targets.shape[0]
        # the gradients (per unit of grad_output) are made now, chunk by chunk, when the backward pass will
        # only have to scale them: no weight is trained, or the result is a sum (one scalar scales all)
        early = any(ctx.needs_input_grad) and (summed or not any(weight_needs))
        with torch.autocast(inputs[0].device.type, enabled=False):
            cast = [w.to(compute_dtype) for w in weights]  # once, not per chunk
            logprobs = torch.empty(n, dtype=out_dtype, device=targets.device)
            lse = torch.empty_like(logprobs)
            input_grads = [
                torch.empty(x.shape, dtype=out_dtype, device=x.device) if need and early else None
                for x, need in zip(inputs, input_needs, strict=True)
            ]
            weight_grads = [
                torch.zeros(w.shape, dtype=out_dtype, device=w.device) if need and early else None
                for w, need in zip(weights, weight_needs, strict=True)
            ]
            for start in range(0, n, chunk_rows):
                rows = slice(start, start + chunk_rows)
                logits = _chunk_logits(inputs, cast, rows, out_dtype)  # (c, V)
                chunk_lse = torch.logsumexp(logits, dim=-1)
                chunk_targets = targets[rows, None]
                logprobs[rows] = logits.gather(1, chunk_targets)[:, 0] - chunk_lse
                lse[rows] = chunk_lse
                if early:
                    d_logits = _onehot_minus_softmax(logits, chunk_lse, chunk_targets)
                    _chunk_gradients(d_logits, inputs, cast, rows, input_grads, weight_grads, compute_dtype)
        ctx.early, ctx.summed = early, summed
        ctx.chunk_rows, ctx.compute_dtype = chunk_rows, compute_dtype
        ctx.dtypes = [t.dtype for t in operands]
        if early:
            made = [g for pair in zip(input_grads, weight_grads, strict=True) for g in pair]
            ctx.made = [g is not None for g in made]
            ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in made))
        elif any(ctx.needs_input_grad):
            ctx.save_for_backward(targets, lse, *operands)
        return logprobs.sum() if summed else logprobs

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.early:
            scale = grad_output if ctx.summed else grad_output.contiguous()[:, None]  # () or (N, 1)
            grads = [
                (saved * scale).to(dtype) if made else None
                for saved, made, dtype in zip(ctx.saved_tensors, ctx.made, ctx.dtypes, strict=True)
            ]
            return (None, None, None, None, *grads)
        targets, lse, *operands = ctx.saved_tensors
        inputs, weights = operands[0::2], operands[1::2]
        input_needs, weight_needs = ctx.needs_input_grad[4::2], ctx.needs_input_grad[5::2]
        out_dtype = lse.dtype
        grad_output = grad_output.contiguous()
        with torch.autocast(inputs[0].device.type, enabled=False):
            cast = [w.to(ctx.compute_dtype) for w in weights]
            input_grads = [
                torch.empty(x.shape, dtype=out_dtype, device=x.device) if need else None
                for x, need in zip(inputs, input_needs, strict=True)
            ]
            weight_grads = [
                torch.zeros(w.shape, dtype=out_dtype, device=w.device) if need else None
                for w, need in zip(weights, weight_needs, strict=True)
            ]
            for start in range(0, targets.shape[0], ctx.chunk_rows):
                rows = slice(start, start + ctx.chunk_rows)
                logits = _chunk_logits(inputs, cast, rows, out_dtype)
                d_logits = _onehot_minus_softmax(logits, lse[rows], targets[rows, None])
                d_logits.mul_(grad_output[rows, None])
                _chunk_gradients(d_logits, inputs, cast, rows, input_grads, weight_grads, ctx.compute_dtype)
        grads = [g for pair in zip(input_grads, weight_grads, strict=True) for g in pair]
        grads = [None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes, strict=True)]
        return (None, None, None, None, *grads)


def _chunk_gradients(
    d_logits: torch.Tensor,
    inputs: list[torch.Tensor],
    weights: list[torch.Tensor],
    rows: slice,
    input_grads: list[torch.Tensor | None],
    weight_grads: list[torch.Tensor | None],
    compute_dtype: torch.dtype,
) -> None:
    """Given the gradient with respect to a chunk's logits (c, V): write its inputs' gradient rows and add its
    share of the weights' gradients."""
    d_logits = d_logits.to(compute_dtype)
    for x, w, input_grad, weight_grad in zip(inputs, weights, input_grads, weight_grads, strict=True):
        if input_grad is not None:
            input_grad[rows] = linear_product(d_logits, w.t())  # (c, in)
        if weight_grad is not None:
            weight_grad.add_(d_logits.t() @ x[rows].to(compute_dtype))  # (V, in)


def _onehot_minus_softmax(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """onehot(targets) - softmax(logits), the gradient of log p(target) with respect to the logits; made in
    place of `logits` (c, V), given their log-sum-exp (c,) and the targets (c, 1)."""
    d_logits = logits.sub_(lse[:, None]).exp_().neg_()
    d_logits.scatter_add_(1, targets, torch.ones_like(targets, dtype=d_logits.dtype))
    return d_logits
