"""Idefics2Tokenizer (tokenizers library) against transformers' tokenizer on the Mistral-7B vocabulary."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tokenizers
import torch

from idefics2 import Idefics2Tokenizer
from oracle_processing import LLAMA_TOKENIZER_CONFIG, build_reference_tokenizer

TEXTS = [
    "Hello world",
    "  two leading spaces and trailing  ",
    "line one\nline two\n\n\ttabbed",
    "naïve café, über-Straße — «quotes»",
    "日本語のテキストと中文",
    "emoji 👍🏽🎉 and flags 🇫🇷",
    "مرحبا بالعالم",
    "<s>bos inside</s> text",
    "User:<image>What is it?<end_of_utterance>\nAssistant:",
    "<fake_token_around_image><image><image><fake_token_around_image> word",
    "control \x00\x07 chars and \u200b zero width",
    "1234567890 3.14159 -42",
    "",
    " ",
    "a" * 300,
]


@pytest.fixture(scope="module")
def reference(reference_processor_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(reference_processor_dir)


@pytest.fixture(scope="module")
def ours(reference_processor_dir):
    return Idefics2Tokenizer.from_pretrained(reference_processor_dir)


def test_backend_and_special_tokens(ours, reference):
    assert isinstance(ours.backend, tokenizers.Tokenizer)
    for name in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id"):
        assert getattr(ours, name) == getattr(reference, name), name
    assert ours.padding_side == reference.padding_side
    assert len(ours) == len(reference) == 32003
    assert ours.convert_tokens_to_ids(["<fake_token_around_image>", "<image>", "<end_of_utterance>"]) == [
        32000,
        32001,
        32002,
    ]


@pytest.mark.parametrize("index", range(len(TEXTS)))
def test_encode_matches(ours, reference, index):
    text = TEXTS[index]
    assert ours.encode(text) == reference.encode(text)
    assert ours.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False)
    assert ours.tokenize(text) == reference.tokenize(text)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"padding": True},
        {"padding": "longest", "padding_side": "right"},
        {"padding": "max_length", "max_length": 40},
        {"padding": True, "truncation": True, "max_length": 8},
        {"truncation": True, "max_length": 5, "add_special_tokens": False},
        {"padding": True, "return_tensors": "pt"},
        {"padding": True, "padding_side": "left", "add_special_tokens": False, "return_tensors": "pt"},
    ],
    ids=lambda kwargs: ",".join(f"{k}={v}" for k, v in kwargs.items()) or "plain",
)
def test_batch_call_matches(ours, reference, kwargs):
    batch = TEXTS[:6]
    expected, actual = reference(batch, **kwargs), ours(batch, **kwargs)
    for key in ("input_ids", "attention_mask"):
        want, got = expected[key], actual[key]
        if isinstance(want, torch.Tensor):
            assert torch.equal(want, got), key
        else:
            assert got == want, key


def test_single_text_call_and_truncation_side(ours, reference, reference_processor_dir):
    assert ours("Hello there")["input_ids"] == reference("Hello there")["input_ids"]
    assert ours("Hello there", return_tensors="pt")["input_ids"].shape == (1, 3)
    left = Idefics2Tokenizer.from_pretrained(reference_processor_dir, truncation_side="left")
    reference.truncation_side = "left"
    try:
        text = "one two three four five six"
        assert (
            left(text, truncation=True, max_length=4)["input_ids"]
            == reference(text, truncation=True, max_length=4)["input_ids"]
        )
    finally:
        reference.truncation_side = "right"


def test_decode_matches(ours, reference):
    rng = np.random.default_rng(0)
    sequences = [reference.encode(text) for text in TEXTS] + [rng.integers(0, 32003, size=40).tolist()]
    for skip in (False, True):
        assert ours.batch_decode(sequences, skip_special_tokens=skip) == reference.batch_decode(
            sequences, skip_special_tokens=skip
        )
        for ids in sequences:
            assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(
                ids, skip_special_tokens=skip
            )
    assert ours.decode(torch.tensor([1, 15043, 32001])) == reference.decode([1, 15043, 32001])
    assert ours.decode(np.array([15043])) == reference.decode([15043])
    ids = list(range(0, 32003, 997))
    assert ours.convert_ids_to_tokens(ids) == reference.convert_ids_to_tokens(ids)
    assert ours.convert_ids_to_tokens(32001) == "<image>"
    tokens = ["<s>", "▁Hello", "not_a_token_at_all", "<image>"]
    assert ours.convert_tokens_to_ids(tokens) == reference.convert_tokens_to_ids(tokens)


def test_idefics2_tokens_are_added_when_absent(tmp_path):
    from transformers import Idefics2Processor
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    reference = build_reference_tokenizer(tmp_path / "source")
    reference.save_pretrained(tmp_path / "plain")
    assert "<image>" not in json.loads((tmp_path / "plain" / "tokenizer.json").read_text())["model"]["vocab"]
    ours = Idefics2Tokenizer.from_pretrained(tmp_path / "plain")
    Idefics2Processor(
        image_processor=Idefics2ImageProcessorPil(), tokenizer=reference
    )  # adds them the reference way
    for token in ("<fake_token_around_image>", "<image>", "<end_of_utterance>"):
        assert ours.convert_tokens_to_ids(token) == reference.convert_tokens_to_ids(token)
    text = "User:<image>hi<end_of_utterance>"
    assert ours.encode(text) == reference.encode(text)
    assert ours.decode(ours.encode(text), skip_special_tokens=True) == reference.decode(
        reference.encode(text), skip_special_tokens=True
    )


def test_add_eos_token_and_added_tokens_decoder(tmp_path, reference_processor_dir):
    from transformers import AutoTokenizer

    folder = tmp_path / "eos"
    folder.mkdir()
    shutil.copyfile(reference_processor_dir / "tokenizer.json", folder / "tokenizer.json")
    config = {
        **LLAMA_TOKENIZER_CONFIG,
        "add_eos_token": True,
        "added_tokens_decoder": {
            str(i): {"content": token, "special": True, "normalized": False}
            for i, token in enumerate(["<unk>", "<s>", "</s>"])
        }
        | {
            str(32000 + i): {"content": token, "special": True, "normalized": False}
            for i, token in enumerate(
                ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<extra_marker>"]
            )
        },
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours = Idefics2Tokenizer.from_pretrained(folder)
    reference = AutoTokenizer.from_pretrained(folder)
    assert (
        ours.convert_tokens_to_ids("<extra_marker>")
        == reference.convert_tokens_to_ids("<extra_marker>")
        == 32003
    )
    # add_eos_token=True: every sequence ends with </s>. transformers 5 ignores the flag for this tokenizer
    # class, so the expectation is built by hand from its plain encoding.
    for text in ("Hello", "a <extra_marker> b", ""):
        plain = reference.encode(text, add_special_tokens=False)
        assert ours.encode(text) == [1, *plain, 2]
        assert ours.backend.encode(text).ids == [1, *plain, 2]
    truncated = ours(["x y z", "x"], padding=True, truncation=True, max_length=4)["input_ids"]
    x_y_z = reference.encode("x y z", add_special_tokens=False)
    assert truncated[0] == [1, *x_y_z[:2], 2]
    assert truncated[1][-3:] == [1, *reference.encode("x", add_special_tokens=False), 2][-3:]


def test_special_tokens_map_and_config_settings(tmp_path, reference_processor_dir):
    shutil.copyfile(reference_processor_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    special = {"bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>", "pad_token": "</s>"}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 6, "add_bos_token": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = Idefics2Tokenizer.from_pretrained(tmp_path)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    assert tokenizer.padding_side == "right" and tokenizer.model_max_length == 6
    ids = tokenizer(["one two three four five six seven", "x"], padding=True, truncation=True)["input_ids"]
    assert len(ids[0]) == 6 and ids[0][0] == 1 and ids[1][-1] == 2


def test_save_pretrained_round_trip(ours, tmp_path):
    ours.save_pretrained(tmp_path)
    again = Idefics2Tokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert again.encode(text) == ours.encode(text)
    assert (again.padding_side, again.pad_token_id, len(again)) == (
        ours.padding_side,
        ours.pad_token_id,
        len(ours),
    )
    assert again.additional_special_tokens == ours.additional_special_tokens


def test_bad_input(ours, tmp_path):
    with pytest.raises(ValueError, match="must be a str"):
        ours.encode(123)
    with pytest.raises(ValueError, match="str or a list of str"):
        ours([b"bytes"])
    with pytest.raises(ValueError, match="empty list"):
        ours([])
    with pytest.raises(ValueError, match="needs max_length"):
        ours(["a"], padding="max_length")
    with pytest.raises(ValueError, match="padding must be"):
        ours(["a"], padding="sideways")
    with pytest.raises(ValueError, match="padding_side"):
        ours(["a", "b c"], padding=True, padding_side="top")
    with pytest.raises(ValueError, match="no room"):
        ours("abc", truncation=True, max_length=0)
    with pytest.raises(ValueError, match="padding=True to return tensors"):
        ours(["a", "b c d"], return_tensors="pt")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Idefics2Tokenizer.from_pretrained(tmp_path)
