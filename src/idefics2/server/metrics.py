"""The server's Prometheus metrics (prometheus-client), in a registry of their own per app."""

from __future__ import annotations

import logging
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from idefics2.server.remote import REASONS
from idefics2.serving import Completion, Engine

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
# distinct unknown field names given a label of their own (clients choose them: the series must stay few);
# the others are counted under OTHER_FIELD
MAX_UNKNOWN_FIELD_NAMES = 64
OTHER_FIELD = "(other)"
log = logging.getLogger("idefics2.server")


class ServerMetrics:
    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("idefics2_queue_size", "Requests waiting for a cache row", registry=r).set_function(
            lambda: engine.stats()["waiting"]
        )
        Gauge("idefics2_batch_size", "Requests in the running batch", registry=r).set_function(
            lambda: engine.stats()["running"]
        )
        Gauge(
            "idefics2_engine_dead", "1 once the engine has died (see /health for why): restart the process",
            registry=r,
        ).set_function(lambda: engine.stats()["dead"])  # fmt: skip
        self.requests = Counter(
            "idefics2_requests", "Requests answered, by route and status", ["route", "status"], registry=r
        )
        self.failures = Counter(
            "idefics2_request_failures", "Failed requests, by reason", ["reason"], registry=r
        )
        self.duration = Histogram(
            "idefics2_request_duration_seconds",
            "Submission to last token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "idefics2_time_to_first_token_seconds", "Submission to first token", buckets=_LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            "idefics2_time_per_output_token_seconds", "Decode time per token after the first",
            buckets=_TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokens = Counter("idefics2_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("idefics2_prompt_tokens", "Prompt tokens processed", registry=r)
        self.remote_image_failures = Counter(
            "idefics2_remote_image_failures", "http(s) image URLs that could not be used, by reason",
            ["reason"], registry=r,
        )  # fmt: skip
        for reason in REASONS:  # every reason listed from the start, at 0
            self.remote_image_failures.labels(reason=reason)
        self.unknown_fields = Counter(
            "idefics2_unknown_request_fields", "Request fields this server does not know (accepted, no "
            "effect), by route and field name", ["route", "field"], registry=r,
        )  # fmt: skip
        self._seen_fields: set[tuple[str, str]] = set()
        self._seen_lock = threading.Lock()

    def unknown(self, route: str, names: list[str]) -> None:
        """Count the request fields of `route` that have no effect here; each name is logged once."""
        for name in names:
            key = (route, name[:100])
            with self._seen_lock:
                first = key not in self._seen_fields
                if first and len(self._seen_fields) < MAX_UNKNOWN_FIELD_NAMES:
                    self._seen_fields.add(key)
                elif first:
                    key = (route, OTHER_FIELD)
                    first = key not in self._seen_fields
                    self._seen_fields.add(key)
            if first:
                what = f"field {key[1]!r}" if key[1] != OTHER_FIELD else "more unknown fields"
                log.warning("%s: %s is not known to this server: accepted, with no effect (counted in "
                            "idefics2_unknown_request_fields_total)", route, what)  # fmt: skip
            self.unknown_fields.labels(route=key[0], field=key[1]).inc()

    def finished(self, completion: Completion) -> None:
        """Record a finished request (any finish reason)."""
        self.tokens.inc(completion.completion_tokens)
        self.prompt_tokens.inc(completion.prompt_tokens)
        self.duration.observe(completion.finished_at - completion.submitted_at)
        if completion.first_token_at is not None:
            self.ttft.observe(completion.first_token_at - completion.submitted_at)
            if completion.completion_tokens > 1:
                decode = completion.finished_at - completion.first_token_at
                self.tpot.observe(decode / (completion.completion_tokens - 1))
        if completion.finish_reason in ("cancelled", "error"):
            self.failures.labels(reason=completion.finish_reason).inc()
