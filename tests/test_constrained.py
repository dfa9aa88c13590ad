"""Structured output (idefics2.constrained): which tokens a JSON schema or regex allows, when the end tokens
are allowed, clear errors, and generation on random-weight models, where only the constraint can make the
output valid."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch

from idefics2.assets import builtin_model_dir
from idefics2.cli import main
from idefics2.config import Idefics2Config
from idefics2.constrained import (
    compile_grammar,
    row_grammars,
    validate,
)
from idefics2.generation import generate
from idefics2.modeling import Idefics2ForConditionalGeneration
from idefics2.processing import Idefics2Processor
from idefics2.shapes import (
    answer_questions,
    answer_schema,
    json_answer,
    make_dataset,
    normalize_answer,
    plain_answer,
)

END_IDS = [2, 6]  # </s> and <end_of_utterance> in the built-in vocabulary
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,8}$"},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "score": {"type": "number", "minimum": -1.5, "maximum": 2.5, "multipleOf": 0.25},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "city": {"enum": ["Oslo", "Lima"]},
            },
            "required": ["zip", "city"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "score", "tags", "address", "active"],
    "additionalProperties": False,
}
CODE = r"[A-Z]{3}-[0-9]{2,4}"
SMALL = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def processor():
    return Idefics2Processor.from_pretrained(builtin_model_dir())


@pytest.fixture(scope="module")
def random_model():
    """The built-in model's architecture and vocabulary with random weights: it never writes JSON itself."""
    torch.manual_seed(0)
    model = Idefics2ForConditionalGeneration(Idefics2Config.from_pretrained(builtin_model_dir())).eval()
    model.generation_config = {"eos_token_id": END_IDS, "pad_token_id": 3}
    return model


def prompts(processor, texts: list[str]) -> dict[str, torch.Tensor]:
    chats = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": t}]}], add_generation_prompt=True
        )
        for t in texts
    ]
    return dict(processor.tokenizer(chats, padding=True, padding_side="left", return_tensors="pt"))


def answers(processor, out: torch.Tensor, prompt_len: int) -> list[tuple[str, bool]]:
    """(text up to the first end token, whether an end token was produced) for every row."""
    rows = []
    for row in out[:, prompt_len:].tolist():
        end = next((i for i, t in enumerate(row) if t in END_IDS), None)
        rows.append((processor.tokenizer.decode(row[:end]), end is not None))
    return rows


def token_bytes(tokenizer) -> list[bytes | None]:
    """What each token writes, read from the vocabulary itself (None for special tokens)."""
    config = json.loads(tokenizer.backend.to_str())
    special = set(tokenizer.all_special_ids) | {t["id"] for t in config["added_tokens"]}
    byte_level = "ByteLevel" in json.dumps(config["pre_tokenizer"])
    if byte_level:  # GPT-2's printable characters standing for the 256 byte values
        kept = [*range(33, 127), *range(161, 173), *range(174, 256)]
        others = [b for b in range(256) if b not in kept]
        char_to_byte = {chr(b): b for b in kept} | {chr(256 + i): b for i, b in enumerate(others)}
    table: list[bytes | None] = [None] * len(tokenizer)
    for token, i in tokenizer.get_vocab().items():
        if i in special:
            continue
        if byte_level:
            table[i] = bytes(char_to_byte[c] for c in token)
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            table[i] = bytes([int(token[3:5], 16)])
        else:
            table[i] = token.replace("▁", " ").encode()
    return table


def allowed(state, vocab: int) -> set[int]:
    return set(torch.from_numpy(~state.forbidden(vocab)).nonzero().flatten().tolist())


# ------------------------------------------------------------------------------------------- the masks
def test_regex_allows_exactly_the_tokens_that_keep_a_match_possible(processor):
    tokenizer = processor.tokenizer
    pieces = token_bytes(tokenizer)
    vocab = len(tokenizer)
    state = compile_grammar(processor, regex="yes|no").new_state(END_IDS)
    expected = {i for i, b in enumerate(pieces) if b and (b"yes".startswith(b) or b"no".startswith(b))}
    assert allowed(state, vocab) == expected and tokenizer.token_to_id("Ġyes") not in expected
    assert not state.can_end()
    for token in ("y", "e"):
        state.advance(tokenizer.token_to_id(token))
        assert not state.can_end() and not set(END_IDS) & allowed(state, vocab)
    state.advance(tokenizer.token_to_id("s"))
    assert state.can_end() and allowed(state, vocab) == set(END_IDS)  # complete, nothing can follow
    state.advance(END_IDS[1])
    assert state.is_finished()
    with pytest.raises(ValueError, match="finished"):
        state.advance(END_IDS[0])


