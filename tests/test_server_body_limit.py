"""A body over `idefics2 serve`'s limit gets the JSON 413 over a real socket, whatever the client: urllib
(which sends the whole body before it reads), requests, openai and curl, with Content-Length and chunked
bodies, on both of uvicorn's HTTP implementations (and the 401 of a large body sent without the key); and the
server reads only a bounded amount of a refused body.

The server's sockets get a small receive buffer so that a few MB of body are more than the kernel holds in
flight (with the default, autotuned buffers a 40 MB body was needed to lose the 413 to a connection reset).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from idefics2 import pipeline
from idefics2.server import ServerSettings, create_app
from idefics2.serving import Engine
from server_utils import post_json, serving

LIMIT = 1_000_000
ROUTE = "/v1/chat/completions"


def _implementations() -> list[str]:
    try:
        import httptools  # noqa: F401
    except ImportError:
        return ["h11"]
    return ["h11", "httptools"]


@pytest.fixture(scope="module")
def builtin():
    return pipeline()


@pytest.fixture(scope="module", params=_implementations())
def server(builtin, request):
    engine = Engine(builtin.model, builtin.processor, max_batch=2)
    settings = ServerSettings(model_name="builtin", max_body_bytes=LIMIT,
                              refused_body_discard_bytes=8_000_000, refused_body_discard_s=2.0)  # fmt: skip
    with serving(create_app(engine, settings), http=request.param, receive_buffer=32768) as base:
        yield base


@pytest.fixture(scope="module")
def big_body() -> bytes:
    # 6 MB: over the limit, more than the server's socket buffer and the client's together, and within
    # the discard budget
    return json.dumps({"messages": [{"role": "user", "content": "x" * 6_000_000}], "max_tokens": 2}).encode()


def _is_413(status: int, text: str | bytes) -> bool:
    return status == 413 and json.loads(text)["error"]["code"] == "body_too_large"


def _chunks(body: bytes, size: int = 256_000):
    for start in range(0, len(body), size):
        yield body[start : start + size]


def test_urllib_reads_the_413_with_content_length_and_chunked(server, big_body):
    headers = {"Content-Type": "application/json"}
    for body in (big_body, _chunks(big_body)):  # bytes: Content-Length; an iterable: chunked
        request = urllib.request.Request(server + ROUTE, data=body, headers=headers)
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request, timeout=30)
        assert _is_413(error.value.code, error.value.read())
    # the server goes on serving
    assert (
        post_json(server, ROUTE, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})[0] == 200
    )


def test_requests_reads_the_413_with_content_length_and_chunked(server, big_body):
    import requests

    for body in (big_body, _chunks(big_body)):
        reply = requests.post(
            server + ROUTE, data=body, headers={"Content-Type": "application/json"}, timeout=30
        )
        assert _is_413(reply.status_code, reply.content) and reply.headers["connection"] == "close"


def test_openai_client_reads_the_413(server):
    import openai

    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(openai.APIStatusError) as error:
        client.chat.completions.create(
            model="builtin", messages=[{"role": "user", "content": "x" * 6_000_000}]
        )
    assert error.value.status_code == 413 and error.value.code == "body_too_large"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize(
    "headers",
    [[], ["-H", "Expect:"], ["-H", "Transfer-Encoding: chunked"]],
    ids=["expect-100-continue", "no-expect", "chunked"],
)
def test_curl_reads_the_413(server, big_body, tmp_path, headers):
    path = tmp_path / "body.json"
    path.write_bytes(big_body)
    out = tmp_path / "answer.json"
    command = ["curl", "-sS", "-o", str(out), "-w", "%{http_code}", "-H", "Content-Type: application/json",
               *headers, "--data-binary", f"@{path}", server + ROUTE]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert _is_413(int(result.stdout), out.read_bytes())


def _raw_post(base: str, length: int) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    head = f"POST {ROUTE} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n"
    sock.sendall(head.encode())
    return sock


def test_a_refused_body_is_read_only_up_to_the_discard_budget(server):
    sock = _raw_post(server, 200_000_000)
    sent, block = 0, b"x" * 65536
    try:
        while sent < 200_000_000:
            sent += sock.send(block)
    except OSError:  # the server stopped reading and closed the connection
        pass
    finally:
        sock.close()
    # the server read the discard budget (8 MB), then closed: what was sent is that and what the two sockets'
    # buffers held
    assert 8_000_000 < sent < 8_000_000 + 2_000_000


def test_a_stalled_refused_body_is_given_up_after_the_discard_time(server):
    sock = _raw_post(server, 10_000_000)
    sock.sendall(b"x" * 1000)  # and then nothing
    start, answer = time.monotonic(), b""
    while chunk := sock.recv(65536):
        answer += chunk
    sock.close()
    assert 1.5 < time.monotonic() - start < 10  # the discard time is 2 s
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"connection: close" in head.lower()
    assert json.loads(body)["error"]["code"] == "body_too_large"


def test_urllib_reads_the_401_of_a_large_body_sent_without_the_key(builtin, big_body):
    engine = Engine(builtin.model, builtin.processor, max_batch=2)
    settings = ServerSettings(api_key="s3cret", refused_body_discard_bytes=8_000_000)
    with serving(create_app(engine, settings), receive_buffer=32768) as base:
        request = urllib.request.Request(
            base + ROUTE, data=big_body, headers={"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request, timeout=30)
        assert (
            error.value.code == 401 and json.loads(error.value.read())["error"]["code"] == "invalid_api_key"
        )
