"""QLoRA: LoRA adapters trained on a frozen int4 (or int8) base: the loss falls, resuming equals an
uninterrupted run, the adapter reloads on the quantized and on the float model, and `idefics2 train
--quantize int4` runs it from the command line. Also the accuracy of the quantized built-in model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from idefics2 import Idefics2ForConditionalGeneration
from idefics2.cli import main
from idefics2.lora import mark_only_lora_trainable
from idefics2.quantization import quantized_layers
from idefics2.training import ChatCollator, ChatDataset, LoraConfig, TrainingArguments, add_lora, train
from test_distributed import build_model_folder, write_dataset
from test_training import color_examples, tiny_processor  # noqa: F401  (a fixture)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_folder(tmp_path_factory.mktemp("model"))


def qlora_model(folder, seed=0, mode="int4"):
    model = Idefics2ForConditionalGeneration.from_pretrained(folder, quantize=mode, group_size=32)
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1)
    add_lora(model, config)
    mark_only_lora_trainable(model)
    return model, config


def lora_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_qlora_loss_falls_like_float_lora_and_only_the_adapters_move(model_dir, tiny_processor, tmp_path):  # noqa: F811
    collator = ChatCollator(tiny_processor)
    data = ChatDataset(color_examples(), collator)
    model, config = qlora_model(model_dir)
    frozen = {n: b.clone() for n, b in model.state_dict().items() if ".lora_" not in n}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, batch_size=3, lr=2e-2, progress=False)
    result = train(model, data, collator, args, lora_config=config)
    float_model = Idefics2ForConditionalGeneration.from_pretrained(model_dir)
    torch.manual_seed(0)
    add_lora(float_model, config)
    mark_only_lora_trainable(float_model)
    float_args = TrainingArguments(output_dir=str(tmp_path / "float"), max_steps=6, batch_size=3, lr=2e-2,
                                   progress=False)  # fmt: skip
    float_result = train(float_model, data, collator, float_args, lora_config=config)
    # a random tiny model (loss ~ln(32003)): rank-4 adapters move it slowly, on int4 as in float
    assert result.losses[-1] <= 0.93 * result.losses[0], result.losses
    assert result.losses[-1] == pytest.approx(float_result.losses[-1], rel=0.02), (
        result.losses,
        float_result.losses,
    )
    after = {n: b for n, b in model.state_dict().items() if ".lora_" not in n}
    assert all(torch.equal(frozen[n], after[n]) for n in frozen)  # the quantized base never changes
    adapted = [m for m in quantized_layers(model).values() if hasattr(m, "lora_B")]
    assert len(adapted) == 14 and all(m.lora_B.weight.abs().sum() > 0 for m in adapted)

    # the adapter reloads on the quantized model (same logits) and applies to the float model too
    inputs = {k: v for k, v in collator([data[0]]).items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        trained = model(**inputs).logits
        again = Idefics2ForConditionalGeneration.from_pretrained(
            model_dir, quantize="int4", group_size=32, adapter=tmp_path
        )(**inputs).logits
        on_float = Idefics2ForConditionalGeneration.from_pretrained(model_dir, adapter=tmp_path)(
            **inputs
        ).logits
        base = Idefics2ForConditionalGeneration.from_pretrained(model_dir)(**inputs).logits
    assert torch.allclose(again, trained, atol=1e-5)
    moved = (on_float - base).abs().max()
    assert moved > 0.1  # the adapter changed the float model...
    assert (on_float - trained).abs().max() < 0.5 * moved  # ...in the direction it learned on int4


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_qlora_resume_equals_an_uninterrupted_run(model_dir, tiny_processor, tmp_path, mode):  # noqa: F811
    collator = ChatCollator(tiny_processor)
    data = ChatDataset(color_examples(), collator)
    settings = dict(max_steps=4, batch_size=1, grad_accum=2, lr=5e-3, save_steps=2, progress=False)
    model, config = qlora_model(model_dir, 0, mode)
    whole = train(model, data, collator, TrainingArguments(output_dir=str(tmp_path / "a"), **settings),
                  lora_config=config)  # fmt: skip
    resumed_model, config = qlora_model(model_dir, 1, mode)
    torch.manual_seed(1234)
    resumed_args = TrainingArguments(output_dir=str(tmp_path / "b"), **settings)
    resumed = train(resumed_model, data, collator, resumed_args, lora_config=config,
                    resume_from=tmp_path / "a" / "checkpoint-2")  # fmt: skip
    expected, got = lora_params(model), lora_params(resumed_model)
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) <= 1e-6
    assert resumed.losses == pytest.approx(whole.losses[2:], abs=1e-6)


def test_train_command_with_quantize_int4(model_dir, tmp_path, capsys):
    data = write_dataset(tmp_path)
    out = tmp_path / "adapter"
    base = ["train", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--lora-rank", "8"]
    code = main(base + ["--quantize", "int4", "--max-steps", "2", "--save-steps", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert (out / "adapter_model.safetensors").is_file() and "after 2 steps" in err
    code = main(base + ["--quantize", "int4", "--max-steps", "3", "--resume", "--no-progress"])
    assert code == 0 and "after 3 steps" in capsys.readouterr().err
    code = main(base[:-2] + ["--full", "--quantize", "int8"])
    assert code == 2 and "QLoRA" in capsys.readouterr().err


def test_builtin_model_accuracy_quantized():
    """`idefics2 eval` on the built-in model: int8 within 1 point of float32, int4 (decoder) within 3."""
    from idefics2 import pipeline
    from idefics2.shapes import evaluate, make_dataset

    examples = make_dataset(20, 5)
    scores = {
        mode: evaluate(pipeline(dtype=torch.float32, quantize=mode), examples=examples, batch_size=35)[
            "overall"
        ]
        for mode in (None, "int8", "int4")
    }
    print(scores)
    assert scores[None] >= 0.9
    assert scores["int8"] >= scores[None] - 0.01
    assert scores["int4"] >= scores[None] - 0.03


def test_model_commands_take_quantize(capsys):
    """--quantize on a model command (here generate, on the built-in model) loads the decoder quantized."""
    image = str(Path(__file__).resolve().parents[1] / "examples" / "shapes.png")
    for mode in ("int8", "int4"):
        code = main(
            ["generate", "--image", image, "--prompt", "What color is the circle?", "--quantize", mode]
        )
        out = capsys.readouterr()
        assert code == 0, out.err
        assert out.out == "green\n"


def test_bad_quantize_choice_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--prompt", "hi", "--quantize", "int2"])
    assert exit_info.value.code == 2
    assert "--quantize" in capsys.readouterr().err
