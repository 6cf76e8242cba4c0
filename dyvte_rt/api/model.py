"""The Python API for edge applications: load a bundle once, ask many questions.

with DyvteModel.load("bundle/") as model:
    answer = model.ask("photo.jpg", "What colour is the car?", exit="router")
    for piece in model.generate("photo.jpg", "Describe it.", exit="layer:8"):
        print(piece, end="", flush=True)
    model.ask(None, "What is 2 + 2?")  # a question without an image
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dyvte_rt.bundle.loaded import Bundle
from dyvte_rt.bundle.manifest import TOKENIZER_FILE
from dyvte_rt.errors import InputError
from dyvte_rt.inputs.images import ImageInput, load_image
from dyvte_rt.inputs.preprocess import PreparedImage, prepare_image
from dyvte_rt.inputs.prompt import PromptBuilder
from dyvte_rt.runtime.pipeline import Pipeline, PrefillResult
from dyvte_rt.runtime.policy import ExitPolicy, parse_policy
from dyvte_rt.runtime.sampling import Sampler, SamplingConfig
from dyvte_rt.runtime.streaming import AnswerPieces
from engines import SessionOptions, Transfers

if TYPE_CHECKING:
    from dyvte_rt.api.conversation import Conversation

FINISH_STOP = "stop"  # the model produced an end-of-sequence token
FINISH_LENGTH = "length"  # max_new_tokens was reached first


@dataclass(frozen=True)
class Answer:
    answer: str
    token_ids: list[int]  # generated ids, EOS included if produced
    finish_reason: str  # "stop" | "length", as in the OpenAI API
    exit_layer: int | None  # the last layer that saw the visual tokens; None: they never left
    exit_probs: dict[int, float]  # router p(exit) per evaluated candidate layer
    policy: str
    prompt_tokens: int
    visual_tokens: int
    # preprocess (image loading, resizing), vision, prefill (embed + segments + head), switch (part of
    # prefill), ttft (preprocess + vision + prefill + first token), decode (all later tokens)
    timings_ms: dict[str, float]
    prefill_macs: dict[str, int]  # full, actual
    kv_cache_bytes: int  # KV cache held at the end of the request
    host_bytes: dict[str, float]  # copied between host and backend: prefill, decode, per_decode_token

    def to_dict(self) -> dict:
        data = asdict(self)
        data["exit_probs"] = {str(k): v for k, v in self.exit_probs.items()}
        return data


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


class DyvteModel:
    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.pipeline = Pipeline(bundle)
        self.prompts = PromptBuilder(bundle.manifest, bundle.path / TOKENIZER_FILE)

    @classmethod
    def load(
        cls,
        bundle: str | Path,
        device: str = "cpu",
        threads: int = 0,
        spin: bool = False,
        optimization: str = "all",
        verify_hashes: bool = True,
        dtype: str | None = None,
        memory_arena: bool = False,
    ) -> DyvteModel:
        """`dtype` (fp32 | fp16): refuse a bundle of another precision; None accepts the bundle's
        own, except fp16 on the CPU. `spin`: let idle worker threads spin-wait (lower latency only
        where cores are to spare). `memory_arena`: keep ONNX Runtime's CPU arena (holds a prefill's
        activations between requests)."""
        options = SessionOptions(
            device=device,
            intra_op_threads=threads,
            optimization=optimization,
            spin=spin,
            memory_arena=memory_arena,
        )
        return cls(Bundle.open(bundle, options, verify_hashes=verify_hashes, dtype=dtype))

    def close(self) -> None:
        self.bundle.close()

    def __enter__(self) -> DyvteModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def policy(self, exit: str | ExitPolicy | None = None, threshold: float | None = None) -> ExitPolicy:
        """The bundle's default policy unless one is given; `threshold` overrides the bundle's."""
        if exit is not None and not isinstance(exit, str):
            return exit
        spec = exit if exit is not None else self.manifest.exit.default_policy
        return parse_policy(spec, self.manifest.exit.threshold if threshold is None else threshold)

    def ask(
        self,
        image: ImageInput | None,
        question: str,
        *,
        exit: str | ExitPolicy | None = None,
        threshold: float | None = None,
        max_new_tokens: int = 64,
        sampling: SamplingConfig | None = None,
        stop_at_eos: bool = True,
    ) -> Answer:
        """Answer `question` about `image` (None: a text-only question); see `generate`."""
        return self.generate(
            image,
            question,
            exit=exit,
            threshold=threshold,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            stop_at_eos=stop_at_eos,
        ).result()

    def generate(
        self,
        image: ImageInput | None,
        question: str,
        *,
        exit: str | ExitPolicy | None = None,
        threshold: float | None = None,
        max_new_tokens: int = 64,
        sampling: SamplingConfig | None = None,
        stop_at_eos: bool = True,
    ) -> Generation:
        """Check everything, then return a lazy generation (no compute happens until iterated).

        `exit`: never, router, layer:K or a policy object (default: the bundle's); `threshold`
        overrides the bundle's router threshold; `stop_at_eos=False` decodes exactly
        `max_new_tokens` (benchmarks).
        """
        policy = self.policy(exit, threshold)
        self.pipeline.check_policy(policy)
        started = time.perf_counter()
        input_ids, prepared = self._prepare(image, question, max_new_tokens)
        preprocess_ms = 1e3 * (time.perf_counter() - started)
        sampler = Sampler(sampling or SamplingConfig())
        return Generation(
            lambda generation: self._run(
                generation, input_ids, prepared, policy, max_new_tokens, sampler, stop_at_eos, preprocess_ms
            )
        )

    def ask_batch(
        self,
        questions: list[tuple[ImageInput | None, str]],
        *,
        exit: str | ExitPolicy | list[str | ExitPolicy] | None = None,
        threshold: float | None = None,
        max_new_tokens: int = 64,
        sampling: SamplingConfig | None = None,
        stop_at_eos: bool = True,
    ) -> list[Answer]:
        """Answer several (image, question) pairs together: one batched prefill, in which every
        sample exits at its own layer (`exit` may give each its own policy), then batched decoding.

        Every answer equals the one `ask` gives for the same pair. Each answer's `prefill_macs`
        also holds `batch_computed`: what the whole batch computed, padding included.
        """
        from dyvte_rt.runtime.pipeline import PrefillRequest

        if not questions:
            return []
        policies = exit if isinstance(exit, list) else [exit] * len(questions)
        if len(policies) != len(questions):
            raise InputError(f"{len(policies)} exit policies for {len(questions)} questions")
        requests, started = [], time.perf_counter()
        for (image, question), spec in zip(questions, policies, strict=True):
            policy = self.policy(spec, threshold)
            ids, prepared = self._prepare(image, question, max_new_tokens)
            requests.append(PrefillRequest(ids[0], prepared, policy))
        preprocess_ms = 1e3 * (time.perf_counter() - started)
        capacity = max(len(r.input_ids) for r in requests) + max_new_tokens
        cache = self.pipeline.new_cache(capacity, batch=len(requests))
        clock = TurnClock(self.bundle.backend.transfers, preprocess_ms)
        batch = self.pipeline.prefill_batch(requests, cache)
        samplers = [Sampler(sampling or SamplingConfig()) for _ in requests]
        eos = set(self.manifest.tokens.eos) if stop_at_eos else set()
        tokens = [[samplers[b](result.logits)] for b, result in enumerate(batch.results)]
        first = time.perf_counter()
        done = [t[-1] in eos or max_new_tokens == 1 for t in tokens]
        step = 0
        while not all(done):
            positions = np.array([[r.n_tokens + step] for r in batch.results])  # each sample's next position
            logits = self.pipeline.forward_tokens(np.array([[t[-1]] for t in tokens]), positions, cache)
            step += 1
            for b in range(len(tokens)):
                if not done[b]:
                    tokens[b].append(samplers[b](logits[b : b + 1]))
                    done[b] = tokens[b][-1] in eos or len(tokens[b]) >= max_new_tokens
        decode_ms = 1e3 * (time.perf_counter() - first)
        answers = []
        for result, sample_tokens in zip(batch.results, tokens, strict=True):
            text = self.prompts.tokenizer.decode(sample_tokens, skip_special_tokens=True).strip()
            answers.append(
                Answer(
                    answer=text,
                    token_ids=sample_tokens,
                    finish_reason=FINISH_STOP if sample_tokens[-1] in eos else FINISH_LENGTH,
                    exit_layer=result.exit_layer,
                    exit_probs=result.exit_probs,
                    policy=requests[result.row].policy.spec(),
                    prompt_tokens=result.n_tokens,
                    visual_tokens=result.n_visual,
                    timings_ms={
                        "preprocess": preprocess_ms,
                        **result.timings_ms,
                        "ttft": clock.preprocess_ms + 1e3 * (first - clock.started),
                        "decode": decode_ms,
                    },
                    prefill_macs={
                        "full": result.macs.full,
                        "actual": result.macs.actual,
                        "batch_computed": batch.padded_macs,
                    },
                    kv_cache_bytes=int(cache.lengths[result.row].sum()) * cache.row_bytes(),
                    host_bytes={"batch": clock.transfers.since(clock.before).total},
                )
            )
        return answers

    def chat(
        self,
        image: ImageInput | None = None,
        *,
        exit: str | ExitPolicy | None = None,
        threshold: float | None = None,
        context: int | None = None,
        sampling: SamplingConfig | None = None,
    ) -> Conversation:
        """A multi-turn conversation about `image` (or none) that keeps its KV cache between turns.

        The exit is decided once, in the first turn; `context` bounds the whole conversation's
        tokens (default: the model's context, at most 2048). See `dyvte_rt.api.conversation`.
        """
        from dyvte_rt.api.conversation import Conversation

        return Conversation(self, image, self.policy(exit, threshold), context, sampling or SamplingConfig())

    def _prepare(
        self, image: ImageInput | None, question: str, max_new_tokens: int
    ) -> tuple[np.ndarray, PreparedImage | None]:
        """Check a question and turn it into prompt ids [1, N] and the prepared image (None: no image)."""
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if not question.strip():
            raise InputError("the question is empty", hint="ask something about the image")
        prepared = None if image is None else prepare_image(load_image(image), self.manifest.vision)
        visual = None if prepared is None else prepared.visual_tokens
        input_ids = self.prompts.encode(question, with_image=image is not None, visual_tokens=visual)
        limit = self.manifest.dims.max_positions
        if input_ids.shape[1] + max_new_tokens > limit:
            raise InputError(
                f"the prompt has {input_ids.shape[1]} tokens; with {max_new_tokens} new tokens that exceeds "
                f"the model's context of {limit} positions",
                hint="shorten the question or lower --max-new-tokens",
            )
        return input_ids, prepared

    def _run(
        self,
        generation: Generation,
        input_ids: np.ndarray,
        image: PreparedImage | None,
        policy: ExitPolicy,
        max_new_tokens: int,
        sampler: Sampler,
        stop_at_eos: bool,
        preprocess_ms: float,
    ) -> Iterator[str]:
        clock = TurnClock(self.bundle.backend.transfers, preprocess_ms)
        prefill = self.pipeline.prefill(
            input_ids, image, policy, capacity=input_ids.shape[1] + max_new_tokens
        )
        yield from self.stream_answer(
            generation, prefill, prefill.n_tokens, policy.spec(), max_new_tokens, sampler, stop_at_eos, clock
        )
        self.pipeline.release(prefill.cache)  # its buffers serve the next request

    def stream_answer(
        self,
        generation: Generation,
        start: PrefillResult,
        position: int,
        policy: str,
        max_new_tokens: int,
        sampler: Sampler,
        stop_at_eos: bool,
        clock: TurnClock,
    ) -> Iterator[str]:
        """Decode from `start`'s logits (the next token goes to `position`), streaming text pieces;
        sets `generation.answer` at the end. Shared by single questions and conversation turns."""
        after_prefill = clock.transfers.snapshot()
        eos = set(self.manifest.tokens.eos) if stop_at_eos else set()
        detokenizer = AnswerPieces(self.prompts.tokenizer)
        tokens = [sampler(start.logits)]
        pieces: list[str] = []
        started = time.perf_counter()
        ttft_ms = clock.preprocess_ms + 1e3 * (started - clock.started)
        while True:
            piece = detokenizer.step(tokens[-1])
            if piece:
                pieces.append(piece)
                yield piece
            if tokens[-1] in eos or len(tokens) >= max_new_tokens:
                break
            logits = self.pipeline.decode_one_token(tokens[-1], position + len(tokens) - 1, start.cache)
            tokens.append(sampler(logits))
        decode_ms = 1e3 * (time.perf_counter() - started)
        decode_bytes = clock.transfers.since(after_prefill).total
        generation.answer = Answer(
            answer="".join(pieces).strip(),
            token_ids=tokens,
            finish_reason=FINISH_STOP if tokens[-1] in eos else FINISH_LENGTH,
            exit_layer=start.exit_layer,
            exit_probs=start.exit_probs,
            policy=policy,
            prompt_tokens=start.n_tokens,
            visual_tokens=start.n_visual,
            timings_ms={
                "preprocess": clock.preprocess_ms,
                **start.timings_ms,
                "ttft": ttft_ms,
                "decode": decode_ms,
            },
            prefill_macs={"full": start.macs.full, "actual": start.macs.actual},
            kv_cache_bytes=start.cache.nbytes(),
            host_bytes={
                "prefill": after_prefill.since(clock.before).total,
                "decode": decode_bytes,
                "per_decode_token": decode_bytes / (len(tokens) - 1) if len(tokens) > 1 else 0.0,
            },
        )


@dataclass
class TurnClock:
    """When a request started (after image preprocessing) and what had crossed to the host by then."""

    transfers: Transfers
    preprocess_ms: float
    started: float = field(default_factory=time.perf_counter)
    before: Transfers = field(init=False)

    def __post_init__(self) -> None:
        self.before = self.transfers.snapshot()
