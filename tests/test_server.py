"""`idefics2 serve`'s app, over real HTTP on loopback: clients no one here wrote (openai, huggingface_hub),
raw malformed bodies, limits, the API key, client hang-ups, metrics, image URL policy."""

from __future__ import annotations

import http.client
import http.server
import json
import socket
import threading
import time
import urllib.parse

import pytest

from idefics2 import pipeline
from idefics2.server import ServerSettings, create_app
from idefics2.serving import Engine
from server_utils import EXAMPLE, data_url, get, image_message, post_json, post_raw, serving

QUESTION = "What color is the circle?"
TGI_PROMPT = f"User:![]({{url}}){QUESTION}<end_of_utterance>\nAssistant:"


@pytest.fixture(scope="module")
def builtin():
    return pipeline()


@pytest.fixture(scope="module")
def server(builtin, tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    (media / "shapes.png").write_bytes(EXAMPLE.read_bytes())
    engine = Engine(builtin.model, builtin.processor, max_batch=4)
    settings = ServerSettings(model_name="builtin", max_images_per_request=2, max_image_pixels=500_000,
                              max_body_bytes=2_000_000, allowed_local_media_path=media)  # fmt: skip
    with serving(create_app(engine, settings)) as base:
        yield base, engine, media


@pytest.fixture(scope="module")
def long_server(tmp_path_factory):
    """A random tiny checkpoint that rarely ends early: long answers, to hang up in the middle of."""
    from oracle_model import build_reference_checkpoint
    from oracle_processing import build_reference_processor

    folder = tmp_path_factory.mktemp("random")
    build_reference_checkpoint(folder)
    build_reference_processor(folder, image_seq_len=4, longest_edge=56, shortest_edge=28)
    chat = pipeline(folder)
    engine = Engine(chat.model, chat.processor, max_batch=2, max_queue=1, max_length=512)
    with serving(create_app(engine, ServerSettings(model_name="random"))) as base:
        yield base, engine


def test_openai_client_plain_and_streaming_with_usage(server):
    from openai import OpenAI

    base, _, _ = server
    client = OpenAI(base_url=base + "/v1", api_key="unused")
    reply = client.chat.completions.create(model="builtin", messages=image_message(QUESTION), max_tokens=8)
    assert reply.choices[0].message.content == "green"
    assert reply.choices[0].finish_reason == "stop" and reply.model == "builtin"
    assert reply.usage.completion_tokens == 2 and reply.usage.prompt_tokens > 20
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    chunks = list(client.chat.completions.create(
        model="builtin", messages=image_message(QUESTION), max_tokens=8, stream=True,
        stream_options={"include_usage": True},
    ))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "green"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 2
    assert [m.id for m in client.models.list()] == ["builtin"]


def test_huggingface_hub_client_on_both_apis(server):
    from huggingface_hub import InferenceClient

    base, _, _ = server
    client = InferenceClient(base_url=base)
    assert client.chat_completion(messages=image_message(QUESTION), max_tokens=8).choices[
        0
    ].message.content == ("green")
    prompt = TGI_PROMPT.format(url=data_url())
    out = client.text_generation(prompt, max_new_tokens=5, details=True)
    assert out.generated_text == "green" and out.details.finish_reason == "eos_token"
    assert [t.special for t in out.details.tokens] == [False, True] and out.details.tokens[0].logprob < 0
    stream = list(client.text_generation(prompt, max_new_tokens=5, stream=True, details=True))
    assert "".join(s.token.text for s in stream) == "green" and stream[-1].generated_text == "green"
    assert stream[-1].details.generated_tokens == 2 and stream[-1].details.input_length > 20
    status, body = post_json(base, "/generate", {"inputs": prompt, "parameters": {"max_new_tokens": 5}})
    assert status == 200 and body == {"generated_text": "green"}
    status, info = get(base, "/info")
    assert status == 200 and json.loads(info)["max_total_tokens"] == 512


MALFORMED = [
    (b"{not json", "not valid JSON", None),
    (b"[1, 2]", "must be a JSON object", None),
    (json.dumps({"messages": []}).encode(), "non-empty list", "messages"),
    (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode(), "role must be", "messages[0]"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "video"}]}]}).encode(), "must be",
     "messages[0].content[0]"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 2}).encode(), "n must be 1", "n"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}).encode(), ">= 1",
     "max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}).encode(), "number",
     "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "tools": [{"x": 1}]}).encode(),
     "not supported", "tools"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "stop": [""]}).encode(), "stop must",
     "stop"),
    (json.dumps({"messages": image_message("x", "data:image/png;base64,@@@")}).encode(), "not valid base64",
     "messages[0].content[0].image_url"),
    (json.dumps({"messages": image_message("x", "data:image/png;base64,aGVsbG8=")}).encode(),
     "not a readable image", None),
    (json.dumps({"messages": image_message("x", "http://127.0.0.1:1/x.png")}).encode(),
     "--allow-remote-images", "messages[0].content[0].image_url"),
    (json.dumps({"messages": image_message("x", "file:///etc/passwd")}).encode(), "must point inside",
     "messages[0].content[0].image_url"),
    (json.dumps({"messages": image_message("x", "file://[::1/x.png")}).encode(), "not a valid file:// URL",
     "messages[0].content[0].image_url"),
    (json.dumps({"messages": image_message("x", "http://[::1/x.png")}).encode(), "--allow-remote-images",
     "messages[0].content[0].image_url"),
    (json.dumps({"messages": [{"role": "user", "content": "lone \ud800 surrogate"}]}).encode(), "", None),
]  # fmt: skip


