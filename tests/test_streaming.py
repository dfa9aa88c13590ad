"""Incremental detokenizing and stop-string holding on the real Mistral-7B vocabulary."""

import random

import pytest

from idefics2.streaming import StopStringFilter, TextDeltaDecoder, trim_at_stop
from oracle_processing import build_reference_tokenizer

TEXTS = [
    "Hello world, this is a test.",
    "  leading spaces and\ttabs\nand new lines\n\n",
    "Emoji: 🦙🦙 and 👩‍👩‍👧 family, flags 🇫🇷.",
    "日本語のテキストと中文字符, ελληνικά, русский текст",
    "Accents: déjà vu, naïve café, Ångström — “quotes” …",
    "numbers 12345 and code `x = y[0] ** 2`",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_reference_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip_special", [True, False])
def test_deltas_concatenate_to_the_full_decode(tokenizer, text, skip_special):
    ids = tokenizer.encode(text, add_special_tokens=True) + [tokenizer.eos_token_id]
    decoder = TextDeltaDecoder(tokenizer, skip_special_tokens=skip_special)
    deltas = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip_special)
    assert not any("\ufffd" in d for d in deltas)  # never half a character


def test_byte_fallback_characters_are_held_until_complete(tokenizer):
    ids = tokenizer.encode("🦙", add_special_tokens=False)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert sum(p.startswith("<0x") for p in pieces) >= 2  # the emoji really is split into byte tokens
    decoder = TextDeltaDecoder(tokenizer)
    deltas = [decoder.push(i) for i in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1].strip() == "🦙"


def test_pushing_chunks_of_tokens(tokenizer):
    ids = tokenizer.encode(" ".join(TEXTS), add_special_tokens=False)
    rng = random.Random(0)
    decoder, out, i = TextDeltaDecoder(tokenizer), [], 0
    while i < len(ids):
        n = rng.randint(1, 4)
        out.append(decoder.push(ids[i : i + n]))
        i += n
    assert "".join(out) + decoder.flush() == tokenizer.decode(ids)


STOP_CASES = [
    ("The answer is 42.\nUser: next question", ["\nUser:"]),
    ("abcabcabd and more", ["abd"]),
    ("no stop string here at all", ["zzz", "User:"]),
    ("two candidates: END first then STOP", ["STOP", "END"]),
    ("ends with a partial sto", ["stop"]),
]


@pytest.mark.parametrize(("text", "stops"), STOP_CASES)
def test_stop_string_filter_stops_trims_and_never_shows_part_of_a_stop(text, stops):
    expected = trim_at_stop(text, stops)
    for seed in range(5):
        rng = random.Random(seed)
        f, emitted, i = StopStringFilter(stops), "", 0
        while i < len(text):
            n = rng.randint(1, 5)
            emitted += f.push(text[i : i + n])
            i += n
            assert expected.startswith(emitted)
            assert not any(s in emitted for s in stops)
        emitted += f.flush()
        assert emitted == expected


@pytest.mark.parametrize(("text", "stops"), [*STOP_CASES, ("overlapping: ab then abc", ["abc", "ab"])])
def test_stop_string_filter_keeping_the_stop_ends_right_after_it(text, stops):
    starts = [(text.find(s), -len(s)) for s in stops if s in text]  # the earliest, then the longest there
    start, minus_length = min(starts) if starts else (len(text), 0)
    expected = text[: start - minus_length]
    for seed in range(5):
        rng = random.Random(seed)
        f, emitted, i = StopStringFilter(stops, keep_stop=True), "", 0
        while i < len(text) and not f.stopped:
            n = rng.randint(1, 5)
            emitted += f.push(text[i : i + n])
            i += n
            assert expected.startswith(emitted)
        emitted += f.flush()
        assert emitted == expected


def test_trim_at_stop_uses_the_earliest_stop():
    assert trim_at_stop("a STOP b END", ["END", "STOP"]) == "a "
    assert trim_at_stop("nothing", None) == "nothing"
