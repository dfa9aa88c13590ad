"""`idefics2 serve`: the HTTP server (OpenAI and TGI routes, metrics, chat page) on the engine."""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
from pathlib import Path

from idefics2.cli.common import (
    UserError,
    add_engine_budget_options,
    add_model_options,
    engine_budgets,
    load_pipeline,
    positive_int,
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve the model over HTTP (OpenAI and TGI APIs, chat page)",
        description="Serve a model over HTTP: POST /v1/chat/completions (OpenAI), POST /generate and "
        "/generate_stream (text-generation-inference), GET /v1/models, /info, /health, /metrics "
        "(Prometheus) and a chat page at /. Requests are decoded together on the continuous-batching "
        "engine. SIGTERM or Ctrl-C drains: no new requests, those in flight finish (up to --drain-timeout). "
        "If the engine dies (a fault, or a step longer than --step-timeout), /health answers 503, the "
        "requests in flight get errors and the server exits with code 1, for a supervisor to restart it.",
    )
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("IDEFICS2_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every route but /health and the chat page "
        "(default: $IDEFICS2_API_KEY, else none)",
    )
    p.add_argument(
        "--served-model-name", metavar="NAME", help="the model's name in the API (default: --model)"
    )
    p.add_argument(
        "--max-batch", type=positive_int, default=16, metavar="N", help="requests decoded together"
    )
    p.add_argument(
        "--max-queue", type=positive_int, default=256, metavar="N",
        help="requests waiting for a row; more are answered 429 at once (default: 256)",
    )  # fmt: skip
    p.add_argument(
        "--max-length", type=positive_int, metavar="N",
        help="cache slots per request, prompt + new tokens (default: 4096, at most the model's context)",
    )  # fmt: skip
    add_engine_budget_options(p)
    p.add_argument("--max-images-per-request", type=positive_int, default=8, metavar="N", help="(default: 8)")
    p.add_argument(
        "--max-image-pixels", type=positive_int, metavar="N",
        help="largest image, width x height (default: the processor's, about 89 megapixels)",
    )  # fmt: skip
    p.add_argument(
        "--max-body-mb", type=float, default=32.0, metavar="MB", help="largest request body (default: 32)"
    )
    p.add_argument(
        "--allowed-local-media-path", metavar="DIR", help="allow file:// image URLs inside this folder"
    )
    p.add_argument(
        "--allow-remote-images", action="store_true",
        help="fetch http(s) image URLs (at most 20 MB, 10 s, image content types only)",
    )  # fmt: skip
    p.add_argument(
        "--drain-timeout", type=float, default=30.0, metavar="S",
        help="on shutdown, how long requests in flight may take to finish (default: 30)",
    )  # fmt: skip
    p.set_defaults(func=run)


# glibc's mallopt parameter for the most malloc arenas (heaps for threads that allocate at the same time)
M_ARENA_MAX = -8


def limit_malloc_arenas(count: int = 2) -> bool:
    """Let glibc keep at most `count` heaps for the process's threads (by default up to 8 per core: memory
    freed in one cannot serve another, so a threaded server's resident memory creeps up as they fragment).
    Called before the server's threads start; False where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    return bool(mallopt(M_ARENA_MAX, count))


def run(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1-65535, got {args.port}")
    if args.max_body_mb <= 0:
        raise UserError(f"--max-body-mb must be positive, got {args.max_body_mb}")
    media = None
    if args.allowed_local_media_path:
        media = Path(args.allowed_local_media_path).expanduser()
        if not media.is_dir():
            raise UserError(f"--allowed-local-media-path: {media} is not a folder")
    from idefics2.server import ServerSettings, create_app, run_server
    from idefics2.serving import Engine

    limit_malloc_arenas()
    pipe = load_pipeline(args)
    engine = Engine(pipe.model, pipe.processor, max_batch=args.max_batch, max_queue=args.max_queue,
                    max_length=args.max_length, **engine_budgets(args))  # fmt: skip
    settings = ServerSettings(
        model_name=args.served_model_name or args.model or "idefics2-builtin",
        api_key=args.api_key or None,
        max_images_per_request=args.max_images_per_request,
        max_image_pixels=args.max_image_pixels,
        max_body_bytes=int(args.max_body_mb * 2**20),
        allowed_local_media_path=media,
        allow_remote_images=args.allow_remote_images,
        drain_timeout_s=args.drain_timeout,
    )
    app = create_app(engine, settings)
    url = f"http://{args.host}:{args.port}"
    print(f"idefics2 serve: {settings.model_name} on {url} (chat page: {url}/)", file=sys.stderr, flush=True)
    served = run_server(app, args.host, args.port, args.drain_timeout)
    engine.close(timeout=0)
    if not served:
        print(f"idefics2 serve: the engine died ({engine.dead_reason}); exiting with code 1",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0
