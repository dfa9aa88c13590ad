"""Idefics2Processor against transformers: loading layouts, chat template, decode, save/load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from idefics2 import Idefics2Processor
from oracle_processing import IDEFICS2_CHAT_TEMPLATE, LLAMA_TOKENIZER_CONFIG, build_reference_tokenizer

IMAGE_OPTIONS = {"size": {"longest_edge": 70, "shortest_edge": 20}}


@pytest.fixture(scope="module")
def reference(reference_processor_dir):
    from transformers import Idefics2Processor as Reference

    return Reference.from_pretrained(reference_processor_dir, **IMAGE_OPTIONS)


@pytest.fixture(scope="module")
def ours(reference_processor_dir):
    return Idefics2Processor.from_pretrained(reference_processor_dir, **IMAGE_OPTIONS)


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def assert_same_inputs(expected, actual) -> None:
    assert sorted(expected) == sorted(actual)
    for key in expected:
        if isinstance(expected[key], list):
            assert expected[key] == actual[key], key
            continue
        want, got = torch.as_tensor(np.asarray(expected[key])), torch.as_tensor(np.asarray(actual[key]))
        assert want.shape == got.shape, key
        if key == "pixel_values":
            assert got.dtype == torch.float32
            assert (want - got).abs().max().item() <= 1e-6
        else:
            assert torch.equal(want, got), key


def test_special_tokens_and_ids(ours, reference):
    tok = ours.tokenizer
    assert (tok.fake_image_token_id, tok.image_token_id, tok.end_of_utterance_token_id) == (
        32000,
        32001,
        32002,
    )
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    assert tok.padding_side == reference.tokenizer.padding_side
    assert ours.image_seq_len == 64
    assert ours.chat_template == IDEFICS2_CHAT_TEMPLATE
    for text in ["Hello world", " leading space", "日本語 🎉 emoji", "<image>x<end_of_utterance>", ""]:
        assert tok.encode(text) == reference.tokenizer.encode(text)
        assert tok.encode(text, add_special_tokens=False) == reference.tokenizer.encode(
            text, add_special_tokens=False
        )
    assert tok.backend.encode("Hi").ids == reference.tokenizer.encode("Hi")


def test_call_matches_reference(ours, reference):
    images = [random_image(30, 50, 1), random_image(90, 12, 2), random_image(40, 40, 3)]
    text = ["<image>Describe<image>", "Second: <image> done."]
    for kwargs in ({"padding": True, "return_tensors": "pt"}, {"padding": "longest"}):
        assert_same_inputs(
            reference(text=text, images=images, **kwargs), ours(text=text, images=images, **kwargs)
        )


def test_text_only_and_images_only(ours, reference):
    assert_same_inputs(reference(text="just text"), ours(text="just text"))
    image = random_image(25, 60)
    expected = reference(images=image, return_tensors="pt")
    actual = ours(images=image, return_tensors="pt")
    assert_same_inputs(expected, actual)


def test_truncation_and_max_length_padding(ours, reference):
    text = ["a b c d e f g h i j k l", "short"]
    for kwargs in (
        {"padding": "max_length", "max_length": 20, "truncation": True},
        {"padding": True, "truncation": True, "max_length": 6},
        {"padding": "max_length", "max_length": 9},
    ):
        assert_same_inputs(reference(text=text, **kwargs), ours(text=text, **kwargs))
    with pytest.raises(ValueError, match="padding=True"):
        ours(text=text, return_tensors="pt")
    with pytest.raises(ValueError, match="truncation"):
        ours(text="<image>", images=random_image(5, 5), truncation=True, max_length=10)


def test_padding_side_override(reference_processor_dir, reference):
    right = Idefics2Processor.from_pretrained(reference_processor_dir, padding_side="right")
    text = ["one two three", "one"]
    out = right(text=text, padding=True)
    assert out["attention_mask"][1][-1] == 0 and out["input_ids"][1][-1] == right.tokenizer.pad_token_id
    assert out["input_ids"][1][: sum(out["attention_mask"][1])] == reference.tokenizer.encode("one")


def test_chat_template_and_string_content(ours, reference):
    conversation = [
        {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A dog."}]},
        {"role": "user", "content": [{"type": "text", "text": "Colour?"}, {"type": "image"}]},
    ]
    for add in (False, True):
        want = reference.apply_chat_template(conversation, add_generation_prompt=add)
        assert ours.apply_chat_template(conversation, add_generation_prompt=add) == want
    batch = [conversation, conversation[:2]]
    assert ours.apply_chat_template(batch) == reference.apply_chat_template(batch)
    plain = [{"role": "user", "content": "Hello there"}]
    as_parts = [{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]
    assert ours.apply_chat_template(plain) == reference.apply_chat_template(as_parts)
    want_ids = reference.apply_chat_template(as_parts, add_generation_prompt=True, tokenize=True)
    assert ours.apply_chat_template(plain, add_generation_prompt=True, tokenize=True) == want_ids


def test_chat_template_tokenize_with_images(ours, reference):
    image = random_image(33, 21)
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi"}]}
    ]
    want = reference.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt")
    got = ours.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt")
    assert_same_inputs(dict(want), got)


def test_decode(ours, reference):
    ids = reference(text=["<image>Bonjour à tous 🎉<end_of_utterance>", "x"], padding=True)["input_ids"]
    for skip in (False, True):
        assert ours.batch_decode(ids, skip_special_tokens=skip) == reference.batch_decode(
            ids, skip_special_tokens=skip
        )
        assert ours.decode(torch.tensor(ids[0]), skip_special_tokens=skip) == reference.decode(
            ids[0], skip_special_tokens=skip
        )
    assert ours.tokenizer.convert_ids_to_tokens([32000, 32001]) == ["<fake_token_around_image>", "<image>"]
    assert ours.tokenizer.convert_tokens_to_ids("<end_of_utterance>") == 32002


def test_save_pretrained_round_trip(ours, reference, tmp_path):
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "processor_config.json").is_file() and (tmp_path / "chat_template.jinja").is_file()
    again = Idefics2Processor.from_pretrained(tmp_path)
    assert again.image_processor.to_dict() == ours.image_processor.to_dict()
    assert again.chat_template == ours.chat_template and again.image_seq_len == ours.image_seq_len
    text, images = ["<image>a", "b"], [[random_image(20, 30)], []]
    assert_same_inputs(
        reference(text=text, images=images, padding=True), again(text=text, images=images, padding=True)
    )


def write_hub_layout(folder: Path, template_file: str, splitting: bool) -> Path:
    """A folder laid out like the idefics2-8b hub repository, written from the reference's values; the
    tokenizer.json lacks the Idefics2 tokens, as a plain Mistral tokenizer does."""
    tokenizer = build_reference_tokenizer(folder / "source")
    tokenizer.save_pretrained(folder / "saved")
    shutil.copyfile(folder / "saved" / "tokenizer.json", folder / "tokenizer.json")
    shutil.rmtree(folder / "source")
    shutil.rmtree(folder / "saved")
    tokenizer_config = {
        **LLAMA_TOKENIZER_CONFIG,
        "additional_special_tokens": ["<fake_token_around_image>", "<image>", "<end_of_utterance>"],
        "model_max_length": 1000000000000000019884624838656,
        "padding_side": "left",
    }
    processor_config = {"image_seq_len": 32, "processor_class": "Idefics2Processor"}
    if template_file == "tokenizer_config.json":
        tokenizer_config["chat_template"] = IDEFICS2_CHAT_TEMPLATE
    elif template_file == "processor_config.json":
        processor_config["chat_template"] = IDEFICS2_CHAT_TEMPLATE
    else:
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": IDEFICS2_CHAT_TEMPLATE}))
    preprocessor = {
        "do_convert_rgb": True,
        "do_image_splitting": splitting,
        "do_normalize": True,
        "do_pad": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "Idefics2ImageProcessor",
        "image_std": [0.5, 0.5, 0.5],
        "processor_class": "Idefics2Processor",
        "resample": 2,
        "rescale_factor": 0.00392156862745098,
        "size": {"longest_edge": 60, "shortest_edge": 24},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (folder / "processor_config.json").write_text(json.dumps(processor_config))
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder


@pytest.mark.parametrize(
    "template_file,splitting",
    [("processor_config.json", True), ("tokenizer_config.json", False), ("chat_template.json", False)],
)
def test_hub_layout(tmp_path, template_file, splitting):
    from transformers import Idefics2Processor as Reference
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    folder = write_hub_layout(tmp_path, template_file, splitting)
    ours = Idefics2Processor.from_pretrained(folder)
    assert ours.image_seq_len == 32 and ours.chat_template == IDEFICS2_CHAT_TEMPLATE
    assert ours.image_processor.do_image_splitting is splitting
    assert (ours.tokenizer.fake_image_token_id, ours.tokenizer.image_token_id) == (32000, 32001)
    assert ours.tokenizer.end_of_utterance_token_id == 32002
    reference = Reference(
        image_processor=Idefics2ImageProcessorPil.from_pretrained(folder),
        tokenizer=build_reference_tokenizer(tmp_path / "ref_tokenizer"),
        image_seq_len=32,
        chat_template=IDEFICS2_CHAT_TEMPLATE,
    )
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    prompt = ours.apply_chat_template(conversation, add_generation_prompt=True)
    assert prompt == reference.apply_chat_template(conversation, add_generation_prompt=True)
    images = [random_image(50, 80, 7)]
    assert_same_inputs(
        reference(text=prompt, images=images, return_tensors="pt"),
        ours(text=prompt, images=images, return_tensors="pt"),
    )


def test_batch_feature_to(ours):
    out = ours(text="<image>hi", images=random_image(10, 10), return_tensors="pt")
    assert out.input_ids is out["input_ids"]
    half = out.to(torch.float16)
    assert half.pixel_values.dtype == torch.float16 and half.input_ids.dtype == torch.int64
    assert out.to("cpu").pixel_attention_mask.dtype == torch.int64
