"""The exit switch (docs/exit-semantics.md): during prefill, after each segment that ends at a
candidate layer, ask every undecided sample's policy (with its router's two logits, the only host
transfer) and, for the samples that exit, keep only their text rows — a gather on the backend. The
KV cache is never touched: layers after the exit simply see fewer rows."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from dyvte_rt.bundle import io_names as names
from dyvte_rt.bundle.manifest import SegmentInfo
from dyvte_rt.runtime.features import router_pool
from dyvte_rt.runtime.policy import ExitPolicy, exit_probability
from engines import Backend, Session, Value


@dataclass(frozen=True)
class ExitGraphs:
    """What the switch runs and needs to know: the router and exit-gather sessions and their backend."""

    sessions: dict[str, Session]
    backend: Backend
    candidates: tuple[int, ...]
    image_token: int
    dtype: np.dtype  # the bundle's float type (router pool weights)


class ExitSwitch:
    """Asks each sample's policy at each candidate layer, once, and drops the visual tokens of the
    samples that exit, on the backend. Rows stay right-padded to the longest sample."""

    def __init__(
        self,
        graphs: ExitGraphs,
        policies: list[ExitPolicy],
        ids: list[np.ndarray],
        valid: np.ndarray,
    ) -> None:
        self.graphs = graphs
        self.policies = policies
        batch = len(policies)
        self.exit_layers: list[int | None] = [None] * batch
        self.exit_probs: list[dict[int, float]] = [{} for _ in range(batch)]
        self.ms = 0.0  # reading router outputs, deciding and dropping the visual tokens
        image = graphs.image_token
        self._visual = [bool((sample == image).any()) for sample in ids]
        self._text = [np.flatnonzero(sample != image) for sample in ids]  # kept at an exit
        self._pool = None
        if any(p.needs_routers for p in self.policies):
            self._pool = np.zeros((batch, int(valid.max())), dtype=graphs.dtype)  # [B, S]
            for row, sample in enumerate(ids):
                self._pool[row, : len(sample)] = router_pool(sample, image, graphs.dtype)[0]

    def __call__(
        self, segment: SegmentInfo, hidden: Value, positions: np.ndarray, valid: np.ndarray
    ) -> tuple[Value, np.ndarray, np.ndarray]:
        layer = segment.last_layer
        undecided = [b for b in range(len(self.policies)) if self._visual[b] and self.exit_layers[b] is None]
        if layer not in self.graphs.candidates or not undecided:
            return hidden, positions, valid
        started = time.perf_counter()
        keep_if_exit = self._keep(undecided, valid)  # the rows each sample keeps if every undecided one exits
        probs, gathered = {}, None
        if segment.router is not None and any(self.policies[b].needs_routers for b in undecided):
            feeds = {
                names.HIDDEN_OUT: hidden,
                names.ROUTER_POOL: self._pool,
                names.LAST_INDEX: valid - 1,
                names.KEEP_INDEX: keep_if_exit,
            }
            out = self.graphs.sessions[segment.router].run(feeds)
            logits = self.graphs.backend.download(out[names.ROUTER_LOGITS])  # [B, 2]
            for b in undecided:
                if self.policies[b].needs_routers:  # the others did not ask (a batch ran the router anyway)
                    probs[b] = exit_probability(logits[b])
                    self.exit_probs[b][layer] = probs[b]
            gathered = out[names.HIDDEN_IN]  # the router graph also gathers, as if all exit
        exiting = [b for b in undecided if self.policies[b].decide(layer, probs.get(b))]
        if exiting:
            for b in exiting:
                self.exit_layers[b] = layer
            keep = keep_if_exit if exiting == undecided else self._keep(exiting, valid)
            if gathered is None or exiting != undecided:
                feeds = {names.HIDDEN_OUT: hidden, names.KEEP_INDEX: keep}
                gathered = self.graphs.sessions["exit_gather"].run(feeds)[names.HIDDEN_IN]
            hidden = gathered
            valid = valid.copy()
            for b in exiting:
                valid[b] = len(self._text[b])
            positions = np.take_along_axis(
                positions, np.broadcast_to(keep, (*positions.shape[:-2], *keep.shape)), -1
            )
            if self._pool is not None:  # samples still undecided keep their rows, and so their pool
                self._pool = np.take_along_axis(self._pool, keep, axis=1)
        self.ms += 1e3 * (time.perf_counter() - started)
        return hidden, positions, valid

    def _keep(self, exiting: list[int], valid: np.ndarray) -> np.ndarray:
        """[B, K] row indices to keep: the text rows of `exiting` samples, every valid row of the
        others, right-padded with row 0 to the longest (padding rows are never attended)."""
        rows = [self._text[b] if b in exiting else np.arange(valid[b]) for b in range(len(valid))]
        keep = np.zeros((len(rows), max(len(r) for r in rows)), dtype=np.int64)
        for b, r in enumerate(rows):
            keep[b, : len(r)] = r
        return keep
