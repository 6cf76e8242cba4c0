"""The exit switch (docs/exit-semantics.md): during prefill, after each segment that ends at a
candidate layer, ask every undecided sample's policy (with its router's two logits, the only host
transfer) and, for the samples that exit, keep only their text rows — a gather on the backend. The
KV cache is never touched: layers after the exit simply see fewer rows.

Pruning goes through the same switch: after the layer a sample's prune policy names (-1: before
layer 0), a ranking graph orders its visual tokens on the backend (FastV from the segment's
`prune_scores` output, DART from the hidden state), the ranking — indices only — comes to the
host, and the same gather keeps the text rows and the visual rows that stay. An exit at that
layer wins (nothing is left to prune)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from dyvte_rt.bundle import io_names as names
from dyvte_rt.bundle.manifest import SegmentInfo
from dyvte_rt.runtime.features import router_pool
from dyvte_rt.runtime.policy import ExitPolicy, exit_probability
from dyvte_rt.runtime.prune import NO_PRUNE, PrunePolicy, kept_from_ranking
from engines import Backend, Session, Value


@dataclass(frozen=True)
class ExitGraphs:
    """What the switch runs and needs to know: the router, exit-gather and ranking sessions and their
    backend."""

    sessions: dict[str, Session]
    backend: Backend
    candidates: tuple[int, ...]
    image_token: int
    dtype: np.dtype  # the bundle's float type (router pool weights)


class ExitSwitch:
    """Asks each sample's policy at each candidate layer, once, and drops the visual tokens of the
    samples that exit, on the backend; prunes each sample's visual tokens once, where its prune
    policy says. Rows stay right-padded to the longest sample."""

    def __init__(
        self,
        graphs: ExitGraphs,
        policies: list[ExitPolicy],
        ids: list[np.ndarray],
        valid: np.ndarray,
        prunes: list[PrunePolicy] | None = None,
    ) -> None:
        self.graphs = graphs
        self.policies = policies
        batch = len(policies)
        self.prunes = prunes or [NO_PRUNE] * batch
        self.exit_layers: list[int | None] = [None] * batch
        self.exit_probs: list[dict[int, float]] = [{} for _ in range(batch)]
        self.pruned_after: list[int | None] = [None] * batch
        self.kept_visual: list[list[int] | None] = [None] * batch
        self.ms = 0.0  # reading router outputs, deciding, ranking and dropping visual tokens
        image = graphs.image_token
        self._is_visual = [sample == image for sample in ids]  # [N_b] over the original tokens
        self._ordinal = [np.cumsum(v) - 1 for v in self._is_visual]  # token -> its visual ordinal
        self._visual = [bool(v.any()) for v in self._is_visual]
        self._origin = [np.arange(len(sample)) for sample in ids]  # the original token in each row
        self._pool = None
        if any(p.needs_routers for p in self.policies):
            self._pool = np.zeros((batch, int(valid.max())), dtype=graphs.dtype)  # [B, S]
            for row, sample in enumerate(ids):
                self._pool[row, : len(sample)] = router_pool(sample, image, graphs.dtype)[0]

    def needs_scores(self, layer: int) -> bool:
        """Whether a FastV prune may come after `layer`: it ranks with the segment's scores."""
        return any(p.active and p.method == "fastv" and p.layer == layer for p in self.prunes)

    def visual_rows(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample b's rows that hold visual tokens now, and which visual token (0..V-1) each holds."""
        if self.exit_layers[b] is not None:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        rows = np.flatnonzero(self._is_visual[b][self._origin[b]])
        return rows, self._ordinal[b][self._origin[b][rows]]

    def __call__(
        self,
        segment: SegmentInfo | None,
        hidden: Value,
        positions: np.ndarray,
        valid: np.ndarray,
        scores: Value | None = None,
    ) -> tuple[Value, np.ndarray, np.ndarray]:
        """After `segment` (None: the input embeddings, before layer 0); `scores`: the segment's
        prune_scores output, if it has one."""
        layer = segment.last_layer if segment is not None else -1
        started = time.perf_counter()
        if segment is not None:
            hidden, positions, valid = self._exits(segment, hidden, positions, valid)
        hidden, positions, valid = self._prunes(layer, hidden, positions, valid, scores)
        self.ms += 1e3 * (time.perf_counter() - started)
        return hidden, positions, valid

    # -- the exit ---------------------------------------------------------------------------------

    def _exits(
        self, segment: SegmentInfo, hidden: Value, positions: np.ndarray, valid: np.ndarray
    ) -> tuple[Value, np.ndarray, np.ndarray]:
        layer = segment.last_layer
        undecided = [b for b in range(len(self.policies)) if self._visual[b] and self.exit_layers[b] is None]
        if layer not in self.graphs.candidates or not undecided:
            return hidden, positions, valid
        keep_if_exit = self._exit_keep(undecided, valid)  # the rows kept if every undecided one exits
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
        if not exiting:
            return hidden, positions, valid
        for b in exiting:
            self.exit_layers[b] = layer
        everyone = exiting == undecided  # then the router's gather is the one needed
        keep = keep_if_exit if everyone else self._exit_keep(exiting, valid)
        changed = {b: self._text(b) for b in exiting}
        return self._gather(hidden, positions, valid, keep, changed, gathered if everyone else None)

    def _text(self, b: int) -> np.ndarray:
        """Sample b's rows that hold text tokens now (kept at an exit)."""
        return np.flatnonzero(~self._is_visual[b][self._origin[b]])

    def _exit_keep(self, exiting: list[int], valid: np.ndarray) -> np.ndarray:
        return self._keep({b: self._text(b) for b in exiting}, valid)

    # -- pruning ----------------------------------------------------------------------------------

    def _prunes(
        self, layer: int, hidden: Value, positions: np.ndarray, valid: np.ndarray, scores: Value | None
    ) -> tuple[Value, np.ndarray, np.ndarray]:
        due = [
            b
            for b, prune in enumerate(self.prunes)
            if prune.active
            and prune.layer == layer
            and self._visual[b]
            and self.exit_layers[b] is None
            and self.kept_visual[b] is None
        ]
        if not due:
            return hidden, positions, valid
        changed = {}
        for b in due:
            prune = self.prunes[b]
            rows, ordinals = self.visual_rows(b)
            keep = prune.keep(len(rows))
            feeds = {names.SAMPLE_INDEX: np.array([b], dtype=np.int64), names.VISUAL_ROWS: rows[None]}
            if prune.method == "fastv":
                feeds[names.PRUNE_SCORES] = scores
                out = self.graphs.sessions["fastv_rank"].run(feeds)
            else:
                feeds[names.HIDDEN_OUT] = hidden
                feeds[names.PRUNE_PIVOTS] = np.array([min(prune.pivots, keep)], dtype=np.int64)
                out = self.graphs.sessions["dart_rank"].run(feeds)
            ranking = self.graphs.backend.download(out[names.PRUNE_RANKING])[0]  # [V] indices into rows
            kept = kept_from_ranking(ranking, keep)
            self.kept_visual[b] = ordinals[kept].tolist()
            self.pruned_after[b] = layer
            stay = np.zeros(int(valid[b]), dtype=bool)
            stay[self._text(b)] = True
            stay[rows[kept]] = True
            changed[b] = np.flatnonzero(stay)
        return self._gather(hidden, positions, valid, self._keep(changed, valid), changed, None)

    # -- the gather both share --------------------------------------------------------------------

    def _keep(self, changed: dict[int, np.ndarray], valid: np.ndarray) -> np.ndarray:
        """[B, K] row indices to keep: `changed[b]` for those samples, every valid row of the others,
        right-padded with row 0 to the longest (padding rows are never attended)."""
        rows = [changed[b] if b in changed else np.arange(valid[b]) for b in range(len(valid))]
        keep = np.zeros((len(rows), max(len(r) for r in rows)), dtype=np.int64)
        for b, r in enumerate(rows):
            keep[b, : len(r)] = r
        return keep

    def _gather(
        self,
        hidden: Value,
        positions: np.ndarray,
        valid: np.ndarray,
        keep: np.ndarray,
        changed: dict[int, np.ndarray],
        gathered: Value | None,
    ) -> tuple[Value, np.ndarray, np.ndarray]:
        """Keep rows `keep` [B, K] of the hidden state (`gathered`: already done), the positions and
        the router pool; `changed` samples now hold only their rows."""
        if gathered is None:
            feeds = {names.HIDDEN_OUT: hidden, names.KEEP_INDEX: keep}
            gathered = self.graphs.sessions["exit_gather"].run(feeds)[names.HIDDEN_IN]
        valid = valid.copy()
        for b, rows in changed.items():
            valid[b] = len(rows)
            self._origin[b] = self._origin[b][rows]
        positions = np.take_along_axis(
            positions, np.broadcast_to(keep, (*positions.shape[:-2], *keep.shape)), -1
        )
        if self._pool is not None:  # samples still undecided keep their rows, and so their pool
            self._pool = np.take_along_axis(self._pool, keep, axis=1)
        return gathered, positions, valid
