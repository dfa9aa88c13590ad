"""Greedy generation, float64, token for token against transformers' generate (its sdpa path)."""

import pytest
import torch
from transformers import Idefics2ForConditionalGeneration as RefModel

from idefics2 import Idefics2ForConditionalGeneration
from oracle_model import build_batch, build_reference_checkpoint

N_LATENTS = 4
NEW = 40
PAD = 0

CASES = {
    "one_image": [{"text": [5, 7], "images": [(56, 56)]}],
    "several_images": [{"text": [3, 6], "images": [(56, 42), (28, 56), (56, 56)]}],
    "text_only": [{"text": [11, 0], "images": []}],
    "mixed_left_padded_batch": [
        {"text": [9, 3], "images": []},
        {"text": [2, 5], "images": [(42, 56)]},
        {"text": [4, 1], "images": [(56, 56), (28, 28)]},
    ],
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_reference_checkpoint(tmp_path_factory.mktemp("gen_ckpt"), seed=3)


@pytest.fixture(scope="module")
def reference(checkpoint):
    return RefModel.from_pretrained(checkpoint, attn_implementation="sdpa", dtype=torch.float64).eval()


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def ours(request, checkpoint):
    return Idefics2ForConditionalGeneration.from_pretrained(
        checkpoint, dtype=torch.float64, attn_implementation=request.param
    ).eval()


def inputs_for(case):
    batch = build_batch(CASES[case], N_LATENTS, seed=len(case))
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].double()
    return batch


def reference_generate(reference, batch, **kwargs):
    kwargs = {"max_new_tokens": NEW, "do_sample": False, "pad_token_id": PAD, **kwargs}
    with torch.no_grad():
        return reference.generate(**batch, **kwargs)


def assert_same_tokens(ours, expected):
    assert ours.shape == expected.shape, (ours.shape, expected.shape)
    assert torch.equal(ours, expected), f"first difference at {(ours != expected).nonzero()[0].tolist()}"


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_transformers(reference, ours, case):
    batch = inputs_for(case)
    # an end id the reference never produces here, so all NEW tokens are compared
    expected = reference_generate(reference, batch, eos_token_id=PAD)
    assert expected.shape[1] == batch["input_ids"].shape[1] + NEW
    got = ours.generate(**batch, max_new_tokens=NEW, eos_token_id=PAD, pad_token_id=PAD)
    assert_same_tokens(got, expected)


def test_bad_words_match_transformers(reference, ours):
    batch = inputs_for("mixed_left_padded_batch")
    plain = reference_generate(reference, batch, eos_token_id=PAD)[:, -NEW:]
    # forbid what the model actually writes: its most frequent token and one of its two-token sequences
    frequent = int(plain.flatten().mode().values)
    pair = [int(plain[1, 5]), int(plain[1, 6])]
    bad = [[frequent], pair] if pair[0] != frequent else [[frequent]]
    expected = reference_generate(reference, batch, eos_token_id=PAD, bad_words_ids=bad)
    assert not torch.equal(expected[:, -NEW:], plain)  # the ban really changed the output
    assert not (expected[:, -NEW:] == frequent).any()
    got = ours.generate(**batch, max_new_tokens=NEW, eos_token_id=PAD, pad_token_id=PAD, bad_words_ids=bad)
    assert_same_tokens(got, expected)


def test_one_row_stops_early_on_eos(reference, ours):
    batch = inputs_for("mixed_left_padded_batch")
    plain = reference_generate(reference, batch, eos_token_id=PAD)[:, -NEW:]
    # pick as end id a token that one row writes early and that the other rows never write
    eos = None
    for row in range(plain.shape[0]):
        for step in range(3, 15):
            token = int(plain[row, step])
            others = torch.cat([plain[:row], plain[row + 1 :]])
            if token != PAD and not (others == token).any() and not (plain[row, :step] == token).any():
                eos, stopper = token, row
                break
        if eos is not None:
            break
    assert eos is not None, "no usable end id in the reference output"
    expected = reference_generate(reference, batch, eos_token_id=eos)
    new = expected[:, -NEW:]
    assert new.shape[1] == NEW and (new[stopper] == PAD).sum() >= NEW - 15  # really stopped early, padded
    got = ours.generate(**batch, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=PAD)
    assert_same_tokens(got, expected)


def test_all_rows_stopping_shortens_the_output(reference, ours):
    batch = inputs_for("one_image")
    plain = reference_generate(reference, batch, eos_token_id=PAD)[0, -NEW:]
    eos = int(plain[12])
    expected = reference_generate(reference, batch, eos_token_id=eos)
    assert expected.shape[1] < batch["input_ids"].shape[1] + NEW
    assert_same_tokens(
        ours.generate(**batch, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=PAD), expected
    )


def test_repetition_penalty_and_min_new_tokens_match_transformers(reference, ours):
    batch = inputs_for("mixed_left_padded_batch")
    plain = reference_generate(reference, batch, eos_token_id=PAD)[:, -NEW:]
    eos = int(plain[0, 2])
    kwargs = dict(repetition_penalty=1.3, min_new_tokens=10, eos_token_id=eos)
    expected = reference_generate(reference, batch, **kwargs)
    got = ours.generate(**batch, max_new_tokens=NEW, pad_token_id=PAD, **kwargs)
    assert_same_tokens(got, expected)


def test_vision_encodes_each_real_image_once_before_decoding(ours):
    batch = inputs_for("mixed_left_padded_batch")  # 3 real images, 3 all-zero padding images
    events = []
    hooks = [
        ours.model.vision_model.register_forward_hook(
            lambda m, args, out: events.append(("image", len(args[0])))
        ),
        ours.model.text_model.register_forward_hook(
            lambda m, args, out: events.append(("text", args[0].shape[1]))
        ),
    ]
    try:
        ours.generate(**batch, max_new_tokens=6, eos_token_id=PAD)
    finally:
        for hook in hooks:
            hook.remove()
    images = [n for kind, n in events if kind == "image"]
    assert sum(images) == 3
    first_text = next(i for i, (kind, _) in enumerate(events) if kind == "text")
    assert all(kind == "text" for kind, _ in events[first_text:])  # no vision work once decoding starts
    assert [n for kind, n in events[first_text + 1 :]] == [1] * 5


def test_default_end_ids_come_from_the_checkpoint(reference, ours):
    assert ours.generation_config.get("eos_token_id") == reference.generation_config.eos_token_id == 2
    batch = inputs_for("text_only")
    assert_same_tokens(
        ours.generate(**batch, max_new_tokens=8), reference_generate(reference, batch, max_new_tokens=8)
    )
