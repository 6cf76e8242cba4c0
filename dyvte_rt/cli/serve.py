"""`dyvte-rt serve`: an OpenAI-compatible local server with continuous batching (docs/serving.md)."""

from __future__ import annotations

import argparse
import socket
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from dyvte_rt.cli.commandline import HelpFormatter, config_from, use_config_defaults
from dyvte_rt.cli.common import RunnerConfig, open_model
from dyvte_rt.cli.extras import require
from dyvte_rt.cli.options import bundle_options, device_options
from dyvte_rt.errors import InputError


@dataclass(frozen=True, kw_only=True)
class ServeConfig(RunnerConfig):
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8
    max_queue: int = 64
    prefill_chunk: int = 128  # a longer prompt's prefill goes through each segment this many tokens at a time
    context: int | None = None  # None: the model's context, at most 2048, per request
    api_key: str | None = None
    allow_local_images: Path | None = None
    max_body_mb: float = 20.0
    max_image_mb: float | None = None  # None: 40% of the server's resident memory once loaded, >= 32
    model_name: str | None = None  # None: the bundle directory's name
    drain_seconds: int = 10  # SIGTERM: how long requests in flight may take to finish
    idle_timeout: int = 30  # seconds an idle keep-alive connection stays open
    header_timeout: float = 10.0  # seconds for a request's headers to arrive
    body_timeout: float = 60.0  # seconds for its body to arrive after them
    metrics_public: bool = False  # /metrics without the API key
    ray: bool = False  # replicas on a Ray cluster (Ray Serve) instead of one process
    replicas: int = 2  # with --ray: fixed replicas; 0: autoscale between 1 and --max-replicas
    max_replicas: int = 4
    ray_address: str | None = None  # None: start a local Ray instance; "auto": the running cluster
    replica_cpus: float = 1.0  # CPUs Ray reserves per replica (its ONNX Runtime threads: --threads)
    replica_gpus: float = 0.0  # GPUs per replica (1: each replica pinned to its own GPU)
    ray_ingress: str | None = None  # "haproxy" or "proxy"; None: haproxy where it is installed, else proxy


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "serve",
        help="an OpenAI-compatible local server (chat completions, streaming, metrics)",
        description="Serve a bundle over HTTP: POST /v1/chat/completions (OpenAI's chat format, with "
        "image_url parts as data: URIs and an extension field `exit`), GET /v1/models, /health and /metrics "
        "(Prometheus), and a web page at / for trying the model by hand. Requests are decoded together "
        "in batches that new requests join between steps; --ray serves replicas on Ray Serve. Binds "
        "127.0.0.1 unless --host says otherwise; SIGTERM stops accepting and finishes what is in flight.",
        formatter_class=HelpFormatter,
        parents=[bundle_options(), device_options()],
    )
    parser.add_argument("--host", help="address to bind (0.0.0.0 exposes the server to the network)")
    parser.add_argument("--port", type=int, help="TCP port")
    parser.add_argument("--max-batch", type=int, metavar="N", help="requests decoded together")
    parser.add_argument("--max-queue", type=int, metavar="N", help="requests waiting for a slot before 503s")
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        metavar="TOKENS",
        help="prefills run a step at a time between decode steps: a prompt longer than TOKENS goes "
        "through each segment TOKENS at a time (like chunked prefill in vLLM, or llama.cpp's "
        "--ubatch-size), so running streams keep their pace; 0: a segment at a time",
    )
    parser.add_argument(
        "--vision-priority",
        choices=("low", "normal"),
        help="CPU priority of the image encoder, which runs while other requests decode: low (nice 19) "
        "lets running streams' decode steps take the cores first, for a machine that serves and does "
        "little else (it yields to every other busy process too); normal shares the cores evenly "
        "(Linux; elsewhere always normal)",
    )
    parser.add_argument(
        "--context",
        type=int,
        metavar="N",
        help="positions per request (default: the model's, at most 2048; the KV cache holds max-batch "
        "times this)",
    )
    parser.add_argument(
        "--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on every API call"
    )
    parser.add_argument(
        "--allow-local-images",
        type=Path,
        metavar="DIR",
        help="also accept image URLs naming files under DIR (default: data: URIs only)",
    )
    parser.add_argument("--max-body-mb", type=float, metavar="MB", help="largest request body accepted")
    parser.add_argument(
        "--max-image-mb",
        type=float,
        metavar="MB",
        help="memory one image may take decoded and converted to RGB; a JPEG over it is decoded at "
        "1/2, 1/4 or 1/8 size, other images are refused (default: 40%% of the server's resident memory "
        "once the model is loaded, at least 32 MB, so no image costs more than the model itself)",
    )
    parser.add_argument(
        "--model-name", metavar="NAME", help="the model id clients use (default: the bundle's folder)"
    )
    parser.add_argument(
        "--drain-seconds",
        type=int,
        metavar="S",
        help="on SIGTERM, stop accepting and give requests in flight S seconds to finish, then exit 0",
    )
    parser.add_argument(
        "--idle-timeout", type=int, metavar="S", help="close a keep-alive connection idle for S seconds"
    )
    parser.add_argument(
        "--header-timeout",
        type=float,
        metavar="S",
        help="answer 408 and close a connection whose request headers take longer than S seconds",
    )
    parser.add_argument(
        "--body-timeout",
        type=float,
        metavar="S",
        help="answer 408 to a request whose body takes longer than S seconds to arrive (raise it for "
        "big images over slow links)",
    )
    parser.add_argument(
        "--metrics-public", action="store_true", help="serve /metrics without the API key (--api-key)"
    )
    scale = parser.add_argument_group("scale-out on Ray Serve (pip install 'dyvte-rt[ray]')")
    scale.add_argument(
        "--ray",
        action="store_true",
        help="serve replicas of the model on a Ray cluster behind the same routes, each with its own "
        "engine; Ray Serve routes requests, checks each replica's health and restarts failed ones",
    )
    scale.add_argument(
        "--replicas", type=int, metavar="N", help="replicas (0: autoscale on the requests each holds)"
    )
    scale.add_argument("--max-replicas", type=int, metavar="N", help="the most replicas autoscaling starts")
    scale.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="the cluster to join ('auto': the one `ray start` runs here; default: a local Ray started now)",
    )
    scale.add_argument("--replica-cpus", type=float, metavar="N", help="CPUs reserved per replica")
    scale.add_argument(
        "--replica-gpus", type=float, metavar="N", help="GPUs per replica (1 pins each to its own GPU)"
    )
    scale.add_argument(
        "--ray-ingress",
        choices=("haproxy", "proxy"),
        help="how requests reach the replicas: haproxy, Ray Serve's high-throughput mode (HAProxy "
        "forwards each connection straight to a replica's own HTTP server), or proxy, Ray Serve's "
        "Python proxy actor, which relays every streamed token (default: haproxy where Ray Serve's "
        "HAProxy is installed, as `ray[serve]` does on Linux, else proxy); applies to the Ray this "
        "command starts (a cluster joined with --ray-address runs the ingress its `ray start` was given)",
    )
    use_config_defaults(parser, ServeConfig)
    parser.set_defaults(make_config=partial(config_from, ServeConfig), run=run)


