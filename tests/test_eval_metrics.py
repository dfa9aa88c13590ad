"""The answer metrics against worked examples of their official definitions, and their edge cases; the
bootstrap statistics against their textbook approximations."""

from __future__ import annotations

import functools
import math
import random

import pytest

from idefics2.evaluation.metrics import (
    METRICS,
    anls,
    exact_match,
    extract_choice,
    format_options,
    levenshtein,
    multiple_choice,
    normalize_exact,
    normalize_vqa,
    reference_choice,
    relaxed_accuracy,
    vqa_accuracy,
)
from idefics2.evaluation.stats import bootstrap_ci, group_scores, paired_bootstrap


# ------------------------------------------------------------------------------------------ VQA accuracy
@pytest.mark.parametrize("agreeing, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_over_ten_references(agreeing, expected):
    # by hand: with m of the 10 references matching, the 10 leave-one-out subsets hold m-1 matches (m of them)
    # or m matches (10-m of them): m=1 -> 9 * (1/3) / 10 = 0.3; m=2 -> (2 * 1/3 + 8 * 2/3) / 10 = 0.6;
    # m=3 -> (3 * 2/3 + 7 * 1) / 10 = 0.9; m=4 -> every subset holds at least 3
    references = ["2"] * agreeing + ["3"] * (10 - agreeing)
    assert vqa_accuracy("2", references) == pytest.approx(expected)


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("Two", "2"),  # number words to digits, lower case
        ("none", "0"),
        ("The dog.", "dog"),  # articles dropped, a final period removed
        ("an apple", "apple"),
        ("1,000", "1000"),  # the digit-comma rule: with "1,000" in the text every mark is deleted
        ("red, 1,000 blue!", "red 1000 blue"),
        ("red,blue", "red blue"),  # a comma between words becomes a space ...
        ("red, blue", "red blue"),  # ... and one that touches a space is deleted
        ("e-mail", "e mail"),
        ("left - right", "left right"),
        ("3.5", "3.5"),  # a period followed by a digit stays
        ("2.", "2"),
        ("dont", "don't"),  # the contraction table
        ("whats", "what's"),
        ("yes\n", "yes"),
        ("it's:fine", "it's:fine"),  # ":" and "'" are not in the script's punctuation list
        ("  Café  ", "café"),
        ("", ""),
    ],
)
def test_vqa_normalisation(raw, normalised):
    assert normalize_vqa(raw) == normalised


def test_vqa_period_rule_stops_after_32_periods():
    # the script passes re.UNICODE (32) as re.sub's count: only the first 32 periods are removed
    text = "x" + ".y" * 40
    assert normalize_vqa(text) == "x" + "y" * 32 + ".y" * 8


def test_vqa_edge_cases():
    dogs = ["dog"] * 10
    assert vqa_accuracy("", dogs) == 0.0
    assert vqa_accuracy("a dog is sitting on the grass", dogs) == 0.0  # longer than every reference
    assert vqa_accuracy("The Dog!", dogs) == 1.0
    assert vqa_accuracy("two", ["2"] * 10) == vqa_accuracy("2", ["two"] * 10) == 1.0
    assert vqa_accuracy("1,000", ["1000"] * 10) == 1.0
    assert vqa_accuracy("CAFÉ", ["café"] * 10) == 1.0
    # fewer references: the same formula over what there is; a single one: equality
    assert vqa_accuracy("dog", ["dog", "dog"]) == pytest.approx(1 / 3)
    assert vqa_accuracy("dog", ["dog", "dog", "dog", "dog"]) == pytest.approx(1.0)
    assert vqa_accuracy("the dog", ["Dog"]) == 1.0 and vqa_accuracy("cat", ["dog"]) == 0.0
    with pytest.raises(ValueError, match="at least one reference"):
        vqa_accuracy("dog", [])


