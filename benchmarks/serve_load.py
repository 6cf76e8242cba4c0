"""Load on `dyvte-rt serve` from concurrent clients: throughput, latency percentiles, memory.

    python benchmarks/serve_load.py --bundle runs/demo-bundle --clients 8 --seconds 60
    python benchmarks/serve_load.py --bundle runs/slice4-bundle-int4 --clients 1,4 --requests 4 \
        --max-tokens 32

Starts the server (its own process, 127.0.0.1), warms it up, then runs each client count in turn:
every client streams requests back to back (`ignore_eos`, exactly --max-tokens tokens each) for
--seconds or --requests. Reports per client count: requests, errors, aggregate generated tokens/s,
TTFT (as the server reports it: from the request's arrival to the first token, which a random
model's byte tokens may keep out of the text until the end) and request latency p50/p99, and the
server's resident memory after warm-up (two requests per client at the largest client count) and at
the end.

    python benchmarks/serve_load.py --bundle ~/.cache/dyvte-rt/demo-bundle --clients 8 --seconds 60 \
        --bad-per-second 1
    python benchmarks/serve_load.py --bundle runs/demo-bundle --clients 8 --seconds 30 --threads 1 \
        --serve-args "--ray --replicas 2 --replica-cpus 1"      # replicas on Ray Serve

    python benchmarks/serve_load.py --bundle runs/slice4-bundle-int4 --rate 0.1,0.2 --requests 12

--rate R (comma-separated) is an open-loop load instead: requests arrive at R a second on average
(Poisson arrivals, a fixed seed), each on its own connection whether or not earlier ones have been
answered, --requests of them in all or for --seconds; below saturation this is what a service with
many occasional users sees, where a closed loop of clients measures the saturated queue.

    python benchmarks/serve_load.py --bundle runs/slice4-bundle-int4 --burst 4 --requests 2

--burst N sends N requests at the same moment, --requests times (each burst once the last one is
answered), and reports every request's TTFT and latency in the order they were answered: what
scheduling does with requests that arrive together (in a closed loop of N clients the queue always
holds N, so by Little's law the mean latency is N over the throughput whatever the order).

--bad-per-second R also sends R bad requests a second from one more client, in turn from a battery
(broken JSON, wrong types, out-of-range values, unknown routes, images too wide, too big or not
images, a lone surrogate, a tiny temperature) and counts those not answered as they should be
(a JSON 4xx, or a 200 where the request is valid) beside the good clients' errors.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import itertools
import json
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--clients", default="8", help="comma-separated concurrent client counts")
    parser.add_argument(
        "--rate", type=_rates, default=None, help="comma-separated arrival rates (requests/s): an open loop"
    )
    parser.add_argument(
        "--burst", type=int, default=None, help="N requests at once, --requests times (instead of clients)"
    )
    parser.add_argument("--seconds", type=float, default=None, help="run each client count this long")
    parser.add_argument(
        "--requests", type=int, default=None, help="or this many requests per client (per rate with --rate)"
    )
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--exit", default=None, help="exit policy for every request (default: the bundle's)")
    parser.add_argument("--image", type=Path, default=ROOT / "examples/three_shapes.png")
    parser.add_argument("--question", default="what shape is in the top left?")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--warmup-seconds", type=float, default=15.0)
    parser.add_argument("--bad-per-second", type=float, default=0.0, help="bad requests a second, too")
    parser.add_argument(
        "--serve-args", default="", help="more options for dyvte-rt serve, e.g. '--ray --replicas 2'"
    )
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    if args.burst is not None:
        if args.burst < 1 or args.rate or args.seconds:
            parser.error("--burst takes a positive count and --requests, not --rate or --seconds")
    elif (args.seconds is None) == (args.requests is None):
        parser.error("give --seconds or --requests")

    command = [
        sys.executable,
        "-m",
        "dyvte_rt.cli",
        "serve",
        "--bundle",
        str(args.bundle),
        "--port",
        str(args.port),
    ]
    command += [
        "--max-batch",
        str(args.max_batch),
        "--threads",
        str(args.threads),
        *shlex.split(args.serve_args),
    ]
    with tempfile.TemporaryFile(mode="w+") as log:  # a file, not a pipe: a chatty server never blocks
        server = subprocess.Popen(command, stderr=log, text=True)
        try:
            report = _drive(f"http://127.0.0.1:{args.port}", server, log, args)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=120)
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))
    return 0


def _rates(text: str) -> list[float]:
    """--rate's value: positive numbers, comma-separated."""
    try:
        rates = [float(r) for r in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated numbers") from None
    if not all(r > 0 for r in rates):
        raise argparse.ArgumentTypeError("rates must be above 0")
    return rates


def _drive(url: str, server: subprocess.Popen, log, args) -> dict:
    _wait(url, server, log)
    image = "data:image/png;base64," + base64.b64encode(args.image.read_bytes()).decode()
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image}},
                    {"type": "text", "text": args.question},
                ],
            }
        ],
        "max_tokens": args.max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        **({"exit": args.exit} if args.exit else {}),
    }
    # warm-up at the largest client count (and the bad requests, if any) for --warmup-seconds, so
    # the batch's buffers, the allocator's arenas and every path's first use are behind us before
    # memory is read (two requests a client left 8 clients 8% short of their plateau)
    most = 1 if args.rate or args.burst else max(int(c) for c in args.clients.split(","))
    with _BadClient(url, args.bad_per_second):
        _load(url, body, most, seconds=args.warmup_seconds, requests=2)
    report = {"warm_rss_mb": _rss_mb(server.pid), "runs": {}}
    loads = [args.burst] if args.burst else args.rate or [int(c) for c in args.clients.split(",")]
    for run_index, load in enumerate(loads):
        with _BadClient(url, args.bad_per_second) as bad:
            if args.burst:
                run, label = _bursts(url, body, load, args.requests or 1), f"bursts of {load}"
            elif args.rate:
                run = _open_loop(url, body, load, args.seconds, args.requests)
                label = f"{load:g} requests/s (open loop)"
            else:
                run, label = _load(url, body, load, args.seconds, args.requests), f"{load} clients"
        report["runs"][f"{run_index}:{load}"] = run
        run["bad"] = bad.report()
        run["rss_mb"] = _rss_mb(server.pid)
        if args.burst:
            for burst in run["bursts"]:
                print(
                    f"burst: TTFT {', '.join(f'{t:.0f}' for t in burst['ttft_ms'])} ms; latency "
                    f"{', '.join(f'{t:.0f}' for t in burst['latency_ms'])} ms (in the order answered)",
                    flush=True,
                )
        print(
            f"{label}: {run['rss_mb']:.0f} MB resident after {run['requests']} requests, "
            f"{run['errors']} errors, "
            f"{run['tokens_per_s']:.1f} tok/s together; TTFT p50 {run['ttft_ms_p50']:.0f} ms "
            f"p99 {run['ttft_ms_p99']:.0f} ms; gap between pieces p50 {run['gap_ms_p50']:.0f} ms "
            f"p99 {run['gap_ms_p99']:.0f} ms; between tokens (server) p50 {run['token_gap_ms_p50']:.0f} ms "
            f"p99 {run['token_gap_ms_p99']:.0f} ms; latency p50 {run['latency_ms_p50']:.0f} ms p99 "
            f"{run['latency_ms_p99']:.0f} ms"
            + (
                f"; {run['bad']['sent']} bad requests, {run['bad']['wrong']} answered wrongly"
                if args.bad_per_second
                else ""
            ),
            flush=True,
        )
    report["end_rss_mb"] = _rss_mb(server.pid)
    report["rss_growth"] = report["end_rss_mb"] / report["warm_rss_mb"] - 1
    print(
        f"server resident memory {report['warm_rss_mb']:.0f} MB after warm-up, "
        f"{report['end_rss_mb']:.0f} MB at the end"
    )
    return report


