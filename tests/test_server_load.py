"""Load and fault test of `idefics2 serve` (scripts/load_test.py): 32 concurrent streaming clients with the
built-in model on loopback, faults injected meanwhile (hang-ups mid-stream, malformed images, oversize
bodies, lone surrogates, bad JSON). No good request fails, every greedy answer equals the model's answer to
that question alone, resident memory stays within 10% after the warm-up (the first half, at most 60 s, and
at least the first 5,000 answers, however long they take on a loaded machine: the allocator's arenas fill
at first, then the resident set stays flat), SIGTERM exits 0.

IDEFICS2_LOAD_SECONDS sets the duration (default 120, the issue's 2 minutes)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "load_test.py"


def load_test_module():
    spec = importlib.util.spec_from_file_location("load_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_32_streaming_clients_with_faults():
    load = load_test_module()
    seconds = float(os.environ.get("IDEFICS2_LOAD_SECONDS", "120"))
    items = load.questions(24)
    server = load.start_server(clients=32)
    try:
        report = load.run(seconds, clients=32, warmup=min(60.0, seconds / 2), port=server.port,
                          pid=server.process.pid, items=items)  # fmt: skip
    finally:
        code = server.stop()  # SIGTERM
    summary = load.summarize(report)
    print(summary)
    assert code == 0
    assert summary["failed"] == 0 and summary["wrong"] == 0, summary["examples"]
    assert summary["completed"] >= 32
    assert summary["fault_errors"] == 0, summary["examples"]
    kinds = {"hang-up mid-stream", "malformed image", "oversize body", "lone surrogate", "bad JSON"}
    assert set(summary["faults"]) == kinds
    assert summary["rss_growth"] is not None and summary["rss_growth"] <= 0.10, summary
