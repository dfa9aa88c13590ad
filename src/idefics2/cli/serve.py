"""`idefics2 serve`: the HTTP server (OpenAI and TGI routes, metrics, chat page) on the engine."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import sys
from pathlib import Path

from idefics2.cli.common import UserError, add_engine_budget_options, add_model_options, engine_budgets
from idefics2.settings import load_pipeline, non_negative_int, number_in, positive_int, weights_dtype


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
        help="fetch http(s) image URLs (at most 20 MB, image content types only), from public addresses only "
        "(loopback, private, link-local and other internal addresses are refused)",
    )  # fmt: skip
    p.add_argument(
        "--allowed-media-domains", nargs="+", type=_domain, metavar="HOST",
        help="with --allow-remote-images: only these hosts, on every redirect hop too (example.com exactly, "
        "*.example.com for its subdomains)",
    )  # fmt: skip
    p.add_argument(
        "--allow-private-media-hosts", action="store_true",
        help="with --allow-remote-images: also fetch from loopback, private and other internal addresses "
        "(for a deliberate internal image store; UNSAFE on a public server: clients reach your network)",
    )  # fmt: skip
    p.add_argument(
        "--media-max-redirects", type=non_negative_int, metavar="N",
        help="with --allow-remote-images: redirects followed, each checked again, never https to http "
        "(default: 3; 0 refuses redirects)",
    )  # fmt: skip
    p.add_argument(
        "--media-fetch-timeout", type=number_in(0, 3600, low_open=True), metavar="S",
        help="with --allow-remote-images: the whole fetch of an image, redirects included (default: 10)",
    )  # fmt: skip
    p.add_argument(
        "--cors-allow-origin", nargs="+", type=_origin, metavar="ORIGIN",
        help="let web pages of these origins (https://app.example.com, or * for any) call the API from a "
        "browser (default: none)",
    )  # fmt: skip
    p.add_argument(
        "--drain-timeout", type=float, default=30.0, metavar="S",
        help="on shutdown, how long requests in flight may take to finish (default: 30)",
    )  # fmt: skip
    ray = p.add_argument_group("replicas on Ray Serve (pip install 'idefics2[ray]')")
    ray.add_argument(
        "--ray", nargs="?", const="", metavar="auto|ADDRESS",
        help="serve with Ray Serve: replicas of the model behind one HTTP front on --host/--port; alone, "
        "on a Ray started here (or the one RAY_ADDRESS names), 'auto' or an address: an existing cluster",
    )  # fmt: skip
    ray.add_argument("--replicas", type=positive_int, metavar="N", help="replicas (default: 1)")
    ray.add_argument(
        "--gpus-per-replica", type=float, default=0.0, metavar="G",
        help="GPUs each replica holds (fractions share one; default: 0, the replicas run on CPUs)",
    )  # fmt: skip
    ray.add_argument(
        "--cpus-per-replica",
        type=float,
        default=1.0,
        metavar="C",
        help="CPUs each replica holds (default: 1)",
    )
    ray.add_argument(
        "--autoscaling-config", metavar="JSON",
        help="Ray Serve's autoscaling_config instead of --replicas, e.g. "
        '\'{"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}\'',
    )  # fmt: skip
    p.set_defaults(func=run)


def _domain(text: str) -> str:
    from idefics2.server.remote import domain_pattern

    try:
        return domain_pattern(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


_ORIGIN = re.compile(r"https?://(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(:[0-9]{1,5})?")


def _origin(text: str) -> str:
    """A web origin as browsers send it (scheme://host[:port], lower case, no path), or * for any."""
    origin = text.strip().lower().rstrip("/")
    if origin != "*" and not _ORIGIN.fullmatch(origin):
        raise argparse.ArgumentTypeError(
            f"expected an origin like https://app.example.com or *, got {text!r}"
        )
    return origin


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
    remote_flags = {"--allowed-media-domains": args.allowed_media_domains,
                    "--allow-private-media-hosts": args.allow_private_media_hosts or None,
                    "--media-max-redirects": args.media_max_redirects,
                    "--media-fetch-timeout": args.media_fetch_timeout}  # fmt: skip
    for flag, value in remote_flags.items():
        if value is not None and not args.allow_remote_images:
            raise UserError(f"{flag} applies to remote images: add --allow-remote-images")
    given = {
        "media_max_redirects": args.media_max_redirects,
        "media_fetch_timeout_s": args.media_fetch_timeout,
    }
    remote_limits = {name: value for name, value in given.items() if value is not None}  # else the defaults
    ray_options = _ray_options(args)
    media = None
    if args.allowed_local_media_path:
        media = Path(args.allowed_local_media_path).expanduser()
        if not media.is_dir():
            raise UserError(f"--allowed-local-media-path: {media} is not a folder")
    from idefics2.server import ServerSettings, create_app, run_server
    from idefics2.serving import Engine

    settings = ServerSettings(
        model_name=args.served_model_name or args.model or "idefics2-builtin",
        api_key=args.api_key or None,
        max_images_per_request=args.max_images_per_request,
        max_image_pixels=args.max_image_pixels,
        max_body_bytes=int(args.max_body_mb * 2**20),
        allowed_local_media_path=media,
        allow_remote_images=args.allow_remote_images,
        allow_private_media_hosts=args.allow_private_media_hosts,
        allowed_media_domains=tuple(args.allowed_media_domains) if args.allowed_media_domains else None,
        **remote_limits,
        cors_allow_origins=tuple(args.cors_allow_origin or ()),
        drain_timeout_s=args.drain_timeout,
    )
    engine_options = {"max_batch": args.max_batch, "max_queue": args.max_queue, "max_length": args.max_length,
                      **engine_budgets(args)}  # fmt: skip
    if ray_options is not None:
        return _run_on_ray(args, settings, engine_options, ray_options)
    limit_malloc_arenas()
    pipe = load_pipeline(args)
    engine = Engine(pipe.model, pipe.processor, **engine_options)
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


def _ray_options(args: argparse.Namespace) -> dict | None:
    """serve_application's keyword arguments from the Ray flags (None without --ray), checked before
    anything loads."""
    ray_only = {
        "--replicas": args.replicas is not None,
        "--gpus-per-replica": args.gpus_per_replica != 0,
        "--cpus-per-replica": args.cpus_per_replica != 1,
        "--autoscaling-config": args.autoscaling_config is not None,
    }
    if args.ray is None:
        given = [flag for flag, set_ in ray_only.items() if set_]
        if given:
            raise UserError(f"{', '.join(given)} need --ray")
        return None
    if args.gpus_per_replica < 0 or args.cpus_per_replica < 0:
        raise UserError("--gpus-per-replica and --cpus-per-replica must be >= 0")
    if args.device == "cuda" and args.gpus_per_replica == 0:
        raise UserError("--device cuda with --ray needs --gpus-per-replica")
    autoscaling = None
    if args.autoscaling_config is not None:
        if args.replicas is not None:
            raise UserError("--replicas and --autoscaling-config exclude each other (min/max_replicas)")
        try:
            autoscaling = json.loads(args.autoscaling_config)
        except json.JSONDecodeError as error:
            raise UserError(f"--autoscaling-config is not valid JSON: {error}") from None
        if not isinstance(autoscaling, dict):
            raise UserError("--autoscaling-config must be a JSON object")
        _check_autoscaling(autoscaling)
    return {"num_replicas": args.replicas or 1, "gpus_per_replica": args.gpus_per_replica,
            "cpus_per_replica": args.cpus_per_replica, "autoscaling_config": autoscaling}  # fmt: skip


def _check_autoscaling(config: dict) -> None:
    from idefics2.integrations.ray import MISSING_RAY_SERVE

    try:
        from ray.serve.config import AutoscalingConfig
    except ImportError:
        raise UserError(MISSING_RAY_SERVE) from None
    try:
        AutoscalingConfig(**config)
    except Exception as error:  # pydantic's ValidationError, whichever pydantic Ray uses
        raise UserError(f"--autoscaling-config: {' '.join(str(error).split())}") from None


def _run_on_ray(args: argparse.Namespace, settings, engine_options: dict, ray_options: dict) -> int:
    if args.calibrate:
        raise UserError("--calibrate is not supported with Ray replicas: save a calibrated model instead")
    from idefics2.integrations.ray import ReplicaSpec, run_on_ray, serve_application

    device = "cuda" if ray_options["gpus_per_replica"] > 0 else "cpu"
    spec = ReplicaSpec(
        model=args.model, adapter=args.adapter, dtype=weights_dtype(args.dtype, device), device=device,
        quantize=args.quantize, engine=engine_options, settings=settings,
    )  # fmt: skip
    try:
        application = serve_application(spec, **ray_options)
    except ImportError as error:
        raise UserError(str(error)) from None
    url = f"http://{args.host}:{args.port}"
    replicas = "autoscaled" if ray_options["autoscaling_config"] else ray_options["num_replicas"]

    def ready() -> None:
        print(f"idefics2 serve: {settings.model_name} on {url}, {replicas} replica(s) on Ray Serve "
              f"(chat page: {url}/)", file=sys.stderr, flush=True)  # fmt: skip

    run_on_ray(application, address=args.ray or None, host=args.host, port=args.port, on_ready=ready)
    return 0
