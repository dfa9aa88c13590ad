"""Which layers of a model get quantized, quantizing them in place, what a checkpoint stores for them, and the
`quantization_config` entry of config.json (compressed-tensors', which we write; our older "idefics2" one and
AutoAWQ's, which we read)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from idefics2.quantization.calibration import calibrate
from idefics2.quantization.formats import (
    INT4_GROUP_SIZES,
    dequantize_int4,
    group_size_for,
    to_compressed,
)
from idefics2.quantization.layer import QuantizedLinear

MODES = {"int8": 8, "int4": 4}
# The parts of Idefics2 that can be quantized, by module-name prefix. "decoder" is the language model: its
# layers and the lm_head (unless tied to the embeddings); the vision tower's patch embedding is a
# convolution and every embedding table stays in float.
PARTS = {
    "decoder": ("model.text_model.", "lm_head"),
    "connector": ("model.connector.modality_projection.",),
    "perceiver": ("model.connector.perceiver_resampler.",),
    "vision": ("model.vision_model.",),
}
DEFAULT_PARTS = ("decoder",)
COMPRESSED_TENSORS = "compressed-tensors"  # quant_method of the checkpoints save_pretrained writes
PACK_QUANTIZED = "pack-quantized"  # their compressed-tensors format
LEGACY_FORMAT = "idefics2"  # quant_method of the checkpoints save_pretrained wrote before (still read)


@dataclass(frozen=True)
class QuantizationSpec:
    """What to quantize: `bits` (8 or 4), the int4 `group_size`, and the model `parts`."""

    bits: int
    group_size: int = 128
    parts: tuple[str, ...] = DEFAULT_PARTS

    @classmethod
    def parse(
        cls, mode: str, group_size: int = 128, parts: str | Iterable[str] = DEFAULT_PARTS
    ) -> QuantizationSpec:
        """Check the user's choices: mode "int8" / "int4", a kernel group size, known part names."""
        if mode not in MODES:
            raise ValueError(f"quantize must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
        if isinstance(group_size, bool) or group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
        parts = (parts,) if isinstance(parts, str) else tuple(parts)
        unknown = [p for p in parts if p not in PARTS]
        if unknown or not parts:
            raise ValueError(f"quantize modules must be among {', '.join(PARTS)}; got {list(parts)}")
        return cls(MODES[mode], group_size, tuple(dict.fromkeys(parts)))


def target_layers(model: nn.Module, parts: Iterable[str], tied_lm_head: bool) -> list[str]:
    """Names of the nn.Linear layers (not yet quantized) inside the given parts."""
    prefixes = tuple(prefix for part in parts for prefix in PARTS[part])
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if name == "lm_head" and tied_lm_head:
            continue
        if name.startswith(prefixes) or name in prefixes:
            names.append(name)
    return names


def empty_quantized(
    linear: nn.Linear, spec: QuantizationSpec, group_size: int | None = None, device="meta", **kwargs
) -> QuantizedLinear:
    """A QuantizedLinear of the same shape as `linear`, without values (to be filled by loading); int4 groups
    of `group_size`, by default the spec's (or the largest kernel group size dividing the width)."""
    group = group_size or group_size_for(linear.in_features, spec.group_size) if spec.bits == 4 else None
    return QuantizedLinear(
        linear.in_features,
        linear.out_features,
        spec.bits,
        group,
        linear.bias is not None,
        device=device,
        **kwargs,
    )


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@torch.no_grad()
def quantize_model(
    model: nn.Module, spec: QuantizationSpec, tied_lm_head: bool = False, calibration=None
) -> list[str]:
    """Quantize the targeted linear layers of `model` in place, one at a time (each float weight can be freed
    as soon as its layer is done). With `calibration` (token ids (B, T), or an iterable of them or of dicts
    of model inputs), activation-aware scales are folded into the float weights first (see
    idefics2.quantization.calibration). Returns the quantized layers' names."""
    names = target_layers(model, spec.parts, tied_lm_head)
    for name in names:
        if hasattr(model.get_submodule(name), "lora_A"):
            raise ValueError(f"{name} has a LoRA adapter: quantize the model before adding adapters")
    if calibration is not None:
        calibrate(model, names, spec.bits, spec.group_size, calibration)
    for name in names:
        linear = model.get_submodule(name)
        group = group_size_for(linear.in_features, spec.group_size) if spec.bits == 4 else None
        replace_module(model, name, QuantizedLinear.from_float(linear.weight, linear.bias, spec.bits, group))
    return names


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


# ---- what a checkpoint stores -----------------------------------------------------------------------------


def saved_quantized(layer: QuantizedLinear) -> bool:
    """Whether `save_pretrained` stores the layer quantized: int8, and int4 without zero points. int4 with
    zero points (read from AWQ or older idefics2 checkpoints) is stored as its float weight: transformers
    5.24 with compressed-tensors 0.20.1 expects zero points unpacked ([N, K/g]) where compressed-tensors
    writes them packed, and refuses such a folder; its AWQ reader needs yet another package (gptqmodel)."""
    return layer.zeros is None


def saved_tensors(layer: QuantizedLinear, portable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint holds for a quantized layer (names within the layer, bias aside), from its
    portable tensors (`state_dict()`'s qweight, scales, zeros): compressed-tensors' weight_packed (int32),
    weight_scale ([N, 1] for int8, [N, K/g] for int4) and weight_shape, or the float `weight`."""
    n, k = layer.out_features, layer.in_features
    if not saved_quantized(layer):
        weight = dequantize_int4(portable["qweight"], portable["scales"], portable["zeros"], layer.dtype)
        return {"weight": weight}
    scales = portable["scales"]
    return {
        "weight_packed": to_compressed(portable["qweight"], layer.bits),
        "weight_scale": scales[:, None] if layer.bits == 8 else scales,
        "weight_shape": torch.tensor([n, k]),
    }


def _name_patterns(names: Iterable[str], modules: list[str]) -> list[str]:
    """compressed-tensors targets that match exactly `names` among the model's module names: a name whose
    numeric parts (layer indices) are replaced by `\\d+` where every module so matched is among `names`,
    the name itself otherwise."""
    chosen = set(names)

    def pattern(name: str) -> str:
        return r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in name.split("."))

    matching: dict[str, list[str]] = {}
    for name in modules:
        matching.setdefault(pattern(name), []).append(name)
    out = []
    for key, group in matching.items():
        inside = [name for name in group if name in chosen]
        if inside and len(inside) == len(group) and len(group) > 1:
            out.append(f"re:{key}$")
        else:
            out += inside
    return out


def config_entry(model: nn.Module) -> dict | None:
    """config.json's `quantization_config` for the layers of `model` stored quantized (see saved_quantized),
    in compressed-tensors' form: one config group per (bits, group size) naming its layers, every other linear
    layer ignored. None when no layer is stored quantized."""
    layers = {name: layer for name, layer in quantized_layers(model).items() if saved_quantized(layer)}
    if not layers:
        return None
    modules = [name for name, _ in model.named_modules() if name]
    schemes: dict[tuple[int, int], list[str]] = {}
    for name, layer in layers.items():
        group = 0 if layer.group_size == layer.in_features else layer.group_size  # 0: per output channel
        schemes.setdefault((layer.bits, group), []).append(name)
    config_groups = {}
    for i, ((bits, group), names) in enumerate(sorted(schemes.items())):
        weights = {
            "num_bits": bits,
            "type": "int",
            "symmetric": True,
            "dynamic": False,
            "strategy": "channel",
        }
        if group:
            weights.update(strategy="group", group_size=group)
        config_groups[f"group_{i}"] = {
            "targets": _name_patterns(names, modules),
            "weights": weights,
            "input_activations": None,
            "output_activations": None,
            "format": PACK_QUANTIZED,
        }
    float_linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return {
        "quant_method": COMPRESSED_TENSORS,
        "format": PACK_QUANTIZED,
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": _name_patterns(float_linears, modules),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


# ---- checkpoints ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredQuantization:
    """How a checkpoint's weights are stored: compressed-tensors' pack-quantized ("compressed-tensors"), our
    older format ("idefics2") or AutoAWQ's ("awq"); bits, and the group size where the config gives one (a
    compressed-tensors layer's group size is read from its scales)."""

    method: str
    bits: int
    group_size: int | None


def stored_quantization(entry: dict | None) -> StoredQuantization | None:
    """Read config.json's `quantization_config`; None for a float checkpoint. Formats we cannot run are a
    ValueError that says what is supported."""
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise ValueError(f"config.json: quantization_config must be an object, got {entry!r}")
    method = entry.get("quant_method")
    if method == COMPRESSED_TENSORS:
        return StoredQuantization(method, _compressed_tensors_bits(entry), None)
    if method == LEGACY_FORMAT:
        bits = entry.get("bits")
        if bits not in (8, 4):
            raise ValueError(f"config.json: quantization_config bits must be 8 or 4, got {bits!r}")
        return StoredQuantization(method, bits, entry.get("group_size") if bits == 4 else None)
    if method == "awq":
        version = str(entry.get("version", "gemm")).lower()
        bits, group = (
            entry.get("bits", entry.get("w_bit")),
            entry.get("group_size", entry.get("q_group_size")),
        )
        zero_point = entry.get("zero_point", True)
        if version != "gemm" or bits != 4 or not zero_point or not isinstance(group, int) or group <= 0:
            raise ValueError(
                f"only AutoAWQ GEMM checkpoints with 4 bits, zero points and a group size are supported; "
                f"this one has version={version!r}, bits={bits!r}, zero_point={zero_point!r}, "
                f"group_size={group!r}"
            )
        return StoredQuantization(method, 4, group)
    raise ValueError(
        f"config.json: quantization method {method!r} is not supported (supported: {COMPRESSED_TENSORS!r} "
        f"pack-quantized int8 / int4 without zero points, as save_pretrained writes; AutoAWQ's 'awq' GEMM "
        f"checkpoints; and {LEGACY_FORMAT!r}, written by earlier versions)"
    )


def _compressed_tensors_bits(entry: dict) -> int:
    """The bits of a compressed-tensors entry that we can run: every config group "pack-quantized", int8 per
    output channel or int4 per channel or group, symmetric, static, activations left in float; all groups
    with the same bits. Anything else is a ValueError naming what is supported."""
    groups = entry.get("config_groups")
    status = entry.get("quantization_status", "compressed")
    problems = [] if status == "compressed" else [f"quantization_status {status!r}"]
    bits = set()
    for name, group in (groups or {}).items() if isinstance(groups, dict) else []:
        weights = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(weights, dict):
            problems.append(f"config group {name!r} has no weights scheme")
            continue
        form = group.get("format") or entry.get("format")
        strategies = ("channel",) if weights.get("num_bits") == 8 else ("channel", "group")
        if (
            form != PACK_QUANTIZED
            or weights.get("type", "int") != "int"
            or weights.get("num_bits") not in (4, 8)
            or weights.get("symmetric", True) is not True
            or weights.get("dynamic", False) is not False
            or weights.get("strategy") not in strategies
            or group.get("input_activations") is not None
            or group.get("output_activations") is not None
        ):
            problems.append(f"config group {name!r}: format {form!r}, weights {weights}")
        bits.add(weights.get("num_bits"))
    if not bits:
        problems.append("no config_groups")
    elif len(bits) > 1:
        problems.append(f"bits {sorted(bits, key=str)} in one model")
    if problems:
        raise ValueError(
            "config.json: only compressed-tensors 'pack-quantized' checkpoints of int8 weights per output "
            "channel or int4 weights per channel or group, symmetric (no zero points), with activations "
            "left in float and one bit width are supported; this one has " + "; ".join(problems)
        )
    return bits.pop()