def _load(url: str, body: dict, clients: int, seconds: float | None, requests: int | None) -> dict:
    """Each client sends requests back to back for `seconds`, or `requests` of them."""
    deadline = time.perf_counter() + seconds if seconds else None

    def client(_: int) -> list[dict]:
        rows = []
        while (deadline is None and len(rows) < requests) or (
            deadline is not None and time.perf_counter() < deadline
        ):
            rows.append(_request(url, body))
        return rows

    gaps_before = _token_gaps(url)
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        rows = [row for batch in pool.map(client, range(clients)) for row in batch]
    elapsed = time.perf_counter() - started
    return {"clients": clients, **_summary(rows, elapsed, _token_gaps(url) - gaps_before)}


def _open_loop(url: str, body: dict, rate: float, seconds: float | None, requests: int | None) -> dict:
    """Requests arriving at `rate` a second (Poisson, seed 0), each sent when it arrives."""
    arrivals = np.cumsum(np.random.default_rng(0).exponential(1.0 / rate, size=requests or 100_000))
    if seconds:
        arrivals = arrivals[: max(1, int(np.searchsorted(arrivals, seconds)))]
    gaps_before = _token_gaps(url)
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(arrivals)) as pool:
        futures = []
        for at in arrivals:
            time.sleep(max(0.0, started + at - time.perf_counter()))
            futures.append(pool.submit(_request, url, body))
        rows = [f.result() for f in futures]
    elapsed = time.perf_counter() - started
    summary = _summary(rows, elapsed, _token_gaps(url) - gaps_before)
    return {"rate": rate, "offered_per_s": len(arrivals) / arrivals[-1], **summary}


