"""Idefics2 configuration: plain dataclasses read from (and written to) a checkpoint's `config.json`.

The defaults are the ones transformers applies when a key is missing, so a hub `config.json` means the
same model here as there. Keys we do not use are kept in `extra` and written back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Names of the activation functions the model supports (see modeling/layers.py).
ACTIVATIONS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_fast", "quick_gelu", "relu")

# Keys that describe the file format rather than the model; never kept in `extra`.
_FORMAT_KEYS = ("model_type", "transformers_version", "torch_dtype", "dtype")


def _split(cls: type, data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split `data` into the dataclass fields of `cls` and the remaining (unknown) keys."""
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    known = {k: v for k, v in data.items() if k in names}
    extra = {k: v for k, v in data.items() if k not in names and k not in _FORMAT_KEYS}
    return known, extra


# Sizes beyond int32 describe no real model, and products of them would overflow tensor sizes.
MAX_SIZE = 2**31 - 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not _is_int(value) or not 0 < value <= MAX_SIZE:
            raise ValueError(
                f"{type(obj).__name__}.{name} must be a positive integer (at most {MAX_SIZE}), got {value!r}"
            )


def _check_number(
    obj: Any, name: str, low: float, high: float = math.inf, *, high_open: bool = False
) -> None:
    """A finite int or float in [low, high] ([low, high) with high_open)."""
    value = getattr(obj, name)
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number or value < low or value > high or (high_open and value == high):
        span = f"[{low:g}, {high:g}{')' if high_open else ']'}" if math.isfinite(high) else f">= {low:g}"
        raise ValueError(f"{type(obj).__name__}.{name} must be a finite number {span}, got {value!r}")


def _check_token_ids(obj: Any, name: str) -> None:
    """None, a non-negative token id, or (eos) a list of them."""
    value = getattr(obj, name)
    ids = value if isinstance(value, list) and name == "eos_token_id" else [value]
    if value is not None and not all(_is_int(i) and i >= 0 for i in ids):
        raise ValueError(
            f"{type(obj).__name__}.{name} must be a non-negative token id or null, got {value!r}"
        )


def _check_rates(obj: Any) -> None:
    """The float settings every part has: dropout in [0, 1), a non-negative initializer_range."""
    _check_number(obj, "attention_dropout", 0.0, 1.0, high_open=True)
    _check_number(obj, "initializer_range", 0.0)


def _check_activation(obj: Any, name: str) -> None:
    if getattr(obj, name) not in ACTIVATIONS:
        raise ValueError(
            f"{type(obj).__name__}.{name}={getattr(obj, name)!r} is not supported; use one of {ACTIVATIONS}"
        )


