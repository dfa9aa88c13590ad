"""Load and fault test of `idefics2 serve`, on loopback: N concurrent streaming clients for a while, with
faults injected meanwhile; checks that no good request fails, that every greedy answer equals the answer the
model gives the question alone, and that the server's resident memory stays flat after a warm-up (in
seconds and in answers: see WARMUP_REQUESTS).

    python scripts/load_test.py --seconds 120 --clients 32          # starts `idefics2 serve` (built-in model)

Faults, sent one after another by their own thread while the clients run: hang-ups in the middle of a
stream, malformed images, bodies over the size limit, lone-surrogate text, bad JSON. Each must get its own
4xx answer (a hang-up: nothing) and never disturb the clients.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import random
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

from idefics2.server.process import ServerProcess

MAX_BODY_MB = 4
# The server's resident memory rises while it answers its first few thousand requests (glibc's heaps reach
# their high-water mark: 296 MB to 529 MB over the first 4,560 answers, then 529-537 MB to the 16,000th, with
# 32 clients on the built-in model), however long that takes: a loaded machine answers fewer per second, so
# the warm-up is counted in answers as well as in seconds.
WARMUP_REQUESTS = 5000


@dataclass
class Report:
    completed: int = 0
    failed: list[str] = field(default_factory=list)  # good requests that did not get their answer
    wrong: list[str] = field(default_factory=list)  # answers that differ from the solo answer
    faults: dict[str, int] = field(default_factory=dict)  # fault kind -> times injected and answered right
    fault_errors: list[str] = field(default_factory=list)
    rss_mb: list[tuple[float, float]] = field(default_factory=list)  # (seconds, MB)
    warmed_at: float | None = None  # seconds: when the warm-up ended (None: it never did)
    seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


def questions(n: int, seed: int = 4242) -> list[tuple[str, str, str]]:
    """(question, PNG data URL, the model's solo greedy answer) for n one-image shapes-world questions."""
    from idefics2 import pipeline
    from idefics2.shapes import make_dataset

    chat = pipeline(dtype="float32")
    examples = [e for e in make_dataset(n, seed) if len(e.scenes) == 1][:n]
    out = []
    for example in examples:
        image = example.images()[0]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        answer = chat.chat(example.question, images=[image], max_new_tokens=16)
        out.append((example.question, url, answer))
    return out


def chat_body(question: str, url: str, stream: bool = True) -> bytes:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
    return json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": 16,
                       "stream": stream}).encode()  # fmt: skip


