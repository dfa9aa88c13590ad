"""A real uvicorn server on a free loopback port, in a thread, for tests and benchmarks."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"


@contextlib.contextmanager
def serving(
    app, drain_s: float = 5.0, http: str = "auto", receive_buffer: int | None = None
) -> Iterator[str]:
    """Run `app` on 127.0.0.1 (a free port) while the block runs; yields the base URL. `http` picks uvicorn's
    HTTP implementation (h11, httptools); `receive_buffer` sets the sockets' SO_RCVBUF (which also stops the
    kernel from growing it), so that a test needs only a few MB of body to fill what is in flight."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=drain_s, http=http
    )
    server = uvicorn.Server(config)
    sockets = None
    if receive_buffer is not None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer
        )  # accepted sockets inherit it
        listener.bind(("127.0.0.1", 0))
        sockets = [listener]
    thread = threading.Thread(target=server.run, kwargs={"sockets": sockets}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def data_url(path: Path = EXAMPLE) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def image_message(text: str, url: str | None = None) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url or data_url()}},
                                         {"type": "text", "text": text}]}]  # fmt: skip


def post_raw(
    base: str, path: str, body: bytes, headers: dict | None = None, timeout: float = 60
) -> tuple[int, dict | str]:
    """POST bytes with http.client (no client-side checks); (status, parsed JSON or text)."""
    import http.client
    import urllib.parse

    url = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    headers = {"Content-Type": "application/json", **(headers or {})}
    headers = {name: value for name, value in headers.items() if value is not None}  # None: not sent
    connection.request("POST", path, body=body, headers=headers)
    response = connection.getresponse()
    text = response.read().decode()
    connection.close()
    try:
        return response.status, json.loads(text)
    except json.JSONDecodeError:
        return response.status, text


def post_json(
    base: str, path: str, body: dict, headers: dict | None = None, timeout: float = 60
) -> tuple[int, dict | str]:
    return post_raw(base, path, json.dumps(body).encode(), headers, timeout)


def get(base: str, path: str, headers: dict | None = None) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(base + path, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


class TargetServer:
    """An HTTP(S) server on 127.0.0.1 standing in for an image host or an internal service: `routes` maps a
    path to a function that answers on the handler; every request that reaches it is recorded (path, Host)."""

    def __init__(self, routes: dict, tls=None) -> None:
        import http.server

        requests: list[tuple[str, str]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                requests.append((self.path, self.headers.get("Host", "")))
                answer = routes.get(self.path.partition("?")[0])
                if answer is None:
                    self.send_error(404)
                    return
                try:
                    answer(self)
                except OSError:  # the client hung up
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.requests = requests
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.base = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> TargetServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def answer(body: bytes, kind: str = "image/png", status: int = 200, headers: dict | None = None):
    """A route that answers `body` with Content-Length."""

    def respond(handler) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", kind)
        handler.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(body)

    return respond


def redirect(location: str, status: int = 302):
    return answer(b"", "text/plain", status, {"Location": location})
