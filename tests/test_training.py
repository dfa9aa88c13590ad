"""End-to-end training of a fresh tiny Idefics2: loss drop, exact resume, gradient checkpointing, freezing."""

from __future__ import annotations

import time

import pytest
import torch
from PIL import Image

from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Processor
from idefics2.training import (
    ChatCollator,
    ChatDataset,
    LoraConfig,
    TrainingArguments,
    add_lora,
    freeze,
    mark_only_lora_trainable,
    train,
)
from oracle_model import tiny_config_dict
from oracle_processing import build_reference_processor

COLORS = {
    "red": (230, 20, 20),
    "green": (20, 200, 40),
    "blue": (30, 40, 220),
    "white": (250, 250, 250),
    "black": (5, 5, 5),
    "yellow": (240, 230, 30),
}


@pytest.fixture(scope="session")
def tiny_processor(tmp_path_factory):
    """Mistral vocabulary, 4 image tokens per image (the tiny model's perceiver latents), images <= 56 px."""
    folder = build_reference_processor(
        tmp_path_factory.mktemp("tiny_processor"), image_seq_len=4, longest_edge=56, shortest_edge=28
    )
    return Idefics2Processor.from_pretrained(folder)


def color_examples() -> list[dict]:
    """A small synthetic set: what colour is the square (one turn), and a follow-up turn for some."""
    examples = []
    for i, (name, rgb) in enumerate(COLORS.items()):
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is this?"}]},
            {"role": "assistant", "content": f"It is {name}."},
        ]
        if i % 2:
            messages += [
                {"role": "user", "content": "Are you sure?"},
                {"role": "assistant", "content": "Yes."},
            ]
        examples.append({"messages": messages, "images": [Image.new("RGB", (28 + 4 * i, 28), rgb)]})
    return examples


def fresh_model(seed: int = 0) -> Idefics2ForConditionalGeneration:
    torch.manual_seed(seed)
    return Idefics2ForConditionalGeneration(Idefics2Config.from_dict(tiny_config_dict()))


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_short_run_halves_the_loss(tiny_processor, tmp_path):
    collator = ChatCollator(tiny_processor)
    data = ChatDataset(color_examples(), collator)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=16,
        batch_size=3,
        lr=2e-2,
        warmup_steps=2,
        eval_steps=8,
        progress=False,
    )
    start = time.perf_counter()
    result = train(fresh_model(), data, collator, args, eval_data=data)
    elapsed = time.perf_counter() - start
    first, last = result.losses[0], sum(result.losses[-3:]) / 3
    print(f"loss {first:.3f} -> {last:.3f} ({100 * (1 - last / first):.0f}% lower) in {elapsed:.1f} s")
    assert last <= 0.5 * first
    assert elapsed < 60
    assert [s for s, _ in result.eval_losses] == [8, 16]
    assert result.eval_losses[1][1] < result.eval_losses[0][1] < first
    # the output folder is a complete checkpoint that loads back
    reloaded = Idefics2ForConditionalGeneration.from_pretrained(tmp_path)
    assert reloaded.config.text_config.hidden_size == 64


def lora_model(seed=0):
    model = fresh_model()
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1)
    add_lora(model, config)
    mark_only_lora_trainable(model)
    return model, config


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_resume_equals_an_uninterrupted_run(tiny_processor, tmp_path, use_lora):
    collator = ChatCollator(tiny_processor)
    data = ChatDataset(color_examples(), collator)
    settings = dict(
        max_steps=4,
        batch_size=1,
        grad_accum=2,
        lr=5e-3,
        warmup_steps=1,
        scheduler="cosine",
        save_steps=2,
        save_total_limit=None,
        progress=False,
    )

    def model_and_config(seed):
        if use_lora:
            return lora_model(seed)
        model = fresh_model()
        freeze(model, vision=True)
        return model, None

    model, config = model_and_config(0)
    whole = train(
        model,
        data,
        collator,
        TrainingArguments(output_dir=str(tmp_path / "a"), **settings),
        lora_config=config,
    )
    expected = params(model)

    resumed_model, config = model_and_config(1)  # other LoRA init: the checkpoint must restore it
    torch.manual_seed(1234)  # other RNG state: the checkpoint must restore it (LoRA dropout draws from it)
    resumed = train(
        resumed_model,
        data,
        collator,
        TrainingArguments(output_dir=str(tmp_path / "b"), **settings),
        lora_config=config,
        resume_from=tmp_path / "a" / "checkpoint-2",
    )
    diff = max_diff(expected, params(resumed_model))
    print(f"resume vs uninterrupted ({'lora' if use_lora else 'full'}): max weight diff {diff:.2e}")
    assert diff <= 1e-6
    assert resumed.losses == pytest.approx(whole.losses[2:], abs=1e-6)
    saved = sorted(p.name for p in (tmp_path / "a" / "checkpoint-2").iterdir())
    assert not [name for name in saved if not name.endswith((".json", ".safetensors"))]


def test_gradient_checkpointing_gives_the_same_training(tiny_processor, tmp_path):
    collator = ChatCollator(tiny_processor)
    data = ChatDataset(color_examples(), collator)
    results = []
    for checkpointing in (False, True):
        model, config = lora_model()
        args = TrainingArguments(
            output_dir=str(tmp_path / str(checkpointing)),
            max_steps=2,
            batch_size=3,
            lr=1e-2,
            gradient_checkpointing=checkpointing,
            progress=False,
        )
        train(model, data, collator, args, lora_config=config)
        results.append(params(model))
    assert max_diff(*results) <= 1e-6


def test_frozen_parts_do_not_move(tiny_processor, tmp_path):
    collator = ChatCollator(tiny_processor)
    data = ChatDataset(color_examples(), collator)
    model = fresh_model()
    freeze(model, vision=True, connector=True)
    before = params(model)
    train(
        model,
        data,
        collator,
        TrainingArguments(output_dir=str(tmp_path), max_steps=2, batch_size=3, lr=1e-2, progress=False),
    )
    after = params(model)
    for name in before:
        moved = not torch.equal(before[name], after[name])
        assert moved == name.startswith(("model.text_model.", "lm_head.")), name


def test_bf16_autocast_runs_on_cpu(tiny_processor, tmp_path):
    collator = ChatCollator(tiny_processor)
    data = ChatDataset(color_examples(), collator)
    model, config = lora_model()
    result = train(
        model,
        data,
        collator,
        TrainingArguments(
            output_dir=str(tmp_path), max_steps=2, batch_size=3, mixed_precision="bf16", progress=False
        ),
        lora_config=config,
    )
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "adapter_config.json").is_file()
