"""Requests per second through `idefics2 serve --ray --replicas N` against one `idefics2 serve`, in one run.

Each server is a process of its own serving the built-in model; --clients closed-loop clients (threads of this
process, each sending its next request when its answer is complete) ask about examples/shapes.png (each
request its own question, an image and up to --max-tokens tokens) for --seconds after a warm-up.

    python benchmarks/bench_ray.py                      # one server, then Ray with 1 and 2 replicas
    python benchmarks/bench_ray.py --replicas 1 2 4 --cpus-per-replica 0.5
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from idefics2.server.process import ServerProcess  # noqa: E402
from server_utils import data_url  # noqa: E402

QUESTIONS = ["What color is the circle?", "What shape is green?", "How many shapes are there?",
             "What is left of the square?", "Describe the image."]  # fmt: skip


def load(port: int, clients: int, seconds: float, max_tokens: int) -> dict:
    image = data_url()
    bodies = [json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": q}]}],
        "max_tokens": max_tokens}).encode() for q in QUESTIONS]  # fmt: skip
    latencies: list[float] = []
    failures = [0]
    stop = time.monotonic() + seconds

    def client(index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        i = index
        while time.monotonic() < stop:
            body = bodies[i % len(bodies)]
            i += 1
            began = time.monotonic()
            connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            if response.status == 200:
                latencies.append(time.monotonic() - began)
            else:
                failures[0] += 1
        connection.close()

    for warm_up in range(2 * len(bodies)):
        urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions", bodies[warm_up % len(bodies)],
            {"Content-Type": "application/json"}), timeout=120).read()  # fmt: skip
    began = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    return {"requests_per_s": len(latencies) / elapsed, "answered": len(latencies), "failed": failures[0],
            "latency_p50_s": statistics.median(latencies)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cpus-per-replica", default="1")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()
    setups = {"idefics2 serve": []}
    for n in args.replicas:
        setups[f"--ray --replicas {n}"] = ["--ray", "--replicas", str(n), "--cpus-per-replica",
                                           args.cpus_per_replica]  # fmt: skip
    print(f"{args.clients} closed-loop clients, {args.seconds:g} s, built-in model, {os.cpu_count()} CPUs")
    for name, extra in setups.items():
        with ServerProcess(extra, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as server:
            row = load(server.port, args.clients, args.seconds, args.max_tokens)
        latency = row["latency_p50_s"] * 1e3
        print(f"{name:>22}: {row['requests_per_s']:6.1f} requests/s, latency p50 {latency:.0f} ms, "
              f"{row['answered']} answered, {row['failed']} failed", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