def run(config: ServeConfig) -> int:
    require("ray" if config.ray else "serve", "dyvte-rt serve --ray" if config.ray else "dyvte-rt serve")
    if config.replicas < 1 and config.replicas != 0:
        raise InputError(f"--replicas must be at least 1 (or 0 for autoscaling), not {config.replicas}")
    import uvicorn

    from dyvte_rt.serving.engine import check_engine_limits
    from dyvte_rt.serving.timeouts import header_timeout_protocol

    check_engine_limits(config.max_batch, config.max_queue, config.context, config.prefill_chunk)
    for name in ("idle_timeout", "header_timeout", "body_timeout", "drain_seconds", "max_body_mb"):
        if getattr(config, name) <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive, not {getattr(config, name)}")
    if config.allow_local_images is not None and not config.allow_local_images.is_dir():
        raise InputError(f"--allow-local-images {config.allow_local_images} is not a directory")
    if not 0 <= config.port <= 65535:
        raise InputError(f"--port must lie in 0..65535, not {config.port}")
    if config.api_key is not None and not config.api_key.strip():  # --api-key "$KEY" with KEY unset
        raise InputError(
            "--api-key is empty, so no request could be authorised",
            hint="set the variable it comes from, or leave --api-key out",
        )
    if config.ray:
        from dyvte_rt.serving.ray_serve import serve_on_ray

        return serve_on_ray(config)
    with listening_socket(config.host, config.port) as sock, open_model(config) as model:
        app, engine = build_app(config, model)
        name, port = app.state.model_name, sock.getsockname()[1]
        print(f"serving {name} on http://{config.host}:{port}/v1 (batch {config.max_batch})", file=sys.stderr)
        server = draining_server()(
            uvicorn.Config(
                app,
                host=config.host,
                port=port,
                log_level="warning",
                timeout_graceful_shutdown=config.drain_seconds,
                timeout_keep_alive=config.idle_timeout,
                http=header_timeout_protocol(config.header_timeout),
            )
        )
        try:
            server.run(sockets=[sock])
        finally:
            engine.stop(timeout=config.drain_seconds)
    return 0


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads, so that a port already taken (or a host
    not on this machine) is one line at once, not an error after the model loaded. Port 0: the
    system picks one, and the start line says which."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        reason = err.strerror or str(err)
        raise InputError(
            f"cannot listen on {host}:{port}: {reason}", hint="choose another --port or --host"
        ) from None
    return sock


