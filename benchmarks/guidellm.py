"""GuideLLM, the field's serving benchmark (a client nobody here wrote), against `idefics2 serve`, and
bench_serving.py's streaming HTTP clients against the same server process, on the same shapes, in the same
run.

The server serves the built-in model (--config mid: the "mid" config, 246M parameters, bench_serving's random
weights, float32). The requests have bench_serving's "mid" shapes: a short question and one image of its own
(--image-size, default 240x260) each, --new-tokens asked, arriving all at once (--requests concurrent
streams) or as a Poisson process at --rate. GuideLLM draws its own synthetic data (a --prompt-tokens text
and a JPEG gradient of that size, different in every request); bench_serving sends its photo-like PNGs.

GuideLLM is installed in a throwaway environment, never as a dependency of idefics2:

    python3 -m venv /tmp/guidellm-venv --system-site-packages
    /tmp/guidellm-venv/bin/pip install guidellm
    python benchmarks/guidellm.py --guidellm /tmp/guidellm-venv/bin/guidellm

Both are reported under bench_serving's definitions: TPOT is a request's (last token - first token) /
(tokens - 1), which GuideLLM calls ITL (GuideLLM's own TPOT, (last token - request start) / tokens, includes
the wait for the first token). Output tokens are the server's usage counts in both.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]

from bench_serving import http_bodies, http_clients, make_requests  # noqa: E402
from idefics2.server.process import ServerProcess  # noqa: E402


def write_mid_checkpoint(folder: Path) -> None:
    """The "mid" config with bench_serving's random weights (same seed), as a checkpoint folder."""
    import torch

    from bench import CONFIGS
    from bench_serving import build

    model, _ = build(CONFIGS["mid"], torch.float32, torch.device("cpu"), split=False, folder=folder)
    model.save_pretrained(folder)


def start_server(model: Path | None) -> ServerProcess:
    flags = ["--dtype", "float32", "--max-batch", "16", "--served-model-name", "idefics2"]
    if model is not None:
        flags += ["--model", str(model)]
    return ServerProcess(flags, stderr=subprocess.DEVNULL)


def run_guidellm(args, port: int, tokenizer: Path, profile: str, out: Path) -> dict:
    height, width = args.image_size
    command = [
        args.guidellm, "run",
        "--backend", f"kind=openai_http,target=http://127.0.0.1:{port}",
        "--profile", f"kind={profile}",
        "--constraint", f"kind=max_requests,count={args.requests}",
        "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
        "--data", f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},output_tokens={args.new_tokens}",
        "--data", f"kind=synthetic_image,width={width},height={height}",
        "--output", f"kind=json,path={out}",
        "--disable-progress",
    ]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return summarize_guidellm(json.loads(out.read_text()))


def summarize_guidellm(report: dict) -> dict:
    benchmark = report["benchmarks"][0]
    metrics = benchmark["metrics"]

    def stat(name: str, which: str) -> float:
        values = metrics[name]["successful"]
        return values["percentiles"][which] if which.startswith("p") else values[which]

    return {
        "requests": len(benchmark["requests"]["successful"]),
        "errored": len(benchmark["requests"]["errored"]),
        "requests_per_s": stat("requests_per_second", "mean"),
        "output_tokens_per_s": stat("output_tokens_per_second", "mean"),
        "output_tokens": {
            "p50": stat("output_token_count", "p50"),
            "min": stat("output_token_count", "min"),
            "max": stat("output_token_count", "max"),
        },  # fmt: skip
        "ttft_s": {p: stat("time_to_first_token_ms", p) / 1000 for p in ("p50", "p99")},
        "tpot_ms": {"p50": stat("inter_token_latency_ms", "p50")},  # GuideLLM's ITL
        "guidellm_tpot_ms": {"p50": stat("time_per_output_token_ms", "p50")},
    }


def run_ours(args, port: int, rate: float | None) -> dict:
    """bench_serving's streaming HTTP clients (threads of this process) against the running server."""
    from bench_serving import percentiles

    requests = make_requests(args.requests, rate, args.new_tokens, mixed=False, size=args.image_size)
    seconds, token_times, tokens = http_clients(port, http_bodies(requests), [r.arrival for r in requests])
    ttft = [times[0] - r.arrival for r, times in zip(requests, token_times, strict=True)]
    tpot = [(times[-1] - times[0]) / (n - 1) for times, n in zip(token_times, tokens, strict=True) if n > 1]
    ordered = sorted(tokens)
    return {
        "requests": len(requests),
        "requests_per_s": len(requests) / seconds,
        "output_tokens_per_s": sum(tokens) / seconds,
        "output_tokens": {"p50": ordered[len(ordered) // 2], "min": ordered[0], "max": ordered[-1]},
        "ttft_s": {p: v for p, v in percentiles(ttft).items() if p != "p90"},
        "tpot_ms": {"p50": percentiles(tpot)["p50"] * 1000},
    }


def table(results: dict[str, dict]) -> str:
    lines = [
        "| | requests/s | output tokens/s | output tokens (p50; min-max) | TTFT p50 / p99 | TPOT p50 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in results.items():
        n = row["output_tokens"]
        lines.append(
            f"| {name} | {row['requests_per_s']:.2f} | {row['output_tokens_per_s']:.1f} | "
            f"{n['p50']:.0f}; {n['min']:.0f}-{n['max']:.0f} | {row['ttft_s']['p50']:.2f} / "
            f"{row['ttft_s']['p99']:.2f} s | {row['tpot_ms']['p50']:.1f} ms |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--guidellm", default="guidellm", help="the guidellm executable")
    parser.add_argument("--config", choices=["builtin", "mid"], default="builtin", help="the served model")
    parser.add_argument("--requests", type=int, default=16, help="requests per run (and concurrent streams)")
    parser.add_argument("--rate", type=float, default=2.0, help="Poisson arrivals per second (0: skip)")
    parser.add_argument("--prompt-tokens", type=int, default=12, help="GuideLLM's synthetic text")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--image-size", default="240x260", help="HxW (default: 240x260)")
    parser.add_argument("--out", help="folder for GuideLLM's reports (default: a temporary one)")
    args = parser.parse_args()
    args.image_size = tuple(int(side) for side in args.image_size.lower().split("x"))
    out = Path(args.out or tempfile.mkdtemp(prefix="guidellm-"))
    out.mkdir(parents=True, exist_ok=True)
    model = None
    if args.config == "mid":
        model = out / "mid"
        write_mid_checkpoint(model)
    from idefics2.assets import builtin_model_dir

    tokenizer = model or builtin_model_dir()
    server = start_server(model)
    port = server.port
    results: dict[str, dict] = {}
    arrivals = {f"{args.requests} at once": None}
    if args.rate:
        arrivals[f"Poisson {args.rate:g}/s"] = args.rate
    try:
        for label, rate in arrivals.items():
            results[f"bench_serving, {label}"] = run_ours(args, port, rate)
            profile = f"poisson,rate={rate}" if rate else f"concurrent,streams={args.requests}"
            report = out / f"guidellm-{profile.split(',')[0]}.json"
            results[f"GuideLLM, {label}"] = run_guidellm(args, port, tokenizer, profile, report)
    finally:
        server.stop()
    print(table(results))
    (out / "summary.json").write_text(json.dumps(results, indent=2))
    print(f"reports in {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
