"""`m3ae serve`: start the embedding deployment on Ray Serve and keep it up until told to stop.

    m3ae serve --model runs/demo/model                        # http://127.0.0.1:8000, local Ray
    m3ae serve --model runs/demo/model --port 9000 --max-batch-size 64 --batch-wait-ms 10
    M3AE_SERVE_TOKEN=s3cret m3ae serve --model runs/demo/model   # bearer-token auth
    m3ae serve --model /shared/model --address auto --autoscale 1:8 --replica-gpus 1

    curl -s localhost:8000/v1/embeddings/text -H 'content-type: application/json' \\
         -d '{"texts": ["a red apple"]}'
    curl -s localhost:8000/v1/embeddings/image -F image=@cat.png

Without `--address` an embedded Ray starts on 127.0.0.1 (`--local-cpus`, default: enough for
the replicas); with one, the deployment joins that cluster. HTTP listens on `--host` (default
127.0.0.1: this machine only; another address without a token prints a warning). SIGINT or
SIGTERM deletes the application (and stops an embedded Ray); `serve()` is the library call.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import time
from typing import Any

from m3ae.serve.engine import ServeSettings
from m3ae.serve.inputs import Limits

APP = "m3ae"
_EMBEDDED = False  # whether serve() started the Ray it runs on (so shutdown() stops Serve)
TOKEN_ENV = "M3AE_SERVE_TOKEN"


def deployment_options(
    replicas: int = 1,
    autoscale: str | None = None,
    target_ongoing_requests: float = 8.0,
    max_ongoing_requests: int = 64,
    replica_cpus: float = 1.0,
    replica_gpus: float = 0.0,
) -> dict[str, Any]:
    """Ray Serve `.options()` of the deployment: fixed replicas, or `autoscale` "MIN:MAX"."""
    if replicas < 1 or max_ongoing_requests < 1 or replica_cpus < 0 or replica_gpus < 0:
        raise ValueError(
            "--replicas and --max-ongoing-requests must be >= 1, --replica-cpus/gpus >= 0"
        )
    options: dict[str, Any] = {
        "max_ongoing_requests": max_ongoing_requests,
        "ray_actor_options": {"num_cpus": replica_cpus, "num_gpus": replica_gpus},
    }
    if autoscale is None:
        options["num_replicas"] = replicas
        return options
    try:
        low, high = (int(v) for v in autoscale.split(":"))
    except ValueError:
        raise ValueError(f"--autoscale takes MIN:MAX, e.g. 1:4, got {autoscale!r}") from None
    if not 0 <= low <= high or high < 1:
        raise ValueError(f"--autoscale MIN:MAX needs 0 <= MIN <= MAX and MAX >= 1, got {autoscale}")
    options["autoscaling_config"] = {
        "min_replicas": low,
        "max_replicas": high,
        "initial_replicas": max(low, 1),
        "target_ongoing_requests": target_ongoing_requests,
    }
    return options


def serve(
    settings: ServeSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    local_cpus: int | None = None,
    object_store_mb: int = 256,
    token: str | None = None,
    **options: Any,
) -> str:
    """Deploy `settings` on Ray Serve (joining `address`, or an embedded local Ray) and return
    its base URL once every replica is up (loaded and warmed up). `options` are
    `deployment_options`' keywords. `shutdown()` undoes it."""
    import ray
    from ray import serve as ray_serve

    from m3ae.launch.local_ray import init_ray
    from m3ae.serve.app import EmbeddingService, token_digest

    deploy = deployment_options(**options)
    if not os.path.isdir(settings.model_dir):
        raise FileNotFoundError(f"--model {settings.model_dir}: no such directory")
    if settings.file_root is not None and not os.path.isdir(settings.file_root):
        raise FileNotFoundError(f"--allow-files {settings.file_root}: no such directory")
    global _EMBEDDED
    if not ray.is_initialized():
        # An embedded Ray gets at least the CPUs the replicas ask for.
        replicas = deploy.get("num_replicas") or deploy["autoscaling_config"]["max_replicas"]
        need = math.ceil(replicas * deploy["ray_actor_options"]["num_cpus"])
        _EMBEDDED = not (address or os.environ.get("RAY_ADDRESS"))
        init_ray(address, max(local_cpus or os.cpu_count() or 1, need), object_store_mb)
    quiet = {"log_level": "WARNING", "enable_access_log": False}  # no line per request
    ray_serve.start(http_options={"host": host, "port": port}, logging_config=quiet)
    app = EmbeddingService.options(**deploy).bind(settings, token_digest(token))
    ray_serve.run(app, name=APP, route_prefix="/", logging_config=quiet)
    return f"http://{host}:{port}"


