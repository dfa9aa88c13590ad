"""Serving throughput and latency: the continuous-batching engine against one request at a time and against
static batching, on the same requests (the HTTP clients in a second process).

N chat requests (each with an image of its own unless --images says how many there are; small ones unless
--image-size says; no image splitting unless --split; prompts mixed; max_new_tokens fixed or mixed) arrive
all at once or as a Poisson process at --rate requests/s. Three ways to serve them:

  engine       idefics2.serving.Engine, --max-batch rows decoded together, requests joining and leaving
  http         (--http) the same engine behind `idefics2 serve`'s app, each request a streaming HTTP client
  one at a time  `generate` on each request alone, in arrival order
  static       `generate` on fixed batches of --max-batch requests (left-padded), each batch until its
               longest row ends, the next batch when the previous one is done and its requests have arrived

Reported as vLLM's serving benchmark does: time to first token (TTFT, from arrival), time per output token
(TPOT, a request's decode time over its tokens after the first), inter-token latency (ITL, every gap
between two tokens) at p50/p90/p99, request throughput and output-token throughput.

    python benchmarks/bench_serving.py                          # CPU, "mid" config, 16 requests at once
    python benchmarks/bench_serving.py --rate 2 --requests 32   # Poisson arrivals
    python benchmarks/bench_serving.py --http --modes engine    # engine against HTTP
    python benchmarks/bench_serving.py --device cuda --config 8b --requests 32 --max-batch 32 --split
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench import CONFIGS  # noqa: E402
from bench_generation import built_in, photo_like, sync  # noqa: E402

QUESTIONS = [
    "Describe this image.",
    "What colours do you see here?",
    "Is there anything unusual in this picture? Answer in one sentence.",
    "Write a short caption.",
    "What is in the top left corner of the image, and what is in the bottom right corner?",
]


@dataclass
class Request:
    arrival: float  # seconds after the start
    question: str
    image: object
    max_new_tokens: int
    token_times: list[float] = field(default_factory=list)  # seconds after the start


def make_requests(
    n: int,
    rate: float | None,
    new_tokens: int,
    mixed: bool,
    images: int | None = None,
    size: tuple[int, int] | None = None,
    seed: int = 0,
) -> list[Request]:
    """n requests; request i shows image i % `images` (default: each its own, so that the engine's image
    cache does not help), of `size` (height, width) or of one of a few small sizes."""
    rng = random.Random(seed)
    sizes = [size or (rng.choice([200, 240, 300]), rng.choice([220, 260, 320])) for _ in range(images or n)]
    pictures = [photo_like(*hw, seed=i) for i, hw in enumerate(sizes)]
    arrival, requests = 0.0, []
    for i in range(n):
        if rate:
            arrival += rng.expovariate(rate)
        length = rng.randint(new_tokens // 3, new_tokens * 5 // 3) if mixed else new_tokens
        requests.append(Request(arrival, QUESTIONS[i % len(QUESTIONS)], pictures[i % len(pictures)], length))
    return requests


def build(config: dict, dtype: torch.dtype, device: torch.device, split: bool, folder: Path):
    from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Processor
    from oracle_processing import build_reference_processor

    torch.manual_seed(0)
    with built_in(dtype, device):
        model = Idefics2ForConditionalGeneration(Idefics2Config.from_dict(copy.deepcopy(config)))
    model.generation_config = {"eos_token_id": [2], "pad_token_id": 0}
    build_reference_processor(folder, image_seq_len=64, do_image_splitting=split)
    return model.eval(), Idefics2Processor.from_pretrained(folder)


def messages(request: Request) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": request.question}]}]


def wait_until(start: float, moment: float) -> None:
    delay = start + moment - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def serve_engine(model, processor, requests: list[Request], max_batch: int, device, **budgets) -> float:
    from idefics2.serving import Engine

    with Engine(model, processor, max_batch=max_batch, max_queue=len(requests), **budgets) as engine:
        engine.submit(messages(requests[0]), [requests[0].image], max_new_tokens=2).result()  # warm-up
        start = time.perf_counter()

        def consume(request, handle):
            for event in handle:
                if event.token_ids:
                    request.token_times.append(time.perf_counter() - start)

        threads = []
        for request in requests:
            wait_until(start, request.arrival)
            handle = engine.submit(messages(request), [request.image], max_new_tokens=request.max_new_tokens,
                                   min_new_tokens=request.max_new_tokens)  # fmt: skip
            threads.append(threading.Thread(target=consume, args=(request, handle)))
            threads[-1].start()
        for thread in threads:
            thread.join()
        return time.perf_counter() - start


def serve_http(model, processor, requests: list[Request], max_batch: int, device, **budgets) -> float:
    """The engine behind `idefics2 serve`'s app (uvicorn, loopback), each request a streaming client (OpenAI's
    API, the image as a PNG data URL encoded beforehand). The clients run in a process of their own, as they
    would on other machines, so that what is measured is the server's cost and not the clients' parsing
    competing with the server for the interpreter."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from idefics2.server import ServerSettings, create_app
    from idefics2.serving import Engine
    from server_utils import serving

    bodies = http_bodies(requests)
    engine = Engine(model, processor, max_batch=max_batch, max_queue=len(requests), **budgets)
    app = create_app(engine, ServerSettings(max_body_bytes=64 * 2**20))
    # every row runs to max_new_tokens, as in the other modes
    engine.submit = _forcing_min_new_tokens(engine.submit)
    spawn = multiprocessing.get_context("spawn")
    with engine, serving(app) as base, ProcessPoolExecutor(1, spawn) as clients:
        port = int(base.rsplit(":", 1)[1])
        arrivals = [r.arrival for r in requests]
        seconds, token_times, _ = clients.submit(http_clients, port, bodies, arrivals).result()
    for request, times in zip(requests, token_times, strict=True):
        request.token_times = times
    return seconds