def _bursts(url: str, body: dict, size: int, bursts: int) -> dict:
    """`bursts` times, `size` requests sent at once; the next burst once all are answered."""
    gaps_before = _token_gaps(url)
    started = time.perf_counter()
    rows, each = [], []
    with concurrent.futures.ThreadPoolExecutor(size) as pool:
        for _ in range(bursts):
            burst = list(pool.map(lambda _: _request(url, body), range(size)))
            rows += burst
            ok = sorted((r for r in burst if r["ok"]), key=lambda r: r["latency_ms"])
            each.append({"ttft_ms": [r["ttft_ms"] for r in ok], "latency_ms": [r["latency_ms"] for r in ok]})
    elapsed = time.perf_counter() - started
    return {"burst": size, "bursts": each, **_summary(rows, elapsed, _token_gaps(url) - gaps_before)}


def _summary(rows: list[dict], elapsed: float, token_gaps: np.ndarray) -> dict:
    """Counts and percentiles of one run's requests (and the server's token gaps meanwhile)."""
    ok = [r for r in rows if r["ok"]]
    ttft = [r["ttft_ms"] for r in ok]
    latency = [r["latency_ms"] for r in ok]
    gaps = [gap for r in ok for gap in r["gaps_ms"]]
    return {
        "requests": len(rows),
        "errors": len(rows) - len(ok),
        "tokens_per_s": sum(r["tokens"] for r in ok) / elapsed,
        "ttft_ms_p50": float(np.percentile(ttft, 50)) if ttft else float("nan"),
        "ttft_ms_p99": float(np.percentile(ttft, 99)) if ttft else float("nan"),
        "latency_ms_p50": float(np.percentile(latency, 50)) if latency else float("nan"),
        "latency_ms_p99": float(np.percentile(latency, 99)) if latency else float("nan"),
        "exit_layers": sorted({r["exit_layer"] for r in ok}, key=str),
        # between one streamed piece and the next of the same answer (others' prefills included)
        "gap_ms_p50": float(np.percentile(gaps, 50)) if gaps else float("nan"),
        "gap_ms_p99": float(np.percentile(gaps, 99)) if gaps else float("nan"),
        # between one token and the next of the same request, as the server's engine saw them
        # (its dyvte_inter_token_seconds histogram; text pieces may hold several tokens)
        "token_gap_ms_p50": 1e3 * _quantile(token_gaps, 0.50),
        "token_gap_ms_p99": 1e3 * _quantile(token_gaps, 0.99),
        "token_gaps": int(token_gaps[-1]) if len(token_gaps) else 0,
    }


GAP_METRIC = "dyvte_inter_token_seconds_bucket"


def _token_gaps(url: str) -> np.ndarray:
    """The server's cumulative inter-token histogram counts, by bucket (empty: no such metric)."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
            text = response.read().decode()
    except OSError:
        return np.zeros(0)
    counts = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(GAP_METRIC)]
    return np.array(counts)


def _quantile(cumulative: np.ndarray, q: float) -> float:
    """Prometheus' histogram_quantile: linear within the bucket that holds the q-th observation."""
    from dyvte_rt.serving.metrics import GAP_BUCKETS

    if not len(cumulative) or cumulative[-1] == 0:
        return float("nan")
    rank = q * cumulative[-1]
    bucket = int(np.searchsorted(cumulative, rank))
    if bucket >= len(GAP_BUCKETS):  # beyond the last bound (+Inf)
        return float(GAP_BUCKETS[-1])
    low = GAP_BUCKETS[bucket - 1] if bucket else 0.0
    below = cumulative[bucket - 1] if bucket else 0.0
    inside = cumulative[bucket] - below
    return low + (GAP_BUCKETS[bucket] - low) * ((rank - below) / inside if inside else 0.0)


