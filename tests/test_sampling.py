"""Logits controls against transformers' logits processors, and sampling on controlled logits."""

import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    NoBadWordsLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from idefics2.sampling import (
    BadWords,
    forbid_tokens,
    mark_seen_,
    pick_next_tokens,
    repetition_penalty_,
    top_k_filter,
    top_p_filter,
)

VOCAB = 50


def random_scores(seed, batch=4, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=g) * 3


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers_with_left_padding(penalty):
    g = torch.Generator().manual_seed(0)
    scores = random_scores(1)
    input_ids = torch.randint(0, VOCAB, (4, 12), generator=g)
    pad_lengths = torch.tensor([0, 3, 7, 11])
    keep = torch.arange(12)[None, :] >= pad_lengths[:, None]
    expected = RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=pad_lengths)(
        input_ids, scores.clone()
    )

    seen = mark_seen_(torch.zeros(4, VOCAB, dtype=torch.bool), input_ids, keep)
    got = repetition_penalty_(scores, seen, penalty)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(got, scores)


def test_repetition_penalty_incremental_history_equals_full_history():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 20), generator=g)
    seen = mark_seen_(torch.zeros(3, VOCAB, dtype=torch.bool), ids[:, :5])
    for t in range(5, 20):
        mark_seen_(seen, ids[:, t : t + 1])
    scores = random_scores(2, batch=3)
    expected = RepetitionPenaltyLogitsProcessor(1.5)(ids, scores.clone())
    torch.testing.assert_close(repetition_penalty_(scores, seen, 1.5), expected, rtol=0, atol=0)


def test_bad_words_match_transformers_including_multi_token_sequences():
    bad = [[3], [7, 8], [1, 2, 9], [4, 2, 9], [5, 8], [2]]  # [2] is an eos id: never banned alone
    eos = [2]
    contexts = torch.tensor(
        [
            [0, 0, 1, 2],  # ends with [1, 2] -> 9 banned
            [6, 6, 6, 7],  # ends with [7] -> 8 banned
            [4, 2, 1, 5],  # ends with [5] -> 8 banned
            [0, 0, 0, 0],
            [9, 9, 4, 2],  # ends with [4, 2] -> 9 banned
        ]
    )
    scores = random_scores(3, batch=5)
    expected = NoBadWordsLogitsProcessor(bad, eos_token_id=eos)(contexts, scores.clone())
    got = BadWords(bad, VOCAB, eos, "cpu")(scores, contexts)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert (
        torch.isinf(got[0, 9])
        and torch.isinf(got[1, 8])
        and torch.isinf(got[2, 8])
        and torch.isinf(got[4, 9])
    )
    assert torch.isinf(got[:, 3]).all() and torch.isfinite(got[:, 2]).all()
    assert torch.isfinite(got[3, [8, 9]]).all()


def test_bad_words_longer_than_context_are_ignored():
    got = BadWords([[1, 2, 3, 4]], VOCAB, [], "cpu")(random_scores(4, batch=1), torch.tensor([[2, 3]]))
    assert torch.isfinite(got).all()


def test_min_new_tokens_forbids_every_eos_id():
    scores = random_scores(5)
    eos = torch.tensor([2, 11])
    expected = MinNewTokensLengthLogitsProcessor(4, 3, [2, 11])(torch.zeros(4, 6, dtype=torch.long), scores)
    torch.testing.assert_close(forbid_tokens(scores, eos), expected, rtol=0, atol=0)


@pytest.mark.parametrize("k", [1, 5, 49, 50, 80])
def test_top_k_matches_transformers(k):
    scores = random_scores(6)
    scores[0, :10] = 1.0  # ties at the boundary are kept
    expected = TopKLogitsWarper(top_k=k)(None, scores)
    torch.testing.assert_close(top_k_filter(scores, k), expected, rtol=0, atol=0)


@pytest.mark.parametrize("p", [0.01, 0.3, 0.9, 0.999, 1.0])
def test_top_p_matches_transformers(p):
    scores = random_scores(7)
    expected = TopPLogitsWarper(top_p=p)(None, scores)
    torch.testing.assert_close(top_p_filter(scores, p), expected, rtol=0, atol=0)


def test_temperature_then_filters_match_transformers_chain():
    scores = random_scores(8)
    expected = TopPLogitsWarper(0.8)(
        None, TopKLogitsWarper(10)(None, TemperatureLogitsWarper(0.6)(None, scores))
    )
    torch.testing.assert_close(top_p_filter(top_k_filter(scores / 0.6, 10), 0.8), expected, rtol=0, atol=0)


# Controlled logits: probabilities 0.4, 0.3, 0.2, 0.06, 0.04 on tokens 10..14, nothing elsewhere.
CONTROLLED_PROBS = torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04])


def controlled_scores(batch=2000):
    scores = torch.full((batch, 30), -1e9)
    scores[:, 10:15] = CONTROLLED_PROBS.log()
    return scores


@pytest.mark.parametrize(
    ("k", "p", "allowed"),
    [
        (2, 1.0, {10, 11}),
        (3, 1.0, {10, 11, 12}),
        (0, 0.65, {10, 11}),
        (0, 0.85, {10, 11, 12}),
        (4, 0.5, {10, 11}),
    ],
)
def test_sampling_stays_inside_the_allowed_set(k, p, allowed):
    scores = controlled_scores()
    if k:
        scores = top_k_filter(scores, k)
    scores = top_p_filter(scores, p)
    drawn = pick_next_tokens(scores, True, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == allowed  # never outside, and every allowed token does occur


def test_top_p_keeps_the_best_token_even_for_tiny_p():
    drawn = pick_next_tokens(
        top_p_filter(controlled_scores(200), 1e-6), True, torch.Generator().manual_seed(0)
    )
    assert set(drawn.tolist()) == {10}


def test_sampling_frequencies_follow_the_distribution():
    drawn = pick_next_tokens(controlled_scores(20000), True, torch.Generator().manual_seed(1))
    freq = torch.bincount(drawn - 10, minlength=5).double() / 20000
    torch.testing.assert_close(freq, CONTROLLED_PROBS.double(), atol=0.015, rtol=0)


def test_same_seed_same_draws_and_greedy_is_argmax():
    scores = random_scores(9, batch=64)
    a = pick_next_tokens(scores, True, torch.Generator().manual_seed(5))
    b = pick_next_tokens(scores, True, torch.Generator().manual_seed(5))
    c = pick_next_tokens(scores, True, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(pick_next_tokens(scores, False), scores.argmax(-1))
    assert torch.equal(pick_next_tokens(top_k_filter(scores, 1), True, torch.Generator()), scores.argmax(-1))
