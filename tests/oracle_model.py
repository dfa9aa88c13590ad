"""Reference (transformers) Idefics2 checkpoints for tests (tiny configs, seeded random weights), inputs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

_TINY = {
    "image_token_id": 32001,
    "tie_word_embeddings": False,
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 56,
        "patch_size": 14,
    },
    "perceiver_config": {
        "hidden_size": 64,
        "resampler_n_latents": 4,
        "resampler_depth": 2,
        "resampler_n_heads": 4,
        "resampler_head_dim": 8,
        "num_key_value_heads": 2,
    },
    "text_config": {
        "model_type": "mistral",
        "vocab_size": 32003,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "sliding_window": None,
        "pad_token_id": 0,
    },
}


def tiny_config_dict(**overrides: Any) -> dict:
    """A tiny Idefics2 config dict (transformers layout).

    Top-level keys override directly; `vision_config`, `perceiver_config` and `text_config` overrides are
    merged into the tiny defaults (pass e.g. text_config={"num_key_value_heads": 1}).
    """
    config = copy.deepcopy(_TINY)
    for key, value in overrides.items():
        if key in ("vision_config", "perceiver_config", "text_config") and isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    if "hidden_size" not in overrides.get("perceiver_config", {}):
        config["perceiver_config"]["hidden_size"] = config["text_config"]["hidden_size"]
    return config


def build_reference_model(seed: int = 0, **config_overrides: Any):
    """A seeded random transformers Idefics2ForConditionalGeneration (float32, sdpa, eval mode).

    The perceiver latents and the norm weights are randomised too (transformers initialises them to ones),
    so that tests exercise them.
    """
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration

    config = Idefics2Config(**tiny_config_dict(**config_overrides))
    torch.manual_seed(seed)
    model = Idefics2ForConditionalGeneration._from_config(
        config, attn_implementation="sdpa", dtype=torch.float32
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("latents"):
                param.normal_(0.0, 1.0)
            elif "norm" in name and name.endswith("weight"):
                param.normal_(1.0, 0.1)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.02)
    return model.eval()


def build_reference_checkpoint(folder: str | Path, seed: int = 0, **config_overrides: Any) -> Path:
    """Save a seeded random transformers Idefics2 (see build_reference_model) in `folder`; returns it."""
    folder = Path(folder)
    build_reference_model(seed, **config_overrides).save_pretrained(folder)
    return folder


FAKE, IMAGE = 32000, 32001  # <fake_token_around_image>, <image> in the tiny configs


def build_batch(
    samples: list[dict], n_latents: int, patch_multiple: int = 1, padding_side: str = "left", seed: int = 0
) -> dict[str, torch.Tensor]:
    """Inputs for a batch; each sample is {"text": [n_before, n_after], "images": [(h, w), ...]}.

    Every image becomes `<fake> <image> * n_latents <fake>` between the text runs; images are drawn at random,
    put top-left in a (max_h, max_w) canvas (padding pixels 0 and masked), and missing images are all-zero.
    """
    g = torch.Generator().manual_seed(seed)
    rows = []
    for sample in samples:
        before, after = sample["text"]
        ids = torch.randint(3, 31000, (before,), generator=g).tolist()
        for _ in sample["images"]:
            ids += [FAKE] + [IMAGE] * n_latents + [FAKE]
        ids += torch.randint(3, 31000, (after,), generator=g).tolist()
        rows.append(ids)
    length = max(len(r) for r in rows)
    input_ids = torch.zeros((len(rows), length), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, ids in enumerate(rows):
        span = slice(length - len(ids), length) if padding_side == "left" else slice(0, len(ids))
        input_ids[i, span] = torch.tensor(ids)
        attention_mask[i, span] = 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask}

    sizes = [s for sample in samples for s in sample["images"]]
    if sizes:
        n_max = max(len(s["images"]) for s in samples)
        h_max = max(h for h, _ in sizes)
        w_max = max(w for _, w in sizes)
        h_max += -h_max % patch_multiple
        w_max += -w_max % patch_multiple
        pixel_values = torch.zeros((len(samples), n_max, 3, h_max, w_max))
        pixel_mask = torch.zeros((len(samples), n_max, h_max, w_max), dtype=torch.long)
        for i, sample in enumerate(samples):
            for j, (h, w) in enumerate(sample["images"]):
                pixel_values[i, j, :, :h, :w] = torch.randn((3, h, w), generator=g)
                pixel_mask[i, j, :h, :w] = 1
        out["pixel_values"] = pixel_values
        out["pixel_attention_mask"] = pixel_mask
    return out


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding: cumsum(mask) - 1, clamped at 0."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def lm_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Labels on real text tokens; the first real token of each row is left out (predicted from padding)."""
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels = labels.masked_fill((input_ids == IMAGE) | (input_ids == FAKE), -100)
    first = attention_mask.argmax(dim=1)
    labels[torch.arange(len(labels)), first] = -100
    return labels


def rel_diff(actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """max |actual - expected| / max |expected| over the positions where mask (B, T) is 1."""
    if mask is not None:
        actual, expected = actual[mask.bool()], expected[mask.bool()]
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def write_legacy_quantized_checkpoint(source: Path, folder: Path, bits: int, group_size: int = 32) -> dict:
    """Rewrite the float checkpoint in `source` as idefics2 wrote quantized checkpoints before they were
    compressed-tensors ones (quant_method "idefics2"): each decoder projection and the lm_head as `qweight`,
    `scales` and, for int4, `zeros` (asymmetric: the group's [min, max] in 15 steps, bfloat16 scales and
    zeros). Returns the float weights those tensors stand for, by name, computed here from the stored
    integers: weight = q * scale (int8), (q - 8) * scale + zero (int4)."""
    import json
    import shutil

    from idefics2.loading import read_safetensors, write_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.name != "model.safetensors":
            shutil.copy(file, folder / file.name)
    tensors, dequantized = {}, {}
    for name, tensor in read_safetensors(source / "model.safetensors").items():
        layer = name.removesuffix(".weight")
        quantized = name.endswith(".weight") and (
            layer == "lm_head" or (layer.startswith("model.text_model.layers.") and layer.endswith("_proj"))
        )
        if not quantized:
            tensors[name] = tensor.clone()
            continue
        w = tensor.float()
        n, k = w.shape
        if bits == 8:
            scales = w.abs().amax(dim=1) / 127
            q = torch.round(w / scales[:, None]).to(torch.int8)
            tensors.update({f"{layer}.qweight": q, f"{layer}.scales": scales})
            dequantized[name] = q.double() * scales.double()[:, None]
            continue
        groups = w.reshape(n, k // group_size, group_size)
        low, high = groups.amin(-1), groups.amax(-1)
        scales = ((high - low) / 15).to(torch.bfloat16)
        zeros = (low + 8 * scales.float()).to(torch.bfloat16)
        q = torch.round((groups - zeros.float()[..., None]) / scales.float()[..., None] + 8).clamp(0, 15)
        q = q.reshape(n, k).to(torch.uint8)
        tensors[f"{layer}.qweight"] = (q[:, 0::2] << 4) | q[:, 1::2]
        tensors.update({f"{layer}.scales": scales, f"{layer}.zeros": zeros})
        value = (q.double().reshape(n, -1, group_size) - 8) * scales.double()[..., None]
        dequantized[name] = (value + zeros.double()[..., None]).reshape(n, k)
    write_safetensors(folder / "model.safetensors", tensors)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "idefics2", "bits": bits, "modules": ["decoder"]}
    if bits == 4:
        config["quantization_config"]["group_size"] = group_size
    (folder / "config.json").write_text(json.dumps(config))
    return dequantized
