"""Logits and loss parity with transformers' Idefics2 (sdpa, float32) on tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch

from idefics2 import Idefics2ForConditionalGeneration
from oracle_model import (
    build_batch,
    build_reference_checkpoint,
    lm_labels,
    positions,
    rel_diff,
    tiny_config_dict,
)

N_LATENTS = tiny_config_dict()["perceiver_config"]["resampler_n_latents"]
TOL = 1e-4

# one sample per entry: text runs before/after the images, and the (height, width) of each image
TEXT_ONLY = [{"text": [9, 0], "images": []}, {"text": [5, 0], "images": []}]
ONE_IMAGE = [{"text": [3, 4], "images": [(56, 42)]}]
SEVERAL_IMAGES = [{"text": [2, 3], "images": [(56, 56), (28, 42), (42, 56)]}]
MIXED = [
    {"text": [7, 2], "images": []},
    {"text": [2, 3], "images": [(50, 45)]},  # pixels past the last whole patch are padding
    {"text": [1, 2], "images": [(28, 56), (56, 56), (42, 28), (42, 42)]},  # 9 patches, as the (50, 45)
]


def reference_outputs(ref, batch, labels=None):
    """transformers' logits/loss, with the same padding-aware position ids our model derives."""
    with torch.no_grad():
        return ref(**batch, position_ids=positions(batch["attention_mask"]), labels=labels)


def assert_parity(ref, ours, batch, *, check_loss=True):
    labels = lm_labels(batch["input_ids"], batch["attention_mask"]) if check_loss else None
    expected = reference_outputs(ref, batch, labels)
    with torch.no_grad():
        got = ours(**batch, labels=labels)
    diff = rel_diff(got.logits, expected.logits, batch["attention_mask"])
    assert diff <= TOL, f"logits relative max diff {diff:.2e}"
    if check_loss:
        assert abs(got.loss.item() - expected.loss.item()) <= TOL * max(1.0, abs(expected.loss.item()))
    return got


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(reference model, our model loaded from its save_pretrained folder, folder): the tiny base config."""
    folder = build_reference_checkpoint(tmp_path_factory.mktemp("base"))
    from transformers import Idefics2ForConditionalGeneration as Reference

    ref = Reference.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32).eval()
    return ref, Idefics2ForConditionalGeneration.from_pretrained(folder), folder


@pytest.mark.parametrize(
    "samples, padding_side",
    [
        (TEXT_ONLY, "right"),
        (ONE_IMAGE, "left"),
        (SEVERAL_IMAGES, "left"),
        (MIXED, "left"),
        (MIXED, "right"),
    ],
    ids=["text-only", "one-image", "several-images", "mixed-0-1-3-left-pad", "mixed-0-1-3-right-pad"],
)
def test_parity_with_transformers(base, samples, padding_side):
    ref, ours, _ = base
    assert_parity(ref, ours, build_batch(samples, N_LATENTS, padding_side=padding_side))


def test_image_splitting_inputs(base):
    """Inputs from transformers' image processor with do_image_splitting (4 crops + the whole image)."""
    from PIL import Image
    from transformers import Idefics2ImageProcessor

    ref, ours, _ = base
    size = {"longest_edge": 56, "shortest_edge": 28}
    processor = Idefics2ImageProcessor(do_image_splitting=True, size=size)
    g = torch.Generator().manual_seed(1)
    images = [
        [Image.fromarray(torch.randint(0, 255, (60, 90, 3), generator=g, dtype=torch.uint8).numpy())],
        [Image.fromarray(torch.randint(0, 255, (80, 40, 3), generator=g, dtype=torch.uint8).numpy())] * 2,
    ]
    pixels = processor(images, return_tensors="pt")
    assert pixels["pixel_values"].shape[1] == 10  # 5 crops per image, up to 2 images per sample
    batch = build_batch(
        [{"text": [3, 2], "images": [(0, 0)] * 5}, {"text": [2, 1], "images": [(0, 0)] * 10}], N_LATENTS
    )
    batch.update(pixel_values=pixels["pixel_values"], pixel_attention_mask=pixels["pixel_attention_mask"])
    got = assert_parity(ref, ours, batch)
    assert got.image_hidden_states.shape == (15, N_LATENTS, 64)