@pytest.mark.parametrize("body, message, param", MALFORMED)
def test_malformed_bodies_get_a_400_in_openais_format(server, body, message, param):
    base, _, _ = server
    status, answer = post_raw(base, "/v1/chat/completions", body)
    assert status == 400, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert message in error["message"] and error["param"] == param


def test_limits_answer_with_the_numbers(server):
    base, _, _ = server
    image = {"type": "image_url", "image_url": {"url": data_url()}}
    three = {"messages": [{"role": "user", "content": [image] * 3 + [{"type": "text", "text": "x"}]}]}
    status, answer = post_json(base, "/v1/chat/completions", three)
    assert status == 400 and "3 images, more than this server's limit of 2" in answer["error"]["message"]
    status, answer = post_raw(base, "/v1/chat/completions", b"x" * 2_000_001)
    assert status == 413 and "2000000 bytes" in answer["error"]["message"]
    big = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 600}
    status, answer = post_json(base, "/v1/chat/completions", big)
    assert status == 400 and answer["error"]["code"] == "context_length_exceeded"
    assert "600" in answer["error"]["message"] and "512" in answer["error"]["message"]
    from PIL import Image

    huge = "data:image/png;base64,"
    import base64
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (1000, 600)).save(buffer, format="PNG")
    huge += base64.b64encode(buffer.getvalue()).decode()
    status, answer = post_json(base, "/v1/chat/completions", {"messages": image_message("x", huge)})
    assert status == 400 and "600000 pixels, above the limit of 500000" in answer["error"]["message"]
    status, answer = post_json(base, "/generate", {"inputs": "hi", "parameters": {"temperature": 0}})
    assert status == 422 and answer["error_type"] == "validation" and "temperature" in answer["error"]


def test_local_files_only_inside_the_allowed_folder(server):
    base, _, media = server
    url = (media / "shapes.png").as_uri()
    status, answer = post_json(base, "/v1/chat/completions", {"messages": image_message(QUESTION, url)})
    assert status == 200 and answer["choices"][0]["message"]["content"] == "green"
    escape = (media / ".." / media.name / ".." / "elsewhere.png").as_uri()
    status, answer = post_json(base, "/v1/chat/completions", {"messages": image_message(QUESTION, escape)})
    assert status == 400 and "must point inside" in answer["error"]["message"]


