"""Logits controls against transformers' logits processors, sampling on controlled logits, and the decode
core's batched chain (rows with different controls in one call, each as it would be alone)."""

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

from idefics2.decoding.sampler import RowSampler, first_largest, sample_rows
from idefics2.sampling import BadWords, mark_seen_, repetition_penalty_, top_k_filter, top_p_filter

VOCAB = 50


def row(vocab=VOCAB, prompt=(), **controls) -> RowSampler:
    """One row's sampler with generate's defaults for the controls not given."""
    options = dict(
        do_sample=False, temperature=1.0, top_k=0, top_p=1.0, generator=None, repetition_penalty=1.0,
        min_new_tokens=0, eos_token_id=[], bad_words_ids=None,
    )  # fmt: skip
    options.update(controls)
    return RowSampler(options, list(prompt), vocab, torch.device("cpu"))


def draw(scores, seed, **controls) -> torch.Tensor:
    """Every row of scores sampled with the same controls and one generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    rows = [row(scores.shape[1], do_sample=True, generator=generator, **controls) for _ in scores]
    tokens, errors = sample_rows(scores, rows)
    assert not errors
    return torch.tensor(tokens)


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


def test_min_new_tokens_forbids_every_eos_id_until_reached():
    scores = random_scores(5)
    scores[:, 11] = 100.0  # an end token is every row's best
    expected = MinNewTokensLengthLogitsProcessor(4, 3, [2, 11])(torch.zeros(4, 6, dtype=torch.long), scores)
    rows = [row(min_new_tokens=3, eos_token_id=[2, 11]) for _ in range(4)]
    rows[3].generated = 3  # this one has its minimum
    tokens, _ = sample_rows(scores, rows)
    assert tokens[:3] == expected[:3].argmax(-1).tolist() and 11 not in tokens[:3] and tokens[3] == 11


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
    drawn = draw(controlled_scores(), 0, top_k=k, top_p=p)
    assert set(drawn.tolist()) == allowed  # never outside, and every allowed token does occur


def test_top_p_keeps_the_best_token_even_for_tiny_p():
    assert set(draw(controlled_scores(200), 0, top_p=1e-6).tolist()) == {10}


def test_sampling_frequencies_follow_the_distribution():
    drawn = draw(controlled_scores(20000), 1)
    freq = torch.bincount(drawn - 10, minlength=5).double() / 20000
    torch.testing.assert_close(freq, CONTROLLED_PROBS.double(), atol=0.015, rtol=0)


def test_same_seed_same_draws_and_greedy_is_argmax():
    scores = random_scores(9, batch=64)
    a, b, c = draw(scores, 5), draw(scores, 5), draw(scores, 6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert sample_rows(scores, [row() for _ in scores])[0] == scores.argmax(-1).tolist()
    assert torch.equal(draw(scores, 0, top_k=1), scores.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_greedy_pick_is_argmax_on_ties_nan_and_infinities(dtype):
    scores = torch.randn(6, 32003, generator=torch.Generator().manual_seed(3))
    scores[0, [7, 30000]] = 50.0  # a tie: the first
    scores[1, [9, 20]] = float("nan")  # a NaN wins, the first one
    scores[2] = float("-inf")  # nothing allowed: index 0
    scores[3, [5, 31000]] = float("inf")
    scores[4, 32002] = 50.0  # the last index
    scores[5] = 0.0  # all equal
    picked = first_largest(scores.to(dtype))
    assert picked.tolist() == [7, 9, 0, 5, 32002, 0] and picked.dtype == torch.long
    assert torch.equal(picked, scores.to(dtype).argmax(-1))
    assert torch.equal(first_largest(scores.to(dtype)[1:]), picked[1:])  # a view that starts further on


def test_the_chain_draws_what_transformers_processors_give_with_the_same_generator():
    scores = random_scores(10, batch=8)
    prompt = torch.randint(0, VOCAB, (8, 5), generator=torch.Generator().manual_seed(3))
    processed = RepetitionPenaltyLogitsProcessor(1.2)(prompt, scores.clone())
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(12), TopPLogitsWarper(0.9)):
        processed = warper(prompt, processed)
    expected = torch.multinomial(processed.softmax(-1), 1, generator=torch.Generator().manual_seed(4))
    generator = torch.Generator().manual_seed(4)
    controls = dict(do_sample=True, generator=generator, repetition_penalty=1.2, temperature=0.7, top_k=12)
    rows = [row(prompt=ids.tolist(), top_p=0.9, **controls) for ids in prompt]
    assert sample_rows(scores, rows)[0] == expected[:, 0].tolist()


def test_rows_with_different_controls_choose_as_each_would_alone():
    """A batch mixing greedy, penalized, banned-word, min-length and sampled rows (each with its own
    seeded generator and settings): every row's token equals the one it gets in a call of its own, and the
    caller's logits are left as they were."""
    scores = random_scores(11, batch=6)
    kept = scores.clone()

    def rows():
        return [
            row(),
            row(prompt=[3, 4, 5], repetition_penalty=1.5),
            row(prompt=[7, 8], bad_words_ids=[[8, 20], [21]]),
            row(min_new_tokens=2, eos_token_id=[int(scores[3].argmax())]),
            row(do_sample=True, generator=torch.Generator().manual_seed(1), temperature=0.5, top_k=5),
            row(do_sample=True, generator=torch.Generator().manual_seed(2), top_p=0.7),
        ]

    together, errors = sample_rows(scores, rows())
    alone = [sample_rows(scores[i : i + 1], [r])[0][0] for i, r in enumerate(rows())]
    assert together == alone and not errors and torch.equal(scores, kept)
    assert together[3] != int(scores[3].argmax())  # held back from its end token


def test_greedy_rows_under_their_minimum_length_take_the_best_token_that_does_not_end():
    """The minimum length masks the end tokens: a greedy row whose argmax is an end token takes the best
    other token; one whose argmax is not an end token keeps it, even beside an end token of the same logit
    (the first largest logit wins either way); a row past its minimum may end."""
    scores = torch.zeros(4, VOCAB)
    scores[0, [3, 7]] = torch.tensor([5.0, 4.0])  # the end token 3 is best: 7 instead
    scores[1, [3, 7]] = 5.0  # the end token 3 ties with 7 and comes first: 7
    scores[2, [7, 9]] = 5.0  # the end token 9 ties with 7 after it: 7 either way
    scores[3, [3, 7]] = torch.tensor([5.0, 4.0])  # past its minimum length: it may end
    rows = [row(eos_token_id=[3, 9], min_new_tokens=2) for _ in range(3)] + [row(eos_token_id=[3, 9])]
    masked = scores.clone()
    masked[:3, [3, 9]] = float("-inf")
    tokens, errors = sample_rows(scores, rows)
    assert not errors and tokens == [7, 7, 7, 3] == masked.argmax(-1).tolist()
