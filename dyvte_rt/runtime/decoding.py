"""One request's decoding, the same for a single question, a chat turn, a batch row and a server
slot: the tokens so far, the sampler, the text released so far, when to stop and why, the position
the next token goes to, and what the request cost.

    state = DecodeState(tokenizer, sampler, limits, first_position=N)
    state.accept(logits)        # after prefill: the first token
    while not state.finished:   # each decode step
        logits = forward(state.last_token, state.next_position)
        state.accept(logits)
    state.take_text()           # the text released since the last call

Text is released as tokens arrive (tokenizers' `DecodeStream`), except what may still turn out to be
the start of a stop string or trailing whitespace: that is held back until it cannot, so the text
streamed is always exactly the final text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from dyvte_rt.errors import InputError
from dyvte_rt.runtime.sampling import Sampler

FINISH_STOP = "stop"  # an end-of-sequence token or a stop string ended the answer
FINISH_LENGTH = "length"  # max_new_tokens (or the context) was reached first
FINISH_CANCELLED = "cancelled"  # the caller gave up (a client went away)
MAX_STOP_STRINGS = 4  # as the OpenAI API allows


@dataclass(frozen=True)
class StopRule:
    """When an answer ends."""

    max_new_tokens: int
    eos: frozenset[int] = frozenset()
    stop: tuple[str, ...] = ()  # the answer ends before the first of these strings
    ignore_eos: bool = False  # decode max_new_tokens whatever the model says (benchmarks)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if len(self.stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in self.stop):
            raise InputError(f"stop takes up to {MAX_STOP_STRINGS} non-empty strings")


class StreamingText:
    """An answer's text as its tokens arrive: the leading space dropped (it follows the prompt's),
    stop strings cut, and text that may still be part of one (or trailing whitespace) held back."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._stop = stop
        self._released: list[str] = []
        self._pending = ""  # decoded, not released yet
        self._started = False
        self.stopped = False  # a stop string was found

    @property
    def text(self) -> str:
        """Everything released so far."""
        return "".join(self._released)

    def push(self, token: int) -> str:
        """Decode one token -> the text that can be released now."""
        piece = self._stream.step(self._tokenizer, token) or ""
        if not self._started:
            piece = piece.lstrip()
            self._started = bool(piece)
        self._pending += piece
        cut = min((i for i in (self._pending.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._release(self._pending[:cut].rstrip(), keep="")
        split = len(self._pending) - self._held_back(self._pending)
        split = len(self._pending[:split].rstrip())  # released text never ends in whitespace
        return self._release(self._pending[:split], keep=self._pending[split:])

    def finish(self) -> str:
        """The answer ended: release what was held back, but trailing whitespace."""
        return self._release(self._pending.rstrip(), keep="")

    def _release(self, text: str, keep: str) -> str:
        self._pending = keep
        if text:
            self._released.append(text)
        return text

    def _held_back(self, text: str) -> int:
        """Characters at the end of `text` that may yet become the start of a stop string."""
        longest = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest


@dataclass
class Costs:
    """What one request cost, its share of shared graph calls included."""

    host_bytes_prefill: float = 0.0  # its share of the prefill call(s) it took part in
    host_bytes_decode: float = 0.0  # its share of each decode step
    decode_steps: int = 0
    vision_ms: float = 0.0
    prefill_ms: float = 0.0  # embed + segments (with the exit) + head
    switch_ms: float = 0.0  # within prefill: routers, decisions, the exit gather
    decode_ms: float = 0.0  # from the first token to the last


class DecodeState:
    """One request's decoding state (module docstring)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        sampler: Sampler,
        rule: StopRule,
        first_position: int,
        started_at: float | None = None,
        preprocess_ms: float = 0.0,
    ) -> None:
        self.sampler = sampler
        self.rule = rule
        self.tokens: list[int] = []
        self.text = StreamingText(tokenizer, rule.stop)
        self.finish_reason: str | None = None
        self.first_position = first_position  # where the first generated token goes when fed back
        self.started_at = time.perf_counter() if started_at is None else started_at
        self.preprocess_ms = preprocess_ms
        self.first_token_at: float | None = None
        self.token_gaps_ms: list[float] = []  # between each token and the next (a stream's pace)
        self._last_token_at: float | None = None
        self.finished_at: float | None = None
        self.costs = Costs()
        self._unread: list[str] = []

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def last_token(self) -> int:
        return self.tokens[-1]

    @property
    def next_position(self) -> int:
        """The original position id of `last_token` when it is fed back."""
        return self.first_position + len(self.tokens) - 1

    def accept(self, logits: np.ndarray) -> None:
        """Sample the next token from `logits` [1, vocab] (or [vocab]) and decide whether it ends."""
        if self.finished:
            raise RuntimeError("the request has finished")
        token = self.sampler(logits)
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        else:
            self.token_gaps_ms.append(1e3 * (now - self._last_token_at))
        self._last_token_at = now
        self.tokens.append(token)
        if token in self.rule.eos and not self.rule.ignore_eos:
            self._end(FINISH_STOP, now)
            return
        self._unread.append(self.text.push(token))
        if self.text.stopped:
            self._end(FINISH_STOP, now)
        elif len(self.tokens) >= self.rule.max_new_tokens:
            self._end(FINISH_LENGTH, now)

    def cancel(self) -> None:
        if not self.finished:
            self._end(FINISH_CANCELLED, time.perf_counter())

    def take_text(self) -> str:
        """The text released since the last call ("" if none)."""
        text, self._unread = "".join(self._unread), []
        return text

    @property
    def ttft_ms(self) -> float:
        if self.first_token_at is None:
            return float("nan")
        return self.preprocess_ms + 1e3 * (self.first_token_at - self.started_at)

    @property
    def latency_ms(self) -> float:
        end = self.finished_at if self.finished_at is not None else time.perf_counter()
        return self.preprocess_ms + 1e3 * (end - self.started_at)

    def _end(self, reason: str, now: float) -> None:
        if reason != FINISH_CANCELLED:
            self._unread.append(self.text.finish())
        self.finish_reason = reason
        self.finished_at = now
        if self.first_token_at is not None:
            self.costs.decode_ms = 1e3 * (now - self.first_token_at)
