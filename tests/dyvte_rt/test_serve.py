"""`dyvte-rt serve` against a live server on 127.0.0.1 with the demo bundle."""

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.dyvte_rt.served import IMAGE, QUESTIONS
from tests.dyvte_rt.served import data_uri as _data_uri
from tests.dyvte_rt.served import messages as _messages
from tests.dyvte_rt.served import start_server as _start

KEY = "test-key"


@pytest.fixture(scope="module")
def server(demo_bundle):
    process, url = _start(demo_bundle, "--max-batch", "4", "--api-key", KEY, "--max-body-mb", "1")
    yield url
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)


def _post(
    url: str, body: bytes | dict, key: str | None = KEY, path: str = "/v1/chat/completions"
) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url + path, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _infer(bundle: Path, question: str) -> dict:
    command = [
        sys.executable,
        "-m",
        "dyvte_rt.cli",
        "infer",
        str(IMAGE),
        question,
        "--bundle",
        str(bundle),
        "--json",
    ]
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True, timeout=120).stdout)


def test_the_openai_client_gets_what_infer_gives(server, demo_bundle):
    openai = pytest.importorskip("openai")  # in the dev extra; installed wherever the tests run
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY)
    model = client.models.list().data[0].id
    for question in QUESTIONS[:2]:
        expected = _infer(demo_bundle, question)
        reply = client.chat.completions.create(model=model, messages=_messages(question), max_tokens=16)
        assert reply.choices[0].message.content == expected["answer"]
        assert reply.choices[0].finish_reason == expected["finish_reason"]
        assert reply.model_extra["dyvte"]["exit_layer"] == expected["exit_layer"]
        assert reply.usage.prompt_tokens == expected["prompt_tokens"]
        stream = client.chat.completions.create(
            model=model, messages=_messages(question), max_tokens=16, stream=True
        )
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert "".join(pieces) == expected["answer"]


def test_32_requests_from_8_clients_each_equal_their_single_answer(server, demo_bundle):
    """Every answer 16 tokens long (`ignore_eos`): the demo's own answers end after a few tokens, and
    on a busy machine 8 clients' short requests could all run one after another."""
    from dyvte_rt.api.model import DyvteModel

    with DyvteModel.load(demo_bundle) as model:
        expected = {q: model.ask(IMAGE, q, max_new_tokens=16, ignore_eos=True) for q in QUESTIONS}

    def ask(index: int) -> tuple[str, dict]:
        question = QUESTIONS[index % len(QUESTIONS)]
        body = {"messages": _messages(question), "max_tokens": 16, "ignore_eos": True}
        return question, _post(server, body)[1]

    before = _step_counts(server)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, range(32)))
    assert len(results) == 32
    for question, body in results:
        assert body["choices"][0]["message"]["content"] == expected[question].text, question
        assert body["usage"]["completion_tokens"] == 16
        assert body["dyvte"]["exit_layer"] == expected[question].exit_layer
    alone, steps = (after - earlier for after, earlier in zip(_step_counts(server), before, strict=True))
    assert steps > alone  # some decode steps served several requests at once: a serial engine fails here


def _step_counts(url: str) -> tuple[float, float]:
    """(decode steps that served one request, all decode steps) from /metrics."""
    request = urllib.request.Request(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        lines = response.read().decode().splitlines()
    value = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if line[:1] != "#"}
    return value['dyvte_decode_step_requests_bucket{le="1.0"}'], value["dyvte_decode_step_requests_count"]


def _bad_inputs(tmp: Path) -> dict[str, tuple[bytes | dict, str | None, int]]:
    text_file = tmp / "notes.png"
    text_file.write_text("not an image")
    return {
        "invalid JSON": (b"{not json", KEY, 400),
        "bad base64": ({"messages": _messages("what?", "data:image/png;base64,@@@@")}, KEY, 400),
        "text as image": ({"messages": _messages("what?", _data_uri(text_file))}, KEY, 400),
        "unknown model": ({"model": "gpt-7", "messages": _messages("what?")}, KEY, 404),
        "file path as image": ({"messages": _messages("what?", str(IMAGE))}, KEY, 400),
        "missing key": ({"messages": _messages("what?")}, None, 401),
        "no messages": ({"messages": []}, KEY, 400),
        "bad policy": ({"messages": _messages("what?"), "exit": "sometimes"}, KEY, 400),
    }


def test_bad_requests_get_a_4xx_json_error_and_the_server_keeps_serving(server, tmp_path):
    for name, (body, key, status) in _bad_inputs(tmp_path).items():
        try:
            code, reply = _post(server, body, key=key)
        except OSError as err:
            raise AssertionError(f"{name}: {err}") from err
        assert code == status, (name, code, reply)
        assert reply["error"]["message"], name
    assert _oversized(server) == 413  # refused from its Content-Length, before the body is read
    code, reply = _post(server, {"messages": _messages(QUESTIONS[0]), "max_tokens": 4})
    assert code == 200 and reply["choices"][0]["message"]["content"]


