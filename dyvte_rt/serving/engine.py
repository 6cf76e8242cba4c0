"""Continuous batching: many requests decoded together, each joining between decode steps.

One thread owns the model and a `DecodeBatch` of `max_batch` slots (rows of one KV cache). Images
come encoded (the server runs the vision graph on its preparing thread, so decode steps go on
meanwhile). Requests waiting when slots are free start their prefill into them at once — each
deciding its own exit, as a single request does; short prompts that start together share one
prefill call, a prompt longer than `prefill_chunk` tokens goes through each segment that many
tokens at a time — and then decode with every other active slot in one graph call per step.

Prefills do not run whole: the engine alternates one decode step of the running requests with one
step (a segment, or a chunk of one) of a prefill in progress, taking the prefills in turn. So a
stream's gap between tokens stays about a decode step plus a prefill step, and a request's first
token waits for its own prefill's steps and a share of the others', not for every prefill queued
before it. A finished, cancelled or disconnected request frees its slot at once. Every slot's
tokens equal what the request would get alone.

Events go back to the caller through `emit(kind, payload)`, called on the engine thread: ("piece",
text), then ("done", Answer) or ("error", DyvteError).

Faults stay with the requests they touch: a request whose prefill fails gets an error event (an
`InputError` for what the client can fix, a `RequestFailed` for anything else) and the others go
on; a decode step that fails ends the requests in that step and frees their slots, and the engine
serves the next ones. Only a failure outside any request (the engine's own bookkeeping) stops it:
`failure` then says why, every waiting request gets an error and new ones are refused with
`EngineDown`, which the server answers 503 and reports on /health.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from dyvte_rt.api.answer import Answer
from dyvte_rt.api.model import DyvteModel
from dyvte_rt.errors import DyvteError, InputError
from dyvte_rt.inputs.preprocess import PreparedImage
from dyvte_rt.runtime.batch import DecodeBatch, StartingPrefill
from dyvte_rt.runtime.decoding import FINISH_CANCELLED, DecodeState, StopRule
from dyvte_rt.runtime.pipeline import PrefillRequest
from dyvte_rt.runtime.policy import ExitPolicy
from dyvte_rt.runtime.prune import NO_PRUNE, PrunePolicy
from dyvte_rt.runtime.sampling import Sampler

_ids = itertools.count(1)


class QueueFullError(DyvteError):
    """More requests are waiting than the server accepts (HTTP 503)."""


class RequestFailed(DyvteError):
    """Serving one request failed for a reason that is not the client's (HTTP 500)."""


class EngineDown(DyvteError):
    """The engine thread has stopped and cannot serve (HTTP 503)."""


def _failed(err: BaseException, during: str) -> DyvteError:
    if isinstance(err, DyvteError):
        return err
    return RequestFailed(f"{during} failed: {type(err).__name__}: {err}"[:500])


@dataclass
class ServeRequest:
    prompt_ids: np.ndarray  # [N]
    image: PreparedImage | None
    policy: ExitPolicy
    rule: StopRule
    sampler: Sampler
    emit: Callable[[str, object], None]
    preprocess_ms: float = 0.0  # image decoding and preparation before the request was queued
    prune: PrunePolicy = NO_PRUNE
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: int = field(default_factory=lambda: next(_ids))
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class _Starting:
    """A prefill in progress and the requests it starts, by slot."""

    prefill: StartingPrefill
    requests: dict[int, ServeRequest]

    def waiting(self) -> list[tuple[int, ServeRequest]]:
        """The slots and requests not prefilled yet."""
        return [(slot, self.requests[slot]) for slot, _, _ in self.prefill.waiting]


def check_engine_limits(max_batch: int, max_queue: int, context: int | None, prefill_chunk: int) -> None:
    """Refuse limits no engine can run with (the server asks before it loads the model)."""
    if max_batch < 1 or max_queue < 0 or prefill_chunk < 0:
        raise InputError("--max-batch must be at least 1, --max-queue and --prefill-chunk at least 0")
    if context is not None and context < 1:
        raise InputError(f"--context must be at least 1 position, not {context}")


