"""The request fields that OpenAI-compatible clients send beyond OpenAI's own (vLLM's extensions, as GuideLLM
and other benchmark clients send them) and TGI's ignore_eos_token, over real HTTP on the built-in model;
unknown fields are accepted, logged once and counted in /metrics."""

from __future__ import annotations

import json
import logging
import urllib.request

import pytest
from PIL import Image

from idefics2 import pipeline
from idefics2.server import ServerSettings, create_app
from idefics2.serving import Engine
from server_utils import EXAMPLE, data_url, get, image_message, post_json, serving

QUESTION = "What color is the circle?"
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]


@pytest.fixture(scope="module")
def builtin():
    return pipeline()


@pytest.fixture(scope="module")
def base(builtin):
    engine = Engine(builtin.model, builtin.processor, max_batch=4)
    with serving(create_app(engine, ServerSettings(model_name="builtin"))) as url:
        yield url


def chat(base: str, **fields) -> dict:
    status, body = post_json(base, "/v1/chat/completions", {"messages": image_message(QUESTION), **fields})
    assert status == 200, body
    return body


def reply(body: dict) -> tuple[str, str, int]:
    choice = body["choices"][0]
    return choice["message"]["content"], choice["finish_reason"], body["usage"]["completion_tokens"]


def reference(builtin, **controls) -> str:
    """The same request through `generate` (the pipeline), with the controls the fields stand for."""
    return builtin.chat(MESSAGES, [Image.open(EXAMPLE)], **controls)


def test_ignore_eos_gives_exactly_max_tokens(base, builtin):
    text, reason, n = reply(chat(base, max_tokens=12))
    assert reason == "stop" and n < 12  # the model ends its answer early by itself
    text, reason, n = reply(chat(base, max_tokens=12, ignore_eos=True))
    assert (reason, n) == ("length", 12)
    assert text == reference(builtin, max_new_tokens=12, eos_token_id=[])
    # with the special tokens kept, the end tokens the model produced show in the text
    kept, _, _ = reply(chat(base, max_tokens=12, ignore_eos=True, skip_special_tokens=False))
    assert "<end_of_utterance>" in kept and kept.replace("<end_of_utterance>", "") == text


def test_min_tokens_holds_back_the_end(base, builtin):
    text, reason, n = reply(chat(base, max_tokens=12, min_tokens=6))
    assert n >= 6
    assert text == reference(builtin, max_new_tokens=12, min_new_tokens=6)


def test_stop_token_ids_end_the_reply_and_include_stop_str_in_output_keeps_them(base, builtin):
    status, body = post_json(
        base,
        "/generate",
        {"inputs": f"User:![]({data_url()}){QUESTION}<end_of_utterance>\nAssistant:",
         "parameters": {"max_new_tokens": 12, "details": True, "ignore_eos_token": True}},
    )  # fmt: skip
    assert status == 200 and body["details"]["generated_tokens"] == 12  # TGI's ignore_eos_token
    tokens = body["details"]["tokens"]
    end_ids = {2, 6}  # the built-in model's </s> and <end_of_utterance>
    at = next(i for i, t in enumerate(tokens) if i > 0 and t["id"] not in end_ids and not t["special"])
    stop_id, stop_text = tokens[at]["id"], tokens[at]["text"]
    before = "".join(t["text"] for t in tokens[:at]).strip()

    text, reason, n = reply(chat(base, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_id]))
    assert (text, reason, n) == (before, "stop", at + 1)
    text, _, _ = reply(
        chat(base, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_id], include_stop_str_in_output=True)
    )
    assert text == before + stop_text
    # the model's own end tokens still end it when ignore_eos is not set
    assert reply(chat(base, max_tokens=12, stop_token_ids=[stop_id])) == reply(chat(base, max_tokens=12))


def test_include_stop_str_in_output_keeps_the_stop_string(base):
    answer, _, _ = reply(chat(base, max_tokens=12, ignore_eos=True))
    stop = answer[1:3]
    cut = answer.index(stop)
    assert reply(chat(base, max_tokens=12, ignore_eos=True, stop=[stop]))[0] == answer[:cut]
    kept = reply(chat(base, max_tokens=12, ignore_eos=True, stop=[stop], include_stop_str_in_output=True))
    assert kept[0] == answer[: cut + len(stop)] and kept[1] == "stop"


