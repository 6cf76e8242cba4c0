"""The arguments of the benchmarks that time one request, over and over, against one bundle."""

from __future__ import annotations

import argparse
from pathlib import Path


def single_request_parser(doc: str) -> argparse.ArgumentParser:
    """A parser with --bundle, --image, --question, --exit and --threads; `doc` is the script's."""
    parser = argparse.ArgumentParser(
        description=doc.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--image", type=Path, default=Path("examples/three_shapes.png"))
    parser.add_argument("--question", default="what shape is in the top left?")
    parser.add_argument("--exit", default="never", help="exit policy")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    return parser