def test_remote_images_guarded_by_default_and_every_failure_reads_the_same(builtin, caplog):
    """The issue's attack, through the server: with --allow-remote-images alone, an internal service on
    127.0.0.1 is out of reach in every spelling (it sees no request); with the override it is reached. A
    refused address, a closed port, a timeout and a page that is not an image all get the same answer, with
    the field that named the URL; the log and /metrics tell them apart."""
    from idefics2.server.process import free_port
    from server_utils import TargetServer, answer

    def drip(handler):
        handler.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 99\r\n\r\n")
        for _ in range(30):
            handler.wfile.write(b"x")
            handler.wfile.flush()
            time.sleep(0.1)

    routes = {"/shapes.png": answer(EXAMPLE.read_bytes()), "/page.html": answer(b"<html>", "text/html"),
              "/drip.png": drip}  # fmt: skip
    guarded = ServerSettings(allow_remote_images=True, media_fetch_timeout_s=0.5)
    unguarded = ServerSettings(
        allow_remote_images=True, allow_private_media_hosts=True, media_fetch_timeout_s=0.5
    )
    ask = lambda base, url: post_json(
        base, "/v1/chat/completions", {"messages": image_message(QUESTION, url)}
    )
    param = "messages[0].content[0].image_url"
    unusable = {"message": "the image URL could not be used", "type": "invalid_request_error", "param": param,
                "code": "image_url_unusable"}  # fmt: skip
    with TargetServer(routes) as internal:
        port = internal.port
        with serving(create_app(Engine(builtin.model, builtin.processor, max_batch=2), guarded)) as base:
            for host in ("127.0.0.1", "localhost", "2130706433", "0x7f.1", "[::1]", "[::ffff:127.0.0.1]"):
                assert ask(base, f"http://{host}:{port}/shapes.png") == (400, {"error": unusable}), host
            prompt = TGI_PROMPT.format(url=f"http://127.0.0.1:{port}/shapes.png")
            status, reply = post_json(base, "/generate", {"inputs": prompt})
            assert (status, reply) == (422, {"error": unusable["message"], "error_type": "validation"})
            _, metrics = get(base, "/metrics")
            assert 'idefics2_remote_image_failures_total{reason="forbidden_address"} 7.0' in metrics
            assert 'idefics2_request_failures_total{reason="image_url_unusable"} 7.0' in metrics
        assert internal.requests == []
        assert any("forbidden_address" in r.message and "loopback" in r.message for r in caplog.records)
        with serving(create_app(Engine(builtin.model, builtin.processor, max_batch=2), unguarded)) as base:
            status, reply = ask(base, f"http://127.0.0.1:{port}/shapes.png")
            assert status == 200 and reply["choices"][0]["message"]["content"] == "green"
            for url in (f"http://127.0.0.1:{free_port()}/x.png", f"http://127.0.0.1:{port}/page.html",
                        f"http://127.0.0.1:{port}/drip.png"):  # fmt: skip
                assert ask(base, url) == (400, {"error": unusable}), url
            _, metrics = get(base, "/metrics")
            for reason in ("connect_failed", "not_an_image", "timeout"):
                assert f'idefics2_remote_image_failures_total{{reason="{reason}"}} 1.0' in metrics
            assert 'idefics2_remote_image_failures_total{reason="forbidden_address"} 0.0' in metrics
        assert [path for path, _ in internal.requests] == ["/shapes.png", "/page.html", "/drip.png"]


def _call(base: str, method: str, path: str, headers: dict, body: bytes | None = None):
    """(status, lower-cased response headers) of one raw request."""
    url = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    response.read()
    connection.close()
    return response.status, {name.lower(): value for name, value in response.getheaders()}