def test_image_features_match_reference(base):
    ref, ours, _ = base
    batch = build_batch(MIXED, N_LATENTS)
    with torch.no_grad():
        expected = ref.get_image_features(batch["pixel_values"], batch["pixel_attention_mask"]).pooler_output
        got = ours.get_image_features(batch["pixel_values"], batch["pixel_attention_mask"])
    expected = torch.cat([e.reshape(-1, N_LATENTS, 64) for e in expected])
    assert got.shape == (sum(len(s["images"]) for s in MIXED), N_LATENTS, 64)  # padding images skipped
    assert rel_diff(got, expected) <= TOL


CONFIG_VARIANTS = {
    # GQA ratio 1 in decoder and perceiver, tied embeddings
    "gqa1-tied": dict(
        tie_word_embeddings=True,
        text_config={"num_key_value_heads": 4},
        perceiver_config={"num_key_value_heads": 4},
    ),
    # GQA ratio 4 = one kv head, patch 16, sliding window shorter than the sequences
    "gqa4-one-kv-head-patch16-window": dict(
        text_config={"num_key_value_heads": 1, "sliding_window": 5},
        perceiver_config={"num_key_value_heads": 1},
        vision_config={"patch_size": 16, "image_size": 64},
    ),
}


@pytest.mark.parametrize("variant", list(CONFIG_VARIANTS))
def test_config_variants(tmp_path, variant):
    overrides = CONFIG_VARIANTS[variant]
    folder = build_reference_checkpoint(tmp_path, seed=3, **overrides)
    from transformers import Idefics2ForConditionalGeneration as Reference

    ref = Reference.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32).eval()
    ours = Idefics2ForConditionalGeneration.from_pretrained(folder)
    vision = tiny_config_dict(**overrides)["vision_config"]
    size = vision["image_size"]
    samples = [
        {"text": [7, 2], "images": []},
        {"text": [2, 3], "images": [(size - 5, size - 11)]},
        {"text": [1, 2], "images": [(size // 2, size), (size, size), (size * 3 // 4, size // 2)]},
    ]
    batch = build_batch(samples, N_LATENTS, patch_multiple=vision["patch_size"])
    assert_parity(ref, ours, batch)
    if overrides.get("tie_word_embeddings"):
        assert ours.lm_head.weight is ours.model.text_model.embed_tokens.weight


@pytest.mark.parametrize("samples", [MIXED, SEVERAL_IMAGES], ids=["padded", "unpadded-plain-causal"])
def test_eager_matches_sdpa(base, samples):
    ref, ours, folder = base
    eager = Idefics2ForConditionalGeneration.from_pretrained(folder, attn_implementation="eager")
    batch = build_batch(samples, N_LATENTS, padding_side="left")
    with torch.no_grad():
        expected = ours(**batch).logits
        got = eager(**batch).logits
    assert rel_diff(got, expected, batch["attention_mask"]) <= TOL
    assert rel_diff(got, reference_outputs(ref, batch).logits, batch["attention_mask"]) <= TOL


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_float64_left_padding(base, attn_implementation):
    """float64 stays float64 end to end, gives no NaN with left padding, and matches the float32 reference."""
    ref, _, folder = base
    ours = Idefics2ForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float64, attn_implementation=attn_implementation
    )
    batch = build_batch(MIXED, N_LATENTS, padding_side="left")
    labels = lm_labels(batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        got = ours(**batch, labels=labels)
    expected = reference_outputs(ref, batch, labels)
    assert got.logits.dtype == torch.float64 and got.loss.dtype == torch.float64
    assert torch.isfinite(got.logits).all()  # padding positions included
    assert rel_diff(got.logits, expected.logits, batch["attention_mask"]) <= TOL
    assert abs(got.loss.item() - expected.loss.item()) <= TOL


def test_gradients_match_reference(base):
    ref, _, folder = base
    ours = Idefics2ForConditionalGeneration.from_pretrained(folder)
    batch = build_batch(MIXED, N_LATENTS, padding_side="right")
    labels = lm_labels(batch["input_ids"], batch["attention_mask"])
    ref.zero_grad()
    ref(**batch, labels=labels).loss.backward()
    ours(**batch, labels=labels).loss.backward()
    ref_params = dict(ref.named_parameters())
    for name, param in ours.named_parameters():
        expected = ref_params[name].grad
        assert param.grad is not None, name
        if name.endswith("k_proj.bias"):  # softmax ignores a shift shared by all keys: exactly 0 up to noise
            assert param.grad.abs().max() <= 1e-6 * ref_params["lm_head.weight"].grad.abs().max(), name
            continue
        assert rel_diff(param.grad, expected) <= 1e-3, name
    ref.zero_grad()
