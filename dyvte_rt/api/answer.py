"""The one result type of every way to ask (single, streamed, batched, chat turn, server), and the
replayable stream of an answer's text."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from dyvte_rt.runtime.batch import Slot


@dataclass(frozen=True)
class Answer:
    text: str  # exactly the text streamed
    token_ids: list[int]  # generated ids, EOS included if produced
    finish_reason: str  # "stop" | "length" (| "cancelled"), as in the OpenAI API
    exit_layer: int | None  # the last layer that saw the visual tokens; None: they never left
    exit_probs: dict[int, float]  # router p(exit) per evaluated candidate layer
    policy: str
    prompt_tokens: int
    visual_tokens: int
    # preprocess (image loading, resizing), vision, prefill (embed + segments + head), switch (part of
    # prefill), ttft (preprocess to first token, queueing included), decode (first to last token),
    # latency (preprocess to last token)
    timings_ms: dict[str, float]
    # full and actual (this request's multiply-adds without and with its exit); batch_computed: what
    # its prefill call computed for every row it shared, padding included
    prefill_macs: dict[str, int]
    kv_cache_bytes: int  # KV cache held at the end of the request
    # copied between host and backend (shared calls split among the requests in them): prefill,
    # decode, per_decode_token
    host_bytes: dict[str, float]
    prune: str = "none"  # the prune policy asked for
    visual_tokens_kept: int = 0  # visual tokens left after the prune (all of them without one)
    pruned_after_layer: int | None = None  # the layer a prune followed (-1: the input embeddings)
    kept_visual: list[int] | None = None  # the visual tokens (0..V-1) that stayed, sorted
    token_gaps_ms: list[float] = field(default_factory=list)  # from each token to the next

    @property
    def answer(self) -> str:
        """Deprecated name of `text` (until 0.3)."""
        warnings.warn("Answer.answer is deprecated; use Answer.text", DeprecationWarning, stacklevel=2)
        return self.text

    def to_dict(self) -> dict:
        """JSON-ready, as `dyvte-rt infer --json` prints it (the text under "answer")."""
        data = asdict(self)
        data = {"answer": data.pop("text"), **data}
        data["exit_probs"] = {str(k): v for k, v in self.exit_probs.items()}
        return data

    @classmethod
    def from_slot(cls, slot: Slot, policy: str, prune: str = "none") -> Answer:
        state, prefill, costs = slot.state, slot.prefill, slot.state.costs
        steps = costs.decode_steps
        return cls(
            text=state.text.text,
            token_ids=list(state.tokens),
            finish_reason=state.finish_reason or "length",
            exit_layer=prefill.exit_layer,
            exit_probs=dict(prefill.exit_probs),
            policy=policy,
            prompt_tokens=prefill.n_tokens,
            visual_tokens=prefill.n_visual,
            timings_ms={
                "preprocess": state.preprocess_ms,
                "vision": costs.vision_ms,
                "prefill": costs.prefill_ms,
                "switch": costs.switch_ms,
                "ttft": state.ttft_ms,
                "decode": costs.decode_ms,
                "latency": state.latency_ms,
            },
            prefill_macs={
                "full": prefill.macs.full,
                "actual": prefill.macs.actual,
                "batch_computed": slot.computed_macs,
            },
            kv_cache_bytes=slot.kv_bytes,
            host_bytes={
                "prefill": costs.host_bytes_prefill,
                "decode": costs.host_bytes_decode,
                "per_decode_token": costs.host_bytes_decode / steps if steps else 0.0,
            },
            prune=prune,
            visual_tokens_kept=prefill.visual_tokens_kept,
            pruned_after_layer=prefill.pruned_after_layer,
            kept_visual=list(prefill.kept_visual) if prefill.kept_visual is not None else None,
            token_gaps_ms=list(state.token_gaps_ms),
        )


class Generation:
    """The text pieces of one answer, produced lazily as it is iterated.

    It can be iterated any number of times: a later iteration replays the pieces produced so far
    and continues where generation stands. `answer` is set once generation has finished, and
    `result()` finishes it.
    """

    def __init__(self, produce: Callable[[Generation], Iterator[str]]) -> None:
        self.answer: Answer | None = None  # set by `produce` when it finishes
        self._source = produce(self)
        self._pieces: list[str] = []
        self._finished = False

    def __iter__(self) -> Iterator[str]:
        index = 0
        while True:
            if index < len(self._pieces):
                yield self._pieces[index]
                index += 1
            elif self._finished:
                return
            else:
                self._advance()

    def _advance(self) -> None:
        try:
            self._pieces.append(next(self._source))
        except StopIteration:
            self._finished = True

    def result(self) -> Answer:
        while not self._finished:
            self._advance()
        assert self.answer is not None
        return self.answer
