"""Idefics2Config: transformers' defaults for missing keys, round trips, unknown keys, clear errors."""

from __future__ import annotations

import json

import pytest

from idefics2 import Idefics2Config
from oracle_model import tiny_config_dict

# A config.json as the idefics2-8b hub repo writes it (model_type "idefics2" in the sub-configs, legacy
# rope_theta, no perceiver hidden_size, an unknown key).
HUB_STYLE = {
    "architectures": ["Idefics2ForConditionalGeneration"],
    "image_token_id": 32001,
    "model_type": "idefics2",
    "perceiver_config": {"model_type": "idefics2", "resampler_n_latents": 64, "resampler_depth": 3},
    "text_config": {
        "model_type": "mistral",
        "vocab_size": 32003,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "transformers_version": "4.40.0.dev0",
    "vision_config": {"model_type": "idefics2", "hidden_size": 1152, "image_size": 980, "patch_size": 14},
    "some_future_key": {"kept": True},
}

VISION = (
    "hidden_size intermediate_size num_hidden_layers num_attention_heads num_channels image_size patch_size"
)
PERCEIVER = "hidden_act hidden_size rms_norm_eps resampler_n_latents resampler_depth resampler_n_heads"
TEXT = "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads"
FIELDS = {
    "vision_config": VISION + " hidden_act layer_norm_eps",
    "perceiver_config": PERCEIVER + " resampler_head_dim num_key_value_heads",
    "text_config": TEXT
    + " hidden_act max_position_embeddings rms_norm_eps pad_token_id bos_token_id eos_token_id"
    " sliding_window",
}


def assert_same_as_transformers(ours: Idefics2Config, theirs) -> None:
    for sub, names in FIELDS.items():
        for name in names.split():
            assert getattr(getattr(ours, sub), name) == getattr(getattr(theirs, sub), name), f"{sub}.{name}"
    assert ours.text_config.rope_theta == theirs.text_config.rope_parameters["rope_theta"]
    assert ours.image_token_id == theirs.image_token_id
    assert ours.tie_word_embeddings == theirs.tie_word_embeddings


@pytest.mark.parametrize(
    "data",
    [{}, HUB_STYLE, tiny_config_dict(), {"text_config": {"hidden_size": 256, "num_attention_heads": 8}}],
    ids=["empty", "hub-style", "tiny", "text-only-overrides"],
)
def test_defaults_match_transformers(data):
    """Missing keys get the values transformers gives them (incl. the perceiver following the text width)."""
    from transformers import Idefics2Config as Reference

    assert_same_as_transformers(Idefics2Config.from_dict(data), Reference.from_dict(data))


def test_perceiver_follows_text_width():
    config = Idefics2Config.from_dict({"text_config": {"hidden_size": 256, "rms_norm_eps": 1e-5}})
    assert config.perceiver_config.hidden_size == 256
    assert config.perceiver_config.rms_norm_eps == 1e-5


def test_round_trip_keeps_unknown_keys_and_loads_in_transformers(tmp_path):
    from transformers import Idefics2Config as Reference

    config = Idefics2Config.from_dict(HUB_STYLE)
    assert config.extra["some_future_key"] == {"kept": True}
    assert config.torch_dtype == "float32"
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    again = Idefics2Config.from_dict(data)
    assert again.to_dict() == config.to_dict()
    assert_same_as_transformers(again, Reference.from_pretrained(tmp_path))


def test_rope_theta_from_rope_parameters():
    config = Idefics2Config.from_dict(
        {"text_config": {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}}
    )
    assert config.text_config.rope_theta == 5e5


@pytest.mark.parametrize(
    "data, message",
    [
        ({"model_type": "llava"}, "expected 'idefics2'"),
        (
            {"text_config": {"num_attention_heads": 32, "num_key_value_heads": 5}},
            "multiple of num_key_value_heads",
        ),
        ({"perceiver_config": {"resampler_n_heads": 16, "num_key_value_heads": 3}}, "multiple of"),
        ({"vision_config": {"hidden_size": 100, "num_attention_heads": 12}}, "not divisible"),
        ({"vision_config": {"hidden_act": "mystery"}}, "not supported"),
        ({"text_config": {"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}}, "not supported"),
        ({"text_config": {"num_hidden_layers": 0}}, "positive integer"),
        ({"text_config": "mistral"}, "must be a dict"),
    ],
)
def test_bad_configs_are_clear_errors(data, message):
    with pytest.raises(ValueError, match=message):
        Idefics2Config.from_dict(data)


def test_missing_or_invalid_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Idefics2Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Idefics2Config.from_pretrained(tmp_path)
