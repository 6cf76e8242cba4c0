"""Requests decoding together on the rows ("slots") of one KV cache: the one decode path of single
questions, chat turns, `ask_batch` and the server.

    batch = DecodeBatch(pipeline, pipeline.new_cache(capacity, slots))
    batch.prefill([(slot, request, state), ...])  # adjacent slots share one padded prefill call
    while batch.active:
        for slot in batch.step():                  # one graph call per step for every active row
            batch.release(slot)                    # finished: its row is free again

    starting = batch.begin([(slot, request, state), ...], chunk=64)  # or a step at a time:
    while not starting.done:
        starting.advance()                         # one segment (or chunk) of the prefill
        batch.step()                               # the others decode meanwhile

A request is prefilled into its own rows (deciding its own exit, as a single request does), alone or
with the others that start at the same moment; every decode step runs the rows up to the highest
active one, so a finished row leaves at once (a free row below an active one carries a padding
token that attends to itself and is forgotten). Every row's tokens equal what the request gets
alone: rows never see each other (each has its own KV lengths). Host transfers and time of a
shared call are split among the requests that took part. Batches of more than one row need the
in-place KV flavour (`Pipeline.new_cache`); rows are views of the cache's buffers on every backend
that has them (ONNX Runtime on the CPU and CUDA).

A prefill begun with `begin` holds its rows while it runs a step at a time (`Pipeline.prefill_steps`);
decode steps leave those rows out (cutting the step into a call per run of rows around them), so
running requests keep decoding while a long prompt is prefilled.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from dyvte_rt.runtime.compute import continuation_macs
from dyvte_rt.runtime.decoding import DecodeState
from dyvte_rt.runtime.kv_cache import KVCache
from dyvte_rt.runtime.pipeline import BatchPrefill, Pipeline, PrefillRequest, PrefillResult, PrefillSteps

Entry = tuple[int, PrefillRequest, DecodeState]  # a slot, what to prefill into it, its decoding


@dataclass
class Slot:
    state: DecodeState
    prefill: PrefillResult  # what its prefill decided and cost (exit, visual tokens, MACs)
    computed_macs: int  # what the prefill call computed for all its rows, padding included
    kv_bytes: int = 0  # KV cache held when it finished


class DecodeBatch:
    def __init__(self, pipeline: Pipeline, cache: KVCache) -> None:
        self.pipeline = pipeline
        self.cache = cache
        self.slots: list[Slot | None] = [None] * cache.batch
        self._held: set[int] = set()  # slots a prefill in progress writes into
        self._transfers = pipeline.backend.transfers

    @property
    def size(self) -> int:
        return len(self.slots)

    @property
    def active(self) -> int:
        """Slots decoding now."""
        return sum(s is not None and not s.state.finished for s in self.slots)

    def free_slots(self) -> list[int]:
        """Slots neither decoding nor held by a prefill in progress."""
        return [i for i, slot in enumerate(self.slots) if slot is None and i not in self._held]

    # -- starting requests ------------------------------------------------------------------------

    def prefill(self, entries: list[Entry]) -> list[Slot]:
        """Prefill each request into its free slot (requests in adjacent slots in one call) and take
        its first token. Returns the new slots, in the order given."""
        starting = self.begin(entries)
        while not starting.done:
            starting.advance()
        return [self.slots[slot] for slot, _, _ in entries]

    def begin(self, entries: list[Entry], chunk: int | None = None) -> StartingPrefill:
        """Hold the entries' free slots for a prefill run a step at a time (`StartingPrefill.advance`);
        `chunk`: a single request's prompt goes through each segment this many tokens at a time."""
        for slot, _, _ in entries:
            if self.slots[slot] is not None or slot in self._held:
                raise ValueError(f"slot {slot} is taken")
        self._held.update(slot for slot, _, _ in entries)
        return StartingPrefill(self, _adjacent_runs(sorted(entries, key=lambda e: e[0])), chunk)

    def _install(self, run: list[Entry], result: BatchPrefill, share: float) -> None:
        """A finished prefill's requests take their slots and their first tokens."""
        for (slot, _, state), prefill in zip(run, result.results, strict=True):
            costs = state.costs
            costs.host_bytes_prefill += share
            costs.vision_ms = prefill.timings_ms["vision"]
            costs.prefill_ms = prefill.timings_ms["prefill"]
            costs.switch_ms = prefill.timings_ms["switch"]
            self._held.discard(slot)
            self.slots[slot] = Slot(state, prefill, result.padded_macs)
            state.accept(prefill.logits)
            self._note_finished(slot)

    def _unhold(self, slots: list[int]) -> None:
        for slot in slots:
            self._held.discard(slot)
            self.cache.lengths[slot] = 0
            self.cache.position_offsets[slot] = 0

    def extend(self, slot: int, token_ids: np.ndarray, state: DecodeState, first: PrefillResult) -> Slot:
        """A later conversation turn in `slot`'s row, which keeps what earlier turns left: its tokens
        [1, M] go through every layer like decoding tokens, attending to the cache (no routers, no
        exit: `first` is the prefill that decided it), then the answer's first token."""
        rows = self.cache.rows(slot, slot + 1)
        held = rows.layer_lengths()
        before, started = self._transfers.snapshot(), time.perf_counter()
        logits = self.pipeline.forward_tokens(token_ids, state.first_position - token_ids.shape[1], rows)
        state.costs.host_bytes_prefill += self._transfers.since(before).total
        state.costs.prefill_ms = 1e3 * (time.perf_counter() - started)
        macs = continuation_macs(self.pipeline.decoder_dims, token_ids.shape[1], held)
        turn = PrefillResult(
            logits=logits,
            cache=rows,
            exit_layer=first.exit_layer,
            exit_probs=first.exit_probs,
            n_tokens=token_ids.shape[1],
            n_visual=0,
            macs=macs,
            timings_ms={"vision": 0.0, "prefill": state.costs.prefill_ms, "switch": 0.0},
        )
        self.slots[slot] = Slot(state, turn, macs.actual)
        state.accept(logits)
        self._note_finished(slot)
        return self.slots[slot]

    # -- decoding -----------------------------------------------------------------------------------

    def step(self) -> list[int]:
        """One decode step for every active slot -> the slots that finished in it."""
        active = [i for i, s in enumerate(self.slots) if s is not None and not s.state.finished]
        if not active:
            return []
        top = active[-1] + 1
        idle = [i for i in range(top) if i not in active and i not in self._held]
        if any(self.slots[i] is not None for i in idle):
            raise RuntimeError("a finished slot below an active one must be released before the next step")
        tokens = np.zeros((top, 1), dtype=np.int64)  # idle rows carry padding token 0 at position 0
        positions = np.zeros((top, 1), dtype=np.int64)
        for i in active:
            state = self.slots[i].state
            tokens[i, 0], positions[i, 0] = state.last_token, state.next_position
        before = self._transfers.snapshot()
        logits = {}
        for start, stop in _runs_around(top, self._held):  # rows a prefill holds are left out
            if any(start <= i < stop for i in active):
                rows = self.cache.rows(start, stop)
                out = self.pipeline.forward_tokens(tokens[start:stop], positions[start:stop], rows)
                logits.update({start + r: out[r : r + 1] for r in range(stop - start)})
        share = self._transfers.since(before).total / len(active)
        self.cache.lengths[idle] = 0  # a padding row leaves nothing behind
        finished = []
        for i in active:
            state = self.slots[i].state
            state.costs.host_bytes_decode += share
            state.costs.decode_steps += 1
            state.accept(logits[i])
            if self._note_finished(i):
                finished.append(i)
        return finished

    def stream(self, slot: int) -> Iterator[str]:
        """Decode `slot` (the only active one) to its end, yielding text as it is released."""
        state = self.slots[slot].state
        while True:
            text = state.take_text()
            if text:
                yield text
            if state.finished:
                return
            self.step()

    def cancel(self, slot: int) -> None:
        self.slots[slot].state.cancel()
        self._note_finished(slot)

    def release(self, slot: int) -> Slot:
        """Free a finished slot's row for the next request."""
        done = self.slots[slot]
        self.slots[slot] = None
        self.cache.lengths[slot] = 0
        self.cache.position_offsets[slot] = 0
        return done

    def _note_finished(self, slot: int) -> bool:
        entry = self.slots[slot]
        if not entry.state.finished:
            return False
        entry.kv_bytes = int(self.cache.lengths[slot].sum()) * self.cache.row_bytes()
        return True