@dataclass
class Idefics2VisionConfig:
    """The SigLIP-style vision encoder."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict)

    model_type = "idefics2_vision"

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):  # a square size written as [h, w]
                if len(value) != 2 or value[0] != value[1]:
                    raise ValueError(f"vision_config.{name} must be one integer (square), got {value!r}")
                setattr(self, name, int(value[0]))
        _check_positive(
            self,
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_channels",
            "image_size",
            "patch_size",
        )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"vision hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.image_size < self.patch_size:
            raise ValueError(
                f"vision image_size {self.image_size} is smaller than patch_size {self.patch_size}"
            )
        _check_activation(self, "hidden_act")
        _check_number(self, "layer_norm_eps", 0.0)
        _check_rates(self)

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class Idefics2PerceiverConfig:
    """The perceiver resampler that turns an image's patch features into a fixed number of latents."""

    hidden_act: str = "silu"
    hidden_size: int = 4096
    rms_norm_eps: float = 1e-6
    resampler_n_latents: int = 64
    resampler_depth: int = 3
    resampler_n_heads: int = 16
    resampler_head_dim: int = 96
    num_key_value_heads: int = 4
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict)

    model_type = "idefics2_perceiver"

    def __post_init__(self) -> None:
        _check_positive(
            self,
            "hidden_size",
            "resampler_n_latents",
            "resampler_depth",
            "resampler_n_heads",
            "resampler_head_dim",
            "num_key_value_heads",
        )
        if self.resampler_n_heads % self.num_key_value_heads:
            raise ValueError(
                f"perceiver resampler_n_heads {self.resampler_n_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        _check_activation(self, "hidden_act")
        _check_number(self, "rms_norm_eps", 0.0)
        _check_rates(self)


@dataclass
class Idefics2TextConfig:
    """The Mistral decoder."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    rope_theta: float = 10000.0
    sliding_window: int | None = 4096
    attention_dropout: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    model_type = "mistral"

    def __post_init__(self) -> None:
        _check_positive(self, "hidden_size", "num_attention_heads")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        _check_positive(
            self,
            "vocab_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"text num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"text head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_window is not None:
            _check_positive(self, "sliding_window")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            _check_token_ids(self, name)
        if self.pad_token_id is not None and not self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"text pad_token_id {self.pad_token_id} is outside the vocabulary ({self.vocab_size})"
            )
        _check_activation(self, "hidden_act")
        _check_number(self, "rms_norm_eps", 0.0)
        _check_number(self, "rope_theta", 0.0)
        if self.rope_theta == 0:
            raise ValueError("Idefics2TextConfig.rope_theta must be positive, got 0")
        _check_rates(self)

    @classmethod
    def _from_dict(cls, data: dict[str, Any]) -> Idefics2TextConfig:
        data = dict(data)
        rope = data.pop("rope_parameters", None) or data.pop("rope_scaling", None)
        if rope is not None and not isinstance(rope, dict):
            raise ValueError(f"text_config rope_parameters must be an object, got {rope!r}")
        if rope:
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type != "default":
                raise ValueError(
                    f"text_config rope_type {rope_type!r} is not supported (only 'default' RoPE)"
                )
            if "rope_theta" in rope:
                data["rope_theta"] = rope["rope_theta"]
        known, extra = _split(cls, data)
        return cls(**known, extra=extra)

    def _to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("extra",)}
        out["rope_theta"] = float(self.rope_theta)  # read by transformers 4.x
        out["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": float(self.rope_theta),
        }  # transformers 5
        return {**self.extra, **out, "model_type": self.model_type}


def _dtype_name(dtype: Any) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


@dataclass
class Idefics2Config:
    """The whole model: vision encoder, perceiver connector and text decoder."""

    vision_config: Idefics2VisionConfig = field(default_factory=Idefics2VisionConfig)
    perceiver_config: Idefics2PerceiverConfig = field(default_factory=Idefics2PerceiverConfig)
    text_config: Idefics2TextConfig | None = None
    image_token_id: int = 32001
    tie_word_embeddings: bool = False
    use_cache: bool = True
    torch_dtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    model_type = "idefics2"

    def __post_init__(self) -> None:
        for name, cls in (
            ("vision_config", Idefics2VisionConfig),
            ("perceiver_config", Idefics2PerceiverConfig),
        ):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _sub_from_dict(cls, value))
        if self.text_config is None:
            # transformers' defaults for an Idefics2 whose config names no text model at all
            self.text_config = Idefics2TextConfig(
                max_position_embeddings=32768, rms_norm_eps=1e-5, pad_token_id=0
            )
        elif isinstance(self.text_config, dict):
            self.text_config = Idefics2TextConfig._from_dict(self.text_config)
        if not _is_int(self.image_token_id) or self.image_token_id < 0:
            raise ValueError(f"image_token_id must be a non-negative token id, got {self.image_token_id!r}")
        for name in ("tie_word_embeddings", "use_cache"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        given_dtype = type(self.torch_dtype)
        if self.torch_dtype is not None and given_dtype is not str and given_dtype.__module__ != "torch":
            raise ValueError(f"torch_dtype must be the name of a dtype, got {self.torch_dtype!r}")
        self.torch_dtype = _dtype_name(self.torch_dtype)
        # The perceiver works in the text width; a perceiver config that disagrees was left at its defaults.
        if self.perceiver_config.hidden_size != self.text_config.hidden_size:
            self.perceiver_config.hidden_size = self.text_config.hidden_size
            self.perceiver_config.rms_norm_eps = self.text_config.rms_norm_eps

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Idefics2Config:
        """Build from a `config.json` dict (hub or transformers layout); unknown keys are kept in `extra`."""
        if not isinstance(data, dict):
            raise ValueError(f"an Idefics2 config must be a dict, got {type(data).__name__}")
        if data.get("model_type", "idefics2") != "idefics2":
            raise ValueError(f"config model_type is {data['model_type']!r}, expected 'idefics2'")
        data = dict(data)
        dtype = data.get("dtype") or data.get("torch_dtype")
        known, extra = _split(cls, data)
        for name in ("vision_config", "perceiver_config", "text_config"):
            if known.get(name) is not None and not isinstance(known[name], dict):
                raise ValueError(f"{name} must be a dict, got {type(known[name]).__name__}")
        known.pop("torch_dtype", None)
        return cls(**known, torch_dtype=dtype, extra=extra)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike) -> Idefics2Config:
        """Read `config.json` from a checkpoint folder or hub repo id."""
        from idefics2.hub import CheckpointError, read_json, resolve_checkpoint

        path = resolve_checkpoint(path_or_repo_id) / "config.json"
        data = read_json(path, what="model config", required=True)
        try:
            return cls.from_dict(data)
        except ValueError as error:
            raise CheckpointError(f"{path}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        """A `config.json` dict that both this package and transformers load back."""
        out = dict(self.extra)
        out.update(
            model_type=self.model_type,
            architectures=["Idefics2ForConditionalGeneration"],
            image_token_id=self.image_token_id,
            tie_word_embeddings=self.tie_word_embeddings,
            use_cache=self.use_cache,
            vision_config=_sub_to_dict(self.vision_config),
            perceiver_config=_sub_to_dict(self.perceiver_config),
            text_config=self.text_config._to_dict(),
        )
        if self.torch_dtype is not None:
            out["dtype"] = self.torch_dtype
        return out

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def _sub_from_dict(cls: type, data: dict[str, Any]) -> Any:
    known, extra = _split(cls, data)
    return cls(**known, extra=extra)


def _sub_to_dict(config: Any) -> dict[str, Any]:
    out = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "extra"}
    return {**config.extra, **out, "model_type": config.model_type}