def stream_answer(port: int, body: bytes) -> str:
    """Stream one chat completion; its text. Raises on anything but a clean 200 stream ending in [DONE]."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        raw = response.read().decode()
        if response.status != 200:
            raise RuntimeError(f"status {response.status}: {raw[:200]}")
        events = [e[6:] for e in raw.split("\n\n") if e.startswith("data: ")]
        if events[-1] != "[DONE]":
            raise RuntimeError(f"the stream did not end with [DONE]: {events[-1][:200]}")
        chunks = [json.loads(e) for e in events[:-1]]
        errors = [c for c in chunks if "error" in c]
        if errors:
            raise RuntimeError(f"error in the stream: {errors[0]}")
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    finally:
        connection.close()


def client(port: int, items, stop: threading.Event, report: Report, seed: int) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        question, url, expected = rng.choice(items)
        try:
            text = stream_answer(port, chat_body(question, url))
        except Exception as error:  # a good request that failed
            with report.lock:
                report.failed.append(f"{question}: {error}")
            continue
        with report.lock:
            report.completed += 1
            if text != expected:
                report.wrong.append(f"{question}: got {text!r}, alone {expected!r}")


def post(port: int, body: bytes) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def hang_up(port: int, body: bytes) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
    received = b""
    while b"data:" not in received:
        chunk = sock.recv(4096)
        if not chunk:
            break
        received += chunk
    sock.close()


def faults(port: int, items, stop: threading.Event, report: Report) -> None:
    question, url, _ = items[0]
    kinds = {
        "hang-up mid-stream": lambda: hang_up(port, chat_body(question, url)),
        "malformed image": lambda: post(port, chat_body(question, "data:image/png;base64,aGVsbG8gd29ybGQ=")),
        "oversize body": lambda: post(port, b'{"messages": "' + b"x" * (MAX_BODY_MB * 2**20 + 10) + b'"}'),
        "lone surrogate": lambda: post(port, b'{"messages": [{"role": "user", "content": "\\ud800 hi"}]}'),
        "bad JSON": lambda: post(port, b'{"messages": [}'),
    }
    expected = {"malformed image": 400, "oversize body": 413, "lone surrogate": 400, "bad JSON": 400}
    while not stop.is_set():
        for kind, send in kinds.items():
            try:
                status = send()
            except Exception as error:
                report.fault_errors.append(f"{kind}: {type(error).__name__}: {error}")
                continue
            if kind in expected and status != expected[kind]:
                report.fault_errors.append(f"{kind}: status {status}, expected {expected[kind]}")
            else:
                report.faults[kind] = report.faults.get(kind, 0) + 1
            time.sleep(0.2)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def run(
    seconds: float,
    clients: int,
    warmup: float,
    port: int,
    pid: int,
    items,
    warmup_requests: int = WARMUP_REQUESTS,
) -> Report:
    """`clients` clients and the faults against the server on `port` (process `pid`), its resident memory
    sampled every second. The warm-up lasts `warmup` seconds and `warmup_requests` answers, whichever ends
    later; the run goes on `seconds - warmup` seconds after it (it gives up on a warm-up 10 minutes late)."""
    report = Report()
    stop = threading.Event()
    threads = [threading.Thread(target=client, args=(port, items, stop, report, i)) for i in range(clients)]
    threads.append(threading.Thread(target=faults, args=(port, items, stop, report)))
    start = time.monotonic()
    for thread in threads:
        thread.start()
    while (elapsed := time.monotonic() - start) < seconds + 600:
        report.rss_mb.append((elapsed, rss_mb(pid)))
        if report.warmed_at is None and elapsed >= warmup and report.completed >= warmup_requests:
            report.warmed_at = elapsed
        if report.warmed_at is not None and elapsed - report.warmed_at >= seconds - warmup:
            break
        time.sleep(1.0)
    stop.set()
    for thread in threads:
        thread.join()
    report.seconds = time.monotonic() - start
    report.rss_mb.append((report.seconds, rss_mb(pid)))
    return report


def start_server(clients: int, port: int | None = None) -> ServerProcess:
    """`idefics2 serve` (built-in model) for `clients` concurrent clients on `port` (None: a free port)."""
    flags = ["--dtype", "float32", "--max-batch", str(clients), "--max-body-mb", str(MAX_BODY_MB)]
    return ServerProcess(flags, port=port, env={"HF_HUB_OFFLINE": "1"}, timeout=120)


def summarize(report: Report) -> dict:
    warmed = report.warmed_at
    after = [mb for t, mb in report.rss_mb if warmed is not None and t >= warmed]
    base = after[0] if after else float("nan")
    return {
        "seconds": round(report.seconds, 1),
        "completed": report.completed,
        "requests_per_s": round(report.completed / report.seconds, 2),
        "failed": len(report.failed),
        "wrong": len(report.wrong),
        "faults": report.faults,
        "fault_errors": len(report.fault_errors),
        "warmup_s": None if warmed is None else round(warmed, 1),
        "rss_after_warmup_mb": round(base, 1),
        "rss_max_mb": round(max(after), 1) if after else None,
        "rss_end_mb": round(after[-1], 1) if after else None,
        "rss_growth": round(max(after) / base - 1, 4) if after else None,
        "rss_every_10s_mb": [round(mb) for t, mb in report.rss_mb][::10],
        "examples": (report.failed + report.wrong + report.fault_errors)[:5],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=60, help="seconds before memory must stay flat")
    parser.add_argument(
        "--warmup-requests", type=int, default=WARMUP_REQUESTS, help="answers before memory must stay flat"
    )
    parser.add_argument("--questions", type=int, default=24)
    parser.add_argument("--port", type=int, default=8731)
    args = parser.parse_args()
    items = questions(args.questions)
    server = start_server(args.clients, args.port)
    try:
        report = run(args.seconds, args.clients, args.warmup, server.port, server.process.pid, items,
                     args.warmup_requests)  # fmt: skip
    finally:
        code = server.stop()
    summary = {**summarize(report), "server_exit_code": code}
    print(json.dumps(summary, indent=1))
    ok = not summary["failed"] and not summary["wrong"] and not summary["fault_errors"]
    ok = ok and summary["rss_growth"] is not None and summary["rss_growth"] <= 0.10 and code == 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