def http_bodies(requests: list[Request]) -> list[bytes]:
    """Each request as a streamed OpenAI chat request (its image a PNG data URL), with usage at the end."""
    import base64
    import io

    bodies = []
    for request in requests:
        buffer = io.BytesIO()
        request.image.save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        content = [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": request.question},
        ]
        bodies.append(json.dumps({"messages": [{"role": "user", "content": content}], "stream": True,
                                  "stream_options": {"include_usage": True},
                                  "max_tokens": request.max_new_tokens}).encode())  # fmt: skip
    return bodies


def http_clients(
    port: int, bodies: list[bytes], arrivals: list[float]
) -> tuple[float, list[list[float]], list[int]]:
    """One streaming client thread per body, started at its arrival (after one warm-up request); the seconds
    they took together, the moments (seconds after the start) when each one received a token, and each
    one's completion tokens (from the usage the server sends at the end)."""
    import http.client

    def stream(body: bytes, times: list[float], tokens: list[int]) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        buffer = b""
        while chunk := response.read1(65536):
            buffer += chunk
            *events, buffer = buffer.split(b"\n\n")
            now = time.perf_counter() - start
            for event in events:
                data = event.decode().removeprefix("data: ")
                if data != "[DONE]":
                    parsed = json.loads(data)
                    choices = parsed["choices"]
                    if choices and choices[0]["delta"].get("content"):
                        times.append(now)
                    if parsed.get("usage"):
                        tokens.append(parsed["usage"]["completion_tokens"])
        connection.close()

    start = time.perf_counter()
    stream(bodies[0], [], [])  # warm-up
    token_times: list[list[float]] = [[] for _ in bodies]
    tokens: list[list[int]] = [[] for _ in bodies]
    start = time.perf_counter()
    threads = []
    for body, arrival, times, count in zip(bodies, arrivals, token_times, tokens, strict=True):
        wait_until(start, arrival)
        threads.append(threading.Thread(target=stream, args=(body, times, count)))
        threads[-1].start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, token_times, [sum(count) for count in tokens]


def _forcing_min_new_tokens(submit):
    def forced(*args, **controls):
        return submit(*args, min_new_tokens=controls.get("max_new_tokens", 1), **controls)

    return forced


