"""`dyvte-rt serve` as a user starts it: a subprocess on a free local port, waited for until its
/health answers, and the chat messages the tests send it (the server tests, the Ray Serve tests
and the web page's browser test share them)."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

IMAGE = Path(__file__).resolve().parents[2] / "examples/three_shapes.png"
QUESTIONS = [
    "what color is the shape in the top left?",
    "what shape is in the top right?",
    "how many shapes are there?",
    "where is the blue shape?",
]


def data_uri(path: Path = IMAGE) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def messages(question: str, url: str | None = None) -> list[dict]:
    """One user message: an image (the example's unless `url` says otherwise) and a question."""
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url or data_uri()}},
                {"type": "text", "text": question},
            ],
        }
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command(bundle: Path, *options: str) -> list[str]:
    """`dyvte-rt serve --bundle BUNDLE OPTIONS...` as this interpreter runs it."""
    return [sys.executable, "-m", "dyvte_rt.cli", "serve", "--bundle", str(bundle), *options]


def start_server(bundle: Path, *options: str, wait_s: float = 30.0) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = serve_command(bundle, "--port", str(port), *options)
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                if json.load(response)["status"] == "ok":
                    return server, url
        except OSError:
            time.sleep(0.1)
        if server.poll() is not None:
            raise AssertionError(server.stderr.read())
    raise AssertionError("the server did not start")
