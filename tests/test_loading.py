"""Loading and saving checkpoints: transformers round trips, sharding, dtypes, and every bad checkpoint."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

from idefics2 import Idefics2ForConditionalGeneration, loading
from idefics2.hub import CheckpointNotFoundError
from idefics2.loading import CheckpointError, read_safetensors, write_safetensors
from oracle_model import build_batch, build_reference_checkpoint, positions, rel_diff, tiny_config_dict

N_LATENTS = tiny_config_dict()["perceiver_config"]["resampler_n_latents"]
BATCH = build_batch(
    [{"text": [5, 2], "images": [(56, 42)]}, {"text": [3, 1], "images": [(28, 56), (56, 56)]}], N_LATENTS
)


def reference(folder):
    from transformers import Idefics2ForConditionalGeneration as Reference

    return Reference.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32).eval()


def logits(model, batch=BATCH):
    with torch.no_grad():
        return model(**batch, position_ids=positions(batch["attention_mask"])).logits


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_reference_checkpoint(tmp_path_factory.mktemp("ref"), seed=2)


@pytest.fixture()
def copy(checkpoint, tmp_path):
    """A scratch copy of the reference checkpoint to damage."""
    return shutil.copytree(checkpoint, tmp_path / "copy")


@pytest.mark.parametrize("tied", [False, True])
def test_save_then_transformers_loads_same_logits(tmp_path, tied):
    source = build_reference_checkpoint(tmp_path / "src", seed=4, tie_word_embeddings=tied)
    ours = Idefics2ForConditionalGeneration.from_pretrained(source)
    ours.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()
    assert ("lm_head.weight" in read_safetensors(tmp_path / "saved" / "model.safetensors")) is not tied
    # the saved weights are exactly the source's; our packed vision path rounds differently (<= 1e-5)
    assert rel_diff(logits(reference(tmp_path / "saved")), logits(reference(source))) == 0.0
    assert rel_diff(logits(reference(tmp_path / "saved")), logits(ours)) <= 1e-5


def test_sharded_save_loads_in_transformers_and_back(checkpoint, tmp_path):
    ours = Idefics2ForConditionalGeneration.from_pretrained(checkpoint)
    ours.generation_config = {"max_new_tokens": 7}
    ours.save_pretrained(tmp_path, max_shard_size="6MB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    expected = logits(ours)
    assert rel_diff(logits(reference(tmp_path)), logits(reference(checkpoint))) == 0.0  # weights exact
    assert rel_diff(logits(reference(tmp_path)), expected) <= 1e-5
    again = Idefics2ForConditionalGeneration.from_pretrained(tmp_path)
    assert rel_diff(logits(again), expected) == 0.0
    assert again.generation_config == {"max_new_tokens": 7}
    assert again.checkpoint_dir == tmp_path

    # saving unsharded into the same folder replaces the shards (the loaded model still reads its weights)
    again.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]
    assert rel_diff(logits(again), expected) == 0.0
    assert rel_diff(logits(Idefics2ForConditionalGeneration.from_pretrained(tmp_path)), expected) == 0.0


def test_dtypes(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "_CHUNK_BYTES", 4096)  # convert in many chunks, dropping pages as it goes
    bf16 = Idefics2ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    source = read_safetensors(checkpoint / "model.safetensors")
    for name, param in bf16.state_dict().items():
        assert torch.equal(param, source[name].to(torch.bfloat16)), name
    assert (
        Idefics2ForConditionalGeneration.from_pretrained(checkpoint, torch_dtype="float16").dtype
        == torch.float16
    )
    assert Idefics2ForConditionalGeneration.from_pretrained(checkpoint, dtype="auto").dtype == torch.float32
    assert Idefics2ForConditionalGeneration.from_pretrained(checkpoint).dtype == torch.float32
    bf16.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    auto = Idefics2ForConditionalGeneration.from_pretrained(tmp_path, dtype="auto")
    assert auto.dtype == torch.bfloat16
    assert rel_diff(logits(auto).float(), logits(bf16).float()) == 0.0
    with pytest.raises(ValueError, match="floating torch dtype"):
        Idefics2ForConditionalGeneration.from_pretrained(checkpoint, dtype="int8")


def test_loaded_weights_are_memory_mapped(checkpoint):
    """Loading does not copy the weights: the parameters are views of the mapped file."""
    model = Idefics2ForConditionalGeneration.from_pretrained(checkpoint)
    file_size = (checkpoint / "model.safetensors").stat().st_size
    for param in model.parameters():  # each one a view into the whole mapped file
        assert param.untyped_storage().nbytes() == file_size
    assert not any(p.is_meta for p in model.parameters())
    assert not model.training


def test_mismatched_tensors_listed_in_one_error(copy):
    tensors = {k: v.clone() for k, v in read_safetensors(copy / "model.safetensors").items()}
    del tensors["model.text_model.norm.weight"]
    del tensors["model.connector.perceiver_resampler.latents"]
    tensors["model.text_model.extra.weight"] = torch.zeros(2)
    tensors["lm_head.weight"] = torch.zeros(10, 64)
    write_safetensors(copy / "model.safetensors", tensors)
    with pytest.raises(CheckpointError) as error:
        Idefics2ForConditionalGeneration.from_pretrained(copy)
    message = str(error.value)
    for expected in [
        "missing tensors (2)",
        "model.text_model.norm.weight",
        "model.connector.perceiver_resampler.latents",
        "unexpected tensors (1)",
        "model.text_model.extra.weight",
        "shape mismatches (1)",
        "lm_head.weight: checkpoint (10, 64), model (32003, 64)",
    ]:
        assert expected in message


def test_config_that_does_not_fit_the_weights(copy):
    config = json.loads((copy / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 3
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"missing tensors \(9\)"):
        Idefics2ForConditionalGeneration.from_pretrained(copy)


@pytest.mark.parametrize("damage", ["truncated", "garbage-header", "huge-header-length", "tiny"])
def test_corrupted_safetensors_is_a_clear_error(copy, damage):
    path = copy / "model.safetensors"
    data = path.read_bytes()
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "garbage-header":
        data = data[:8] + b"\x00\xff{{{" + data[13:]
    elif damage == "huge-header-length":
        data = (10**12).to_bytes(8, "little") + data[8:]
    else:
        data = data[:5]
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        Idefics2ForConditionalGeneration.from_pretrained(copy)


class _Exploit:
    """Unpickling this would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_checkpoints_are_refused_never_unpickled(copy, tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Exploit(marker))
    (copy / "model.safetensors").unlink()
    (copy / "pytorch_model.bin").write_bytes(payload)
    with pytest.raises(CheckpointError, match="pickle-based weights .*pytorch_model.bin.* refused"):
        Idefics2ForConditionalGeneration.from_pretrained(copy)
    (copy / "model.safetensors").write_bytes(payload)  # a pickle renamed as safetensors
    with pytest.raises(CheckpointError, match="pickle/PyTorch file"):
        Idefics2ForConditionalGeneration.from_pretrained(copy)
    assert not marker.exists()


