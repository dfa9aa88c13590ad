"""`idefics2 serve` as a process: it serves, and SIGTERM drains (no new requests, the ones in flight finish,
exit code 0)."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import threading
import time

import pytest

from idefics2.server.process import ServerProcess, free_port
from server_utils import get, post_json


def test_sigterm_drains_requests_in_flight_then_exits_0(tmp_path):
    from oracle_model import build_reference_checkpoint
    from oracle_processing import build_reference_processor

    folder = build_reference_checkpoint(tmp_path / "model")
    build_reference_processor(folder, image_seq_len=4, longest_edge=56, shortest_edge=28)
    flags = ["--model", str(folder), "--dtype", "float32", "--drain-timeout", "60", "--max-length", "512",
             "--prefill-chunk", "64", "--vision-chunk", "4096"]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    serving = ServerProcess(flags, env=env, timeout=120, stderr=subprocess.PIPE, text=True)
    server, port, base = serving.process, serving.port, serving.url
    try:
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


def test_a_server_process_that_cannot_serve_says_why():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"port {port} is taken"):
            ServerProcess(port=port)
    with pytest.raises(RuntimeError, match="exited with code 2 before it answered"):
        ServerProcess(["--max-batch", "0"], stderr=subprocess.DEVNULL)


SERVE_MISTAKES = [
    (["--allow-private-media-hosts"], "--allow-private-media-hosts applies to remote images"),
    (["--allowed-media-domains", "example.com"], "--allowed-media-domains applies to remote images"),
    (["--media-max-redirects", "1"], "--media-max-redirects applies to remote images"),
    (["--allow-remote-images", "--allowed-media-domains", "http://example.com"], "expected a host name"),
    (["--allow-remote-images", "--allowed-media-domains", "a.*.com"], "expected a host name"),
    (["--allow-remote-images", "--media-max-redirects", "-1"], "expected a non-negative integer"),
    (["--allow-remote-images", "--media-fetch-timeout", "0"], "expected a number in (0, 3600]"),
    (["--cors-allow-origin", "app.example.com"], "expected an origin like https://app.example.com"),
    (["--cors-allow-origin", "https://app.example.com/page"], "expected an origin"),
]


def test_serve_flag_mistakes_are_one_line_and_exit_2(capsys):
    from idefics2.cli import main

    for argv, problem in SERVE_MISTAKES:
        try:
            code = main(["serve", *argv])
        except SystemExit as exit_:  # argparse
            code = exit_.code
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("idefics2 serve: error:"), (argv, err)
        assert problem in err, (argv, err)


def test_serve_flags_reach_the_server_settings(monkeypatch):
    """The security flags as the app receives them (the model is the built-in one, nothing is served)."""
    import idefics2.server
    from idefics2.cli import main

    seen = {}

    def create_app(engine, settings):
        seen["settings"] = settings
        return None

    monkeypatch.setattr(idefics2.server, "create_app", create_app)
    monkeypatch.setattr(idefics2.server, "run_server", lambda *args: True)  # served, the engine alive
    monkeypatch.setattr("idefics2.cli.serve.limit_malloc_arenas", lambda: True)  # not in the test process
    assert main(["serve", "--allow-remote-images", "--allowed-media-domains", "Images.Example.com.",
                 "*.cdn.example.net", "--media-max-redirects", "0", "--media-fetch-timeout", "2.5",
                 "--cors-allow-origin", "https://App.example", "http://localhost:3000/"]) == 0  # fmt: skip
    settings = seen["settings"]
    assert settings.allow_remote_images and not settings.allow_private_media_hosts
    assert settings.allowed_media_domains == ("images.example.com", "*.cdn.example.net")
    assert (settings.media_max_redirects, settings.media_fetch_timeout_s) == (0, 2.5)
    assert settings.cors_allow_origins == ("https://app.example", "http://localhost:3000")
    main(["serve"])
    defaults = seen["settings"]
    assert not defaults.allow_remote_images and defaults.cors_allow_origins == ()
    assert (defaults.media_max_redirects, defaults.media_fetch_timeout_s) == (3, 10.0)


def test_ray_flags_without_ray_are_one_line_and_exit_2(capsys):
    from idefics2.cli import main

    assert main(["serve", "--replicas", "2", "--gpus-per-replica", "1"]) == 2
    err = capsys.readouterr().err
    assert err == "idefics2 serve: error: --replicas, --gpus-per-replica need --ray\n"


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
