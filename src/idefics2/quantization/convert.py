"""Which layers of a model get quantized, quantizing them in place, and the `quantization_config` entry of
config.json (ours, and AutoAWQ's)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from idefics2.quantization.calibration import calibrate
from idefics2.quantization.formats import INT4_GROUP_SIZES, group_size_for
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
FORMAT_NAME = "idefics2"  # quant_method of the checkpoints save_pretrained writes


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

    def config_entry(self) -> dict:
        """The `quantization_config` written to config.json."""
        entry = {"quant_method": FORMAT_NAME, "bits": self.bits, "modules": list(self.parts)}
        if self.bits == 4:
            entry["group_size"] = self.group_size
        return entry


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


def layer_shapes(spec: QuantizationSpec, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
    """The portable tensors' shapes for a layer (see idefics2.quantization.formats)."""
    if spec.bits == 8:
        return {"qweight": (out_features, in_features), "scales": (out_features,)}
    groups = in_features // group_size_for(in_features, spec.group_size)
    return {
        "qweight": (out_features, in_features // 2),
        "scales": (out_features, groups),
        "zeros": (out_features, groups),
    }


def empty_quantized(linear: nn.Linear, spec: QuantizationSpec, device="meta", **kwargs) -> QuantizedLinear:
    """A QuantizedLinear of the same shape as `linear`, without values (to be filled by loading)."""
    group = group_size_for(linear.in_features, spec.group_size) if spec.bits == 4 else None
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


# ---- checkpoints ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredQuantization:
    """How a checkpoint's weights are stored: ours ("idefics2") or AutoAWQ's ("awq"), bits and group size."""

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
    if method == FORMAT_NAME:
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
        f"config.json: quantization method {method!r} is not supported (supported: {FORMAT_NAME!r}, "
        f"written by save_pretrained after quantizing, and AutoAWQ's 'awq' GEMM checkpoints)"
    )
