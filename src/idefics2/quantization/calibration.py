"""Activation-aware scales for weight-only quantization (the idea of AWQ, Lin et al. 2023), folded into the
float weights before they are quantized, so the saved format is unchanged.

A layer's output error from quantizing its weight W [N, K] is largest where its inputs are large: input
channels with large activations multiply their weights' rounding errors by large values. Scaling input
channel k of W up by s[k] (and the input down by 1 / s[k]) leaves the float product unchanged but spends
more of the quantization grid on the channels that matter. Here the 1 / s goes where it costs nothing at
run time:

- q / k / v projections: into the weight of the RMSNorm before them (`input_layernorm`);
- gate / up projections: into `post_attention_layernorm`;
- down projection: into the rows of the up projection (its input is act(gate) * up);
- lm_head (when quantized, i.e. not tied): into the decoder's final norm, so the decoder's last hidden
  states come out scaled per channel (the logits are the same).

For each such group, s = a ** alpha with a the mean absolute activation of each input channel over the
calibration tokens, normalised to a geometric mean of 1; alpha is searched on a grid for the least squared
output error of the group's quantized layers on those tokens. The float model's outputs are unchanged by the
folding (up to float rounding); only the quantized weights differ. (AWQ's second step, clipping each
group's range for the least output error, was tried on the built-in model: it lowered the mean logits error
a little and raised the largest, so it is not done.)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from idefics2.quantization.formats import (
    dequantize_int4,
    dequantize_int8,
    group_size_for,
    quantize_int4,
    quantize_int8,
)

ALPHAS = tuple(i / 10 for i in range(11))  # exponents tried for s = a ** alpha (0: no scaling)
MAX_TOKENS = 512  # calibration tokens kept per group (a random subset beyond that)


@dataclass
class ScaledGroup:
    """Linear layers sharing one input, and where that input's 1 / s is folded: a norm's weight, or the
    output rows of a linear layer."""

    names: tuple[str, ...]
    fold_into: str


def scaled_groups(model: nn.Module, targets: Iterable[str]) -> list[ScaledGroup]:
    """The groups of the decoder whose layers are all among `targets` (the layers about to be quantized)."""
    targets = set(targets)
    groups = []
    for i, _ in enumerate(model.model.text_model.layers):
        prefix = f"model.text_model.layers.{i}."
        candidates = [
            (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
            (("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
            (("mlp.down_proj",), "mlp.up_proj"),
        ]
        for names, fold in candidates:
            names = tuple(prefix + name for name in names)
            if set(names) <= targets:
                groups.append(ScaledGroup(names, prefix + fold))
    if "lm_head" in targets:
        groups.append(ScaledGroup(("lm_head",), "model.text_model.norm"))
    return groups


def batches_of(calibration: Iterable | torch.Tensor) -> Iterator[dict]:
    """Model inputs from `calibration`: a LongTensor of token ids (B, T), or an iterable of such tensors or
    of dicts of model inputs (e.g. a processor's outputs)."""
    if isinstance(calibration, torch.Tensor):
        calibration = [calibration]
    for batch in calibration:
        if isinstance(batch, torch.Tensor):
            yield {"input_ids": batch if batch.dim() == 2 else batch[None]}
        elif isinstance(batch, dict) or hasattr(batch, "keys"):
            yield dict(batch)
        else:
            raise ValueError(
                f"calibration batches must be token id tensors or dicts of model inputs, got {type(batch)}"
            )


@torch.no_grad()
def collect_inputs(model: nn.Module, names: set[str], calibration) -> dict[str, torch.Tensor]:
    """The float32 inputs [tokens, K] each named linear layer sees on the calibration batches (at most
    MAX_TOKENS, a fixed random subset)."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def keep(name):
        def hook(module, args):
            seen[name].append(args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu())

        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(keep(name)) for name in names]
    device = next(model.parameters()).device
    training = model.training
    model.eval()
    try:
        count = 0
        for batch in batches_of(calibration):
            model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
            count += 1
        if count == 0:
            raise ValueError("calibration has no batches")
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    generator = torch.Generator().manual_seed(0)
    inputs = {}
    for name, parts in seen.items():
        rows = torch.cat(parts)
        if rows.shape[0] > MAX_TOKENS:
            rows = rows[torch.randperm(rows.shape[0], generator=generator)[:MAX_TOKENS]]
        inputs[name] = rows
    return inputs


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The float32 weight that the quantized layer computes with (quantized, then dequantized)."""
    if bits == 8:
        return dequantize_int8(*quantize_int8(weight), torch.float32)
    group = group_size_for(weight.shape[1], group_size)
    return dequantize_int4(*quantize_int4(weight, group), None, torch.float32)


def best_scales(
    weights: list[torch.Tensor], x: torch.Tensor, bits: int, group_size: int
) -> tuple[torch.Tensor, float, float]:
    """(s [K], error with s, error without) for layers `weights` [N_i, K] sharing input x [tokens, K]: the
    alpha of ALPHAS with the least summed squared output error after quantizing W * s and computing
    (x / s) @ dequantized.T."""
    magnitude = x.abs().mean(dim=0).clamp(min=1e-6)
    expected = [x @ w.float().t() for w in weights]
    best, best_error, plain_error = torch.ones_like(magnitude), float("inf"), float("inf")
    for alpha in ALPHAS:
        s = magnitude**alpha
        s = s / (s.max() * s.min()).sqrt()
        scaled_x = x / s
        error = sum(
            float((scaled_x @ fake_quantize(w.float() * s, bits, group_size).t() - y).pow(2).sum())
            for w, y in zip(weights, expected, strict=True)
        )
        if alpha == 0:
            plain_error = error
        if error < best_error:
            best, best_error = s, error
    return best, best_error, plain_error


@torch.no_grad()
def calibrate(model: nn.Module, targets: list[str], bits: int, group_size: int, calibration) -> dict:
    """Fold activation-aware scales into `model`'s float weights for the layers `targets` about to be
    quantized with `bits` / `group_size`. Returns {group's first layer: (error with scales, without)}."""
    groups = scaled_groups(model, targets)
    if not groups:
        raise ValueError("calibration scales the decoder's layers: quantize the decoder to calibrate")
    inputs = collect_inputs(model, {group.names[0] for group in groups}, calibration)
    report = {}
    for group in groups:
        layers = [model.get_submodule(name) for name in group.names]
        weights = [layer.weight for layer in layers]
        s, error, plain = best_scales(weights, inputs[group.names[0]], bits, group_size)
        for layer in layers:
            layer.weight.mul_(s.to(layer.weight.dtype)[None, :])
        fold = model.get_submodule(group.fold_into)
        if isinstance(fold, nn.Linear):  # the up projection: its output rows feed the scaled inputs
            fold.weight.div_(s.to(fold.weight.dtype)[:, None])
            if fold.bias is not None:
                fold.bias.div_(s.to(fold.bias.dtype))
        else:
            fold.weight.div_(s.to(fold.weight.dtype))
        report[group.names[0]] = (error, plain)
    return report
