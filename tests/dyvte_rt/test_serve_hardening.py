"""The server against bad input and faults, as a client or an attacker would send them, in-process
(Starlette's TestClient over the demo bundle): JSON for every status, a 4xx for every client
mistake, no request that stops the engine, images bounded by what they cost, limits that hold."""

from __future__ import annotations

import base64
import io
import json
import socket
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "examples/three_shapes.png"
QUESTION = "what color is the shape in the top left?"


def _png(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _messages(question: str = QUESTION, url: str | None = None) -> list[dict]:
    url = url or "data:image/png;base64," + base64.b64encode(IMAGE.read_bytes()).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]  # fmt: skip


@pytest.fixture(scope="module")
def model(demo_bundle):
    from dyvte_rt import DyvteModel

    with DyvteModel.load(demo_bundle) as loaded:
        yield loaded


def _app(model, api_key=None, max_batch=2, max_queue=4, image_memory=64 << 20):
    """The server's app over the demo bundle and its engine (the caller stops the engine)."""
    from dyvte_rt.serving.app import ServerLimits, create_app
    from dyvte_rt.serving.engine import BatchEngine

    engine = BatchEngine(model, max_batch=max_batch, max_queue=max_queue, context=256)
    limits = ServerLimits(max_body_bytes=1 << 20, api_key=api_key, max_image_memory=image_memory)
    return create_app(model, engine, "demo", limits), engine


def _client(model, **options):
    from starlette.testclient import TestClient

    app, engine = _app(model, **options)
    return TestClient(app, raise_server_exceptions=False), engine


@pytest.fixture(scope="module")
def served(model):
    client, engine = _client(model)
    yield client, engine
    engine.stop()


def _post(client, body, **headers):
    data = body if isinstance(body, bytes) else json.dumps(body)
    return client.post(
        "/v1/chat/completions", content=data, headers={"content-type": "application/json", **headers}
    )


def _good(client) -> str:
    reply = _post(client, {"messages": _messages(), "max_tokens": 8})
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"]


BAD_REQUESTS = {  # body -> what the one-line message names
    "temperature below 0": ({"temperature": -1}, "temperature"),
    "temperature above 2": ({"temperature": 2.5}, "temperature"),
    "temperature as text": ({"temperature": "0.5"}, "temperature"),
    "top_p above 1": ({"top_p": 1.5}, "top_p"),
    "seed as text": ({"seed": "abc"}, "seed"),
    "negative seed": ({"seed": -1}, "seed"),
    "exit as a number": ({"exit": 123}, "exit"),
    "exit unknown": ({"exit": "sometimes"}, "exit policy"),
    "exit_threshold above 1": ({"exit_threshold": 1.5}, "exit_threshold"),
    "exit_threshold as text": ({"exit_threshold": "0.5"}, "exit_threshold"),
    "stream as text": ({"stream": "false"}, "stream"),
    "n of 2": ({"n": 2}, "n must be 1"),
    "logprobs": ({"logprobs": True}, "logprobs"),
    "logit_bias": ({"logit_bias": {"5": 100}}, "logit_bias"),
    "json mode": ({"response_format": {"type": "json_object"}}, "response_format"),
    "tools": ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    "a penalty": ({"frequency_penalty": 0.5}, "frequency_penalty"),
    "max_tokens 0": ({"max_tokens": 0}, "max_tokens"),
    "max_tokens as float": ({"max_tokens": 4.5}, "max_tokens"),
    "five stops": ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    "include_usage as text": ({"stream_options": {"include_usage": "yes"}}, "include_usage"),
    "a role of robot": ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
    "no messages": ({"messages": []}, "messages"),
    "content a number": ({"messages": [{"role": "user", "content": 5}]}, "content"),
    "unknown part": ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages"),
    "wide image": ({"messages": _messages(url=_png(2000, 10))}, "20 times wider than high"),
    "tall image": ({"messages": _messages(url=_png(3, 300))}, "crop it to at most 20:1"),
}


def test_every_bad_field_is_a_400_naming_it_and_the_engine_serves_on(served):
    client, engine = served
    for name, (fields, named) in BAD_REQUESTS.items():
        body = {"messages": _messages(), "max_tokens": 4, **fields}
        reply = _post(client, body)
        assert reply.status_code == 400, (name, reply.status_code, reply.text)
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error" and "\n" not in error["message"], name
        assert named in error["message"], (name, error["message"])
    assert engine.failure is None and _good(client)


