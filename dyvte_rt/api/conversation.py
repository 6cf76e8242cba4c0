"""Multi-turn chat that reuses the KV cache between turns.

    with DyvteModel.load(bundle) as model:
        chat = model.chat("photo.jpg")
        print(chat.ask("What is on the table?").text)
        for piece in chat.generate("And what colour is it?"):
            print(piece, end="")

Semantics (docs/runtime.md, *Conversations*): the first turn is an ordinary prefill of the image and
the question, and the exit policy decides there, once, where the visual tokens leave. Later turns do
not prefill again: their tokens (the previous answer's last token unless it was end-of-sequence,
then the text the chat template adds for the new question, tokenized on its own) go through every
layer like decoding tokens, attending to whatever the cache holds. After an exit at layer k the
layers above k hold no visual rows, so a later turn computes exactly what a single prefill of the
whole conversation with policy `layer:k` would (tested against the PyTorch reference); without an
exit, exactly the full model's. `reset()` forgets the history and keeps the image: the next turn
prefills (and decides the exit) again.
"""

from __future__ import annotations

import time

import numpy as np

from dyvte_rt.api.answer import Answer, Generation
from dyvte_rt.errors import InputError
from dyvte_rt.inputs.images import ImageInput, load_image
from dyvte_rt.inputs.prompt import PromptBuilder
from dyvte_rt.runtime.batch import DecodeBatch
from dyvte_rt.runtime.decoding import DecodeState, StopRule
from dyvte_rt.runtime.pipeline import Pipeline, PrefillRequest, PrefillResult
from dyvte_rt.runtime.policy import ExitPolicy
from dyvte_rt.runtime.prune import NO_PRUNE, PrunePolicy
from dyvte_rt.runtime.sampling import Sampler, SamplingConfig

DEFAULT_CONTEXT = 2048  # positions a conversation reserves, unless the model has fewer


class Conversation:
    def __init__(
        self,
        pipeline: Pipeline,
        prompts: PromptBuilder,
        image: ImageInput | None,
        policy: ExitPolicy,
        context: int | None,
        sampling: SamplingConfig,
        prune: PrunePolicy = NO_PRUNE,
    ) -> None:
        pipeline.check_policy(policy)
        pipeline.check_prune(prune)
        self.pipeline = pipeline
        self.prompts = prompts
        self.policy = policy
        self.prune = prune
        self.context = min(context or DEFAULT_CONTEXT, pipeline.dims.max_positions)
        self.sampler = Sampler(sampling)  # one random stream for the whole conversation
        self._eos = frozenset(pipeline.bundle.manifest.tokens.eos)
        started = time.perf_counter()
        self._image = None if image is None else pipeline.family.prepare_image(load_image(image))
        self._preprocess_ms = 1e3 * (time.perf_counter() - started)
        self.history: list[tuple[str, str]] = []  # (question, answer) per finished turn
        self._batch: DecodeBatch | None = None  # one row, kept between turns
        self._first: PrefillResult | None = None  # the first turn's prefill: the exit decision
        self._position = 0  # index of the next token fed to the model
        self._pending: int | None = None  # the last answer's last token, not yet fed back

    @property
    def exit_layer(self) -> int | None:
        return self._first.exit_layer if self._first is not None else None

    @property
    def layer_lengths(self) -> list[int]:
        """Rows the KV cache holds per layer (fewer above the exit layer)."""
        return self._batch.cache.layer_lengths() if self._batch is not None else []

    @property
    def tokens(self) -> int:
        """Positions the conversation uses so far (prompt, answers and the template between them)."""
        return self._position

    def ask(
        self, question: str, max_new_tokens: int = 64, stop: tuple[str, ...] = (), ignore_eos: bool = False
    ) -> Answer:
        return self.generate(question, max_new_tokens, stop, ignore_eos).result()

    def generate(
        self, question: str, max_new_tokens: int = 64, stop: tuple[str, ...] = (), ignore_eos: bool = False
    ) -> Generation:
        """The next turn's answer, streamed; the turn joins the history once the answer is complete."""
        if not question.strip():
            raise InputError("the question is empty", hint="ask something")
        StopRule(max_new_tokens, stop=tuple(stop))  # checks the arguments now, not when iterated
        with_image = self._image is not None
        if self._batch is None:
            visual = self._image.visual_tokens if self._image is not None else None
            ids = self.prompts.encode(question, with_image=with_image, visual_tokens=visual)
        else:
            turn = self.prompts.encode_next_turn(self.history, question, with_image)
            pending = [] if self._pending is None else [self._pending]
            ids = np.concatenate([np.array([pending], dtype=np.int64).reshape(1, -1), turn], axis=1)
        room = self.context - self._position - ids.shape[1]  # positions left for the answer
        if room < 1:
            raise InputError(
                f"the conversation holds {self._position} positions and this question {ids.shape[1]} more, "
                f"past its context of {self.context}",
                hint="reset the conversation (/reset) or create it with a larger context",
            )
        rule = StopRule(min(max_new_tokens, room), self._eos, tuple(stop), ignore_eos)  # "length" at the end
        return Generation(lambda generation: self._turn(generation, question, ids, rule))

    def reset(self) -> None:
        """Forget the history (the image stays); the next turn starts a new prefill."""
        self.history, self._batch, self._first, self._position, self._pending = [], None, None, 0, None

    def close(self) -> None:
        self.reset()

    def __enter__(self) -> Conversation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _turn(self, generation: Generation, question: str, ids: np.ndarray, rule: StopRule):
        first_turn = self._batch is None
        self._position += ids.shape[1]
        state = DecodeState(
            self.prompts.tokenizer,
            self.sampler,
            rule,
            self._position,
            preprocess_ms=self._preprocess_ms if first_turn else 0.0,
        )
        if first_turn:
            self._batch = DecodeBatch(self.pipeline, self.pipeline.new_cache(self.context))
            request = PrefillRequest(ids[0], self._image, self.policy, self.prune)
            (slot,) = self._batch.prefill([(0, request, state)])
            self._first = slot.prefill
        else:
            slot = self._batch.extend(0, ids, state, self._first)
        yield from self._batch.stream(0)
        answer = Answer.from_slot(slot, self.policy.spec(), self.prune.spec())
        generation.answer = answer
        self._position += len(answer.token_ids) - 1  # every generated token but the last went in
        last = answer.token_ids[-1]
        # the last token goes in with the next turn, unless it ended the answer (the template goes on)
        self._pending = None if last in self._eos else last
        self.history.append((question, answer.text))