def _inputs(processor, batch: list[Request], device):
    from idefics2.processing.chat import chat_prompt

    prompts = [chat_prompt(processor, messages(r), [r.image])[0] for r in batch]
    processor.tokenizer.padding_side = "left"
    inputs = processor(text=prompts, images=[[r.image] for r in batch], padding=True, return_tensors="pt")
    return inputs.to(device)


def serve_static(model, processor, requests: list[Request], batch_size: int, device) -> float:
    """`generate` on fixed batches (one at a time when batch_size is 1), in arrival order."""
    _ = model.generate(**_inputs(processor, requests[:1], device), max_new_tokens=2)  # warm-up
    start = time.perf_counter()
    for first in range(0, len(requests), batch_size):
        batch = requests[first : first + batch_size]
        wait_until(start, batch[-1].arrival)
        inputs = _inputs(processor, batch, device)
        longest = max(r.max_new_tokens for r in batch)

        def clock(tokens, batch=batch):
            sync(device)
            now = time.perf_counter() - start
            step = len(batch[0].token_times) if batch else 0
            for r in batch:
                if len(r.token_times) < r.max_new_tokens and len(r.token_times) == step:
                    r.token_times.append(now)

        model.generate(**inputs, max_new_tokens=longest, min_new_tokens=longest, streamer=clock)
    return time.perf_counter() - start


def second_turn_ttft(model, processor, split: bool, repeats: int = 3) -> dict[str, float]:
    """Time to first token of a conversation's first turn and of its second turn, which sends the same image
    again (as OpenAI-style clients do), with the image-feature cache and without it; medians of `repeats`."""
    from idefics2.serving import Engine

    image = photo_like(480, 640, seed=11)
    first = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[0]}]}]
    second = first + [{"role": "assistant", "content": "A picture."},
                      {"role": "user", "content": [{"type": "text", "text": QUESTIONS[1]}]}]  # fmt: skip

    def ttft(engine, messages) -> float:
        """From the call to submit (processing included) to the first token."""
        start = time.monotonic()
        handle = engine.submit(messages, [image], max_new_tokens=1)
        handle.result()
        return handle.first_token_at - start

    times: dict[str, list[float]] = {"first turn": [], "second turn, cached": [], "second turn, no cache": []}
    for _ in range(repeats):
        with Engine(model, processor, max_batch=1) as engine:
            times["first turn"].append(ttft(engine, first))
            times["second turn, cached"].append(ttft(engine, second))
        with Engine(model, processor, max_batch=1, image_cache_mb=0) as engine:
            times["second turn, no cache"].append(ttft(engine, second))
    return {name: statistics.median(values) for name, values in times.items()}


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


def report(requests: list[Request], seconds: float) -> dict:
    ttft = [r.token_times[0] - r.arrival for r in requests]
    tpot = [(r.token_times[-1] - r.token_times[0]) / (len(r.token_times) - 1) for r in requests
            if len(r.token_times) > 1]  # fmt: skip
    itl = [b - a for r in requests for a, b in zip(r.token_times, r.token_times[1:])]
    tokens = sum(r.max_new_tokens for r in requests)
    # through HTTP a chunk can carry more than one token (text held back until it is whole)
    assert all(0 < len(r.token_times) <= r.max_new_tokens for r in requests)
    return {
        "seconds": seconds,
        "requests_per_s": len(requests) / seconds,
        "output_tokens_per_s": tokens / seconds,
        "ttft_s": percentiles(ttft),
        "tpot_s": percentiles(tpot),
        "itl_s": percentiles(itl),
        "ttft_mean_s": statistics.mean(ttft),
    }