# --------------------------------------------------------------------------------------------------- ANLS
@functools.cache
def _edit_distance(a: str, b: str) -> int:  # the recursive definition
    if not a or not b:
        return len(a) + len(b)
    return min(_edit_distance(a[1:], b) + 1, _edit_distance(a, b[1:]) + 1,
               _edit_distance(a[1:], b[1:]) + (a[0] != b[0]))  # fmt: skip


def test_levenshtein_is_the_edit_distance():
    rng = random.Random(0)
    for _ in range(200):
        a = "".join(rng.choice("abcé") for _ in range(rng.randint(0, 7)))
        b = "".join(rng.choice("abcé") for _ in range(rng.randint(0, 7)))
        assert levenshtein(a, b) == _edit_distance(a, b), (a, b)
    assert levenshtein("kitten", "sitting") == 3


def test_anls_worked_examples():
    assert anls("helo", ["hello"]) == pytest.approx(1 - 1 / 5)
    assert anls("abd", ["abc"]) == pytest.approx(1 - 1 / 3)
    assert anls("ac", ["ab"]) == 0.0  # NL = 0.5 is not below tau
    assert anls("Hello   World ", ["hello world"]) == 1.0  # case and whitespace
    assert anls("helo", ["xyz", "hello", "help"]) == pytest.approx(0.8)  # the best reference
    assert anls("Müller", ["Muller"]) == pytest.approx(1 - 1 / 6)  # a character, not a byte
    assert anls("", ["x"]) == 0.0 and anls("", [""]) == 1.0
    assert anls("the total is 42 dollars", ["42"]) == 0.0  # longer than every reference
    with pytest.raises(ValueError, match="at least one reference"):
        anls("x", [])


# -------------------------------------------------------------------------------------- relaxed accuracy
@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("12.1", "12", 1.0),  # 0.8% off
        ("105", "100", 1.0),  # exactly 5%
        ("105.1", "100", 0.0),
        ("95", "100", 1.0),
        ("13", "12", 0.0),
        ("50%", "0.5", 1.0),  # a percentage is its fraction
        ("0.01", "0", 0.0),  # a zero reference is compared as text
        ("0", "0", 1.0),
        ("Yes", "yes", 1.0),
        (" 42 ", "42", 1.0),
        ("1,000", "1000", 0.0),  # ChartQA's rule reads no thousands separators: compared as text
        ("", "12", 0.0),
        ("about 12 percent", "12", 0.0),
    ],
)
def test_relaxed_accuracy(prediction, reference, expected):
    assert relaxed_accuracy(prediction, [reference]) == expected


def test_relaxed_accuracy_takes_the_best_reference():
    assert relaxed_accuracy("20", ["10", "20.5"]) == 1.0 and relaxed_accuracy("20", ["10", "30"]) == 0.0


# ------------------------------------------------------------------------------------------- exact match
def test_exact_match_normalisation():
    assert normalize_exact("  The   Cat. ") == "the cat"
    assert normalize_exact("ＡＢＣ") == "abc"  # NFKC: full-width letters
    assert normalize_exact("«Straße»") == "strasse"  # case folding, unicode punctuation at the ends
    assert exact_match("3.5", ["35"]) == 0.0 and exact_match("3.5", ["3.5."]) == 1.0
    assert exact_match("", [""]) == 1.0 and exact_match("", ["a"]) == 0.0
    assert exact_match("two", ["2"]) == 0.0  # no number words here
    assert exact_match("cat", ["dog", "Cat!"]) == 1.0


# ------------------------------------------------------------------------------------- multiple choice
CHOICES = ["dog", "cat", "bird"]


@pytest.mark.parametrize(
    "answer, letter",
    [
        ("B", "B"), ("(b)", "B"), ("b.", "B"), ("The answer is B.", "B"), ("Answer: C, a bird", "C"),
        ("A", "A"), ("A. dog", "A"),
        ("A cat", "B"),  # "A" before a lower-case word is the article: the text decides
        ("I think it is a bird", "C"),
        ("cats", None),  # whole words only
        ("A or B", None), ("cat or dog", None),  # two options named: none
        ("D", None), ("", None), ("¿qué?", None),
    ],
)  # fmt: skip
def test_extract_choice(answer, letter):
    assert extract_choice(answer, CHOICES) == letter


