"""Continuous batching: many requests decoded together, each joining between decode steps.

One thread owns the model. A batch KV cache has `max_batch` slots (rows); a new request is
prefilled alone into a free slot's rows — deciding its own exit, as a single request does — and
then decodes with every other active slot in one graph call per step. A finished, cancelled or
disconnected request frees its slot at once. Every slot's tokens equal what the request would get
alone: padding rows never reach a sample's attention (each row has its own KV lengths).

Events go back to the caller through `emit(kind, payload)`, called on the engine thread: ("piece",
text), then ("done", Completion) or ("error", DyvteError).
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from dyvte_rt.api.model import FINISH_LENGTH, FINISH_STOP, DyvteModel
from dyvte_rt.errors import DyvteError, InputError
from dyvte_rt.inputs.preprocess import PreparedImage
from dyvte_rt.runtime.pipeline import PrefillRequest, PrefillResult
from dyvte_rt.runtime.policy import ExitPolicy
from dyvte_rt.runtime.sampling import Sampler
from dyvte_rt.runtime.streaming import AnswerPieces

_ids = itertools.count(1)


class QueueFullError(DyvteError):
    """More requests are waiting than the server accepts (HTTP 503)."""


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # stop | length
    prompt_tokens: int
    exit_layer: int | None
    prefill_macs: dict[str, int]
    ttft_s: float
    latency_s: float


@dataclass
class ServeRequest:
    prompt_ids: np.ndarray  # [N]
    image: PreparedImage | None
    policy: ExitPolicy
    max_tokens: int
    sampler: Sampler
    stop: tuple[str, ...]
    emit: Callable[[str, object], None]
    ignore_eos: bool = False  # decode max_tokens tokens whatever the model says (benchmarks, tests)
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: int = field(default_factory=lambda: next(_ids))
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class _Active:
    request: ServeRequest
    prefill: PrefillResult
    tokens: list[int]
    text: str
    detokenizer: AnswerPieces
    first_token_at: float


class BatchEngine:
    def __init__(
        self, model: DyvteModel, max_batch: int = 8, max_queue: int = 64, context: int | None = None
    ) -> None:
        if max_batch < 1 or max_queue < 0:
            raise InputError("--max-batch must be at least 1 and --max-queue at least 0")
        self.model = model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.context = min(context or 2048, model.manifest.dims.max_positions)
        self.cache = model.pipeline.new_cache(self.context, batch=max_batch)
        self.rows = [self.cache.row(i) for i in range(max_batch)]
        self.slots: list[_Active | None] = [None] * max_batch
        self.queue: collections.deque[ServeRequest] = collections.deque()
        self._eos = set(model.manifest.tokens.eos)
        self._wake = threading.Condition()
        self._stopping = False
        self.on_finished: Callable[[ServeRequest, Completion], None] | None = None  # metrics hooks
        self.on_cancelled: Callable[[ServeRequest], None] | None = None
        self._thread = threading.Thread(target=self._loop, name="dyvte-engine", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return len(self.queue)

    @property
    def active(self) -> int:
        return sum(slot is not None for slot in self.slots)

    def submit(self, request: ServeRequest) -> None:
        if request.prompt_ids.shape[0] + 1 > self.context:
            raise InputError(
                f"the prompt has {request.prompt_ids.shape[0]} tokens, more than the server's context"
            )
        with self._wake:
            if len(self.queue) >= self.max_queue and self.active >= self.max_batch:
                raise QueueFullError(f"{len(self.queue)} requests are already waiting", hint="retry later")
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
        while True:
            with self._wake:
                while not self.queue and not self.active and not self._stopping:
                    self._wake.wait()
                if self._stopping and not self.queue and not self.active:
                    return
            self._admit()
            if self.active:
                self._step()

    def _admit(self) -> None:
        while True:
            with self._wake:
                free = next((i for i, slot in enumerate(self.slots) if slot is None), None)
                if free is None or not self.queue:
                    return
                request = self.queue.popleft()
            if request.cancelled.is_set():
                continue
            try:
                self._start(free, request)
            except DyvteError as err:
                request.emit("error", err)

    def _start(self, slot: int, request: ServeRequest) -> None:
        room = self.context - request.prompt_ids.shape[0]
        request.max_tokens = min(request.max_tokens, room)
        row = self.rows[slot]
        row.lengths[:] = 0
        result = self.model.pipeline.prefill_batch(
            [PrefillRequest(request.prompt_ids, request.image, request.policy)], row
        ).results[0]
        active = _Active(
            request, result, [], "", AnswerPieces(self.model.prompts.tokenizer), time.perf_counter()
        )
        self.slots[slot] = active
        self._advance(slot, result.logits)

    def _step(self) -> None:
        """One decode step for every slot (free ones carry a padding token and are reset after)."""
        tokens = np.zeros((self.max_batch, 1), dtype=np.int64)
        positions = np.zeros((self.max_batch, 1), dtype=np.int64)
        for slot, active in enumerate(self.slots):
            if active is not None:
                tokens[slot, 0] = active.tokens[-1]
                positions[slot, 0] = active.prefill.n_tokens + len(active.tokens) - 1
        logits = self.model.pipeline.forward_tokens(tokens, positions, self.cache)
        for slot, active in enumerate(self.slots):
            if active is None:
                self.cache.lengths[slot] = 0  # the padding row leaves nothing behind
            else:
                self._advance(slot, logits[slot : slot + 1])

    def _advance(self, slot: int, logits: np.ndarray) -> None:
        active = self.slots[slot]
        request = active.request
        token = request.sampler(logits)
        active.tokens.append(token)
        piece = active.detokenizer.step(token)
        finish = None
        if token in self._eos and not request.ignore_eos:
            finish, piece = FINISH_STOP, ""
        text = active.text + piece
        stopped_at = min((i for i in (text.find(s) for s in request.stop) if i >= 0), default=-1)
        if stopped_at >= 0:
            piece, text, finish = text[len(active.text) : stopped_at], text[:stopped_at], FINISH_STOP
        active.text = text
        if piece:
            request.emit("piece", piece)
        if finish is None and len(active.tokens) >= request.max_tokens:
            finish = FINISH_LENGTH
        if finish is None and request.cancelled.is_set():
            finish = "cancelled"
        if finish is not None:
            self.slots[slot] = None
            self.cache.lengths[slot] = 0
            if finish == "cancelled" and self.on_cancelled is not None:
                self.on_cancelled(request)
            if finish != "cancelled":
                done = Completion(
                    text=active.text.strip(),
                    token_ids=active.tokens,
                    finish_reason=finish,
                    prompt_tokens=active.prefill.n_tokens,
                    exit_layer=active.prefill.exit_layer,
                    prefill_macs={"full": active.prefill.macs.full, "actual": active.prefill.macs.actual},
                    ttft_s=active.first_token_at - request.queued_at,
                    latency_s=time.perf_counter() - request.queued_at,
                )
                if self.on_finished is not None:
                    self.on_finished(request, done)
                request.emit("done", done)
