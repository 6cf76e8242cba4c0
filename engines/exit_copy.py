"""The exit switch as a list of contiguous copies, for backends whose values are raw device buffers.

At the exit (docs/exit-semantics.md) each sample keeps the rows the runtime names in `keep` [B, K]
of the hidden state [B, S, D] — its text rows, or all its valid rows if it stays — and the next
segment reads [B, K, D]. ONNX Runtime does this with the `exit_gather` graph; a TensorRT backend holds plain
device buffers and does it with a few device-to-device copies instead: the text of a LLaVA prompt
is two runs (before and after the image), so a sample costs two copies however long it is.

The plan is a pure function of `keep`, so it is tested here on numpy arrays against the runtime's
own gather, and applied on a GPU by `engines.cuda_memory.copy_runs`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CopyRun:
    """Copy `rows` consecutive rows from row `src_row` of the source to row `dst_row` of the target
    (rows of the flattened [B*S, D] source and [B*K, D] target)."""

    src_row: int
    dst_row: int
    rows: int

    def byte_range(self, row_bytes: int) -> tuple[int, int, int]:
        """(source offset, target offset, byte count) for rows of `row_bytes` bytes."""
        return self.src_row * row_bytes, self.dst_row * row_bytes, self.rows * row_bytes


def exit_copy_plan(keep: np.ndarray, source_rows: int) -> list[CopyRun]:
    """Copies that turn a [B, S, D] hidden state into the [B, K, D] one the runtime's gather gives,
    on every row the next segment attends to.

    keep: [B, K] row indices into each sample's S rows, increasing, right-padded by repeating row 0
    (as the runtime writes them). Padding rows are never attended, so they are not copied: the
    first entry not above its predecessor ends a sample's rows. Consecutive indices merge into
    one run.
    """
    keep = np.asarray(keep)
    if keep.ndim != 2:
        raise ValueError(f"keep must be [B, K], got shape {keep.shape}")
    if keep.size and (keep.min() < 0 or keep.max() >= source_rows):
        raise ValueError(f"keep indexes rows outside 0..{source_rows - 1}")
    plan: list[CopyRun] = []
    batch, width = keep.shape
    for b in range(batch):
        row = keep[b]
        steps = np.diff(row)
        length = width if np.all(steps > 0) else int(np.argmax(steps <= 0)) + 1  # before the padding
        breaks = np.flatnonzero(steps[: length - 1] != 1) + 1  # where a new run starts
        for start, end in zip(np.r_[0, breaks], np.r_[breaks, length], strict=True):
            plan.append(CopyRun(b * source_rows + int(row[start]), b * width + int(start), int(end - start)))
    return plan


def apply_copy_plan(plan: list[CopyRun], source: np.ndarray, kept_rows: int) -> np.ndarray:
    """The plan applied on the host: source [B, S, D] -> [B, K, D] (what a device does with memcpy)."""
    batch, source_rows, dim = source.shape
    flat = source.reshape(batch * source_rows, dim)
    out = np.zeros((batch * kept_rows, dim), dtype=source.dtype)  # padding rows stay zero
    for run in plan:
        out[run.dst_row : run.dst_row + run.rows] = flat[run.src_row : run.src_row + run.rows]
    return out.reshape(batch, kept_rows, dim)
