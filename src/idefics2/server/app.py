"""The HTTP server: a FastAPI app over one engine, with OpenAI's and text-generation-inference's routes,
Prometheus metrics, a chat page, an API key, a body-size limit and a graceful drain.

    app = create_app(engine, ServerSettings(model_name="my-model", api_key="secret"))
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import contextlib
import hmac
import signal
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import anyio
import uvicorn
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from idefics2.server import openai, tgi
from idefics2.server.errors import APIError
from idefics2.server.media import MediaPolicy
from idefics2.server.metrics import ServerMetrics
from idefics2.server.remote import RemotePolicy, domain_pattern
from idefics2.server.running import ClientGone, preparation_slots
from idefics2.serving import Engine

TGI_ROUTES = ("/generate", "/generate_stream", "/info")  # errors in TGI's body here (and on POST /)
# no API key on these: the liveness probe, and the static chat page (which asks for the key)
OPEN_ROUTES = (("GET", "/health"), ("GET", "/"))


@dataclass
class ServerSettings:
    model_name: str = "idefics2"
    api_key: str | None = None
    max_images_per_request: int = 8
    max_image_pixels: int | None = None  # default: the processor's limit
    max_body_bytes: int = 32 * 2**20
    # after a 413 or 401, the rest of the refused body is read and dropped (at most this much, for at most
    # this long) before the connection is closed: closing with unread bytes would make the kernel answer
    # with a reset, which loses the answer for clients that send the whole body before they read
    refused_body_discard_bytes: int = 64 * 2**20
    refused_body_discard_s: float = 10.0
    allowed_local_media_path: Path | None = None
    allow_remote_images: bool = False
    # with remote images: the address guard's override, the allow-list, redirects, the whole fetch's deadline
    allow_private_media_hosts: bool = False
    allowed_media_domains: tuple[str, ...] | None = None  # example.com, *.example.com (remote.domain_pattern)
    media_max_redirects: int = 3
    media_fetch_timeout_s: float = 10.0
    cors_allow_origins: tuple[str, ...] = ()  # none: no CORS headers, web pages of other origins cannot call
    drain_timeout_s: float = 30.0


def create_app(engine: Engine, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    if settings.max_image_pixels is not None:
        engine.processor.image_processor.max_pixels = settings.max_image_pixels

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await run_in_threadpool(engine.close, settings.drain_timeout_s)  # requests in flight finish first

    app = FastAPI(title="idefics2", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.settings, app.state.model_name = engine, settings, settings.model_name
    app.state.metrics = ServerMetrics(engine)
    app.state.started = int(time.time())
    app.state.preparation_slots = preparation_slots()
    app.state.media_policy = MediaPolicy(settings.allowed_local_media_path, _remote_policy(settings))
    app.include_router(openai.router)
    app.include_router(tgi.router)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        app.state.metrics.failures.labels(reason=_reason(error)).inc()
        body = error.tgi_body() if _tgi(request.method, request.url.path) else error.openai_body()
        return JSONResponse(body, status_code=error.status)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, error: ClientGone) -> Response:
        app.state.metrics.failures.labels(reason="client_gone").inc()
        return Response(status_code=499)  # nobody reads it

    @app.get("/health")
    async def health() -> Response:
        if engine.dead:
            return JSONResponse({"status": "dead", "reason": engine.dead_reason}, status_code=503)
        if not engine.accepting:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(resources.files("idefics2.server").joinpath("static/chat.html").read_text())

    app.add_middleware(Guard, settings=settings, metrics=app.state.metrics)
    if settings.cors_allow_origins:  # outside the guard: a preflight carries no API key
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_allow_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return app


def _remote_policy(settings: ServerSettings) -> RemotePolicy | None:
    if not settings.allow_remote_images:
        return None
    domains = settings.allowed_media_domains
    return RemotePolicy(
        allow_private_hosts=settings.allow_private_media_hosts,
        allowed_domains=None if domains is None else tuple(map(domain_pattern, domains)),
        max_redirects=settings.media_max_redirects,
        deadline_s=settings.media_fetch_timeout_s,
    )


def _reason(error: APIError) -> str:
    if error.status == 413:
        return "body_too_large"
    if error.status == 401:
        return "unauthorized"
    return error.code or {429: "overloaded", 503: "shutting_down"}.get(error.status, f"http_{error.status}")


def _version() -> str:
    import idefics2

    return idefics2.__version__


class BodyTooLarge(APIError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than this server's limit of {limit} bytes",
                         code="body_too_large")  # fmt: skip


class Guard:
    """ASGI middleware in front of the app: the API key (compared in constant time; every route but
    OPEN_ROUTES), the body-size limit (Content-Length at once, streamed bodies as they arrive), and a count
    of answers by route and status.

    A request refused before its body is read (401, or 413 for a body over the limit) is answered with
    `Connection: close`, at once; the rest of the body is then read and dropped (up to the settings' discard
    budget) before the response ends and the connection closes, so that the client reads the answer whether
    or not it reads before it has sent everything. A client that asked `Expect: 100-continue` has sent
    nothing yet and gets the answer instead of the go-ahead."""

    def __init__(self, app, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics
        self._key = settings.api_key.encode() if settings.api_key else None

    async def __call__(self, scope: dict[str, Any], receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        headers = dict(scope["headers"])
        open_route = (scope["method"], path) in OPEN_ROUTES
        waiting_to_send = headers.get(b"expect", b"").lower() == b"100-continue"
        refusing_send = self._closing(send, None if waiting_to_send else receive)
        if self._key is not None and not open_route and not self._authorized(headers):
            error = APIError(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                             code="invalid_api_key")  # fmt: skip
            await self._refuse(error, scope, refusing_send)
            return
        limit = self.settings.max_body_bytes
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            await self._refuse(BodyTooLarge(limit), scope, refusing_send)
            return
        received, refused_send = 0, None

        async def limited_receive():
            nonlocal received, refused_send
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    rest = receive if message.get("more_body", False) else None
                    refused_send = self._closing(send, rest)
                    raise BodyTooLarge(limit)
            return message

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route=_route(path), status=str(message["status"])).inc()
            await (refused_send or send)(message)

        await self.app(scope, limited_receive, counting_send)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)

    async def _refuse(self, error: APIError, scope: dict[str, Any], send) -> None:
        path = scope["path"]
        self.metrics.failures.labels(reason=_reason(error)).inc()
        self.metrics.requests.labels(route=_route(path), status=str(error.status)).inc()
        body = error.tgi_body() if _tgi(scope["method"], path) else error.openai_body()
        await JSONResponse(body, status_code=error.status)(scope, None, send)

    def _closing(self, send, receive):
        """`send` for the answer to a refused request: with `Connection: close`, and, when `receive` is given,
        the rest of the request body read and dropped (within the discard budget) after the answer is
        written and before it ends (the server closes the connection once it has ended)."""

        async def closing_send(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            elif message["type"] == "http.response.body" and not message.get("more_body") and receive:
                await send({**message, "more_body": True})
                await self._discard(receive)
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        return closing_send

    async def _discard(self, receive) -> None:
        budget = self.settings.refused_body_discard_bytes
        with anyio.move_on_after(self.settings.refused_body_discard_s):
            while budget > 0:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client hung up
                budget -= len(message.get("body", b""))
                if not message.get("more_body", False):
                    return


_KNOWN_ROUTES = ("/v1/chat/completions", "/v1/models", *TGI_ROUTES, "/health", "/metrics", "/")


def _tgi(method: str, path: str) -> bool:
    return path in TGI_ROUTES or (method == "POST" and path == "/")


def _route(path: str) -> str:
    return path if path in _KNOWN_ROUTES else "other"


def run_server(app: FastAPI, host: str, port: int, drain_timeout_s: float) -> bool:
    """Serve until SIGTERM or SIGINT, then drain: no new connections, requests in flight finish (for at most
    `drain_timeout_s`), and return True (exit code 0 for the caller). When the engine dies, its requests
    have been answered with errors: the server shuts down the same way and returns False (the caller exits
    non-zero, for a supervisor to restart the process)."""
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=drain_timeout_s,
                            log_level="warning")  # fmt: skip
    _DrainingServer(config, app.state.engine).run()
    return not app.state.engine.dead


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, without raising the signal again after its graceful shutdown (so the process can
    exit 0), and shutting down on its own once the engine has died. A second signal stops at once."""

    def __init__(self, config: uvicorn.Config, engine: Engine) -> None:
        super().__init__(config)
        self.engine = engine

    async def on_tick(self, counter: int) -> bool:  # every 0.1 s
        return self.engine.dead or await super().on_tick(counter)

    @contextlib.contextmanager
    def capture_signals(self):
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
