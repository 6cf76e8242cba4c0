"""`dyvte-rt serve`: an OpenAI-compatible local server with continuous batching (docs/serving.md)."""

from __future__ import annotations

import argparse
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
    context: int | None = None  # None: the model's context, at most 2048, per request
    api_key: str | None = None
    allow_local_images: Path | None = None
    max_body_mb: float = 20.0
    model_name: str | None = None  # None: the bundle directory's name
    drain_seconds: int = 10  # SIGTERM: how long requests in flight may take to finish
    idle_timeout: int = 30  # seconds an idle keep-alive connection stays open
    metrics_public: bool = False  # /metrics without the API key


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "serve",
        help="an OpenAI-compatible local server (chat completions, streaming, metrics)",
        description="Serve a bundle over HTTP: POST /v1/chat/completions (OpenAI's chat format, with "
        "image_url parts as data: URIs and an extension field `exit`), GET /v1/models, /health and /metrics "
        "(Prometheus). Requests are decoded together in batches that new requests join between steps. Binds "
        "127.0.0.1 unless --host says otherwise; SIGTERM stops accepting and finishes what is in flight.",
        formatter_class=HelpFormatter,
        parents=[bundle_options(), device_options()],
    )
    parser.add_argument("--host", help="address to bind (0.0.0.0 exposes the server to the network)")
    parser.add_argument("--port", type=int, help="TCP port")
    parser.add_argument("--max-batch", type=int, metavar="N", help="requests decoded together")
    parser.add_argument("--max-queue", type=int, metavar="N", help="requests waiting for a slot before 503s")
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
        "--metrics-public", action="store_true", help="serve /metrics without the API key (--api-key)"
    )
    use_config_defaults(parser, ServeConfig)
    parser.set_defaults(make_config=partial(config_from, ServeConfig), run=run)


def run(config: ServeConfig) -> int:
    require("serve", "dyvte-rt serve")
    import uvicorn

    from dyvte_rt.serving.app import ServerLimits, create_app
    from dyvte_rt.serving.engine import BatchEngine

    if config.allow_local_images is not None and not config.allow_local_images.is_dir():
        raise InputError(f"--allow-local-images {config.allow_local_images} is not a directory")
    with open_model(config) as model:
        engine = BatchEngine(model, config.max_batch, config.max_queue, config.context)
        limits = ServerLimits(
            max_body_bytes=int(config.max_body_mb * 2**20),
            allow_local_images=config.allow_local_images,
            api_key=config.api_key,
            metrics_public=config.metrics_public,
        )
        name = config.model_name or model.bundle.path.resolve().name
        app = create_app(model, engine, name, limits)
        print(
            f"serving {name} on http://{config.host}:{config.port}/v1 (batch {config.max_batch})",
            file=sys.stderr,
        )
        server = draining_server()(
            uvicorn.Config(
                app,
                host=config.host,
                port=config.port,
                log_level="warning",
                timeout_graceful_shutdown=config.drain_seconds,
                timeout_keep_alive=config.idle_timeout,
            )
        )
        try:
            server.run()
        finally:
            engine.stop(timeout=config.drain_seconds)
    return 0


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

