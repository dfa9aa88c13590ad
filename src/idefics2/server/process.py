"""`idefics2 serve` in a child process, for scripts, notebooks, benchmarks and tests that talk to a real
server over HTTP: started on a free loopback port (or the one given), waited for until GET /health answers,
stopped with SIGTERM (the server drains its requests in flight first)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the system's pick)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`idefics2 serve *args` in a child process that runs the same idefics2 as this one, on 127.0.0.1:`port`
    (None: the `--port N` in `args`, else a free port, added as --port). The constructor returns once GET
    /health answers 200, and raises RuntimeError when the port is taken already, when the server exits
    before answering, or when it does not answer within `timeout` seconds (it is killed then). `env`:
    variables set for the child on top of this process's environment; `popen_options` go to
    subprocess.Popen (stdout=, stderr=, text=...; by default the child writes to this process's streams).

        with ServerProcess(["--max-batch", "8"], stderr=subprocess.DEVNULL) as server:
            urllib.request.urlopen(server.url + "/v1/models")
    """

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 300.0,
        **popen_options: Any,
    ) -> None:
        args = list(args)
        if "--port" in args:
            if port is not None:
                raise ValueError("give the port as `port` or as --port in `args`, not both")
            port = int(args[args.index("--port") + 1])
        else:
            port = free_port() if port is None else port
            args += ["--port", str(port)]
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.command = [sys.executable, "-m", "idefics2.cli", "serve", *args]
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                raise RuntimeError(f"port {port} is taken: another server is running there")
        child_env = {**os.environ, **(env or {})}
        here = str(Path(__file__).resolve().parents[2])  # the folder this idefics2 is imported from
        child_env["PYTHONPATH"] = os.pathsep.join(p for p in (here, child_env.get("PYTHONPATH")) if p)
        self.process = subprocess.Popen(self.command, env=child_env, **popen_options)
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"idefics2 serve exited with code {self.process.returncode} before it answered"
                )
            if time.monotonic() > deadline:
                self.process.kill()
                self.process.wait()
                raise RuntimeError(f"idefics2 serve did not answer GET /health within {timeout:g} s")
            time.sleep(0.2)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                return response.status == 200
        except OSError:  # not listening yet, or 503 (an HTTPError)
            return False

    def stop(self, timeout: float = 120.0) -> int:
        """SIGTERM, then the server's exit code once it has drained (0 after a clean shutdown); killed when it
        has not exited after `timeout` seconds."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
