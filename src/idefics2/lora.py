"""LoRA adapters on nn.Linear layers, stored in the PEFT adapter format.

An adapter adds `scaling * B(A(dropout(x)))` to a linear layer's output. The two small matrices live as child
modules `lora_A` / `lora_B` of the wrapped `nn.Linear` itself, so the base weights keep their names
(`...q_proj.weight`) and the adapter weights get PEFT's names once prefixed with `base_model.model.`:
`base_model.model.model.text_model.layers.0.self_attn.q_proj.lora_A.weight`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from idefics2.hub import CheckpointError, CheckpointNotFoundError, read_json, resolve_checkpoint
from idefics2.modeling.attention import activation, linear
from idefics2.quantization import QuantizedLinear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# Layers adapters attach to: float linear layers, and quantized ones (QLoRA: the adapter trains in float on a
# frozen int8 / int4 base; its weights have the same names and apply to the float model as well).
ADAPTABLE = (nn.Linear, QuantizedLinear)

# Every projection of the decoder and of the connector (modality projection + perceiver); the vision tower is
# left alone, as in the usual Idefics2 fine-tuning recipes.
DEFAULT_TARGET_MODULES = (
    r".*(text_model|connector).*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
)


@dataclass
class LoraConfig:
    """The subset of PEFT's LoraConfig that this implementation supports (same field names and meaning)."""

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    target_modules: str | list[str] = DEFAULT_TARGET_MODULES
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        if not _is_int(self.r) or self.r <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.r!r}")
        if not _is_number(self.lora_alpha):
            raise ValueError(f"LoRA alpha must be a finite number, got {self.lora_alpha!r}")
        if not _is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"use_rslora must be true or false, got {self.use_rslora!r}")
        targets = self.target_modules
        if not isinstance(targets, str) and not (
            isinstance(targets, (list, tuple)) and all(isinstance(t, str) for t in targets)
        ):
            raise ValueError(f"target_modules must be a regex or a list of module names, got {targets!r}")
        for name, check in (("rank_pattern", _is_int), ("alpha_pattern", _is_number)):
            pattern = getattr(self, name)
            if not isinstance(pattern, dict) or not all(
                isinstance(k, str) and check(v) and v > (0 if name == "rank_pattern" else -math.inf)
                for k, v in pattern.items()
            ):
                raise ValueError(f"{name} must map module-name patterns to numbers, got {pattern!r}")
            for key in pattern:
                _compile(key, name)
        if isinstance(self.target_modules, str):
            _compile(self.target_modules, "target_modules")

    def targets(self, module_name: str) -> bool:
        """PEFT's rule: a string is a regex that must match the whole name; a list matches by name suffix."""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, module_name) is not None
        return any(module_name == t or module_name.endswith("." + t) for t in self.target_modules)

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        return (
            _pattern_value(self.rank_pattern, module_name, self.r),
            _pattern_value(self.alpha_pattern, module_name, self.lora_alpha),
        )

    def to_peft_dict(self) -> dict:
        d = asdict(self)
        d.update(
            peft_type="LORA",
            task_type=None,
            bias="none",
            fan_in_fan_out=False,
            inference_mode=True,
            init_lora_weights=True,
            modules_to_save=None,
            layers_to_transform=None,
            layers_pattern=None,
            use_dora=False,
            lora_bias=False,
            revision=None,
        )
        return dict(sorted(d.items()))

    @classmethod
    def from_peft_dict(cls, d: dict) -> LoraConfig:
        """The config of adapter_config.json; ValueError naming a missing, unsupported or ill-typed field."""
        if not _is_int(d.get("r")):
            raise ValueError(f"adapter_config.json needs the rank r (a positive integer), got {d.get('r')!r}")
        if d.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"only LoRA adapters are supported, this one is {d.get('peft_type')!r}")
        unsupported = {
            "use_dora": bool(d.get("use_dora")),
            "bias": d.get("bias", "none") != "none",
            "modules_to_save": bool(d.get("modules_to_save")),
            "fan_in_fan_out": bool(d.get("fan_in_fan_out")),
            "layers_to_transform": d.get("layers_to_transform") is not None,
            "lora_bias": bool(d.get("lora_bias")),
        }
        bad = [name for name, is_set in unsupported.items() if is_set]
        if bad:
            raise ValueError(f"unsupported LoRA adapter options: {', '.join(bad)}")
        targets = d.get("target_modules")
        if targets is None:
            raise ValueError("adapter_config.json has no target_modules")
        return cls(
            r=d["r"],
            lora_alpha=d.get("lora_alpha", 8),
            lora_dropout=d.get("lora_dropout", 0.0),
            target_modules=list(targets) if isinstance(targets, (list, tuple)) else targets,
            use_rslora=d.get("use_rslora", False),
            rank_pattern=d.get("rank_pattern") or {},
            alpha_pattern=d.get("alpha_pattern") or {},
            base_model_name_or_path=d.get("base_model_name_or_path"),
        )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _compile(pattern: str, what: str) -> None:
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(f"invalid {what} regex {pattern!r}: {error}") from None


