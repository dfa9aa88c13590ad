"""Model behaviour beyond reference parity: KV cache, batch invariance, logits_to_keep, inputs, errors."""

from __future__ import annotations

import math

import pytest
import torch

from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Model
from oracle_model import IMAGE, build_batch, build_reference_checkpoint, lm_labels, rel_diff, tiny_config_dict

N_LATENTS = tiny_config_dict()["perceiver_config"]["resampler_n_latents"]
TOL = 1e-4
MIXED = [
    {"text": [7, 2], "images": []},
    {"text": [2, 3], "images": [(50, 45)]},
    {"text": [1, 2], "images": [(28, 56), (56, 56), (42, 28)]},
]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = build_reference_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=1)
    return Idefics2ForConditionalGeneration.from_pretrained(folder)


@pytest.fixture(scope="module")
def window_model():
    """A randomly initialised model whose sliding window (6) is shorter than the test sequences."""
    torch.manual_seed(0)
    config = Idefics2Config.from_dict(tiny_config_dict(text_config={"sliding_window": 6}))
    return Idefics2ForConditionalGeneration(config).eval()


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_invariance(model, padding_side):
    """Each sample's logits inside a padded batch equal its logits alone."""
    batch = build_batch(MIXED, N_LATENTS, padding_side=padding_side)
    with torch.no_grad():
        together = model(**batch).logits
        for i, sample in enumerate(MIXED):
            alone = build_batch([sample], N_LATENTS)
            if sample["images"]:  # the same pixels, cropped to this sample's own images and canvas
                n = len(sample["images"])
                h = max(s[0] for s in sample["images"])
                w = max(s[1] for s in sample["images"])
                alone["pixel_values"] = batch["pixel_values"][i : i + 1, :n, :, :h, :w]
                alone["pixel_attention_mask"] = batch["pixel_attention_mask"][i : i + 1, :n, :h, :w]
            keep = batch["attention_mask"][i].bool()
            alone["input_ids"] = batch["input_ids"][i : i + 1, keep]
            alone["attention_mask"] = torch.ones_like(alone["input_ids"])
            logits = model(**alone).logits[0]
            assert rel_diff(together[i, keep], logits) <= TOL