def _oversized(url: str) -> int:
    import http.client

    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.putrequest("POST", "/v1/chat/completions")
    for name, value in (("Content-Type", "application/json"), ("Authorization", f"Bearer {KEY}")):
        connection.putheader(name, value)
    connection.putheader("Content-Length", str(2 << 20))  # over the server's --max-body-mb 1
    connection.endheaders(b'{"messages": ')
    response = connection.getresponse()
    assert json.loads(response.read())["error"]["code"] == "body_too_large"
    return response.status


def test_metrics_and_models(server):
    code, _ = _post(server, {"messages": _messages(QUESTIONS[0]), "max_tokens": 4, "ignore_eos": True})
    assert code == 200
    with pytest.raises(urllib.error.HTTPError) as denied:  # behind the key unless --metrics-public
        urllib.request.urlopen(f"{server}/metrics", timeout=10)
    assert denied.value.code == 401
    request = urllib.request.Request(f"{server}/metrics", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    assert (
        "dyvte_requests_total" in text and "dyvte_exit_layer_bucket" in text and "dyvte_queue_depth" in text
    )
    value = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line[:1] != "#"
    }
    answered = value['dyvte_requests_total{outcome="ok"}']  # each has one gap fewer than tokens
    assert value["dyvte_inter_token_seconds_count"] == value["dyvte_generated_tokens_total"] - answered
    request = urllib.request.Request(f"{server}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert json.load(response)["data"][0]["object"] == "model"


def _stream_request(url: str, max_tokens: int, key: str | None = None, ignore_eos: bool = False):
    body = {"messages": _messages(QUESTIONS[0]), "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    body = json.dumps({**body, "ignore_eos": True} if ignore_eos else body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url + "/v1/chat/completions", data=body, headers=headers, method="POST")
    return urllib.request.urlopen(request, timeout=120)


def _health(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
        return json.load(response)


def test_sigterm_finishes_4_requests_in_flight_and_exits_0_despite_a_stalled_upload(demo_bundle):
    process, url = _start(
        demo_bundle, "--max-batch", "4", "--context", "256", "--drain-seconds", "5", "--idle-timeout", "1"
    )
    host, port = url.removeprefix("http://").split(":")
    idle = socket.create_connection((host, int(port)), timeout=30)  # keep-alive, then silence
    idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = b""
    while b'"queued"' not in reply:  # headers and body may come in separate reads
        reply += idle.recv(4096)
    assert b"200 OK" in reply
    time.sleep(2.5)
    assert idle.recv(4096) == b""  # closed by the server after --idle-timeout
    idle.close()
    stalled = socket.create_connection((host, int(port)), timeout=30)  # sends half a request, then waits
    stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
    responses = [_stream_request(url, 170, ignore_eos=True) for _ in range(4)]  # 4 in flight
    firsts = [response.readline() for response in responses]
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        bodies = list(pool.map(lambda response: response.read().decode(), responses))
    for first, body in zip(firsts, bodies, strict=True):
        chunks = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]
        assert first.startswith(b"data: ") and chunks[-1]["usage"]["completion_tokens"] == 170  # all ran out
    assert process.wait(timeout=60) == 0  # a drained SIGTERM is a clean exit
    assert time.monotonic() - started < 5 + 10  # the drain bound, and the process's own teardown
    stalled.close()
    if os.name == "posix":
        with pytest.raises(OSError):
            _health(url)  # no longer accepting


def _read_all(sock: socket.socket) -> bytes:
    reply = b""
    while chunk := sock.recv(4096):
        reply += chunk
    return reply


def test_slow_headers_and_slow_bodies_get_a_json_408_and_the_connection_closed(demo_bundle):
    process, url = _start(demo_bundle, "--header-timeout", "1", "--body-timeout", "1.5")
    host, port = url.removeprefix("http://").split(":")
    try:
        silent = socket.create_connection((host, int(port)), timeout=10)  # opens, sends nothing
        trickle = socket.create_connection((host, int(port)), timeout=10)  # half a header, then waits
        trickle.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
        stalled = socket.create_connection((host, int(port)), timeout=10)  # headers, 1 of 1000 bytes
        stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
        started = time.monotonic()
        replies = [_read_all(sock) for sock in (silent, trickle, stalled)]  # each ends with a close
        assert time.monotonic() - started < 6
        for reply in replies:
            head, _, body = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408") and json.loads(body)["error"]["code"] == "timeout"
        assert b"body did not arrive within 1.5 s" in replies[2]
        busy = socket.create_connection((host, int(port)), timeout=10)  # slow but in time: answered
        busy.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        time.sleep(0.5)
        busy.sendall(b"Connection: close\r\n\r\n")
        assert _read_all(busy).startswith(b"HTTP/1.1 200")
        status, answer = _post(url, {"messages": _messages(QUESTIONS[0]), "max_tokens": 8}, key=None)
        assert status == 200 and answer["choices"][0]["message"]["content"]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
