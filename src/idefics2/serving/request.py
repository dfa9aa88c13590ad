"""What a caller of the engine holds: a handle on one request, the events it streams, and the errors.

A `RequestHandle` is filled by the engine's thread and read by any other thread (iterate it, or call
`result()`) or by asyncio code (`async for event in handle`). Each `StreamEvent` carries the text the new
tokens add (never half a character; the texts concatenate to the final reply); the last one also carries the
finish reason and the token counts.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from idefics2.generation import ContextLengthError

FINISH_REASONS = ("stop", "length", "cancelled", "error")


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full: the request was refused at once (retry later)."""


class EngineClosedError(RuntimeError):
    """The engine no longer accepts requests (it is shutting down or closed)."""


class RequestTooLargeError(ContextLengthError):
    """The request can never fit: its prompt plus max_new_tokens exceed the model's context or the engine's
    cache slots per request (a ValueError; the numbers are attributes)."""


class RequestFailedError(RuntimeError):
    """The request failed inside the engine (the message says why); other requests are not affected."""


class EngineDeadError(RequestFailedError):
    """The engine's loop stopped on a fault outside any one request (or made no progress for its step
    timeout): every request it held ended with this error and it accepts no more. The process should be
    restarted (see the README: running under a supervisor)."""


@dataclass
class StreamEvent:
    text: str  # what the new tokens add to the reply (may be "")
    token_ids: list[int]  # the new tokens
    finish_reason: str | None = None  # None until the last event; then one of FINISH_REASONS
    prompt_tokens: int = 0
    completion_tokens: int = 0  # tokens generated so far (an end-of-sequence token included)
    logprobs: list[float] | None = None  # the new tokens' log-probabilities, when asked for


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]
    logprobs: list[float] | None = None
    stopped_by: str | None = None  # with finish_reason "stop": "eos_token" or "stop_sequence"
    error: str | None = None
    submitted_at: float = 0.0  # time.monotonic() stamps
    first_token_at: float | None = None
    finished_at: float = 0.0

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.submitted_at


_ids = itertools.count()


@dataclass
class RequestHandle:
    """One submitted request. Iterate it (blocking) or `async for` it for its events; `result()` waits for
    the whole reply; `cancel()` stops it and frees its cache at the engine's next step."""

    prompt_tokens: int
    id: int = field(default_factory=lambda: next(_ids))
    submitted_at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self._events: list[StreamEvent] = []
        self._changed = threading.Condition()
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._cancelled = threading.Event()
        self._completion: Completion | None = None
        self._failure: type[RequestFailedError] = RequestFailedError
        self.first_token_at: float | None = None

    # ---- the engine's side ----------------------------------------------------------------------------
    def publish(
        self,
        event: StreamEvent,
        completion: Completion | None = None,
        failure: type[RequestFailedError] = RequestFailedError,
    ) -> bool:
        """Add an event (the last one with its completion); with finish reason "error", `failure` is what the
        caller's side raises. False when the request had already ended (the event is dropped)."""
        with self._changed:
            if self._completion is not None:
                return False
            if self.first_token_at is None and event.token_ids:
                self.first_token_at = time.monotonic()
            self._events.append(event)
            if completion is not None:
                completion.first_token_at = self.first_token_at
                self._completion = completion
                self._failure = failure
            self._changed.notify_all()
            waiters, self._async_waiters = self._async_waiters, []
        for loop, ready in waiters:
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # that event loop is closed: nobody is waiting any more
                pass
        return True

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # ---- the caller's side ----------------------------------------------------------------------------
    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def done(self) -> bool:
        return self._completion is not None

    @property
    def completion(self) -> Completion | None:
        """The finished request, failed or not (None while it runs); `result()` raises for a failure."""
        return self._completion

    def __iter__(self) -> Iterator[StreamEvent]:
        seen = 0
        while True:
            with self._changed:
                while seen == len(self._events):
                    self._changed.wait()
                events = self._events[seen:]
            seen += len(events)
            for event in events:
                yield from self._checked(event)
            if events[-1].finish_reason is not None:
                return

    async def __aiter__(self) -> AsyncIterator[StreamEvent]:
        seen = 0
        loop = asyncio.get_running_loop()
        while True:
            ready = asyncio.Event()
            with self._changed:
                events = self._events[seen:]
                if not events:
                    self._async_waiters.append((loop, ready))
            if not events:
                await ready.wait()
                continue
            seen += len(events)
            for event in events:
                for checked in self._checked(event):
                    yield checked
            if events[-1].finish_reason is not None:
                return

    def result(self, timeout: float | None = None) -> Completion:
        """The finished request (blocks until it is); RequestFailedError if it failed."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._completion is not None, timeout):
                raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
            completion = self._completion
        if completion.finish_reason == "error":
            raise self._failure(completion.error)
        return completion

    def _checked(self, event: StreamEvent) -> Iterator[StreamEvent]:
        if event.finish_reason == "error":
            raise self._failure(self._completion.error if self._completion else "the request failed")
        yield event
