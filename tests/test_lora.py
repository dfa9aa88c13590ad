"""LoRA adapters: PEFT's format and tensor names; the same logits as peft on transformers' Idefics2."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from idefics2 import Idefics2ForConditionalGeneration
from idefics2.lora import DEFAULT_TARGET_MODULES, merge_lora
from idefics2.training import (
    ChatCollator,
    ChatDataset,
    LoraConfig,
    TrainingArguments,
    adapters_disabled,
    add_lora,
    load_adapter,
    mark_only_lora_trainable,
    train,
)
from oracle_model import build_batch, build_reference_checkpoint, rel_diff
from test_training import color_examples, tiny_processor  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return build_reference_checkpoint(tmp_path_factory.mktemp("base"))


def batch():
    samples = [{"text": [5, 7], "images": [(56, 42)]}, {"text": [9, 3], "images": [(28, 56), (42, 42)]}]
    return build_batch(samples, n_latents=4, patch_multiple=14, padding_side="right", seed=3)


def logits(model) -> torch.Tensor:
    """Logits at the real (non-padding) positions of a right-padded batch with 1 and 2 images."""
    inputs = batch()
    with torch.no_grad():
        out = model.eval()(**inputs).logits
    return out[inputs["attention_mask"].bool()]


def reference_base(base_dir):
    from transformers import Idefics2ForConditionalGeneration as Reference

    return Reference.from_pretrained(base_dir, attn_implementation="sdpa", dtype=torch.float32)


def test_tensor_names_and_config_match_peft(base_dir, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_model = get_peft_model(
        reference_base(base_dir), PeftLoraConfig(r=4, lora_alpha=8, target_modules=DEFAULT_TARGET_MODULES)
    )
    peft_model.save_pretrained(tmp_path / "peft")
    ours = Idefics2ForConditionalGeneration.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=8)
    add_lora(ours, config)
    from idefics2.training import save_adapter

    save_adapter(ours, config, tmp_path / "ours")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert "base_model.model.model.text_model.layers.0.self_attn.q_proj.lora_A.weight" in mine
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}
    assert not any("vision_model" in k for k in mine)  # the default leaves the vision tower alone
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 4 and saved["lora_alpha"] == 8


def test_our_trained_adapter_gives_peft_the_same_logits(base_dir, tiny_processor, tmp_path):  # noqa: F811
    from peft import PeftModel

    model = Idefics2ForConditionalGeneration.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0)
    add_lora(model, config)
    mark_only_lora_trainable(model)
    collator = ChatCollator(tiny_processor)
    train(
        model,
        ChatDataset(color_examples(), collator),
        collator,
        TrainingArguments(output_dir=str(tmp_path), max_steps=3, batch_size=3, lr=1e-2, progress=False),
        lora_config=config,
    )
    adapted = logits(model)

    reference = PeftModel.from_pretrained(reference_base(base_dir), tmp_path)
    expected = logits(reference)
    base = logits(Idefics2ForConditionalGeneration.from_pretrained(base_dir))
    diff = rel_diff(adapted, expected)
    print(f"our adapter: ours vs peft relative logit diff {diff:.2e}, vs base {rel_diff(base, expected):.2e}")
    assert diff <= 1e-4
    assert rel_diff(base, expected) > 1e-3  # the adapter changes the outputs

    loaded = Idefics2ForConditionalGeneration.from_pretrained(base_dir, adapter=tmp_path)
    assert rel_diff(logits(loaded), expected) <= 1e-4


def test_peft_trained_adapter_loads_in_ours(base_dir, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    # Random B (init_lora_weights=False) so the adapter is not a no-op; a list of targets, per-layer ranks and
    # rsLoRA scaling exercise the config fields we read.
    peft_config = PeftLoraConfig(
        r=4,
        lora_alpha=16,
        init_lora_weights=False,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"model.text_model.layers.1.self_attn.q_proj": 2},
    )
    torch.manual_seed(0)
    peft_model = get_peft_model(reference_base(base_dir), peft_config)
    peft_model.save_pretrained(tmp_path)
    expected = logits(peft_model)

    ours = Idefics2ForConditionalGeneration.from_pretrained(base_dir, adapter=tmp_path)
    diff = rel_diff(logits(ours), expected)
    print(f"peft adapter: ours vs peft relative logit diff {diff:.2e}")
    assert diff <= 1e-4
    merged = Idefics2ForConditionalGeneration.from_pretrained(base_dir, adapter=tmp_path, merge_adapter=True)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert rel_diff(logits(merged), expected) <= 1e-4
    base = logits(Idefics2ForConditionalGeneration.from_pretrained(base_dir))
    assert rel_diff(base, expected) > 1e-3


def test_merge_keeps_the_outputs_and_drops_the_adapter(base_dir):
    model = Idefics2ForConditionalGeneration.from_pretrained(base_dir)
    add_lora(model, LoraConfig(r=2, lora_dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    before = logits(model)
    merge_lora(model)
    assert not any("lora" in name for name in model.state_dict())
    assert rel_diff(logits(model), before) <= 1e-5


def test_bad_adapters_are_clear_errors(base_dir, tmp_path):
    model = Idefics2ForConditionalGeneration.from_pretrained(base_dir)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "use_dora": True, "target_modules": ["q_proj"]})
    )
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="use_dora"):
        load_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="no linear layer matches"):
        add_lora(model, LoraConfig(target_modules=r"nothing\.here"))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [False, True])
def test_training_path_of_an_adapted_layer_equals_the_formula(dropout, bias):
    """Training through a frozen layer takes the fused path (one product per pass, the adapter's part added
    inside it); its output and gradients equal x W.T + b + scaling * dropout(x) A.T B.T computed plainly."""
    from torch import nn

    from idefics2.modeling.attention import Linear

    torch.manual_seed(0)
    holder = nn.Module()
    holder.proj = Linear(64, 96, bias=bias)
    add_lora(holder, LoraConfig(r=4, lora_dropout=dropout, target_modules=["proj"]))
    mark_only_lora_trainable(holder)
    layer = holder.proj
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(2, 5, 64, requires_grad=True)
    wrt = [x, layer.lora_A.weight, layer.lora_B.weight]
    torch.manual_seed(1)
    out = layer(x)
    assert type(out.grad_fn).__name__.startswith("_FrozenLinearWithLora")
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, wrt, grad)
    torch.manual_seed(1)  # the same dropout mask
    dropped = layer.lora_dropout(x)
    plain = x @ layer.weight.t() + (layer.bias if bias else 0)
    plain = plain + layer.lora_scaling * (dropped @ layer.lora_A.weight.t()) @ layer.lora_B.weight.t()
    theirs = torch.autograd.grad(plain, wrt, grad)
    assert (out - plain).abs().max() < 1e-5
    for mine, ref in zip(ours, theirs, strict=True):
        assert (mine - ref).abs().max() < 1e-5 * max(1.0, ref.abs().max().item())
    with adapters_disabled(holder):  # switched off: the base layer alone
        assert torch.allclose(layer(x), x @ layer.weight.t() + (layer.bias if bias else 0), atol=1e-5)
