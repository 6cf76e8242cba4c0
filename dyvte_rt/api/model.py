"""The Python API for edge applications: load a bundle once, ask many questions.

with DyvteModel.load("bundle/") as model:
    answer = model.ask("photo.jpg", "What colour is the car?", exit="router")
    for piece in model.generate("photo.jpg", "Describe it.", exit="layer:8"):
        print(piece, end="", flush=True)
    model.ask(None, "What is 2 + 2?")  # a question without an image

Every way to ask runs the same decode path (`dyvte_rt.runtime.batch.DecodeBatch`) and gives the
same result type (`Answer`).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np

from dyvte_rt.api.answer import Answer, Generation
from dyvte_rt.api.conversation import Conversation
from dyvte_rt.bundle.loaded import Bundle
from dyvte_rt.bundle.manifest import TOKENIZER_FILE
from dyvte_rt.errors import InputError
from dyvte_rt.inputs.images import ImageInput, load_image
from dyvte_rt.inputs.preprocess import PreparedImage
from dyvte_rt.inputs.prompt import PromptBuilder
from dyvte_rt.runtime.batch import DecodeBatch
from dyvte_rt.runtime.decoding import DecodeState, StopRule
from dyvte_rt.runtime.pipeline import Pipeline, PrefillRequest
from dyvte_rt.runtime.policy import ExitPolicy, parse_policy
from dyvte_rt.runtime.prune import PrunePolicy, parse_prune
from dyvte_rt.runtime.sampling import Sampler, SamplingConfig
from engines import SessionOptions

VISION_GRAPH = "vision"  # the image encoder's graph in every bundle with images
VISION_PRIORITIES = ("normal", "low")


class DyvteModel:
    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.family = bundle.family
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
        lean_memory: bool = True,
        vision_priority: str = "normal",
    ) -> DyvteModel:
        """`dtype` (fp32 | fp16): refuse a bundle of another precision; None accepts the bundle's
        own, except fp16 on the CPU. `spin`: let idle worker threads spin-wait (lower latency only
        where cores are to spare). `memory_arena`: keep ONNX Runtime's CPU arena (holds a prefill's
        activations between requests). `lean_memory`: return to the OS what loading left resident
        beyond the packed weights, and the heap pages each prefill and request freed (glibc;
        engines/host_memory.py). `vision_priority` "low": the image encoder's worker threads run at
        the lowest CPU priority (Linux), for a server that encodes images while others decode; the
        thread that calls `encode_image` should lower its own (engines.host_threads)."""
        if threads < 0:
            raise InputError(f"threads must be 0 (let dyvte-rt choose) or a positive count, not {threads}")
        if vision_priority not in VISION_PRIORITIES:
            choices = ", ".join(VISION_PRIORITIES)
            raise InputError(f"vision priority must be one of {choices}, not {vision_priority!r}")
        options = SessionOptions(
            device=device,
            intra_op_threads=threads,
            optimization=optimization,
            spin=spin,
            memory_arena=memory_arena,
            lean_host_memory=lean_memory,
        )
        low = frozenset({VISION_GRAPH}) if vision_priority == "low" else frozenset()
        return cls(Bundle.open(bundle, options, verify_hashes=verify_hashes, dtype=dtype, low_priority=low))

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

    def prune_policy(self, prune: str | PrunePolicy | None = None) -> PrunePolicy:
        """The bundle's default prune policy unless one is given (none for a bundle without one)."""
        if prune is None:
            prune = self.manifest.prune.default_policy if self.manifest.prune is not None else "none"
        return parse_prune(prune)

    def stop_rule(
        self,
        max_new_tokens: int,
        stop: str | tuple[str, ...] | list[str] = (),
        ignore_eos: bool = False,
        stop_at_eos: bool | None = None,
    ) -> StopRule:
        """When answers end: after `max_new_tokens`, at the model's end-of-sequence token (unless
        `ignore_eos`), or before the first of the `stop` strings."""
        if stop_at_eos is not None:
            warnings.warn(
                "stop_at_eos is deprecated; use ignore_eos (its opposite)", DeprecationWarning, stacklevel=3
            )
            ignore_eos = not stop_at_eos
        stops = (stop,) if isinstance(stop, str) else tuple(stop)
        return StopRule(max_new_tokens, frozenset(self.manifest.tokens.eos), stops, ignore_eos)

    # -- asking ---------------------------------------------------------------------------------

    def ask(
        self,
        image: ImageInput | None,
        question: str,
        *,
        exit: str | ExitPolicy | None = None,
        threshold: float | None = None,
        max_new_tokens: int = 64,
        sampling: SamplingConfig | None = None,
        stop: str | tuple[str, ...] | list[str] = (),
        ignore_eos: bool = False,
        stop_at_eos: bool | None = None,
        prune: str | PrunePolicy | None = None,
    ) -> Answer:
        """Answer `question` about `image` (None: a text-only question); see `generate`."""
        return self.generate(
            image,
            question,
            exit=exit,
            threshold=threshold,
            prune=prune,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            stop=stop,
            ignore_eos=ignore_eos,
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
        stop: str | tuple[str, ...] | list[str] = (),
        ignore_eos: bool = False,
        stop_at_eos: bool | None = None,
        prune: str | PrunePolicy | None = None,
    ) -> Generation:
        """Check everything, then return a lazy generation (no compute happens until iterated).

        `exit`: never, router, layer:K or a policy object (default: the bundle's); `threshold`
        overrides the bundle's router threshold; `prune`: none, fastv:K:R or dart:K:R[:P] (default:
        the bundle's); `stop`: strings the answer ends before (not part of it); `ignore_eos=True`
        decodes exactly `max_new_tokens` (benchmarks).
        """
        rule = self.stop_rule(max_new_tokens, stop, ignore_eos, stop_at_eos)
        request, state = self._request(image, question, exit, threshold, rule, sampling, prune)

        def produce(generation: Generation):
            state.started_at = time.perf_counter()  # a lazy generation is timed from its first read
            capacity = len(request.input_ids) + max_new_tokens
            batch = DecodeBatch(self.pipeline, self.pipeline.new_cache(capacity))
            (slot,) = batch.prefill([(0, request, state)])
            yield from batch.stream(0)
            generation.answer = Answer.from_slot(slot, request.policy.spec(), request.prune.spec())
            held = batch.cache.allocated_bytes()
            del batch, slot
            self.bundle.release_freed_memory(held)  # the request's KV cache

        return Generation(produce)

    def ask_batch(
        self,
        questions: list[tuple[ImageInput | None, str]],
        *,
        exit: str | ExitPolicy | list[str | ExitPolicy] | None = None,
        threshold: float | None = None,
        max_new_tokens: int = 64,
        sampling: SamplingConfig | None = None,
        stop: str | tuple[str, ...] | list[str] = (),
        ignore_eos: bool = False,
        stop_at_eos: bool | None = None,
        prune: str | PrunePolicy | list[str | PrunePolicy | None] | None = None,
    ) -> list[Answer]:
        """Answer several (image, question) pairs together: one batched prefill, in which every
        sample exits at its own layer (`exit` may give each its own policy) and prunes with its own
        policy (`prune`, likewise), then batched decoding in which a finished answer leaves the batch.

        Every answer equals the one `ask` gives for the same pair. Each answer's
        `prefill_macs["batch_computed"]` is what the whole batch's prefill computed, padding included.
        """
        if not questions:
            return []
        specs = exit if isinstance(exit, list) else [exit] * len(questions)
        if len(specs) != len(questions):
            raise InputError(f"{len(specs)} exit policies for {len(questions)} questions")
        prunes = prune if isinstance(prune, list) else [prune] * len(questions)
        if len(prunes) != len(questions):
            raise InputError(f"{len(prunes)} prune policies for {len(questions)} questions")
        rule = self.stop_rule(max_new_tokens, stop, ignore_eos, stop_at_eos)
        entries = [
            (slot, *self._request(image, question, spec, threshold, rule, sampling, each))
            for slot, ((image, question), spec, each) in enumerate(zip(questions, specs, prunes, strict=True))
        ]
        capacity = max(len(request.input_ids) for _, request, _ in entries) + max_new_tokens
        batch = DecodeBatch(self.pipeline, self.pipeline.new_cache(capacity, batch=len(entries)))
        slots = batch.prefill(entries)
        finished = [i for i, slot in enumerate(slots) if slot.state.finished]
        while True:
            for i in finished:
                batch.release(i)
            if not batch.active:
                break
            finished = batch.step()
        answers = [
            Answer.from_slot(slot, request.policy.spec(), request.prune.spec())
            for slot, (_, request, _) in zip(slots, entries, strict=True)
        ]
        held = batch.cache.allocated_bytes()
        del batch, slots
        self.bundle.release_freed_memory(held)  # the batch's KV cache
        return answers

    def chat(
        self,
        image: ImageInput | None = None,
        *,
        exit: str | ExitPolicy | None = None,
        threshold: float | None = None,
        context: int | None = None,
        sampling: SamplingConfig | None = None,
        prune: str | PrunePolicy | None = None,
    ) -> Conversation:
        """A multi-turn conversation about `image` (or none) that keeps its KV cache between turns.

        The exit and the prune are decided once, in the first turn; `context` bounds the whole
        conversation's tokens (default: the model's context, at most 2048). See
        `dyvte_rt.api.conversation`.
        """
        policy = self.policy(exit, threshold)
        return Conversation(
            self.pipeline,
            self.prompts,
            image,
            policy,
            context,
            sampling or SamplingConfig(),
            self.prune_policy(prune),
        )

    def prepare_image(self, image: ImageInput) -> PreparedImage:
        """An image (a path, bytes or a PIL image) opened safely and prepared for the vision graph."""
        return self.family.prepare_image(load_image(image))

    def _request(
        self,
        image: ImageInput | None,
        question: str,
        exit: str | ExitPolicy | None,
        threshold: float | None,
        rule: StopRule,
        sampling: SamplingConfig | None,
        prune: str | PrunePolicy | None = None,
    ) -> tuple[PrefillRequest, DecodeState]:
        """One question checked and prepared -> what to prefill and its decode state (every way
        to ask starts a request this way)."""
        policy = self.policy(exit, threshold)
        self.pipeline.check_policy(policy)
        pruning = self.prune_policy(prune)
        self.pipeline.check_prune(pruning)
        started = time.perf_counter()
        input_ids, prepared = self._prepare(image, question, rule.max_new_tokens)
        preprocess_ms = 1e3 * (time.perf_counter() - started)
        sampler = Sampler(sampling or SamplingConfig())
        state = DecodeState(
            self.prompts.tokenizer, sampler, rule, input_ids.shape[1], preprocess_ms=preprocess_ms
        )
        return PrefillRequest(input_ids[0], prepared, policy, pruning), state

    def _prepare(
        self, image: ImageInput | None, question: str, max_new_tokens: int
    ) -> tuple[np.ndarray, PreparedImage | None]:
        """Check a question and turn it into prompt ids [1, N] and the prepared image (None: no image)."""
        if not question.strip():
            raise InputError("the question is empty", hint="ask something about the image")
        prepared = None if image is None else self.prepare_image(image)
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