def test_shard_problems(checkpoint, tmp_path):
    Idefics2ForConditionalGeneration.from_pretrained(checkpoint).save_pretrained(
        tmp_path, max_shard_size="6MB"
    )
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"]["model.text_model.ghost.weight"] = shards[0]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="ghost.weight: listed in model.safetensors.index.json"):
        Idefics2ForConditionalGeneration.from_pretrained(tmp_path)
    (tmp_path / shards[1]).unlink()
    with pytest.raises(CheckpointError, match=f"shard files that are missing.*{shards[1]}"):
        Idefics2ForConditionalGeneration.from_pretrained(tmp_path)
    index_path.write_text("{")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        Idefics2ForConditionalGeneration.from_pretrained(tmp_path)


def test_missing_weights_config_or_repo(copy, tmp_path):
    (copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        Idefics2ForConditionalGeneration.from_pretrained(copy)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Idefics2ForConditionalGeneration.from_pretrained(tmp_path / "copy" / "..")  # a folder without config
    with pytest.raises(CheckpointNotFoundError, match="no-such-user/no-such-idefics2"):
        Idefics2ForConditionalGeneration.from_pretrained("no-such-user/no-such-idefics2")


def test_header_length_starting_like_a_pickle_is_still_safetensors(tmp_path):
    """A header whose length's first byte is 0x80 (a pickle's first byte) is a valid file, not a pickle."""
    for extra in range(0, 256, 8):
        path = tmp_path / "model.safetensors"
        write_safetensors(path, {"w" * (1 + extra): torch.ones(2)})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no name length gave a header length starting with 0x80")
    assert torch.equal(read_safetensors(path)["w" * (1 + extra)], torch.ones(2))