def test_bodies_must_be_json_so_a_web_page_cannot_post_a_form(server):
    base, engine, _ = server
    chat = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()
    tgi = json.dumps({"inputs": "hi", "parameters": {"max_new_tokens": 1}}).encode()
    steps = engine.steps
    for path, body in (
        ("/v1/chat/completions", chat),
        ("/generate", tgi),
        ("/generate_stream", tgi),
        ("/", tgi),
    ):
        for kind in (
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            None,
        ):
            status, answer = post_raw(base, path, body, {"Content-Type": kind})
            assert status == 415, (path, kind)
            message = answer["error"] if path != "/v1/chat/completions" else answer["error"]["message"]
            assert "Content-Type: application/json" in message
    assert engine.steps == steps  # none of them reached the engine
    status, _ = post_raw(
        base, "/v1/chat/completions", chat, {"Content-Type": "Application/JSON; charset=utf-8"}
    )
    assert status == 200


def test_cors_is_off_unless_origins_are_given(server, builtin):
    base, _, _ = server
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}  # fmt: skip
    status, headers = _call(base, "OPTIONS", "/v1/chat/completions", preflight)
    assert status == 405 and "access-control-allow-origin" not in headers
    status, headers = _call(base, "GET", "/v1/models", {"Origin": "https://evil.example"})
    assert status == 200 and "access-control-allow-origin" not in headers
    settings = ServerSettings(api_key="k", cors_allow_origins=("https://app.example",))
    with serving(create_app(Engine(builtin.model, builtin.processor, max_batch=2), settings)) as base:
        allowed = {**preflight, "Origin": "https://app.example", "Access-Control-Request-Headers":
                   "authorization, content-type"}  # fmt: skip
        status, headers = _call(base, "OPTIONS", "/v1/chat/completions", allowed)  # no key on a preflight
        assert status == 200 and headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in headers["access-control-allow-headers"].lower()
        status, headers = _call(base, "OPTIONS", "/v1/chat/completions", preflight)
        assert status == 400 and "access-control-allow-origin" not in headers
        status, headers = _call(base, "GET", "/v1/models", {"Origin": "https://app.example"})
        assert status == 401 and headers["access-control-allow-origin"] == "https://app.example"
        auth = {"Origin": "https://app.example", "Authorization": "Bearer k"}
        assert _call(base, "GET", "/v1/models", auth)[0] == 200


def test_api_key_on_every_route_but_health_and_the_page(builtin):
    engine = Engine(builtin.model, builtin.processor, max_batch=2)
    with serving(create_app(engine, ServerSettings(api_key="s3cret"))) as base:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        for path in ("/v1/chat/completions", "/generate", "/"):
            status, answer = post_json(base, path, body if path.startswith("/v1") else {"inputs": "hi"})
            assert status == 401, path
        for path in ("/v1/models", "/metrics", "/info"):
            assert get(base, path)[0] == 401
            assert get(base, path, {"Authorization": "Bearer wrong"})[0] == 401
            assert get(base, path, {"Authorization": "Bearer s3cret"})[0] == 200
        assert get(base, "/health")[0] == 200 and get(base, "/")[0] == 200
        status, answer = post_json(base, "/v1/chat/completions", body, {"Authorization": "Bearer s3cret"})
        assert status == 200 and answer["usage"]["completion_tokens"] >= 1


def _hang_up_after_first_bytes(base: str, path: str, body: dict, stream: bool) -> None:
    url = urllib.parse.urlsplit(base)
    sock = socket.create_connection((url.hostname, url.port))
    payload = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)  # fmt: skip
    if stream:
        received = b""
        while b"data:" not in received:  # the headers, then the first chunk
            received += sock.recv(4096)
    else:
        time.sleep(0.3)  # generating
    sock.close()


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_hangs_up_cancels_its_request(long_server, stream):
    base, engine = long_server
    body = {"messages": [{"role": "user", "content": "Talk for a long time."}], "max_tokens": 400,
            "stream": stream}  # fmt: skip
    _hang_up_after_first_bytes(base, "/v1/chat/completions", body, stream)
    deadline = time.monotonic() + 10
    while engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats()["running"] == 0  # the 400 tokens were not generated
    assert engine.steps < 400
    _, metrics = get(base, "/metrics")
    assert 'idefics2_request_failures_total{reason="client_gone"}' in metrics