def build_app(config: ServeConfig, model):
    """The server's app and its engine over a loaded model (one process, or one Ray replica)."""
    from dyvte_rt.serving.app import ServerLimits, create_app
    from dyvte_rt.serving.engine import BatchEngine

    engine = BatchEngine(model, config.max_batch, config.max_queue, config.context, config.prefill_chunk)
    limits = ServerLimits(
        max_body_bytes=int(config.max_body_mb * 2**20),
        max_image_memory=image_budget(config.max_image_mb),
        allow_local_images=config.allow_local_images,
        api_key=config.api_key,
        metrics_public=config.metrics_public,
        body_timeout=config.body_timeout,
    )
    name = config.model_name or model.bundle.path.resolve().name
    app = create_app(model, engine, name, limits)
    app.state.model_name = name
    return app, engine


def image_budget(max_image_mb: float | None) -> int:
    """The memory one image may take, in bytes: as asked, or 40% of what the process holds now
    (the model and the KV cache loaded), and at least 32 MB."""
    if max_image_mb is not None:
        if max_image_mb <= 0:
            raise InputError(f"--max-image-mb must be positive, not {max_image_mb}")
        return int(max_image_mb * 2**20)
    return max(32 << 20, int(0.4 * resident_bytes()))


def resident_bytes() -> int:
    """This process's resident memory now (Linux: /proc; elsewhere its peak so far, which on Linux
    would still hold the parent's from before exec)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB elsewhere
    return peak if sys.platform == "darwin" else peak * 1024


def draining_server() -> type:
    """uvicorn's Server that exits 0 after draining a SIGTERM (made on first use: uvicorn is an
    optional extra)."""
    import contextlib
    import signal

    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn re-raises a captured signal after its graceful shutdown, so a drained SIGTERM
        ended the process by signal; here it is a clean exit (0). SIGINT still ends as Ctrl-C does."""

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                try:
                    yield
                finally:
                    captured = getattr(self, "_captured_signals", [])
                    captured[:] = [s for s in captured if s != signal.SIGTERM]

    return DrainingServer