@pytest.mark.parametrize("which", ["model", "window_model"])
def test_kv_cache_incremental_equals_full_forward(request, which):
    """Prefill then one token at a time through the static cache gives the full forward's logits."""
    model = request.getfixturevalue(which)
    batch = build_batch(MIXED, N_LATENTS, padding_side="left")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    b, t = ids.shape
    extra = torch.randint(3, 1000, (b, 4), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([ids, extra], dim=1)
    mask = torch.cat([mask, torch.ones_like(extra)], dim=1)
    with torch.no_grad():
        full = model(ids, mask, batch["pixel_values"], batch["pixel_attention_mask"]).logits
        cache = model.new_kv_cache(b, ids.shape[1] + 3)
        prefill = model(
            ids[:, :t],
            mask[:, :t],
            batch["pixel_values"],
            batch["pixel_attention_mask"],
            kv_cache=cache,
            cache_position=torch.arange(t),
        ).logits
        steps = [
            model(
                ids[:, s : s + 1],
                mask[:, : s + 1],
                kv_cache=cache,
                cache_position=torch.tensor([s]),
                logits_to_keep=1,
            ).logits
            for s in range(t, ids.shape[1])
        ]
    real = mask.bool()
    assert rel_diff(prefill, full[:, :t], real[:, :t]) <= TOL
    assert rel_diff(torch.cat(steps, dim=1), full[:, t:]) <= TOL
    assert cache.keys[0].shape == (b, model.config.text_config.num_key_value_heads, ids.shape[1] + 3, 16)


def test_kv_cache_chunked_prefill(model):
    """Two prefill chunks through the cache equal one full forward (text only, left padding)."""
    batch = build_batch([{"text": [12, 0], "images": []}, {"text": [7, 0], "images": []}], N_LATENTS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        full = model(ids, mask).logits
        cache = model.new_kv_cache(2, 16)
        first = model(ids[:, :5], mask[:, :5], kv_cache=cache, cache_position=torch.arange(5)).logits
        second = model(ids[:, 5:], mask, kv_cache=cache, cache_position=torch.arange(5, 12)).logits
    got = torch.cat([first, second], dim=1)
    assert rel_diff(got, full, mask) <= TOL


def test_logits_to_keep(model):
    batch = build_batch(MIXED, N_LATENTS)
    with torch.no_grad():
        full = model(**batch).logits
        last = model(**batch, logits_to_keep=1).logits
    assert last.shape == (3, 1, full.shape[-1])
    assert rel_diff(last, full[:, -1:]) <= TOL
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(**batch, labels=batch["input_ids"], logits_to_keep=1)


def test_precomputed_image_features_and_inputs_embeds(model):
    batch = build_batch(MIXED, N_LATENTS)
    with torch.no_grad():
        expected = model(**batch)
        features = model.get_image_features(batch["pixel_values"], batch["pixel_attention_mask"])
        from_features = model(batch["input_ids"], batch["attention_mask"], image_hidden_states=features)
        embeds = model.get_input_embeddings()(batch["input_ids"])
        from_embeds = model(
            inputs_embeds=embeds, attention_mask=batch["attention_mask"], image_hidden_states=features
        )
    assert torch.equal(expected.image_hidden_states, features)
    assert rel_diff(from_features.logits, expected.logits) <= TOL
    assert rel_diff(from_embeds.logits, expected.logits) <= TOL


def test_loss_is_shifted_cross_entropy(model):
    """Loss equals the mean over labelled positions of -log p(label[t + 1] | prefix up to t), by hand."""
    batch = build_batch(MIXED, N_LATENTS, padding_side="right")
    labels = lm_labels(batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        out = model(**batch, labels=labels)
    logp = out.logits.double().log_softmax(-1)
    terms = [
        -logp[i, t, labels[i, t + 1]]
        for i in range(labels.shape[0])
        for t in range(labels.shape[1] - 1)
        if labels[i, t + 1] != -100
    ]
    assert abs(out.loss.item() - torch.stack(terms).mean().item()) <= TOL


def test_image_token_count_mismatch_is_a_clear_error(model):
    batch = build_batch([{"text": [2, 2], "images": [(56, 56)]}], N_LATENTS)
    batch["input_ids"][0, batch["input_ids"][0].tolist().index(IMAGE)] = 5  # one <image> token fewer
    with pytest.raises(ValueError, match="3 <image> tokens but the images give 4 embeddings"):
        model(**batch)


def test_all_zero_images_are_skipped(model):
    batch = build_batch([{"text": [2, 2], "images": [(56, 56)]}], N_LATENTS)
    padded = torch.cat([batch["pixel_values"], torch.zeros_like(batch["pixel_values"])], dim=1)
    mask = torch.cat([batch["pixel_attention_mask"], torch.zeros_like(batch["pixel_attention_mask"])], dim=1)
    with torch.no_grad():
        assert model.get_image_features(padded, mask).shape == (1, N_LATENTS, 64)
        assert model.get_image_features(padded).shape == (1, N_LATENTS, 64)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_ids=torch.tensor([[1, 40000]])), "input_ids must lie in"),
        (dict(input_ids=torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 3)), "attention_mask covers 3"),
        (dict(input_ids=torch.tensor([[1, 2]]), pixel_values=torch.randn(1, 1, 1, 56, 56)), "channels"),
        (
            dict(input_ids=torch.tensor([[1, 2]]), pixel_values=torch.randn(1, 1, 3, 10, 56)),
            "smaller than one",
        ),
        (dict(), "exactly one of input_ids or inputs_embeds"),
    ],
)
def test_bad_inputs_are_clear_errors(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model(**kwargs)


def test_kv_cache_errors(model):
    cache = model.new_kv_cache(1, 4)
    ids = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="cache_position is required"):
        model(ids, kv_cache=cache)
    with pytest.raises(ValueError, match="only 4"):
        model(ids, torch.ones(1, 5), kv_cache=cache, cache_position=torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="batch"):
        model(torch.tensor([[1], [2]]), kv_cache=cache, cache_position=torch.tensor([0]))


def test_random_init_is_usable():
    """A model built from a config alone (to train from scratch) gives finite, near-uniform predictions."""
    torch.manual_seed(0)
    config = Idefics2Config.from_dict(tiny_config_dict())
    model = Idefics2ForConditionalGeneration(config)
    latents = model.model.connector.perceiver_resampler.latents
    assert latents.std() > 0  # random, not constant (a constant would make every latent identical)
    batch = build_batch(MIXED, N_LATENTS, padding_side="right")
    out = model(**batch, labels=lm_labels(batch["input_ids"], batch["attention_mask"]))
    assert torch.isfinite(out.logits).all()
    assert abs(out.loss.item() - math.log(config.text_config.vocab_size)) < 0.5
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())

    base = Idefics2Model(config)  # the base model alone is initialised too
    assert all(torch.isfinite(p).all() and p.abs().max() < 10 for p in base.parameters())
    tied = Idefics2ForConditionalGeneration(
        Idefics2Config.from_dict(tiny_config_dict(tie_word_embeddings=True))
    )
    assert tied.lm_head.weight is tied.get_input_embeddings().weight