def test_end_tokens_are_allowed_exactly_when_the_text_is_complete(processor):
    tokenizer = processor.tokenizer
    digits = {tokenizer.token_to_id(str(d)) for d in range(10)}
    state = compile_grammar(processor, regex=r"[0-9]{1,3}").new_state(END_IDS)
    vocab = len(tokenizer)
    assert allowed(state, vocab) == digits
    state.advance(tokenizer.token_to_id("1"))
    assert allowed(state, vocab) == digits | set(END_IDS)  # may end or go on
    state.advance(tokenizer.token_to_id("2"))
    state.advance(tokenizer.token_to_id("3"))
    assert allowed(state, vocab) == set(END_IDS)  # three digits: only the end is left
    fresh = compile_grammar(processor, regex=r"[0-9]{1,3}").new_state([2])  # ends of the caller's choice
    with pytest.raises(ValueError, match="before the answer is complete"):
        fresh.advance(2)
    with pytest.raises(ValueError, match="not allowed here"):
        fresh.advance(tokenizer.token_to_id("a"))


def test_masks_on_the_real_mistral_vocabulary(reference_processor_dir):
    processor = Idefics2Processor.from_pretrained(reference_processor_dir)
    tokenizer = processor.tokenizer
    pieces = token_bytes(tokenizer)
    ends = [2, 32002]
    state = compile_grammar(processor, regex="yes|no").new_state(ends)
    expected = {i for i, b in enumerate(pieces) if b and (b"yes".startswith(b) or b"no".startswith(b))}
    assert allowed(state, len(tokenizer)) == expected
    assert tokenizer.token_to_id("▁yes") not in expected and tokenizer.token_to_id("yes") in expected
    # JSON may start with one space: SentencePiece answers usually begin with a "▁" token
    state = compile_grammar(processor, json_schema={"type": "object"}).new_state(ends)
    first = {i for i, b in enumerate(pieces) if b and (b" {".startswith(b) or b.startswith((b"{", b" {")))}
    got = allowed(state, len(tokenizer))
    assert {tokenizer.token_to_id(t) for t in ("{", "▁{", "▁")} <= got <= first
    assert not got & {0, 1, 2, 32000, 32001, 32002}  # no special token, no end before the JSON


def test_mask_in_place_on_one_row_several_rows_and_mixed_batches(processor):
    vocab = len(processor.tokenizer)
    grammar = compile_grammar(processor, regex="yes|no")
    state = grammar.new_state(END_IDS)
    keep = torch.zeros(vocab, dtype=torch.bool)
    keep[list(allowed(state, vocab))] = True
    scores = torch.randn(vocab + 3)  # a model may have more rows than the tokenizer has tokens
    original = scores.clone()
    assert state.mask_(scores) is scores
    assert torch.equal(scores[:vocab][keep], original[:vocab][keep])
    assert torch.isneginf(scores[:vocab][~keep]).all() and torch.isneginf(scores[vocab:]).all()
    rows = torch.randn(2, vocab)
    state.mask_(rows)
    assert torch.isneginf(rows[:, ~keep]).all() and torch.isfinite(rows[:, keep]).all()


def test_compiled_grammars_are_cached_and_tell_complete_from_cut_text(processor):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    grammar = compile_grammar(processor, json_schema=schema)
    assert compile_grammar(processor.tokenizer, json_schema=json.dumps(schema)) is grammar
    assert compile_grammar(processor, json_schema={"type": "object"}) is not grammar
    assert grammar.matches('{"n": 12}') and grammar.matches(' {"n": -3}')
    assert not grammar.matches('{"n": 12') and not grammar.matches('{"n":12}') and not grammar.matches("12")


@pytest.mark.parametrize(
    "spec, problem",
    [
        ({"json_schema": "{not json"}, "json_schema is not valid JSON"),
        ({"json_schema": "[1, 2]"}, "a JSON schema must be a JSON object, got list"),
        ({"json_schema": {"type": "colour"}}, "invalid JSON schema: Invalid type: colour"),
        (
            {"json_schema": {"type": "integer", "minimum": 5, "maximum": 1}},
            "minimum (5) is greater than maximum",
        ),
        ({"json_schema": {"type": "string", "pattern": "(?=a)b"}}, "look-around"),
        ({"json_schema": {"$ref": "https://example.com/s.json"}}, "invalid JSON schema"),
        ({"regex": "a(b"}, 'invalid regex "a(b": regex parse error: unclosed group'),
        ({"regex": r"(a)\1"}, "backreferences are not supported"),
        ({"regex": r"[^\s\S]"}, "invalid regex: no text satisfies it"),
        ({"regex": ""}, "regex must be a non-empty string"),
        ({"json_schema": {"type": "object"}, "regex": "a"}, "exactly one of json_schema and regex"),
        ({}, "exactly one of json_schema and regex"),
    ],
)
def test_invalid_schemas_and_regexes_are_one_clear_value_error(processor, spec, problem):
    with pytest.raises(ValueError) as error:
        compile_grammar(processor, **spec)
    assert problem in str(error.value) and "\n" not in str(error.value)
    if problem != "invalid regex: no text satisfies it":  # that one needs the vocabulary to tell
        with pytest.raises(ValueError, match=re.escape(problem)):
            validate(**spec)