def image_size(text: str) -> tuple[int, int]:
    height, width = (int(side) for side in text.lower().split("x"))
    return height, width


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", choices=sorted(CONFIGS), default="mid")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument(
        "--rate", type=float, default=None, help="Poisson arrivals per second (default: all at once)"
    )
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument(
        "--mixed", action="store_true", help="max_new_tokens drawn from [1/3, 5/3] x --new-tokens"
    )
    parser.add_argument("--split", action="store_true", help="image splitting on (4 crops + the image)")
    parser.add_argument(
        "--images", type=int, help="distinct images, shared out in turn (default: one per request)"
    )
    parser.add_argument("--modes", nargs="*", default=["engine", "one at a time", "static"],
                        choices=["engine", "http", "one at a time", "static"])  # fmt: skip
    parser.add_argument("--http", action="store_true", help="also serve through HTTP (idefics2 serve's app)")
    parser.add_argument("--second-turn", action="store_true",
                        help="time to first token of a second turn that sends its image again")  # fmt: skip
    parser.add_argument("--image-size", type=image_size, metavar="HxW",
                        help="every image this size (default: 200-300 x 220-320 pixels)")  # fmt: skip
    parser.add_argument("--prefill-chunk", type=int, default=512, help="the engine's prompt-token budget")
    parser.add_argument("--vision-chunk", type=int, default=1024, help="the engine's image-patch budget")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    if args.http and "http" not in args.modes:
        args.modes.insert(1, "http")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    with tempfile.TemporaryDirectory() as folder:
        model, processor = build(CONFIGS[args.config], dtype, device, args.split, Path(folder))
    arrivals = f"Poisson {args.rate:.2f}/s" if args.rate else "all at once"
    lengths = f"{'mixed ' if args.mixed else ''}{args.new_tokens} new tokens"
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} CPU threads, "
          f"config {args.config}, {dtype}, {args.requests} requests, max batch {args.max_batch}, "
          f"{arrivals}, {lengths}, {args.images or args.requests} distinct images, "
          f"splitting {args.split}")  # fmt: skip
    results = {}
    budgets = {"prefill_chunk": args.prefill_chunk, "vision_chunk": args.vision_chunk}
    with torch.inference_mode():
        for mode in args.modes:
            requests = make_requests(
                args.requests, args.rate, args.new_tokens, args.mixed, args.images, args.image_size
            )
            if mode == "engine":
                seconds = serve_engine(model, processor, requests, args.max_batch, device, **budgets)
            elif mode == "http":
                seconds = serve_http(model, processor, requests, args.max_batch, device, **budgets)
            else:
                size = 1 if mode == "one at a time" else args.max_batch
                seconds = serve_static(model, processor, requests, size, device)
            results[mode] = report(requests, seconds)
            row = results[mode]
            print(f"{mode:>14}: {row['output_tokens_per_s']:8.1f} tok/s, {row['requests_per_s']:.2f} req/s, "
                  f"TTFT p50/p90/p99 {row['ttft_s']['p50']:.2f}/{row['ttft_s']['p90']:.2f}/"
                  f"{row['ttft_s']['p99']:.2f} s, TPOT p50 {row['tpot_s']['p50'] * 1e3:.1f} ms, "
                  f"ITL p50/p99 {row['itl_s']['p50'] * 1e3:.1f}/{row['itl_s']['p99'] * 1e3:.1f} ms",
                  flush=True)  # fmt: skip
    if args.second_turn:
        with torch.inference_mode():
            turns = second_turn_ttft(model, processor, args.split)
        results["second_turn_ttft_s"] = turns
        ratio = turns["second turn, cached"] / turns["first turn"]
        print("time to first token: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in turns.items())
              + f"; the second turn takes {ratio:.2f}x the first's")  # fmt: skip
    if "engine" in results:
        if "http" in results:
            cost = 1 - results["http"]["output_tokens_per_s"] / results["engine"]["output_tokens_per_s"]
            print(f"HTTP costs {cost:.1%} of the engine-level output-token throughput")
            results["http_cost"] = cost
        for other in ("one at a time", "static"):
            if other in results:
                ratio = results["engine"]["output_tokens_per_s"] / results[other]["output_tokens_per_s"]
                print(f"engine / {other}: {ratio:.2f}x output-token throughput")
                results[f"engine_vs_{other.replace(' ', '_')}"] = ratio
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