def _request(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    started = time.perf_counter()
    first, last, extras, pieces = None, None, {}, []
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            for line in response:
                if line.startswith(b"data: {"):
                    chunk = json.loads(line[6:])
                    choices = chunk.get("choices") or [{}]
                    if choices[0].get("delta", {}).get("content"):
                        pieces.append(time.perf_counter())
                    if first is None and pieces:
                        first = pieces[0]
                    extras = chunk.get("dyvte") or extras  # on the chunk that finishes the answer
                    if "usage" in chunk:  # the last chunk (stream_options.include_usage)
                        last = chunk
    except OSError:
        return {"ok": False}
    done = time.perf_counter()
    return {
        "ok": last is not None,
        "tokens": last["usage"]["completion_tokens"] if last else 0,
        "ttft_ms": extras.get("ttft_ms") if last else None,  # the server's: random models may
        "first_content_ms": 1e3 * ((first or done) - started),  # hold text back until the end
        "latency_ms": 1e3 * (done - started),
        "exit_layer": extras.get("exit_layer") if last else None,
        "gaps_ms": [1e3 * (b - a) for a, b in itertools.pairwise(pieces)],  # between streamed pieces
    }


def _png_uri(width: int, height: int, mode: str = "RGB") -> str:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _bad_requests() -> list[tuple[str, str, bytes, set[int]]]:
    """(name, path, body, statuses that are right)."""

    def chat(**fields) -> bytes:
        body = {"messages": [{"role": "user", "content": "what?"}], "max_tokens": 2, **fields}
        return json.dumps(body).encode()

    def image(url: str) -> bytes:
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}]
        return json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": 2}).encode()

    client_error = set(range(400, 500))
    return [
        ("broken JSON", "/v1/chat/completions", b'{"messages": [', client_error),
        ("seed as text", "/v1/chat/completions", chat(seed="abc"), client_error),
        ("stream as text", "/v1/chat/completions", chat(stream="false"), client_error),
        ("n = 2", "/v1/chat/completions", chat(n=2), client_error),
        ("temperature 3", "/v1/chat/completions", chat(temperature=3.0), client_error),
        ("tiny temperature", "/v1/chat/completions", chat(temperature=1e-320), {200}),
        (
            "lone surrogate",
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
            client_error,
        ),
        ("logit_bias", "/v1/chat/completions", chat(logit_bias={"1": 5}), client_error),
        ("no messages", "/v1/chat/completions", chat(messages=[]), client_error),
        ("10000x1 image", "/v1/chat/completions", image(_png_uri(10000, 1)), client_error),
        ("8000x8000 RGBA image", "/v1/chat/completions", image(_png_uri(8000, 8000, "RGBA")), client_error),
        ("not an image", "/v1/chat/completions", image("data:image/png;base64,aGVsbG8="), client_error),
        ("bad base64", "/v1/chat/completions", image("data:image/png;base64,@@@"), client_error),
        ("a web URL", "/v1/chat/completions", image("http://example.com/cat.png"), client_error),
        ("unknown route", "/v1/completions", chat(), {404}),
    ]


class _BadClient:
    """One more client, sending bad requests at a steady rate while the good ones run."""

    def __init__(self, url: str, per_second: float) -> None:
        self.url, self.per_second = url, per_second
        self.battery = _bad_requests() if per_second > 0 else []
        self.sent, self.wrong = 0, []
        self._stop = None

    def __enter__(self):
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        if self.per_second > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(1.0 / self.per_second):
            name, path, body, right = self.battery[self.sent % len(self.battery)]
            self.sent += 1
            request = urllib.request.Request(
                self.url + path, data=body, headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    status, payload = response.status, response.read()
            except urllib.error.HTTPError as err:
                status, payload = err.code, err.read()
            except OSError as err:
                self.wrong.append(f"{name}: {err}")
                continue
            try:
                json.loads(payload)
            except ValueError:
                self.wrong.append(f"{name}: {status} not JSON")
                continue
            if status not in right:
                self.wrong.append(f"{name}: {status}")

    def report(self) -> dict:
        return {"sent": self.sent, "wrong": len(self.wrong), "examples": self.wrong[:5]}


def _wait(url: str, server: subprocess.Popen, log) -> None:
    for _ in range(1200):
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1):
                return
        except OSError:
            if server.poll() is not None:
                log.seek(0)
                raise SystemExit(log.read()) from None
            time.sleep(0.1)
    raise SystemExit("the server did not start")


def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A process's resident memory now (VmRSS) or at its peak (VmHWM), MB; nan off Linux."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


if __name__ == "__main__":
    raise SystemExit(main())