class BatchEngine:
    def __init__(
        self,
        model: DyvteModel,
        max_batch: int = 8,
        max_queue: int = 64,
        context: int | None = None,
        prefill_chunk: int = 128,
    ) -> None:
        check_engine_limits(max_batch, max_queue, context, prefill_chunk)
        self.model = model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk or None  # 0: each segment's prefill in one call
        self.context = min(context or 2048, model.manifest.dims.max_positions)
        self.batch = DecodeBatch(model.pipeline, model.pipeline.new_cache(self.context, batch=max_batch))
        self.requests: dict[int, ServeRequest] = {}  # slot -> request
        self.queue: collections.deque[ServeRequest] = collections.deque()
        self._prefills: collections.deque[_Starting] = collections.deque()  # taken in turn
        self._wake = threading.Condition()
        self._stopping = False
        self._starting = 0  # requests taken off the queue, being prefilled
        self.failure: str | None = None  # why the engine thread stopped, if it did
        self.on_finished: Callable[[ServeRequest, Answer], None] | None = None  # metrics hooks
        self.on_cancelled: Callable[[ServeRequest], None] | None = None
        self.on_step: Callable[[int], None] | None = None  # requests decoded in one step
        self._thread = threading.Thread(target=self._loop, name="dyvte-engine", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return len(self.queue)

    @property
    def active(self) -> int:
        """Requests being served: decoding, or prefilling into their slots."""
        return len(self.requests) + self._starting

    def submit(self, request: ServeRequest) -> None:
        room = self.context - request.prompt_ids.shape[0]
        if room < 1:
            raise InputError(
                f"the prompt has {request.prompt_ids.shape[0]} tokens, more than the server's context"
            )
        if request.rule.max_new_tokens > room:  # the answer stops at the context's end ("length")
            request.rule = StopRule(room, request.rule.eos, request.rule.stop, request.rule.ignore_eos)
        with self._wake:
            if self.failure is not None:
                raise EngineDown(f"the engine has stopped ({self.failure})", hint="restart the server")
            if len(self.queue) + self.active >= self.max_queue + self.max_batch:
                raise QueueFullError(
                    f"{self.active} requests are being served and {len(self.queue)} wait",
                    hint="retry later",
                )
            self.queue.append(request)
            self._wake.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued and active, then end the engine thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    # -- the engine thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self.queue and not self.active and not self._stopping:
                        self._wake.wait()
                    if self._stopping and not self.queue and not self.active:
                        return
                self._admit()
                self._cancel_departed()
                if self.batch.active:
                    if self.on_step is not None:
                        self.on_step(self.batch.active)
                    self._step()
                self._advance_prefill()
        except BaseException as err:  # the engine itself broke: say so, fail everyone, refuse more
            with self._wake:
                self.failure = f"{type(err).__name__}: {err}"[:300]
                waiting, self.queue = list(self.queue), collections.deque()
                starting = [r for s in self._prefills for _, r in s.waiting()]
                self._prefills.clear()
                self._starting = 0
            down = EngineDown(f"the engine has stopped ({self.failure})", hint="restart the server")
            for request in [*self.requests.values(), *starting, *waiting]:
                request.emit("error", down)
            self.requests.clear()

    def _step(self) -> None:
        """One decode step; if it fails, the requests in it end with the error and free their slots."""
        try:
            finished = self.batch.step()
        except Exception as err:
            failure = _failed(err, "a decode step")
            for slot, request in list(self.requests.items()):
                del self.requests[slot]
                self._release_if_taken(slot)
                request.emit("error", failure)
            return
        self._report(finished)

    def _admit(self) -> None:
        """Begin the prefill of the waiting requests that fit into free slots: the short ones
        together, each long one (chunked) alone."""
        with self._wake:
            taken = []
            for slot in self.batch.free_slots():
                while self.queue and self.queue[0].cancelled.is_set():
                    self.queue.popleft()
                if not self.queue:
                    break
                taken.append((slot, self.queue.popleft()))
            self._starting += len(taken)
        chunked = [(slot, r) for slot, r in taken if self._chunked(r)]
        together = [(slot, r) for slot, r in taken if not self._chunked(r)]
        for group in ([together] if together else []) + [[entry] for entry in chunked]:
            self._begin(group)

    def _chunked(self, request: ServeRequest) -> bool:
        return self.prefill_chunk is not None and request.prompt_ids.shape[0] > self.prefill_chunk

    def _begin(self, group: list[tuple[int, ServeRequest]]) -> None:
        try:
            entries = [(slot, self._prefill_request(r), self._state(r)) for slot, r in group]
            prefill = self.batch.begin(entries, self.prefill_chunk)
        except Exception as err:
            self._fail_starting([r for _, r in group], _failed(err, "the prefill"))
            return
        self._prefills.append(_Starting(prefill, dict(group)))

    def _advance_prefill(self) -> None:
        """One step of the prefill whose turn it is; the requests it finishes start decoding. If
        it fails, a lone request gets the error and a group's requests start again one by one
        (only the request at fault fails)."""
        if not self._prefills:
            return
        current = self._prefills[0]
        waiting = current.waiting()
        try:
            started = current.prefill.advance()
        except Exception as err:
            self._prefills.popleft()
            if len(waiting) == 1:
                self._fail_starting([waiting[0][1]], _failed(err, "the prefill"))
            else:
                for entry in waiting:
                    self._begin([entry])
            return
        if started:
            with self._wake:
                self._starting -= len(started)
                self.requests.update({slot: current.requests[slot] for slot in started})
            self._report([])
        if current.prefill.done:
            self._prefills.popleft()
        else:
            self._prefills.rotate(-1)  # the next prefill's turn

    def _fail_starting(self, requests: list[ServeRequest], error: DyvteError) -> None:
        with self._wake:
            self._starting -= len(requests)
        for request in requests:
            request.emit("error", error)

    def _prefill_request(self, request: ServeRequest) -> PrefillRequest:
        return PrefillRequest(request.prompt_ids, request.image, request.policy, request.prune)

    def _state(self, request: ServeRequest) -> DecodeState:
        # an image encoded before it was queued (the server's preparing thread) counts in its TTFT
        encoded_ms = request.image.encoded_ms if request.image is not None else 0.0
        return DecodeState(
            self.model.prompts.tokenizer,
            request.sampler,
            request.rule,
            request.prompt_ids.shape[0],
            started_at=request.queued_at - encoded_ms / 1e3,
            preprocess_ms=request.preprocess_ms,
        )

    def _cancel_departed(self) -> None:
        for slot, request in list(self.requests.items()):
            if request.cancelled.is_set():
                self.batch.cancel(slot)
        for current in list(self._prefills):  # a prefill all of whose requests left stops
            waiting = [request for _, request in current.waiting()]
            if waiting and all(r.cancelled.is_set() for r in waiting):
                current.prefill.abandon()
                self._prefills.remove(current)
                with self._wake:
                    self._starting -= len(waiting)
                for request in waiting:
                    if self.on_cancelled is not None:
                        self.on_cancelled(request)
        self._report([])

    def _report(self, finished: list[int]) -> None:
        """Emit every active request's new text; finish and free the slots that ended."""
        for slot, request in list(self.requests.items()):
            entry = self.batch.slots[slot]
            text = entry.state.take_text()
            if text:
                request.emit("piece", text)
            if not entry.state.finished:
                continue
            del self.requests[slot]
            done = self.batch.release(slot)
            if done.state.finish_reason == FINISH_CANCELLED:
                if self.on_cancelled is not None:
                    self.on_cancelled(request)
                continue
            answer = Answer.from_slot(done, request.policy.spec(), request.prune.spec())
            if self.on_finished is not None:
                self.on_finished(request, answer)
            request.emit("done", answer)

    def _release_if_taken(self, slot: int) -> None:
        if self.batch.slots[slot] is not None:
            self.batch.release(slot)