def test_per_row_grammars(processor):
    grammars = row_grammars(
        processor, 3, json_schema=[{"type": "object"}, None, None], regex=[None, "a+", None]
    )
    assert [g and g.kind for g in grammars] == ["json_schema", "regex", None]
    assert row_grammars(processor, 2, regex="a+") == [compile_grammar(processor, regex="a+")] * 2
    with pytest.raises(ValueError, match="regex has 1 entries for 2 rows"):
        row_grammars(processor, 2, regex=["a"])
    with pytest.raises(ValueError, match="row 0 has both a json_schema and a regex"):
        row_grammars(processor, 1, json_schema=[{}], regex=["a"])
    with pytest.raises(ValueError, match="need tokenizer="):
        row_grammars(None, 1, regex="a")


# ------------------------------------------------------------------------------------------ generation
def test_random_model_writes_schema_valid_json_only_under_the_constraint(processor, random_model):
    inputs = prompts(processor, ["Describe the person."] * 4)
    prompt_len = inputs["input_ids"].shape[1]
    free = generate(random_model, **inputs, max_new_tokens=40, do_sample=True, seed=1, tokenizer=processor)
    for text, _ in answers(processor, free, prompt_len):
        with pytest.raises(ValueError):
            json.loads(text)
    out = generate(
        random_model, **inputs, max_new_tokens=256, do_sample=True, seed=1, tokenizer=processor,
        json_schema=PERSON,
    )  # fmt: skip
    texts = []
    for text, ended in answers(processor, out, prompt_len):
        assert ended, text  # the schema bounds every field, so every answer completes and ends
        jsonschema.validate(json.loads(text), PERSON)
        texts.append(text)
    assert len(set(texts)) == len(texts)  # sampled: four different people


def test_regex_and_a_batch_mixing_constrained_and_free_rows(processor, random_model):
    inputs = prompts(processor, ["A code?", "Tell me something.", "Is it ok?", "Anything."])
    prompt_len = inputs["input_ids"].shape[1]
    free = generate(random_model, **inputs, max_new_tokens=32, tokenizer=processor)
    out = generate(
        random_model, **inputs, max_new_tokens=32, tokenizer=processor,
        json_schema=[None, None, SMALL, None], regex=[CODE, None, None, None],
    )  # fmt: skip
    (code, code_ended), _, (small, small_ended), _ = answers(processor, out, prompt_len)
    assert code_ended and re.fullmatch(CODE, code)
    assert small_ended
    jsonschema.validate(json.loads(small), SMALL)
    for row in (1, 3):  # the free rows are exactly what they are without constraints
        assert torch.equal(out[row], free[row])


def test_max_new_tokens_cuts_the_answer_as_it_is(processor, random_model):
    inputs = prompts(processor, ["Describe the person."])
    prompt_len = inputs["input_ids"].shape[1]
    grammar = compile_grammar(processor, json_schema=PERSON)
    out = generate(random_model, **inputs, max_new_tokens=10, tokenizer=processor, json_schema=PERSON)
    ((text, ended),) = answers(processor, out, prompt_len)
    assert out.shape[1] == prompt_len + 10 and not ended  # finish reason "length"
    assert text.startswith('{"name": "') and not grammar.matches(text)


def test_generation_errors_come_before_the_model_runs(processor, random_model):
    inputs = prompts(processor, ["x"])
    calls = []
    hook = random_model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        cases = [
            ({"json_schema": {"type": "colour"}, "tokenizer": processor}, "Invalid type: colour"),
            ({"regex": "a"}, "need tokenizer="),
            (
                {"regex": "a+", "tokenizer": processor, "min_new_tokens": 2},
                "min_new_tokens cannot be combined",
            ),
            ({"regex": "a+", "tokenizer": processor, "eos_token_id": []}, "need an end-of-sequence token"),
        ]
        for controls, problem in cases:
            with pytest.raises(ValueError, match=re.escape(problem)):
                generate(random_model, **inputs, max_new_tokens=4, **controls)
        assert calls == []
    finally:
        hook.remove()
    a = processor.tokenizer.token_to_id("a")
    with pytest.raises(ValueError, match="row 0: no token is allowed next"):
        generate(
            random_model, **inputs, max_new_tokens=4, tokenizer=processor, regex="a+", bad_words_ids=[[a]]
        )