@dataclass
class StartingPrefill:
    """Requests being prefilled into the rows a `DecodeBatch` holds for them, a step at a time; each
    run of adjacent slots is one padded prefill, the runs one after the other. A run's requests take
    their slots (and first tokens) as soon as it finishes."""

    batch: DecodeBatch
    runs: list[list[Entry]]
    chunk: int | None = None
    _steps: PrefillSteps | None = field(default=None, repr=False)
    _before: object = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return not self.runs

    @property
    def waiting(self) -> list[Entry]:
        """Entries not prefilled yet (the current run's included)."""
        return [entry for run in self.runs for entry in run]

    def advance(self) -> list[int]:
        """One step of the current run -> the slots that started in it (empty until a run ends). If a
        step fails, the error propagates and every waiting entry's slot is free again."""
        run = self.runs[0]
        try:
            if self._steps is None:
                first, last = run[0][0], run[-1][0]
                rows = self.batch.cache.rows(first, last + 1)
                rows.lengths[:] = 0
                rows.position_offsets[:] = 0
                self._before = self.batch._transfers.snapshot()
                requests = [request for _, request, _ in run]
                self._steps = self.batch.pipeline.prefill_steps(requests, rows, self.chunk)
            next(self._steps)
            return []
        except StopIteration as finished:
            share = self.batch._transfers.since(self._before).total / len(run)
            self.batch._install(run, finished.value, share)
            self.runs.pop(0)
            self._steps = None
            return [slot for slot, _, _ in run]
        except BaseException:
            self.abandon()
            raise

    def abandon(self) -> None:
        """Stop: the waiting entries' slots are free again."""
        if self._steps is not None:
            self._steps.close()
            self._steps = None
        self.batch._unhold([slot for slot, _, _ in self.waiting])
        self.runs = []


def _runs_around(top: int, held: set[int]) -> list[tuple[int, int]]:
    """Rows 0..top-1 cut into [start, stop) runs that leave out the `held` ones."""
    runs = _adjacent_runs([row for row in range(top) if row not in held], slot=lambda row: row)
    return [(run[0], run[-1] + 1) for run in runs]


def _adjacent_runs(entries: list, slot: Callable = lambda entry: entry[0]) -> list[list]:
    """Entries sorted by slot, cut where the slots stop being consecutive."""
    runs: list[list] = []
    for entry in entries:
        if runs and slot(entry) == slot(runs[-1][-1]) + 1:
            runs[-1].append(entry)
        else:
            runs.append([entry])
    return runs
