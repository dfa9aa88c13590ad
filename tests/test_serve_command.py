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

from server_utils import free_port, get


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


def test_ray_flags_without_ray_are_one_line_and_exit_2(capsys):
    from idefics2.cli import main

    assert main(["serve", "--replicas", "2", "--gpus-per-replica", "1"]) == 2
    err = capsys.readouterr().err
    assert err == "idefics2 serve: error: --replicas, --gpus-per-replica need --ray\n"
