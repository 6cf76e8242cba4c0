"""The table `python -m export.build` prints: one row per graph, with its parity and quality."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GraphRow:
    name: str
    parameters: int
    size_bytes: int
    seconds: float
    max_abs_error: float  # float graph against its torch module
    quant_cosine: float | None = None  # quantised graph against the float graph (min over outputs)


def format_summary(rows: list[GraphRow]) -> str:
    quantized = any(r.quant_cosine is not None for r in rows)
    header = f"{'graph':<12} {'parameters':>12} {'size':>10} {'export s':>9} {'max abs err':>12}"
    header += f" {'quant cos':>10}" if quantized else ""
    lines = [header, "-" * len(header)]
    for r in rows:
        line = (
            f"{r.name:<12} {r.parameters:>12,} {_size(r.size_bytes):>10} {r.seconds:>9.1f} "
            f"{r.max_abs_error:>12.2e}"
        )
        if quantized:
            line += f" {r.quant_cosine:>10.5f}" if r.quant_cosine is not None else f" {'float':>10}"
        lines.append(line)
    total = sum(r.size_bytes for r in rows)
    lines.append(
        f"{'total':<12} {sum(r.parameters for r in rows):>12,} {_size(total):>10} "
        f"{sum(r.seconds for r in rows):>9.1f}"
    )
    return "\n".join(lines)


def _size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")