def shutdown() -> None:
    """Delete the application; stop Serve too when `serve()` started the embedded Ray (on a
    joined cluster other applications keep theirs), then leave Ray."""
    import ray
    from ray import serve as ray_serve

    if ray.is_initialized():
        try:
            ray_serve.delete(APP)
            if _EMBEDDED:
                ray_serve.shutdown()
        finally:
            ray.shutdown()


def add_serve_command(verbs: Any) -> argparse.ArgumentParser:
    p = verbs.add_parser(
        "serve",
        help="an HTTP embedding endpoint on Ray Serve (image, text and joint)",
    )
    p.add_argument("--model", required=True, help="pretrained M3AE / MAE directory")
    p.add_argument("--host", default="127.0.0.1", help="HTTP address to listen on")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", default=None, help="Ray cluster to join (default: embedded)")
    p.add_argument("--local-cpus", type=int, default=None, help="CPUs of the embedded Ray")
    p.add_argument("--name", default="", help="model id in /v1/models (default: folder name)")
    g = p.add_argument_group("embeddings")
    g.add_argument("--pool", choices=("cls", "mean"), default="cls")
    g.add_argument("--no-normalize", dest="normalize", action="store_false")
    g = p.add_argument_group("batching and replicas")
    g.add_argument("--max-batch-size", type=int, default=32, help="rows per forward")
    g.add_argument("--batch-wait-ms", type=float, default=5.0, help="wait to fill a batch")
    g.add_argument("--replicas", type=int, default=1)
    g.add_argument("--autoscale", default=None, metavar="MIN:MAX", help="instead of --replicas")
    g.add_argument("--target-ongoing-requests", type=float, default=8.0, help="autoscaling")
    g.add_argument("--max-ongoing-requests", type=int, default=64, help="per replica")
    g.add_argument("--replica-cpus", type=float, default=1.0)
    g.add_argument("--replica-gpus", type=float, default=0.0)
    g.add_argument("--no-warmup", dest="warmup", action="store_false", help="compile lazily")
    g = p.add_argument_group("limits and access")
    g.add_argument("--max-body-mb", type=float, default=16.0)
    g.add_argument("--max-items", type=int, default=64, help="images or texts per request")
    g.add_argument("--max-pixels", type=int, default=16_000_000, help="per image (W x H)")
    g.add_argument("--max-text-chars", type=int, default=2000)
    g.add_argument("--allow-files", default=None, metavar="DIR", help="serve image_paths here")
    g.add_argument(
        "--token-file", default=None, help=f"bearer token file (or set {TOKEN_ENV}; none: open)"
    )
    p.set_defaults(func=run_serve)
    return p


def run_serve(args: argparse.Namespace) -> int:
    token = os.environ.get(TOKEN_ENV) or None
    if args.token_file:
        with open(args.token_file) as f:
            token = f.read().strip() or None
        if token is None:
            raise ValueError(f"--token-file {args.token_file} is empty")
    limits = Limits(
        max_body_bytes=int(args.max_body_mb * 1024**2),
        max_items=args.max_items,
        max_pixels=args.max_pixels,
        max_text_chars=args.max_text_chars,
    )
    settings = ServeSettings(
        model_dir=os.path.abspath(args.model),
        pool=args.pool,
        normalize=args.normalize,
        max_batch_size=args.max_batch_size,
        batch_wait_s=args.batch_wait_ms / 1000,
        limits=limits,
        file_root=os.path.abspath(args.allow_files) if args.allow_files else None,
        warmup=args.warmup,
        name=args.name,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") and token is None:
        print(f"m3ae serve: warning: listening on {args.host} without a token", file=sys.stderr)
    stop = threading.Event()
    start = time.perf_counter()
    try:
        url = serve(
            settings,
            host=args.host,
            port=args.port,
            address=args.address,
            local_cpus=args.local_cpus,
            token=token,
            replicas=args.replicas,
            autoscale=args.autoscale,
            target_ongoing_requests=args.target_ongoing_requests,
            max_ongoing_requests=args.max_ongoing_requests,
            replica_cpus=args.replica_cpus,
            replica_gpus=args.replica_gpus,
        )
        print(
            f"m3ae serve: {url} ready in {time.perf_counter() - start:.0f} s: POST "
            f"{url}/v1/embeddings/{{image,text,joint}}, GET {url}/v1/models"
            + (" (bearer token required)" if token else ""),
            flush=True,
        )
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which sets its own
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(1.0):
            pass
        print("m3ae serve: stopping", flush=True)
    finally:
        shutdown()
    return 0
