"""Every folder idefics2 writes loads in transformers unchanged: the built-in model, `train --full` outputs
and their checkpoints, merged adapters, quantized models. transformers' AutoTokenizer / AutoProcessor give
the same ids as ours on varied prompts, and its Idefics2ForConditionalGeneration the same float32 logits,
each side using its own processor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from idefics2 import Idefics2ForConditionalGeneration, Idefics2Processor
from idefics2.assets import builtin_model_dir
from idefics2.modeling import kernels
from idefics2.processing import Idefics2Tokenizer
from idefics2.quantization import quantized_layers
from oracle_model import rel_diff, write_legacy_quantized_checkpoint

SHAPES = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"
PROMPTS = [
    "What color is the circle?",
    "",
    " a leading space",
    "runs   of    spaces  and a trailing one ",
    "line one\nline two\n\n\ttabbed\r\nend\n",
    "digits 0123456789, 3.14159 and 1,000,000",
    "punctuation!?.,;:'\"()[]{}<>-_/\\|@#$%^&*~`",
    "unicode: héllo wörld, naïve café ✓ 日本語 🙂 ÆØÅ",
    "<image><end_of_utterance> special tokens inline</s><s><pad><unk>",
    "User:<fake_token_around_image><image><fake_token_around_image>How many?<end_of_utterance>\nAssistant:",
]


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


CONVERSATIONS = [
    (
        [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}],
            }
        ],
        [Image.open(SHAPES).convert("RGB")],
    ),
    (
        [
            {"role": "system", "content": [{"type": "text", "text": "Answer  briefly.\n"}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare  these:\n"},
                    {"type": "image"},
                    {"type": "image"},
                    {"type": "text", "text": " How many shapes (1, 2 or 3)? ✓"},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": " Two.\n"}]},
            {"role": "user", "content": [{"type": "text", "text": "And   the  colors?"}]},
        ],
        [_image(0, (90, 130)), _image(1, (200, 60))],
    ),
]


def assert_tokenizers_agree(folder: Path) -> None:
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(folder)
    ours = Idefics2Tokenizer.from_pretrained(folder)
    for prompt in PROMPTS:
        for special in (True, False):
            expected = theirs(prompt, add_special_tokens=special)["input_ids"]
            assert ours(prompt, add_special_tokens=special)["input_ids"] == expected, (prompt, special)
        ids = ours.encode(prompt)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    batch = {"padding": True, "return_tensors": "pt"}  # the padding side and pad id, from the folder
    for key, value in theirs(PROMPTS[:4], **batch).items():
        assert torch.equal(ours(PROMPTS[:4], **batch)[key], value), key


def assert_processors_agree(folder: Path) -> None:
    """Chat templates with images: same prompt text, ids, masks and pixels."""
    from transformers import AutoProcessor

    theirs = AutoProcessor.from_pretrained(folder)
    ours = Idefics2Processor.from_pretrained(folder)
    for messages, images in CONVERSATIONS:
        text = ours.apply_chat_template(messages, add_generation_prompt=True)
        assert theirs.apply_chat_template(messages, add_generation_prompt=True) == text
        expected = theirs(text=text, images=[images], return_tensors="pt")
        got = ours(text=text, images=[images], return_tensors="pt")
        assert got["input_ids"].tolist() == expected["input_ids"].tolist()
        assert torch.equal(got["attention_mask"], expected["attention_mask"])
        assert torch.allclose(got["pixel_values"], expected["pixel_values"], atol=1e-5)
        assert torch.equal(got["pixel_attention_mask"], expected["pixel_attention_mask"])


def assert_logits_agree(folder: Path) -> float:
    """Logits of transformers' model on its processor's inputs against ours on ours (float32; a quantized
    model of ours on its float32 route, the dequantized product). Returns the largest relative difference."""
    from transformers import AutoProcessor
    from transformers import Idefics2ForConditionalGeneration as Reference

    reference = Reference.from_pretrained(folder, dtype=torch.float32).eval()
    model = Idefics2ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    theirs, ours = AutoProcessor.from_pretrained(folder), Idefics2Processor.from_pretrained(folder)
    worst = 0.0
    for messages, images in CONVERSATIONS:
        text = ours.apply_chat_template(messages, add_generation_prompt=True)
        with torch.no_grad(), kernels.force(int8="dequantize", int4="dequantize"):
            expected = reference(**theirs(text=text, images=[images], return_tensors="pt")).logits
            got = model(**ours(text=text, images=[images], return_tensors="pt")).logits
        assert got.shape == expected.shape
        worst = max(worst, rel_diff(got, expected))
    assert worst <= 1e-4
    return worst


def assert_loads_alike(folder: Path) -> None:
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == (
        "PreTrainedTokenizerFast"
    )
    assert_tokenizers_agree(folder)
    assert_processors_agree(folder)
    assert_logits_agree(folder)


def test_the_builtin_model_loads_alike_in_transformers():
    assert_loads_alike(builtin_model_dir())


def test_a_saved_idefics2_8b_processor_keeps_the_references_ids(reference_processor_dir, tmp_path):
    """The Mistral vocabulary (idefics2-8b's) saved by us, with image splitting: transformers reads our folder
    as it reads its own."""
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(reference_processor_dir)
    processor = Idefics2Processor.from_pretrained(reference_processor_dir, do_image_splitting=True)
    processor.save_pretrained(tmp_path)
    reread = AutoTokenizer.from_pretrained(tmp_path)
    for prompt in PROMPTS:
        assert reread(prompt)["input_ids"] == reference(prompt)["input_ids"], prompt
    assert_tokenizers_agree(tmp_path)
    assert_processors_agree(tmp_path)


def _train(args: list[str]) -> None:
    from idefics2.cli import main

    try:
        code = main(args)
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 0


@pytest.fixture(scope="module")
def train_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    image = {"type": "image", "image": str(SHAPES)}
    rows = [
        {"messages": [
            {"role": "user", "content": [image, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]}
        for question, answer in (("How many shapes?", "3."), ("What color is the circle?", "Red."))
    ]  # fmt: skip
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_full_training_run_and_its_checkpoints_load_alike(train_data, tmp_path, capsys):
    out = tmp_path / "full"
    flags = ["--max-steps", "2", "--save-steps", "1", "--batch-size", "2", "--lr", "1e-3", "--no-progress"]
    _train(["train", "--full", "--data", str(train_data), "--output", str(out), *flags])
    capsys.readouterr()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    for folder in (out, out / "checkpoint-1"):
        assert_loads_alike(folder)
    # the run changed the weights: the folders hold the trained model, not a copy of the built-in one
    builtin = Idefics2ForConditionalGeneration.from_pretrained(builtin_model_dir())
    trained = Idefics2ForConditionalGeneration.from_pretrained(out)
    name = "model.text_model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(builtin.state_dict()[name], trained.state_dict()[name])


def test_a_merged_adapter_loads_alike(tmp_path):
    from idefics2.training import LoraConfig, add_lora, save_adapter

    model = Idefics2ForConditionalGeneration.from_pretrained(builtin_model_dir())
    config = LoraConfig(r=4, lora_alpha=8)
    add_lora(model, config)
    generator = torch.Generator().manual_seed(0)
    for name, parameter in model.named_parameters():
        if ".lora_B." in name:  # B starts at zero: make the adapter change the outputs
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.05
    save_adapter(model, config, tmp_path / "adapter")

    merged = Idefics2ForConditionalGeneration.from_pretrained(
        builtin_model_dir(), adapter=tmp_path / "adapter", merge_adapter=True
    )
    merged.save_pretrained(tmp_path / "merged")
    Idefics2Processor.from_pretrained(builtin_model_dir()).save_pretrained(tmp_path / "merged")
    assert_loads_alike(tmp_path / "merged")

    from transformers import Idefics2ForConditionalGeneration as Reference

    reference = Reference.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    processor = Idefics2Processor.from_pretrained(tmp_path / "merged")
    messages, images = CONVERSATIONS[0]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=text, images=[images], return_tensors="pt")
    with torch.no_grad():
        adapted = model.eval()(**inputs).logits
        base = Idefics2ForConditionalGeneration.from_pretrained(builtin_model_dir()).eval()(**inputs).logits
        expected = reference(**inputs).logits
    assert rel_diff(adapted, expected) <= 1e-4  # transformers runs the adapter's weights
    assert rel_diff(base, expected) > 1e-3


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_saved_quantized_model_loads_alike(tmp_path, mode):
    """Saved after quantizing: transformers (with compressed-tensors) runs the same int8 / int4 weights, and
    they are really quantized (the logits differ from the float model's)."""
    from transformers import Idefics2ForConditionalGeneration as Reference

    model = Idefics2ForConditionalGeneration.from_pretrained(builtin_model_dir(), quantize=mode)
    model.save_pretrained(tmp_path)
    Idefics2Processor.from_pretrained(builtin_model_dir()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    reloaded = Idefics2ForConditionalGeneration.from_pretrained(tmp_path)
    assert sorted(quantized_layers(reloaded)) == sorted(quantized_layers(model))
    assert_logits_agree(tmp_path)

    reference = Reference.from_pretrained(tmp_path, dtype=torch.float32)
    float_model = Idefics2ForConditionalGeneration.from_pretrained(builtin_model_dir())
    messages, images = CONVERSATIONS[0]
    processor = Idefics2Processor.from_pretrained(tmp_path)
    inputs = processor(
        text=processor.apply_chat_template(messages, add_generation_prompt=True),
        images=[images],
        return_tensors="pt",
    )
    with torch.no_grad():
        assert rel_diff(reference(**inputs).logits, float_model(**inputs).logits) > 1e-3
        for name, layer in quantized_layers(model).items():  # transformers' weights are ours, exactly
            weight = reference.get_submodule(name).weight
            assert torch.equal(weight.float(), layer.dequantized_weight(torch.float32)), name


def test_an_older_int4_folder_saved_again_loads_alike(tmp_path):
    """int4 with zero points (our older format, or AWQ) is saved as float weights: transformers runs what our
    quantized model runs."""
    write_legacy_quantized_checkpoint(builtin_model_dir(), tmp_path / "legacy", bits=4)
    model = Idefics2ForConditionalGeneration.from_pretrained(tmp_path / "legacy")
    with pytest.warns(UserWarning, match="saved as float weights"):
        model.save_pretrained(tmp_path / "saved")
    Idefics2Processor.from_pretrained(builtin_model_dir()).save_pretrained(tmp_path / "saved")
    assert "quantization_config" not in json.loads((tmp_path / "saved" / "config.json").read_text())
    from transformers import Idefics2ForConditionalGeneration as Reference

    reference = Reference.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    processor = Idefics2Processor.from_pretrained(tmp_path / "saved")
    messages, images = CONVERSATIONS[0]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=text, images=[images], return_tensors="pt")
    with torch.no_grad(), kernels.force(int4="dequantize"):
        assert rel_diff(model.eval()(**inputs).logits, reference(**inputs).logits) <= 1e-4