def _pattern_value(patterns: dict, module_name: str, default):
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return value
    return default


def _lora_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An adapted layer's forward: base(x) + scaling * B(A(dropout(x))), or base(x) while disabled."""
    if module.lora_disabled:
        return type(module).forward(module, x)
    if _fused_applies(module, x):
        dropped = module.lora_dropout(x)
        return _FrozenLinearWithLora.apply(
            x,
            dropped,
            module.weight,
            module.bias,
            module.lora_A.weight,
            module.lora_B.weight,
            module.lora_scaling,
        )
    output = type(module).forward(module, x)
    low_rank = module.lora_A(module.lora_dropout(x).to(module.lora_A.weight.dtype))
    return output + (module.lora_B(low_rank) * module.lora_scaling).to(output.dtype)


def _lora_forward_activated(module: nn.Module, x: torch.Tensor, act: str) -> torch.Tensor:
    """act(module(x)): an adapted layer never fuses the activation into its base product."""
    return activation(act)(module(x))


def _fused_applies(module: nn.Module, x: torch.Tensor) -> bool:
    """Training through a frozen float layer whose adapter has the input's dtype (no autocast)."""
    return (
        torch.is_grad_enabled()
        and isinstance(module, nn.Linear)
        and not module.weight.requires_grad
        and (module.bias is None or not module.bias.requires_grad)
        and x.dtype == module.weight.dtype == module.lora_A.weight.dtype
        and not torch.is_autocast_enabled(x.device.type)
    )


# x (T, in) @ weight.T (+ bias) in training's hand-written backward passes (here and in the training loss),
# which run without autograd: on CPU by the kernel measured fastest for these rows and this weight, a
# transposed view (grad @ W) measured apart. For an adapter's rank-8 products (x @ A.T, grad @ B) the race
# keeps away from a very slow route of torch's default product on AMD Zen 4 (48 ms instead of oneDNN's 0.5
# ms for x @ A.T); on an Intel Xeon torch's default product wins the layers' products at ~1,000 rows.
linear_product = linear