def wait_for_engine(engine, running: int, waiting: int, seconds: float = 120) -> None:
    """Until the engine holds `running` requests in its rows and `waiting` in its queue (a state, not a
    time: under load the requests arrive and are admitted late)."""
    deadline = time.monotonic() + seconds
    while (stats := engine.stats())["running"] != running or stats["waiting"] != waiting:
        assert time.monotonic() < deadline, f"the engine never held {running} + {waiting}: {stats}"
        time.sleep(0.005)


def test_a_full_queue_answers_429_at_once_and_others_are_undisturbed(long_server):
    base, engine = long_server
    # 300 tokens each, whatever the random model draws (an early end would free a row and the queue place)
    long = {"messages": [{"role": "user", "content": "Long."}], "max_tokens": 300, "ignore_eos": True}
    results = {}

    def ask(i):  # two waves of 300 tokens: minutes on a loaded machine
        results[i] = post_json(base, "/v1/chat/completions", long, timeout=600)

    wait_for_engine(engine, running=0, waiting=0)  # nothing left over from the tests before
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]  # 2 rows + 1 queue place
    for thread in threads:
        thread.start()
    wait_for_engine(engine, running=2, waiting=1)  # the rows and the queue are full
    start = time.monotonic()
    status, answer = post_json(base, "/v1/chat/completions", long)
    assert status == 429 and answer["error"]["type"] == "server_overloaded"
    assert time.monotonic() - start < 5.0  # at once: not after the 300 tokens of the requests before it
    assert results == {}  # none of them was answered before it
    status, answer = post_raw(base, "/v1/chat/completions", b"{broken")  # a bad request meanwhile
    assert status == 400
    for thread in threads:
        thread.join()
    assert [status for status, _ in results.values()] == [200] * 3, results