# --------------------------------------------------------------------------- the built-in model and the CLI
FRESH_SEED = 20261130  # used neither in training (seeds 1234-1236) nor in the held-out evaluation (777)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def builtin_answers(processor):
    """200 questions about colours and counts, asked plainly, then starting with "Answer in JSON." under the
    schema of their type ({"color": one of the six colours} or {"count": integer 0-9}): (examples, plain
    answers, JSON answers)."""
    model = Idefics2ForConditionalGeneration.from_pretrained(builtin_model_dir()).eval()
    examples = make_dataset(50, FRESH_SEED, ("count_all", "count_color", "count_kind", "color_of_kind"))
    plain = answer_questions(model, processor, examples, batch_size=50)
    structured = answer_questions(model, processor, examples, batch_size=50, structured=True)
    return examples, plain, structured


def test_builtin_model_answers_give_schema_valid_json_every_time(builtin_answers):
    examples, _, structured = builtin_answers
    for example, text in zip(examples, structured, strict=True):
        jsonschema.validate(json.loads(text), answer_schema(example.qtype))


def test_builtin_model_answers_in_json_as_accurately_as_in_words(builtin_answers):
    examples, plain, structured = builtin_answers
    plain_accuracy = sum(normalize_answer(a) == e.answer for e, a in zip(examples, plain)) / len(examples)
    json_accuracy = sum(plain_answer(e.qtype, t) == e.answer for e, t in zip(examples, structured)) / len(
        examples
    )
    assert plain_accuracy >= 0.95
    assert abs(json_accuracy - plain_accuracy) <= 0.02, (plain_accuracy, json_accuracy)


def test_structured_shapes_answers_round_trip_and_fit_their_schema():
    samples = {"count_all": "3", "count_color": "0", "count_kind": "6", "color_of_kind": "purple",
               "kind_of_color": "triangle", "exists": "no", "compare": "second"}  # fmt: skip
    for qtype, answer in samples.items():
        text = json_answer(qtype, answer)
        jsonschema.validate(json.loads(text), answer_schema(qtype))
        assert plain_answer(qtype, text) == answer
    assert (
        json_answer("exists", "yes") == '{"present": true}'
        and json_answer("count_all", "3") == '{"count": 3}'
    )
    assert plain_answer("count_all", '{"count": 3') is None and plain_answer("count_all", '{"n": 3}') is None


def in_process(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_info:  # argparse errors
        code = exit_info.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_generate_with_a_schema_file_a_regex_and_a_cut_answer(tmp_path, capsys):
    schema_file = tmp_path / "count.json"
    schema_file.write_text(json.dumps(answer_schema("count_all")))
    # examples/shapes.png: an orange square, a green circle, a purple triangle and a yellow square
    base = ["generate", "--image", REPO / "examples" / "shapes.png", "--dtype", "float32"]
    question = ["--prompt", "Answer in JSON. How many shapes are there?"]
    code, out, err = in_process([*base, *question, "--json-schema", schema_file], capsys)
    assert (code, out, err) == (0, '{"count": 4}\n', "")
    shape = ["--prompt", "What shape is the green one?", "--regex", "circle|square", "--stream"]
    code, out, err = in_process([*base, *shape], capsys)
    assert (code, out, err) == (0, "circle\n", "")
    cut = ["--json-schema", json.dumps(answer_schema("count_all")), "--max-new-tokens", "3"]
    code, out, err = in_process([*base, *question, *cut], capsys)
    assert code == 0 and out.startswith("{") and not out.rstrip().endswith("}")
    assert err.count("\n") == 1 and "finish reason: length" in err


@pytest.mark.parametrize(
    "flags, problem",
    [
        (["--json-schema", '{"type": "colour"}'], "--json-schema: invalid JSON schema: Invalid type: colour"),
        (["--json-schema", "{not json"], "--json-schema: not valid JSON"),
        (["--json-schema", "[1]"], "is neither a file nor a JSON object"),
        (
            ["--json-schema", "missing.json"],
            "--json-schema: missing.json is neither a file nor a JSON object",
        ),
        (["--regex", "a(b"], '--regex: invalid regex "a(b": regex parse error: unclosed group'),
        (["--regex", "a", "--json-schema", "{}"], "not allowed with argument"),
    ],
)
def test_cli_bad_schemas_and_regexes_are_one_line_before_the_model_loads(flags, problem, capsys, tmp_path):
    no_model = tmp_path / "no-model"  # checked after the schema: the schema's error must come first
    code, out, err = in_process(["generate", "--model", no_model, "--prompt", "x", *flags], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and problem in err, err
