"""Ray integrations (the optional `ray` extra: `pip install 'idefics2[ray]'`).

Serving past one replica: `idefics2 serve`'s app (OpenAI and TGI routes, metrics, limits, the chat page) on
Ray Serve, one model and engine per replica, Ray Serve's proxy in front routing each request (streamed ones
included) to a replica, and Ray's autoscaler adding and removing replicas when asked to.

    from ray import serve
    from idefics2.integrations.ray import ReplicaSpec, serve_application

    spec = ReplicaSpec(model="HuggingFaceM4/idefics2-8b", device="cuda", engine={"max_batch": 32})
    serve.run(serve_application(spec, num_replicas=2, gpus_per_replica=1), route_prefix="/")

`idefics2 serve --ray` does this from the command line; `serve run idefics2.integrations.ray:app_builder
model=DIR` (or a Serve config file naming that import path) does it with Ray's own tools.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field
from typing import Any

from idefics2.server.app import ServerSettings

DEPLOYMENT_NAME = "idefics2"
REPLICA_HEADER = "x-idefics2-replica"  # on every answer: which replica gave it
MISSING_RAY_SERVE = "serving on Ray needs Ray Serve: pip install 'idefics2[ray]'"


def _ray_serve():
    try:
        from ray import serve
    except ImportError:
        raise ImportError(MISSING_RAY_SERVE) from None
    return serve


@dataclass
class ReplicaSpec:
    """What every replica loads and serves; it travels to the replicas, so it holds names, not objects.

    `model`: a checkpoint folder (visible on every node) or a hub repo id (downloaded by each node), None for
    the built-in model. `dtype`: a torch dtype, or "auto" for the checkpoint's own (what the CLI's --dtype
    resolves to). `engine`: keyword arguments of `idefics2.serving.Engine` (max_batch, max_queue, max_length,
    prefill_chunk, vision_chunk)."""

    model: str | None = None
    adapter: str | None = None
    dtype: Any = "auto"
    device: str = "cpu"
    quantize: str | None = None
    engine: dict[str, Any] = field(default_factory=dict)
    settings: ServerSettings = field(default_factory=ServerSettings)


class EngineReplica:
    """One Ray Serve replica: the model, its continuous-batching engine, and the HTTP app over them (built by
    Ray Serve on the replica through `__serve_build_asgi_app__`; the app's shutdown drains the engine)."""

    def __init__(self, spec: ReplicaSpec) -> None:
        from idefics2.pipelines import pipeline
        from idefics2.serving import Engine

        chat = pipeline(spec.model, dtype=spec.dtype, device=spec.device, adapter=spec.adapter,
                        quantize=spec.quantize)  # fmt: skip
        self.engine = Engine(chat.model, chat.processor, **spec.engine)
        self.settings = spec.settings
        self.replica_id = _ray_serve().get_replica_context().replica_id.unique_id

    def __serve_build_asgi_app__(self):
        from idefics2.server import create_app

        app = create_app(self.engine, self.settings)
        app.add_middleware(_NameReplica, replica_id=self.replica_id)
        return app


class _NameReplica:
    """ASGI middleware: the replica's id in a header on every HTTP answer."""

    def __init__(self, app, replica_id: str) -> None:
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica_id.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named_send(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, named_send)


def serve_application(
    spec: ReplicaSpec,
    *,
    num_replicas: int | None = 1,
    gpus_per_replica: float = 0,
    cpus_per_replica: float = 1,
    autoscaling_config: dict[str, Any] | None = None,
):
    """The Ray Serve application (`serve.run` it): `num_replicas` replicas of `spec`, each with its own
    CPUs and GPUs, or, with `autoscaling_config` (Ray Serve's own keys: min_replicas, max_replicas,
    target_ongoing_requests, upscale_delay_s, ...), as many as Ray's autoscaler decides.

    Each replica gets at most its engine's max_batch requests at a time; the others wait in Ray Serve's
    queues (at most the engine's max_queue per proxy; more are answered 503), where the first replica with
    a free row takes them."""
    serve = _ray_serve()
    max_batch = spec.engine.get("max_batch", 16)
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        "max_ongoing_requests": max_batch,
        "max_queued_requests": spec.engine.get("max_queue", 256),
        "graceful_shutdown_timeout_s": spec.settings.drain_timeout_s,
    }
    if autoscaling_config is not None:
        options.update(num_replicas="auto", autoscaling_config=autoscaling_config)
    else:
        options["num_replicas"] = num_replicas
    ingress = serve.ingress()(EngineReplica)
    return serve.deployment(**options)(ingress).bind(spec)


def app_builder(args: dict[str, str]):
    """For Ray's tools: `serve run idefics2.integrations.ray:app_builder model=DIR dtype=float32 ...`, or a
    Serve config file with this `import_path` and these `args` (its `deployments:` entry named "idefics2"
    sets num_replicas, autoscaling_config and ray_actor_options). Keys: model, adapter, dtype (float32,
    bfloat16, float16; default: the checkpoint's), device (default cpu), quantize, served_model_name,
    api_key, max_batch, max_queue, max_length, prefill_chunk, vision_chunk."""
    import torch

    known = {"model", "adapter", "dtype", "device", "quantize", "served_model_name", "api_key", "max_batch",
             "max_queue", "max_length", "prefill_chunk", "vision_chunk"}  # fmt: skip
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    engine = {name: int(args[name]) for name in ("max_batch", "max_queue", "max_length", "prefill_chunk",
                                                 "vision_chunk") if name in args}  # fmt: skip
    dtype = args.get("dtype")
    if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    settings = ServerSettings(
        model_name=args.get("served_model_name") or args.get("model") or "idefics2-builtin",
        api_key=args.get("api_key"),
    )
    spec = ReplicaSpec(model=args.get("model"), adapter=args.get("adapter"),
                       dtype=getattr(torch, dtype) if dtype else "auto", device=args.get("device", "cpu"),
                       quantize=args.get("quantize"), engine=engine, settings=settings)  # fmt: skip
    return serve_application(spec)


def run_on_ray(
    application,
    *,
    address: str | None,
    host: str,
    port: int,
    on_ready=None,
) -> None:
    """Connect to Ray (`address`: "auto" or a cluster's address; None starts a local one unless RAY_ADDRESS
    names one), start Ray Serve's HTTP proxy on host:port, deploy `application` at "/", and serve until
    SIGTERM or SIGINT; then the application is deleted (its replicas drain) and a Ray started here stops.
    `on_ready()` is called once the replicas answer."""
    import ray

    serve = _ray_serve()
    ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application, name=DEPLOYMENT_NAME, route_prefix="/", blocking=False)
        if on_ready is not None:
            on_ready()
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            serve.delete(DEPLOYMENT_NAME)
        finally:
            ray.shutdown()  # a Ray started here stops with it; a cluster's keeps running