def _samples(text: str) -> dict[str, float]:
    """Prometheus text -> {series with its labels: value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        sample.name + str(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_move_with_each_request(server):
    """One request answered moves each latency histogram by one observation, the generated and prompt
    token counters by the request's own counts and the route's answer counter by one."""
    base, _, _ = server
    status, before = get(base, "/metrics")
    assert status == 200
    status, answer = post_json(base, "/v1/chat/completions", {"messages": image_message("Describe it."),
                                                               "max_tokens": 4})  # fmt: skip
    assert status == 200
    usage = answer["usage"]
    assert usage["completion_tokens"] >= 2  # the time per output token needs two tokens
    after = _samples(get(base, "/metrics")[1])
    before = _samples(before)
    moved = lambda name: after.get(name, 0.0) - before.get(name, 0.0)  # noqa: E731
    for histogram in ("idefics2_request_duration_seconds", "idefics2_time_to_first_token_seconds",
                      "idefics2_time_per_output_token_seconds"):  # fmt: skip
        assert moved(f"{histogram}_count[]") == 1, histogram
        assert moved(f"{histogram}_sum[]") > 0, histogram
    assert moved("idefics2_generated_tokens_total[]") == usage["completion_tokens"]
    assert moved("idefics2_prompt_tokens_total[]") == usage["prompt_tokens"]
    route = "idefics2_requests_total[('route', '/v1/chat/completions'), ('status', '200')]"
    assert moved(route) == 1
    assert {"idefics2_queue_size[]", "idefics2_batch_size[]", "idefics2_engine_dead[]"} <= set(after)


def test_health_and_chat_page(server):
    base, _, _ = server
    assert get(base, "/health") == (200, '{"status":"ok"}')
    status, page = get(base, "/")
    assert (
        status == 200 and "<title>idefics2 chat</title>" in page and "http" not in page.split("<script>")[0]
    )


def test_streamed_http_connection_reads_sse_chunks_in_openai_format(server):
    base, _, _ = server
    url = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    body = {"messages": image_message(QUESTION), "stream": True, "max_tokens": 8}
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    events = [line for line in response.read().decode().split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}


COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
COLOR_SCHEMA = {"type": "object", "properties": {"color": {"enum": COLORS}}, "required": ["color"],
                "additionalProperties": False}  # fmt: skip


def test_structured_output_on_both_apis(server):
    from openai import OpenAI

    base, _, _ = server
    client = OpenAI(base_url=base + "/v1", api_key="unused")
    question = "Answer in JSON. What color is the circle?"
    reply = client.chat.completions.create(
        model="builtin", messages=image_message(question), max_tokens=32,
        response_format={"type": "json_schema", "json_schema": {"name": "shape", "schema": COLOR_SCHEMA,
                                                                "strict": True}},
    )  # fmt: skip
    assert json.loads(reply.choices[0].message.content) == {"color": "green"}
    reply = client.chat.completions.create(model="builtin", messages=image_message(question), max_tokens=32,
                                           response_format={"type": "json_object"})  # fmt: skip
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    bad = {"messages": image_message(question), "response_format": {"type": "json_schema",
           "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}}  # fmt: skip
    status, answer = post_json(base, "/v1/chat/completions", bad)
    assert status == 400 and "invalid" in answer["error"]["message"]
    prompt = TGI_PROMPT.format(url=data_url()).replace(QUESTION, question)
    grammar = {"type": "json", "value": COLOR_SCHEMA}
    status, answer = post_json(
        base, "/generate", {"inputs": prompt, "parameters": {"grammar": grammar, "max_new_tokens": 32}}
    )
    assert status == 200 and json.loads(answer["generated_text"]) == {"color": "green"}
    regex = {"type": "regex", "value": "(red|green|blue)"}
    status, answer = post_json(base, "/generate", {"inputs": prompt, "parameters": {"grammar": regex}})
    assert status == 200 and answer["generated_text"] in ("red", "green", "blue")
    status, answer = post_json(
        base, "/generate", {"inputs": prompt, "parameters": {"grammar": {"type": "x"}}}
    )
    assert status == 422 and "grammar" in answer["error"]


def test_a_burst_of_requests_is_prepared_a_few_at_a_time(builtin):
    """Preparing a request (tokenizing, decoding and resizing its images) is CPU work: 12 requests sent
    together are prepared at most as many at once as there are cores (at least 2), and all are answered."""
    import os

    engine = Engine(builtin.model, builtin.processor, max_batch=4)
    slots = max(2, os.cpu_count() or 2)
    busy, most, lock = 0, 0, threading.Lock()
    submit = engine.submit

    def slow_submit(*args, **kwargs):
        nonlocal busy, most
        with lock:
            busy += 1
            most = max(most, busy)
        time.sleep(0.2)
        with lock:
            busy -= 1
        return submit(*args, **kwargs)

    engine.submit = slow_submit
    body = {"messages": image_message("What color is the circle?"), "max_tokens": 2}
    with serving(create_app(engine, ServerSettings())) as base:
        answers = [None] * 12

        def ask(i):
            answers[i] = post_json(base, "/v1/chat/completions", body)[0]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert answers == [200] * 12
    assert 2 <= most <= slots


def test_a_dead_engine_is_seen_on_health_metrics_and_every_route(builtin, monkeypatch):
    engine = Engine(builtin.model, builtin.processor, max_batch=2)

    def admit():
        raise RuntimeError("admission fault")

    with serving(create_app(engine, ServerSettings())) as base:
        assert get(base, "/health") == (200, '{"status":"ok"}')
        assert "idefics2_engine_dead 0.0" in get(base, "/metrics")[1]
        monkeypatch.setattr(engine.scheduler, "admit", admit)
        status, answer = post_json(base, "/v1/chat/completions", {"messages": image_message(QUESTION)})
        assert status == 503 and answer["error"]["code"] == "engine_dead"
        status, body = get(base, "/health")
        assert status == 503
        assert json.loads(body) == {"status": "dead", "reason": "RuntimeError: admission fault"}
        assert "idefics2_engine_dead 1.0" in get(base, "/metrics")[1]
        status, answer = post_json(base, "/generate", {"inputs": "hi"})  # refused at submit
        assert status == 503 and "engine is dead" in answer["error"]


def test_health_answers_within_100_ms_under_32_requests_with_large_images(builtin, tmp_path):
    """/health and /metrics never wait for the engine or for request preparation: while 32 requests with a
    large image each (a 1600x1200 JPEG, 1.9 MB of base64 JSON) are read, parsed, prepared and answered,
    every probe is answered within 100 ms. Clients and probes run in another process, over real sockets."""
    import base64
    import io
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (1200, 1600, 3), dtype=np.uint8)  # does not compress
    Image.fromarray(noise).save(buffer, format="JPEG", quality=85)
    url = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"messages": image_message("What is it?", url), "max_tokens": 2}))
    engine = Engine(builtin.model, builtin.processor, max_batch=8)
    settings = ServerSettings(max_body_bytes=4 * 2**20, max_image_pixels=2_000_000)
    with serving(create_app(engine, settings)) as base:
        warm_up = {"messages": image_message(QUESTION), "max_tokens": 2}  # first-request imports and set-up
        assert post_json(base, "/v1/chat/completions", warm_up)[0] == 200
        run = subprocess.run([sys.executable, "-c", BURST_AND_PROBES, base, str(body)], capture_output=True,
                             text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["statuses"] == [200] * 32
    probes = result["probes"]
    slow = [round(probe, 3) for probe in probes if probe > 0.1]
    # on the shared, overloaded 2-core machine of the tests a probe may wait for the CPU itself; a probe
    # queued behind body parsing, image decoding, the engine's lock or thread start-ups waits for seconds
    assert len(probes) >= 10 and len(slow) <= len(probes) // 20 and max(probes) < 1.0, slow


# 32 threads POST the body in sys.argv[2] to the server at sys.argv[1] at once; meanwhile the main thread
# times GET /health and /metrics every 20 ms until they are answered
BURST_AND_PROBES = """
import http.client, json, sys, threading, time, urllib.parse
url, body = urllib.parse.urlsplit(sys.argv[1]), open(sys.argv[2], "rb").read()
def request(method, path, body=None):
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    connection.request(method, path, body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    response.read()
    return response.status
statuses, probes = [], []
threads = [threading.Thread(target=lambda: statuses.append(request("POST", "/v1/chat/completions", body)))
           for _ in range(32)]
for thread in threads:
    thread.start()
while any(thread.is_alive() for thread in threads):
    for path in ("/health", "/metrics"):
        start = time.perf_counter()
        assert request("GET", path) == 200
        probes.append(time.perf_counter() - start)
    time.sleep(0.02)
print(json.dumps({"statuses": statuses, "probes": probes}))
"""


def test_a_stream_sends_its_first_chunk_with_the_first_token():
    """The role chunk waits for the first token (as vLLM sends it), so a client that times the first event
    measures the time to the first token, not the time to acceptance."""
    import asyncio
    from types import SimpleNamespace

    from idefics2.server.openai import ChatRequest, _stream_chunks

    first_token = asyncio.Event()

    class Handle:
        prompt_tokens = 5

        async def __aiter__(self):
            await first_token.wait()
            yield SimpleNamespace(text="green", token_ids=[7], prompt_tokens=5, completion_tokens=1,
                                  finish_reason="stop")  # fmt: skip

        def result(self):
            return None

    async def scenario():
        chunks = _stream_chunks(Handle(), {"id": "x"}, ChatRequest([], []), SimpleNamespace(finished=print))
        first = asyncio.ensure_future(chunks.__anext__())
        await asyncio.sleep(0.2)
        assert not first.done()  # nothing before the first token
        first_token.set()
        role = await asyncio.wait_for(first, 5)
        rest = [c async for c in chunks]
        return role, rest

    role, rest = asyncio.run(scenario())
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert rest[0]["choices"][0]["delta"] == {"content": "green"}
    assert rest[1]["choices"][0]["finish_reason"] == "stop" and rest[-1] == "[DONE]"