def test_extract_choice_prefers_the_longer_option_text():
    assert extract_choice("It is dark red", ["red", "dark red", "blue"]) == "B"


def test_multiple_choice_references_and_prompt():
    assert [reference_choice(r, CHOICES) for r in ("B", "b", "cat", "Cat", "1")] == ["B"] * 5
    with pytest.raises(ValueError, match="neither an option letter"):
        reference_choice("zebra", CHOICES)
    assert (
        multiple_choice("(B) cat", ["cat"], CHOICES) == 1.0 and multiple_choice("A", ["cat"], CHOICES) == 0.0
    )
    with pytest.raises(ValueError, match="choices"):
        multiple_choice("A", ["A"], None)
    assert format_options(CHOICES) == "A. dog\nB. cat\nC. bird"
    prompt = METRICS["mc"].prompt_template.format(question="Which?", options=format_options(CHOICES))
    assert prompt.startswith("Which?\nA. dog\nB. cat\nC. bird\n")


# ------------------------------------------------------------------------------------------- statistics
def test_bootstrap_interval_matches_the_normal_approximation():
    scores = [1.0] * 200 + [0.0] * 200
    estimate = bootstrap_ci(scores, resamples=2000, seed=1)
    half_width = 1.96 * math.sqrt(0.25 / 400)  # the binomial proportion's normal interval
    assert estimate.score == 0.5 and estimate.n == 400
    assert estimate.low == pytest.approx(0.5 - half_width, abs=0.008)
    assert estimate.high == pytest.approx(0.5 + half_width, abs=0.008)
    assert bootstrap_ci(scores, seed=1) == bootstrap_ci(scores, seed=1) != bootstrap_ci(scores, seed=2)
    assert bootstrap_ci([0.7] * 5) == bootstrap_ci([0.7] * 5)
    constant = bootstrap_ci([0.7] * 5)
    assert constant.low == pytest.approx(0.7) and constant.high == pytest.approx(0.7)
    with pytest.raises(ValueError, match="no scores"):
        bootstrap_ci([])


def test_group_scores_in_order_of_appearance():
    groups = group_scores([1, 0, 1, 1], ["b", "a", "b", "a"])
    assert list(groups) == ["b", "a"]
    assert groups["b"].score == 1.0 and groups["a"].score == 0.5 and groups["a"].n == 2


def test_paired_bootstrap():
    rng = random.Random(0)
    a = [float(rng.random() < 0.5) for _ in range(300)]
    same = paired_bootstrap(a, a)
    assert same.difference == 0.0 and same.p_value == 1.0 and same.low == same.high == 0.0
    better = paired_bootstrap([0.0] * 50, [1.0] * 50, resamples=999)
    assert better.difference == 1.0 and better.p_value == pytest.approx(1 / 1000)
    # a noisy gain on graded scores (as ANLS gives): the p-value and interval agree with the paired z-test
    a = [rng.random() for _ in range(300)]
    b = [min(1.0, max(0.0, x + rng.gauss(0.012, 0.2))) for x in a]
    result = paired_bootstrap(a, b, resamples=4000, seed=3)
    d = [y - x for x, y in zip(a, b, strict=True)]
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1)) / math.sqrt(len(d))
    z_p = math.erfc(abs(mean) / sd / math.sqrt(2))
    assert result.difference == pytest.approx(mean) and result.n == 300
    assert result.p_value == pytest.approx(z_p, abs=0.03)
    assert result.low == pytest.approx(mean - 1.96 * sd, abs=0.006)
    assert result.high == pytest.approx(mean + 1.96 * sd, abs=0.006)
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap([1.0], [1.0, 0.0])
