"""Serving: the continuous-batching engine (engine.py) that `idefics2 batch` and the HTTP server run on.

Modules, in the order data flows: request.py (what callers hold: handles, events, errors), sequence.py (one
request inside the engine), scheduler.py (admission, prefill budget, decode batch), image_cache.py (image
features by content), engine.py (the loop). The model calls, the KV cache rows and the token choice are the
decode core's (idefics2.decoding), which `generate` runs on too.
"""

from idefics2.serving.engine import Engine, EngineOptions
from idefics2.serving.request import (
    Completion,
    EngineClosedError,
    EngineDeadError,
    EngineOverloadedError,
    RequestFailedError,
    RequestHandle,
    RequestTooLargeError,
    StreamEvent,
)

__all__ = [
    "Completion",
    "Engine",
    "EngineClosedError",
    "EngineDeadError",
    "EngineOptions",
    "EngineOverloadedError",
    "RequestFailedError",
    "RequestHandle",
    "RequestTooLargeError",
    "StreamEvent",
]
