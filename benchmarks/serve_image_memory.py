"""Peak memory of `dyvte-rt serve` for the costliest images it accepts, against a normal photo.

    python benchmarks/serve_image_memory.py --bundle ~/.cache/dyvte-rt/demo-bundle

For every case a fresh server (its own process, 127.0.0.1) answers three requests with a normal
photo (a JPEG at the model's input size), its peak resident memory (VmHWM) is read, then it answers
one request with the case's image and VmHWM is read again. Reports each case's peak against the
normal photo's (the target: at most 1.5x) and what the server answered. Images are made here, each
the worst of its kind that the default limits accept (or should refuse), and kept small on the wire
(flat colours compress well), so the body limit does not refuse them first.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import _rss_mb, _wait


def _encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth gradients with a little noise: a photo's statistics, a JPEG's size."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [
        127 + 100 * np.sin(x / max(width, 1) * 6.3 + k) * np.cos(y / max(height, 1) * 4.1 + k)
        for k in range(3)
    ]
    pixels = np.stack(channels, -1) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _noise(width: int, height: int) -> Image.Image:
    """Incompressible: as many bytes on the wire as pixels hold."""
    return Image.fromarray(
        np.random.default_rng(2).integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB"
    )


def _flat(mode: str, width: int, height: int) -> Image.Image:
    colour = {"RGB": (200, 30, 30), "RGBA": (200, 30, 30, 128), "I;16": 40000, "L": 128, "P": 3, "1": 1}[mode]
    return Image.new(mode, (width, height), colour)


def cases(side: int) -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, MIME type). `side`: the model's input size."""
    return {
        "phone photo 4032x3024 JPEG": (_encode(_photo(4032, 3024), "JPEG", quality=90), "image/jpeg"),
        "8000x8000 JPEG": (_encode(_flat("RGB", 8000, 8000), "JPEG", quality=90), "image/jpeg"),
        "8000x8000 RGB PNG": (_encode(_flat("RGB", 8000, 8000), "PNG"), "image/png"),
        "8000x8000 RGBA PNG": (_encode(_flat("RGBA", 8000, 8000), "PNG"), "image/png"),
        "8000x8000 16-bit grey PNG": (_encode(_flat("I;16", 8000, 8000), "PNG"), "image/png"),
        "35700x1785 (20:1) RGB PNG": (_encode(_flat("RGB", 35700, 1785), "PNG"), "image/png"),
        "10000x1 PNG": (_encode(_flat("RGB", 10000, 1), "PNG"), "image/png"),
        "8000x8000 palette GIF": (_encode(_flat("P", 8000, 8000), "GIF"), "image/gif"),
        "8000x8000 WebP": (_encode(_flat("RGB", 8000, 8000), "WEBP", lossless=True), "image/webp"),
        "4000x4000 WebP": (_encode(_flat("RGB", 4000, 4000), "WEBP", lossless=True), "image/webp"),
        "8000x8000 TIFF (deflate)": (
            _encode(_flat("RGB", 8000, 8000), "TIFF", compression="tiff_adobe_deflate"),
            "image/tiff",
        ),
        "4000x2000 8-bit BMP": (_encode(_flat("P", 4000, 2000), "BMP"), "image/bmp"),
        "3840x2160 RGBA PNG screenshot": (_encode(_flat("RGBA", 3840, 2160), "PNG"), "image/png"),
        "3000x2000 RGBA PNG": (_encode(_flat("RGBA", 3000, 2000), "PNG"), "image/png"),
        "2600x1900 RGBA PNG (just within 40 MB)": (_encode(_flat("RGBA", 2600, 1900), "PNG"), "image/png"),
        "3500x2800 RGB PNG (just within 40 MB)": (_encode(_flat("RGB", 3500, 2800), "PNG"), "image/png"),
        "2200x2200 noise PNG (a 19.7 MB body)": (_encode(_noise(2200, 2200), "PNG"), "image/png"),
        f"{side}x{side} JPEG (the normal photo again)": (
            _encode(_photo(side, side, seed=1), "JPEG", quality=90),
            "image/jpeg",
        ),
    }


def _body(data: bytes, mime: str) -> bytes:
    url = f"data:{mime};base64," + base64.b64encode(data).decode()
    content = [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "what shape is it?"},
    ]
    return json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": 4}).encode()


def _ask(url: str, body: bytes) -> str:
    request = urllib.request.Request(
        url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return f"{response.status}"
    except urllib.error.HTTPError as err:
        message = json.loads(err.read())["error"]["message"]
        return f"{err.code} {message[:90]}"


def _peak_mb(pid: int) -> float:
    peak = _rss_mb(pid, "VmHWM")
    if math.isnan(peak):
        raise SystemExit("no VmHWM in /proc (Linux only)")
    return peak


def measure(bundle: Path, port: int, name: str, image: tuple[bytes, str], normal: bytes) -> dict:
    command = [sys.executable, "-m", "dyvte_rt.cli", "serve", "--bundle", str(bundle), "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile(mode="w+") as log:
        server = subprocess.Popen(command, stderr=log, text=True)
        try:
            _wait(url, server, log)
            for _ in range(3):
                _ask(url, normal)
            before = _peak_mb(server.pid)
            answer = _ask(url, _body(*image))
            after = _peak_mb(server.pid)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    return {
        "case": name,
        "wire_bytes": len(image[0]),
        "normal_peak_mb": before,
        "peak_mb": after,
        "ratio": after / before,
        "answer": answer,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path.home() / ".cache/dyvte-rt/demo-bundle")
    parser.add_argument("--port", type=int, default=8767)
    parser.add_argument("--only", default=None, help="run the cases whose name contains this")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    vision = json.loads((args.bundle / "manifest.json").read_text())["vision"]
    side = int(vision["image_width"])
    normal = _body(_encode(_photo(side, side), "JPEG", quality=90), "image/jpeg")
    rows = []
    for name, image in cases(side).items():
        if args.only and args.only not in name:
            continue
        row = measure(args.bundle, args.port, name, image, normal)
        rows.append(row)
        print(
            f"{name:44s} {row['wire_bytes'] / 1024:9.0f} KiB  peak {row['peak_mb']:6.0f} MB vs "
            f"{row['normal_peak_mb']:6.0f} MB = {row['ratio']:.2f}x  {row['answer']}",
            flush=True,
        )
    worst = max(rows, key=lambda row: row["ratio"])
    print(f"worst: {worst['case']} at {worst['ratio']:.2f}x the normal photo's peak (target <= 1.5x)")
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