def test_text_and_paths_that_are_not_text_are_refused_as_json(model, tmp_path):
    from starlette.testclient import TestClient

    from dyvte_rt.serving.app import ServerLimits, create_app
    from dyvte_rt.serving.engine import BatchEngine

    engine = BatchEngine(model, max_batch=1, context=256)
    limits = ServerLimits(allow_local_images=tmp_path)
    client = TestClient(create_app(model, engine, "demo", limits), raise_server_exceptions=False)
    try:
        surrogate = b'{"messages": [{"role": "user", "content": "hi \\ud800 there"}], "max_tokens": 2}'
        for body, status, named in (
            (surrogate, 400, "Unicode"),
            ({"messages": _messages(url=str(tmp_path / "a\x00b.png"))}, 400, "not a valid file name"),
            ({"messages": _messages(url=str(tmp_path / ("x" * 5000)))}, 400, "image"),
            (b"[" * 100_000, 400, "cannot be read"),
            (b"\xff\xfe", 400, "not valid JSON"),
        ):
            reply = _post(client, body)
            assert reply.status_code == status and named in reply.json()["error"]["message"], reply.text
    finally:
        engine.stop()


def test_the_router_threshold_is_per_request_and_the_extras_say_what_the_exit_did(served, model):
    """What the web page draws: p(exit) per router, the threshold used, the saving, the model's layers."""
    client, _ = served
    info = client.get("/v1/models").json()["data"][0]["dyvte"]
    manifest = model.manifest
    assert info["layers"] == manifest.dims.num_layers and info["exit_layers"] == list(
        manifest.exit.candidate_layers
    )
    assert (
        info["routers"] and info["threshold"] == manifest.exit.threshold and info["default_exit"] == "router"
    )
    health = client.get("/health").json()
    assert health["slots"] == 2 and health["max_queue"] == 4
    seen = {}
    for threshold in (0.0, 1.0):
        reply = _post(
            client, {"messages": _messages(), "max_tokens": 4, "exit": "router", "exit_threshold": threshold}
        )
        assert reply.status_code == 200, reply.text
        extras = seen[threshold] = reply.json()["dyvte"]
        expected = model.ask(IMAGE, QUESTION, max_new_tokens=4, exit="router", threshold=threshold)
        assert extras["exit_layer"] == expected.exit_layer and extras["threshold"] == threshold
        assert extras["exit_probs"] == {str(k): v for k, v in expected.exit_probs.items()}
        macs = expected.prefill_macs
        assert extras["prefill_macs_saved"] == pytest.approx(1 - macs["actual"] / macs["full"])
        assert extras["visual_tokens"] == expected.visual_tokens and extras["tokens_per_s"] > 0
    first = min(int(k) for k in seen[0.0]["exit_probs"])
    assert seen[0.0]["exit_layer"] == first and seen[1.0]["exit_layer"] is None  # p >= 0 always, p >= 1 never
    reply = _post(client, {"messages": _messages(), "max_tokens": 4, "exit": "never"})
    assert reply.json()["dyvte"]["threshold"] is None and reply.json()["dyvte"]["exit_probs"] == {}


