"""Multi-turn chat that reuses the KV cache between turns.

    with DyvteModel.load(bundle) as model:
        chat = model.chat("photo.jpg")
        print(chat.ask("What is on the table?").answer)
        for piece in chat.generate("And what colour is it?"):
            print(piece, end="")

Semantics (docs/runtime.md, *Conversations*): the first turn is an ordinary prefill of the image and
the question, and the exit policy decides there, once, where the visual tokens leave. Later turns do
not prefill again: their tokens (the previous answer's last token unless it was end-of-sequence,
then the text the chat template adds for the new question, tokenized on its own) go through every
layer like decoding tokens, attending to whatever the cache holds. After an exit at layer k the
layers above k hold no visual rows, so a later turn computes exactly what a single prefill of the
whole conversation with policy `layer:k` would (tested against the PyTorch reference); without an
exit, exactly the full model's. `reset()` forgets the history and
keeps the image: the next turn prefills (and decides the exit) again.
"""

from __future__ import annotations

import time

import numpy as np

from dyvte_rt.api.model import Answer, DyvteModel, Generation, TurnClock
from dyvte_rt.errors import InputError
from dyvte_rt.inputs.images import ImageInput, load_image
from dyvte_rt.inputs.preprocess import prepare_image
from dyvte_rt.runtime.compute import continuation_macs
from dyvte_rt.runtime.kv_cache import KVCache
from dyvte_rt.runtime.pipeline import PrefillResult
from dyvte_rt.runtime.policy import ExitPolicy
from dyvte_rt.runtime.sampling import Sampler, SamplingConfig

DEFAULT_CONTEXT = 2048  # positions a conversation reserves, unless the model has fewer


class Conversation:
    def __init__(
        self,
        model: DyvteModel,
        image: ImageInput | None,
        policy: ExitPolicy,
        context: int | None,
        sampling: SamplingConfig,
    ) -> None:
        model.pipeline.check_policy(policy)
        self.model = model
        self.policy = policy
        self.context = min(context or DEFAULT_CONTEXT, model.manifest.dims.max_positions)
        self.sampler = Sampler(sampling)
        started = time.perf_counter()
        self._image = None if image is None else prepare_image(load_image(image), model.manifest.vision)
        self._preprocess_ms = 1e3 * (time.perf_counter() - started)
        self.history: list[tuple[str, str]] = []  # (question, answer) per finished turn
        self._cache: KVCache | None = None
        self._first: PrefillResult | None = None  # the first turn's prefill: the exit decision
        self._position = 0  # original position id of the next token fed to the model
        self._pending: int | None = None  # the last answer's last token, not yet fed back

    @property
    def exit_layer(self) -> int | None:
        return self._first.exit_layer if self._first is not None else None

    @property
    def tokens(self) -> int:
        """Positions the conversation uses so far (prompt, answers and the template between them)."""
        return self._position

    def ask(self, question: str, max_new_tokens: int = 64, stop_at_eos: bool = True) -> Answer:
        return self.generate(question, max_new_tokens, stop_at_eos).result()

    def generate(self, question: str, max_new_tokens: int = 64, stop_at_eos: bool = True) -> Generation:
        """The next turn's answer, streamed; the turn joins the history once the answer is complete."""
        if not question.strip():
            raise InputError("the question is empty", hint="ask something")
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        with_image = self._image is not None
        if self._cache is None:
            visual = self._image.visual_tokens if self._image is not None else None
            ids = self.model.prompts.encode(question, with_image=with_image, visual_tokens=visual)
        else:
            turn = self.model.prompts.encode_next_turn(self.history, question, with_image)
            pending = [] if self._pending is None else [self._pending]
            ids = np.concatenate([np.array([pending], dtype=np.int64).reshape(1, -1), turn], axis=1)
        room = self.context - self._position - ids.shape[1]  # positions left for the answer
        if room < 1:
            raise InputError(
                f"the conversation holds {self._position} positions and this question {ids.shape[1]} more, "
                f"past its context of {self.context}",
                hint="reset the conversation (/reset) or create it with a larger context",
            )
        max_new_tokens = min(max_new_tokens, room)  # the answer stops at the context's end ("length")
        return Generation(
            lambda generation: self._turn(generation, question, ids, max_new_tokens, stop_at_eos)
        )

    def reset(self) -> None:
        """Forget the history (the image stays); the next turn starts a new prefill."""
        if self._cache is not None:
            self.model.pipeline.release(self._cache)
        self.history, self._cache, self._first, self._position, self._pending = [], None, None, 0, None

    def close(self) -> None:
        self.reset()

    def __enter__(self) -> Conversation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _turn(
        self, generation: Generation, question: str, ids: np.ndarray, max_new_tokens: int, stop_at_eos: bool
    ):
        model = self.model
        clock = TurnClock(model.bundle.backend.transfers, self._preprocess_ms if self._cache is None else 0.0)
        if self._cache is None:
            start = model.pipeline.prefill(ids, self._image, self.policy, capacity=self.context)
            self._first, self._cache = start, start.cache
        else:
            start = self._continue(ids)
        self._position += ids.shape[1]
        yield from model.stream_answer(
            generation,
            start,
            self._position,
            self.policy.spec(),
            max_new_tokens,
            self.sampler,
            stop_at_eos,
            clock,
        )
        answer = generation.answer
        self._position += len(answer.token_ids) - 1  # every generated token but the last went in
        last = answer.token_ids[-1]
        # the last token goes in with the next turn, unless it ended the answer (the template goes on)
        self._pending = None if answer.finish_reason == "stop" else last
        self.history.append((question, answer.answer))

    def _continue(self, ids: np.ndarray) -> PrefillResult:
        """A later turn's tokens through every layer, attending to the cache (no routers, no exit)."""
        pipeline = self.model.pipeline
        held = self._cache.layer_lengths()
        started = time.perf_counter()
        logits = pipeline.forward_tokens(ids, self._position, self._cache)
        first = self._first
        return PrefillResult(
            logits=logits,
            cache=self._cache,
            exit_layer=first.exit_layer,
            exit_probs=first.exit_probs,
            n_tokens=ids.shape[1],
            n_visual=0,
            macs=continuation_macs(pipeline.decoder_dims, ids.shape[1], held),
            timings_ms={"vision": 0.0, "prefill": 1e3 * (time.perf_counter() - started), "switch": 0.0},
        )