class _FrozenLinearWithLora(torch.autograd.Function):
    """x @ W.T (+ bias) + scaling * dropped @ A.T @ B.T with W (and the bias) frozen, in one pass: the
    low-rank product is added inside a matrix product (no scaled copy of the output, no sum of two outputs),
    and the backward pass makes the input's gradient with one product plus the adapter's part added in place.
    `dropped` is dropout(x), or x itself without dropout."""

    @staticmethod
    def forward(ctx, x, dropped, weight, bias, lora_a, lora_b, scaling):
        rows = x.reshape(-1, x.shape[-1])  # (T, in)
        dropped_rows = rows if dropped is x else dropped.reshape(-1, x.shape[-1])
        out = linear_product(rows, weight, bias)  # (T, out)
        low_rank = linear_product(dropped_rows, lora_a)  # (T, r)
        out.addmm_(low_rank, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(dropped_rows, low_rank, weight, lora_a, lora_b)
        ctx.scaling, ctx.same, ctx.input_shape = scaling, dropped is x, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        dropped_rows, low_rank, weight, lora_a, lora_b = ctx.saved_tensors
        needs_x, needs_dropped, _, _, needs_a, needs_b, _ = ctx.needs_input_grad
        grad_rows = grad.reshape(-1, grad.shape[-1])  # (T, out)
        grad_low_rank = linear_product(grad_rows, lora_b.t()).mul_(ctx.scaling)  # (T, r)
        grad_a = grad_low_rank.t() @ dropped_rows if needs_a else None  # (r, in)
        # (low_rank.T @ grad).T rather than grad.T @ low_rank: the latter takes a very slow route on CPU
        grad_b = (low_rank.t() @ grad_rows).t().mul_(ctx.scaling).contiguous() if needs_b else None
        grad_x = grad_dropped = None
        if needs_x:
            grad_x = linear_product(grad_rows, weight.t())  # (T, in)
            if ctx.same:
                grad_x.addmm_(grad_low_rank, lora_a)
            grad_x = grad_x.view(ctx.input_shape)
        if needs_dropped and not ctx.same:
            grad_dropped = (grad_low_rank @ lora_a).view(ctx.input_shape)
        return grad_x, grad_dropped, None, None, grad_a, grad_b, None


def add_lora(model: nn.Module, config: LoraConfig) -> list[str]:
    """Attach fresh LoRA adapters (A: Kaiming-uniform, B: zeros, as PEFT) to every targeted linear layer
    (nn.Linear or QuantizedLinear).

    Returns the names of the adapted modules. Raises ValueError when nothing matches.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, ADAPTABLE) and config.targets(n)]
    if not names:
        raise ValueError(f"no linear layer matches the LoRA target_modules {config.target_modules!r}")
    modules = dict(model.named_modules())
    for name in names:
        linear = modules[name]
        if hasattr(linear, "lora_A"):
            raise ValueError(f"{name} already has a LoRA adapter")
        rank, alpha = config.rank_and_alpha(name)
        # Adapters are kept in float32 (as PEFT does) whatever the base weights' dtype.
        device = linear.weight.device
        linear.lora_A = nn.Linear(linear.in_features, rank, bias=False, device=device, dtype=torch.float32)
        linear.lora_B = nn.Linear(rank, linear.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(linear.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(linear.lora_B.weight)
        linear.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        linear.lora_scaling = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
        linear.lora_disabled = False
        # instance attributes in front of the class's methods (remove_adapter deletes them)
        linear.forward = functools.partial(_lora_forward, linear)
        linear.forward_activated = functools.partial(_lora_forward_activated, linear)
    _weights_changed(model)
    return names


def _weights_changed(model: nn.Module) -> None:
    """Tell the model its modules changed (its captured CUDA graphs and compiled steps are then dropped)."""
    notify = getattr(model, "weights_changed", None)
    if notify is not None:
        notify()


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ADAPTABLE) and hasattr(m, "lora_A")}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run `model` as its base model inside the block: every LoRA adapter is skipped (not removed)."""
    modules = list(lora_modules(model).values())
    if not modules:
        raise ValueError("the model has no LoRA adapter to disable")
    for module in modules:
        module.lora_disabled = True
    try:
        yield
    finally:
        for module in modules:
            module.lora_disabled = False


def mark_only_lora_trainable(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_A." in name or ".lora_B." in name)


def save_adapter(model: nn.Module, config: LoraConfig, folder: str | os.PathLike) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (PEFT's format) into `folder`."""
    tensors = {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}
    return write_adapter(tensors, config, folder)


def write_adapter(tensors: dict[str, torch.Tensor], config: LoraConfig, folder: str | os.PathLike) -> Path:
    """Save adapter tensors given under the model's names (`...q_proj.lora_A.weight`) in PEFT's format."""
    if not tensors:
        raise ValueError("the model has no LoRA adapter to save")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    peft_named = {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(peft_named, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config.to_peft_dict(), indent=2) + "\n")
    return folder


def read_adapter(folder: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read a PEFT LoRA adapter (folder or hub repo id); tensor names come without PEFT's prefix."""
    folder = resolve_checkpoint(folder)
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointNotFoundError(f"{folder} is not a LoRA adapter folder: {path.name} is missing")
    try:
        config = LoraConfig.from_peft_dict(read_json(config_path, what="adapter config"))
    except CheckpointError:
        raise
    except ValueError as error:
        raise CheckpointError(f"{config_path}: {error}") from None
    try:
        raw = load_file(str(weights_path))
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{weights_path} could not be read: {error}") from None
    weights = {}
    for key, tensor in raw.items():
        if tensor.ndim != 2 or not tensor.dtype.is_floating_point:
            raise CheckpointError(
                f"{weights_path}: adapter tensor {key} must be a 2-D floating-point matrix, got shape "
                f"{tuple(tensor.shape)} of {tensor.dtype}"
            )
        name = key.removeprefix(PEFT_PREFIX)
        # PEFT may keep the adapter name in keys saved by some versions: "...lora_A.default.weight".
        name = re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", name)
        weights[name] = tensor
    return config, weights


def load_adapter(model: nn.Module, folder: str | os.PathLike, *, merge: bool = False) -> LoraConfig:
    """Apply a PEFT LoRA adapter to `model` (in place); with merge=True fold it into the base weights."""
    config, weights = read_adapter(folder)
    targets = {n[: -len(".lora_A.weight")] for n in weights if n.endswith(".lora_A.weight")}
    modules = dict(model.named_modules())
    missing = sorted(t for t in targets if not isinstance(modules.get(t), ADAPTABLE))
    if missing:
        raise ValueError(
            f"adapter {folder} targets layers this model does not have: {', '.join(missing[:5])}"
        )
    # Exactly the layers the file holds, with the ranks of its tensors; no dropout (loaded for inference).
    ranks = {re.escape(t): weights[f"{t}.lora_A.weight"].shape[0] for t in targets}
    add_lora(model, replace(config, target_modules=sorted(targets), rank_pattern=ranks, lora_dropout=0.0))
    for name, module in lora_modules(model).items():
        for part in ("lora_A", "lora_B"):
            tensor = weights.get(f"{name}.{part}.weight")
            target = getattr(module, part).weight
            if tensor is None or tensor.shape != target.shape:
                got = None if tensor is None else tuple(tensor.shape)
                raise ValueError(
                    f"adapter tensor {name}.{part}.weight: expected {tuple(target.shape)}, got {got}"
                )
            with torch.no_grad():
                target.copy_(tensor)
    if merge:
        merge_lora(model)
    return config


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (W += scaling * B @ A) and remove the adapter."""
    quantized = [n for n, m in lora_modules(model).items() if isinstance(m, QuantizedLinear)]
    if quantized:
        raise ValueError(
            f"cannot merge a LoRA adapter into quantized weights ({quantized[0]}, ...): merge it into the "
            f"float model, then quantize (from_pretrained(..., adapter=..., merge_adapter=True, "
            f"quantize=...) does that)"
        )
    for module in lora_modules(model).values():
        delta = module.lora_B.weight.float() @ module.lora_A.weight.float() * module.lora_scaling
        module.weight += delta.to(module.weight.dtype)
        remove_adapter(module)
    _weights_changed(model)


def remove_adapter(module: nn.Linear) -> None:
    del module.forward, module.forward_activated
    for attr in ("lora_A", "lora_B", "lora_dropout"):
        delattr(module, attr)
    del module.lora_scaling, module.lora_disabled