def test_the_web_page_and_its_assets_are_served_with_a_policy_that_allows_this_server_alone(served):
    client, _ = served
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "http" not in policy
    for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css")):
        assert f"/web/{name}" in page.text
        asset = client.get(f"/web/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
        assert (
            "http://" not in asset.text.replace("http://www.w3.org/2000/svg", "")
            and "https://" not in asset.text
        )
    assert (
        client.get("/web/missing.js").status_code == 404 and client.get("/web/..%2Fapp.py").status_code == 404
    )


def test_unknown_routes_and_methods_answer_json(served):
    client, _ = served
    for method, path, status in (("get", "/nowhere", 404), ("get", "/v1/chat/completions", 405),
                                 ("delete", "/v1/models", 405)):  # fmt: skip
        reply = getattr(client, method)(path)
        assert reply.status_code == status and reply.json()["error"]["message"], (path, reply.text)


def test_a_tiny_temperature_is_answered_and_equals_greedy(served):
    """1e-320 once turned the logits into NaN inside the engine thread, which died silently."""
    client, engine = served
    greedy = _good(client)
    reply = _post(client, {"messages": _messages(), "max_tokens": 8, "temperature": 1e-320, "seed": 3})
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == greedy
    reply = _post(client, {"messages": _messages(), "max_tokens": 8, "temperature": 1.0, "top_p": 0})
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == greedy
    assert engine.failure is None and client.get("/health").json()["status"] == "ok"


def test_a_failure_inside_a_decode_step_ends_only_that_request(model, monkeypatch):
    """An exception in a step is a 500 for the request it hit; the engine serves the next one."""
    from dyvte_rt.runtime.batch import DecodeBatch

    client, engine = _client(model)
    try:
        real, calls = DecodeBatch.step, {"n": 0}

        def flaky(self):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("simulated kernel failure")
            return real(self)

        monkeypatch.setattr(DecodeBatch, "step", flaky)
        failed = _post(client, {"messages": _messages(), "max_tokens": 8, "ignore_eos": True})
        assert failed.status_code == 500, failed.text
        assert (
            failed.json()["error"]["type"] == "server_error"
            and "simulated" in failed.json()["error"]["message"]
        )
        assert engine.failure is None and client.get("/health").status_code == 200
        assert _good(client)
    finally:
        engine.stop()


def test_a_stopped_engine_is_503_on_health_and_on_new_requests(model, monkeypatch):
    from dyvte_rt.serving.engine import BatchEngine

    client, engine = _client(model)
    try:
        monkeypatch.setattr(BatchEngine, "_admit", lambda self: (_ for _ in ()).throw(MemoryError("boom")))
        reply = _post(client, {"messages": _messages(), "max_tokens": 4})
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "engine_down", reply.text
        health = client.get("/health")
        assert health.status_code == 503 and "MemoryError" in health.json()["reason"]
        again = _post(client, {"messages": _messages(), "max_tokens": 4})
        assert again.status_code == 503 and "stopped" in again.json()["error"]["message"]
    finally:
        engine.stop(timeout=5)


def test_a_burst_admits_slots_plus_queue_and_refuses_the_rest_with_retry_after(model, monkeypatch):
    """Requests being prefilled count against the bound (they once did not, and 16 queued)."""
    from dyvte_rt.runtime.batch import StartingPrefill

    client, engine = _client(model, max_batch=4, max_queue=4)
    gate = threading.Event()
    real = StartingPrefill.advance
    monkeypatch.setattr(StartingPrefill, "advance", lambda self: (gate.wait(30), real(self))[1])
    replies = []
    try:

        def ask():
            replies.append(_post(client, {"messages": _messages(), "max_tokens": 2}))

        threads = [threading.Thread(target=ask) for _ in range(16)]
        for thread in threads:
            thread.start()
        deadline = time.time() + 30
        while sum(r.status_code == 503 for r in replies) < 8 and time.time() < deadline:
            time.sleep(0.02)
        gate.set()
        for thread in threads:
            thread.join(60)
    finally:
        gate.set()
        engine.stop()
    codes = sorted(r.status_code for r in replies)
    assert codes == [200] * 8 + [503] * 8, codes  # 4 in slots + 4 queued; the rest refused
    refused = next(r for r in replies if r.status_code == 503)
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["code"] == "queue_full"


@contextmanager
def _live(model):
    """The app on a real socket (uvicorn in a thread), for what a test client cannot show: a
    client that goes away."""
    import uvicorn

    app, engine = _app(model)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(30)
        engine.stop()


def _chat(url: str, body: dict) -> dict:
    """One chat completion from the live server, answered in full."""
    request = urllib.request.Request(
        url + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.load(reply)


def _cancelled(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as metrics:
        for line in metrics.read().decode().splitlines():
            if line.startswith('dyvte_requests_total{outcome="cancelled"}'):
                return float(line.split()[-1])
    return 0.0


def test_decode_steps_go_on_while_an_arriving_image_is_encoded(model, monkeypatch):
    """The vision graph runs on the server's preparing thread: it waits here for 5 decode steps of a
    running stream, which could never come if it ran on the engine thread (it would time out)."""
    from dyvte_rt.runtime.batch import DecodeBatch

    expected = model.ask(IMAGE, QUESTION, max_new_tokens=8)
    steps = [0]
    real_step = DecodeBatch.step
    monkeypatch.setattr(
        DecodeBatch, "step", lambda self: (steps.__setitem__(0, steps[0] + 1), real_step(self))[1]
    )
    vision = model.pipeline.sessions["vision"]
    real_run, seen = vision.run, []

    def slow_vision(feeds, into=None):
        start, deadline = steps[0], time.time() + 20
        while steps[0] < start + 5 and time.time() < deadline:
            time.sleep(0.005)
        seen.append(steps[0] - start)
        return real_run(feeds, into)

    monkeypatch.setattr(vision, "run", slow_vision)
    text_only = [{"role": "user", "content": "count to one hundred"}]
    with _live(model) as (url, _):
        body = {"messages": text_only, "max_tokens": 200, "ignore_eos": True, "stream": True}
        running = urllib.request.urlopen(
            urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                   {"Content-Type": "application/json"}), timeout=60)  # fmt: skip
        running.readline()  # the stream has started: its request holds a slot and decodes
        answer = _chat(url, {"messages": _messages(), "max_tokens": 8})
        running.close()
    assert len(seen) == 1 and seen[0] >= 5, seen  # encoded once, on the preparing thread, while decoding
    assert answer["choices"][0]["message"]["content"] == expected.text
    assert answer["dyvte"]["exit_layer"] == expected.exit_layer


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priorities are Linux's")
def test_with_low_vision_priority_the_encoder_runs_low_and_decoding_does_not(model, demo_bundle, monkeypatch):
    """`--vision-priority low`: the vision session's worker and the preparing
    thread that runs it at nice 19, every other graph's worker and the engine thread as before,
    and the same answer."""
    from dyvte_rt import DyvteModel
    from dyvte_rt.runtime.batch import DecodeBatch
    from engines import host_threads

    expected = model.ask(IMAGE, QUESTION, max_new_tokens=8)
    normal = host_threads.nice_of(threading.get_native_id())
    before = host_threads.thread_ids()
    with DyvteModel.load(demo_bundle, threads=2, vision_priority="low") as low_model:
        workers = host_threads.thread_ids() - before  # one per graph (2 threads: the caller + 1)
        lowered = [t for t in workers if host_threads.nice_of(t) == host_threads.LOWEST]
        assert len(workers) == len(low_model.bundle.sessions) and len(lowered) == 1
        seen: dict[str, set[int]] = {"vision": set(), "step": set()}

        def recorded(kind, real):
            def run(*args, **kwargs):
                seen[kind].add(host_threads.nice_of(threading.get_native_id()))
                return real(*args, **kwargs)

            return run

        vision = low_model.pipeline.sessions["vision"]
        monkeypatch.setattr(vision, "run", recorded("vision", vision.run))
        monkeypatch.setattr(DecodeBatch, "step", recorded("step", DecodeBatch.step))
        with _live(low_model) as (url, _):
            answer = _chat(url, {"messages": _messages(), "max_tokens": 8})
    assert seen == {"vision": {host_threads.LOWEST}, "step": {normal}}
    assert answer["choices"][0]["message"]["content"] == expected.text


def test_an_unknown_vision_priority_is_refused_in_one_line(demo_bundle):
    from dyvte_rt import DyvteModel
    from dyvte_rt.errors import InputError

    with pytest.raises(InputError, match="vision priority must be one of normal, low, not 'high'"):
        DyvteModel.load(demo_bundle, vision_priority="high")


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_frees_its_slot_within_a_step(model, monkeypatch, stream):
    """Each step slowed to 20 ms, so 170 tokens would take 3.4 s: the slot must be free long before."""
    from dyvte_rt.runtime.batch import DecodeBatch

    real = DecodeBatch.step
    monkeypatch.setattr(DecodeBatch, "step", lambda self: (time.sleep(0.02), real(self))[1])
    with _live(model) as (url, engine):
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps({"messages": _messages(), "max_tokens": 170, "ignore_eos": True, "stream": stream})
        client = socket.create_connection((host, int(port)), timeout=30)
        client.sendall(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        deadline = time.time() + 10
        while engine.active == 0 and time.time() < deadline:  # generating
            time.sleep(0.01)
        if stream:
            assert client.recv(4096).startswith(b"HTTP/1.1 200")  # the first chunk has come
        time.sleep(0.1)
        client.close()
        left = time.time()
        while engine.active and time.time() < left + 10:
            time.sleep(0.01)
        assert engine.active == 0 and time.time() - left < 1.5  # not the 3.4 s the answer would take
        assert _cancelled(url) == 1


def test_the_api_key_is_checked_before_the_body_is_read(model):
    client, engine = _client(model, api_key="k")
    try:
        reply = _post(client, b"not even json")
        assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
        assert (
            _post(client, {"messages": _messages(), "max_tokens": 2}, authorization="Bearer k").status_code
            == 200
        )
    finally:
        engine.stop()


def test_streamed_text_equals_the_answer_and_usage_comes_as_openai_sends_it(served):
    client, _ = served
    whole = _good(client)
    words = whole.split()
    stop = " ".join(words[1:3]) if len(words) >= 3 else whole[1:]  # a stop string of several tokens
    body = {"messages": _messages(), "max_tokens": 8, "stop": stop, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with client.stream("POST", "/v1/chat/completions", json=body) as reply:
        events = [json.loads(line[6:]) for line in reply.iter_lines() if line.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == whole[: whole.index(stop)] and stop not in text
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] > 0
    assert all("usage" not in e for e in events[:-1])
    plain = {**body, "stream_options": None}
    with client.stream("POST", "/v1/chat/completions", json=plain) as reply:
        events = [json.loads(line[6:]) for line in reply.iter_lines() if line.startswith("data: {")]
    assert all("usage" not in e for e in events)


def test_images_are_bounded_in_the_cli_and_the_api_too(model, tmp_path):
    from dyvte_rt.errors import InputError

    wide = tmp_path / "wide.png"
    Image.new("RGB", (10000, 1)).save(wide)
    with pytest.raises(InputError, match="wider than high"):
        model.ask(wide, QUESTION)
    with pytest.raises(InputError, match="crop it"):
        model.ask(Image.new("RGB", (1, 64)), QUESTION)
    assert model.ask(Image.new("RGB", (400, 20)), QUESTION, max_new_tokens=2).token_ids  # 20:1 is fine


def test_an_image_over_the_servers_memory_budget_is_a_400_and_a_big_jpeg_is_answered(model):
    client, engine = _client(model, image_memory=8 << 20)
    try:
        refused = _post(client, {"messages": _messages(url=_png(1500, 1500)), "max_tokens": 2})
        assert refused.status_code == 400
        assert "1500x1500 RGB" in refused.json()["error"]["message"]
        buffer = io.BytesIO()
        Image.new("RGB", (3000, 2000), (200, 30, 30)).save(buffer, format="JPEG")  # 24 MB decoded
        jpeg = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
        answered = _post(client, {"messages": _messages(url=jpeg), "max_tokens": 2})
        assert answered.status_code == 200, answered.text
        assert _good(client)
    finally:
        engine.stop()


FIELDS = st.sampled_from(["temperature", "top_p", "seed", "max_tokens", "stop", "stream", "exit", "n",
                          "messages", "model", "ignore_eos", "stream_options", "logprobs"])  # fmt: skip
VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(FIELDS, VALUES, max_size=4))
def test_any_request_body_gets_a_json_status_and_never_a_500_for_a_client_mistake(served, fields):
    client, engine = served
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}
    try:
        data = json.dumps(body, allow_nan=True)
    except (TypeError, ValueError):
        return
    reply = _post(client, data.encode())
    assert reply.headers["content-type"].startswith(("application/json", "text/event-stream")), reply.text
    assert reply.status_code in (200, 400, 404, 413), (body, reply.status_code, reply.text)
    if reply.status_code != 200:
        assert reply.json()["error"]["message"]
    assert engine.failure is None


def test_after_the_fuzz_a_good_request_is_answered_as_before(served):
    client, _ = served
    first, second = _good(client), _good(client)
    assert first == second and first
    assert np.isfinite(client.get("/health").json()["active"])
