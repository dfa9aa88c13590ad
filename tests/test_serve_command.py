"""`idefics2 serve` as a process: it serves, and SIGTERM drains (no new requests, the ones in flight finish,
exit code 0)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time

from server_utils import free_port, get, post_json


def test_sigterm_drains_requests_in_flight_then_exits_0(tmp_path):
    from oracle_model import build_reference_checkpoint
    from oracle_processing import build_reference_processor

    folder = build_reference_checkpoint(tmp_path / "model")
    build_reference_processor(folder, image_seq_len=4, longest_edge=56, shortest_edge=28)
    port = free_port()
    command = [sys.executable, "-m", "idefics2.cli", "serve", "--model", str(folder), "--port", str(port),
               "--dtype", "float32", "--drain-timeout", "60", "--max-length", "512",
               "--prefill-chunk", "64", "--vision-chunk", "4096"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if get(base, "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        events: list[str] = []
        first = threading.Event()

        def stream():
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            body = {"messages": [{"role": "user", "content": "Go on and on."}], "max_tokens": 300,
                    "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
            connection.request(
                "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
            )
            response = connection.getresponse()
            buffer = ""
            while chunk := response.read1(1024):
                buffer += chunk.decode()
                *done, buffer = buffer.split("\n\n")
                events.extend(done)
                if events:
                    first.set()

        client = threading.Thread(target=stream)
        client.start()
        assert first.wait(60)
        server.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        refused = False
        try:
            refused = get(base, "/health")[0] != 200
        except OSError:
            refused = True
        client.join(timeout=120)
        assert server.wait(timeout=120) == 0, server.stderr.read()[-2000:]
    finally:
        if server.poll() is None:
            server.kill()
    assert refused  # no new requests once draining
    assert events[-1] == "data: [DONE]"
    usage = json.loads(events[-2][6:])["usage"]
    finish = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events[:-2]]
    assert finish[-1] in ("length", "stop") and (finish[-1] == "stop" or usage["completion_tokens"] == 300)


def test_a_dead_engine_answers_503_and_serve_exits_1(capsys, monkeypatch):
    """A fault that kills the engine: the request in flight gets 503 (engine_dead), and `idefics2 serve`
    shuts down on its own with exit code 1, for a supervisor to restart it."""
    from idefics2.cli import main
    from idefics2.serving.scheduler import Scheduler

    def admit(self):
        raise RuntimeError("admission fault")

    monkeypatch.setattr(Scheduler, "admit", admit)
    port, answers = free_port(), []
    base = f"http://127.0.0.1:{port}"

    def client():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if get(base, "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        answers.append(
            post_json(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        )

    thread = threading.Thread(target=client)
    thread.start()
    code = main(["serve", "--port", str(port), "--drain-timeout", "5"])  # returns when the engine dies
    thread.join(timeout=60)
    err = capsys.readouterr().err
    assert code == 1 and "the engine died (RuntimeError: admission fault)" in err, err
    status, body = answers[0]
    assert status == 503 and body["error"]["code"] == "engine_dead", body
    assert "admission fault" in body["error"]["message"]
