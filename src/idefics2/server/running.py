"""What the routes share: submitting to the engine off the event loop, waiting for a request while watching
for the client hanging up, and the events of a request as server-sent events."""

from __future__ import annotations

import asyncio
import functools
import json
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.requests import Request

from idefics2.generation import default_eos_token_ids
from idefics2.server.errors import APIError, engine_error
from idefics2.server.metrics import ServerMetrics
from idefics2.serving import Engine, RequestFailedError, RequestHandle, StreamEvent


class ClientGone(Exception):
    """The client hung up before its answer was ready (its request was cancelled)."""


@dataclass
class EndTokens:
    """The tokens that end a reply (besides max tokens and stop strings): the model's own end tokens unless
    `ignore_eos`, and the request's `stop_token_ids`."""

    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)

    def controls(self, engine: Engine) -> dict[str, Any]:
        """The engine's `eos_token_id` control for them (none when the request changes nothing)."""
        if not self.ignore_eos and not self.stop_token_ids:
            return {}
        ends = [] if self.ignore_eos else default_eos_token_ids(engine.model, engine.processor)
        return {"eos_token_id": list(dict.fromkeys([*ends, *self.stop_token_ids]))}


async def read_json(request: Request) -> dict[str, Any]:
    """The request's body, a JSON object, parsed in a worker thread within the preparation slots (a body of
    large base64 images takes a while to parse: the event loop keeps answering meanwhile). 415 unless it is
    sent as application/json: a web page of another origin can post a form or text/plain without asking;
    application/json needs a CORS preflight first, which this server answers only for the origins of
    --cors-allow-origin."""
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind != "application/json":
        raise APIError(415, f"the request body must be JSON sent with Content-Type: application/json, not "
                       f"{kind or 'no Content-Type'}", code="unsupported_media_type")  # fmt: skip
    body = await request.body()
    try:
        data = await anyio.to_thread.run_sync(json.loads, body, limiter=request.app.state.preparation_slots)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(400, f"the request body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    return data


def preparation_slots() -> anyio.CapacityLimiter:
    """How many requests are prepared (tokenized, their images decoded and resized) at once: the work is
    CPU-bound, so more at once than there are cores only multiplies threads and the memory of images in flight
    (a burst of large images would otherwise be decoded all together)."""
    return anyio.CapacityLimiter(max(2, os.cpu_count() or 2))


async def submit(
    slots: anyio.CapacityLimiter, submit_fn: Callable[..., RequestHandle], *args: Any, **kwargs: Any
) -> RequestHandle:
    """Run the engine's submit (tokenizing, image loading) in a worker thread, at most `slots` at once;
    engine errors as APIError."""
    try:
        return await anyio.to_thread.run_sync(functools.partial(submit_fn, *args, **kwargs), limiter=slots)
    except APIError:
        raise
    except Exception as error:
        raise engine_error(error) from None


async def until_done(handle: RequestHandle, request: Request) -> list[StreamEvent]:
    """Every event of the request; ClientGone (after cancelling it) if the client hangs up first."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    events: list[StreamEvent] = []

    async def collect() -> None:
        async for event in handle:
            events.append(event)

    collector = asyncio.ensure_future(collect())
    try:
        done, _ = await asyncio.wait({watcher, collector}, return_when=asyncio.FIRST_COMPLETED)
        if collector not in done:
            handle.cancel()
            collector.cancel()
            raise ClientGone()
        error = collector.exception()
        if isinstance(error, RequestFailedError):
            raise engine_error(error)
        if error is not None:
            raise error
        return events
    finally:
        watcher.cancel()
        if not handle.done:
            handle.cancel()


async def sse(
    chunks: AsyncIterator[dict[str, Any] | str], handle: RequestHandle, metrics: ServerMetrics
) -> AsyncIterator[str]:
    """Server-sent events of the JSON chunks (a str chunk is sent as it is); the request is cancelled when
    the client goes away and the stream stops."""
    try:
        async for chunk in chunks:
            yield f"data: {chunk if isinstance(chunk, str) else json.dumps(chunk, ensure_ascii=False)}\n\n"
    finally:
        if not handle.done:
            handle.cancel()
            metrics.failures.labels(reason="client_gone").inc()