def test_top_k_and_repetition_penalty(base, builtin):
    greedy, _, _ = reply(chat(base, max_tokens=12, ignore_eos=True, temperature=0))
    # top_k=1 leaves one token to sample from: the greedy answer, whatever the temperature and seed
    for seed in (1, 2, 3):
        sampled = chat(base, max_tokens=12, ignore_eos=True, temperature=2.0, top_k=1, seed=seed)
        assert reply(sampled)[0] == greedy
    free = {reply(chat(base, max_tokens=12, ignore_eos=True, temperature=2.0, seed=s))[0] for s in (1, 2, 3)}
    assert free != {greedy}
    penalized, _, _ = reply(chat(base, max_tokens=12, ignore_eos=True, repetition_penalty=2.0))
    assert penalized != greedy
    assert penalized == reference(builtin, max_new_tokens=12, eos_token_id=[], repetition_penalty=2.0)


def stream(base: str, **fields) -> list[dict]:
    body = json.dumps({"messages": image_message(QUESTION), "stream": True, **fields}).encode()
    request = urllib.request.Request(
        base + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        lines = response.read().decode().splitlines()
    data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(chunk) for chunk in data[:-1]]


def test_continuous_usage_stats_put_the_usage_in_every_chunk(base):
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = stream(base, max_tokens=6, ignore_eos=True, stream_options=options)
    counts = [chunk["usage"]["completion_tokens"] for chunk in chunks]
    assert counts[0] == 0 and counts[-1] == 6 and counts == sorted(counts)
    prompt = chunks[0]["usage"]["prompt_tokens"]
    assert prompt > 0 and all(chunk["usage"]["prompt_tokens"] == prompt for chunk in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == prompt + 6
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == reply(chat(base, max_tokens=6, ignore_eos=True))[0]
    # without it, only the last chunk (include_usage) has the usage
    plain = stream(base, max_tokens=6, ignore_eos=True, stream_options={"include_usage": True})
    assert [("usage" in chunk) for chunk in plain] == [False] * (len(plain) - 1) + [True]


def test_unknown_fields_are_accepted_logged_once_and_counted(base, caplog):
    caplog.set_level(logging.WARNING, logger="idefics2.server")
    fields = {"max_tokens": 2, "best_of_vendor_x": 3, "stream_options": None}
    for _ in range(2):
        chat(base, **fields)
        status, _ = post_json(
            base, "/generate",
            {"inputs": "Hello", "parameters": {"max_new_tokens": 2, "vendor_knob": 1}, "vendor_top": True},
        )  # fmt: skip
        assert status == 200
    _, text = get(base, "/metrics")
    for route, name in (("/v1/chat/completions", "best_of_vendor_x"), ("/generate", "parameters.vendor_knob"),
                        ("/generate", "vendor_top")):  # fmt: skip
        assert f'idefics2_unknown_request_fields_total{{field="{name}",route="{route}"}} 2.0' in text
        assert sum(f"'{name}'" in record.getMessage() for record in caplog.records) == 1, name
    assert 'field="max_tokens"' not in text  # known fields are not counted


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"stop_token_ids": [1, -2]}, "stop_token_ids"),
        ({"stop_token_ids": 7}, "stop_token_ids"),
        ({"top_k": -2}, "top_k"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"skip_special_tokens": 1}, "skip_special_tokens"),
        ({"include_stop_str_in_output": "no"}, "include_stop_str_in_output"),
        (
            {"stream": True, "stream_options": {"continuous_usage_stats": 1}},
            "stream_options.continuous_usage_stats",
        ),
    ],
)
def test_bad_extension_values_get_a_400_naming_the_field(base, fields, param):
    status, body = post_json(base, "/v1/chat/completions", {"messages": image_message(QUESTION), **fields})
    assert status == 400 and body["error"]["param"] == param, body


def test_a_bad_ignore_eos_token_on_tgi_gets_a_422(base):
    status, body = post_json(base, "/generate", {"inputs": "Hi", "parameters": {"ignore_eos_token": "yes"}})
    assert status == 422 and "ignore_eos_token" in body["error"]
