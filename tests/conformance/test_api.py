"""The Python API and the server's engine, which share one decode path: a single question against
the reference, a batch and the engine's slots against single questions, a conversation against
one prefill of the whole conversation."""

import queue

import numpy as np
import pytest
import torch

from dyvte_rt.api.model import DyvteModel
from dyvte_rt.errors import InputError
from dyvte_rt.runtime.policy import FixedLayerExit, NeverExit, RouterExit
from dyvte_rt.runtime.sampling import Sampler, SamplingConfig
from export.prompting import hf_inputs
from export.reference import DyVTEReference, RouterBank
from tests.conformance.cases import API
from tests.conformance.conftest import QUESTION

FAMILY_CASES = API

MAX_NEW = 6


@pytest.fixture(scope="module")
def model(bundle):
    with DyvteModel.load(bundle) as opened:
        yield opened


def test_answers_equal_the_reference_and_hugging_face(loaded, model, routers, images, image_files):
    bank = RouterBank.load(routers)
    reference = DyVTEReference(loaded.adapter, routers=bank, candidate_layers=bank.layers)
    name = next(iter(images))
    inputs = hf_inputs(loaded.processor, images[name], QUESTION)
    image = loaded.adapter.image_input(inputs)
    for spec, policy in (("never", NeverExit()), ("layer:1", FixedLayerExit(1)), ("router", RouterExit(0.5))):
        expected = reference.generate(inputs["input_ids"], image, policy, max_new_tokens=MAX_NEW)
        answer = model.ask(image_files[name], QUESTION, exit=spec, threshold=0.5, max_new_tokens=MAX_NEW)
        assert answer.token_ids == expected.tokens and answer.exit_layer == expected.exit_layer, spec
        assert answer.prefill_macs["actual"] == expected.prefill.macs.actual, spec
    with torch.no_grad():
        hf = loaded.model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
    never = model.ask(image_files[name], QUESTION, exit="never", max_new_tokens=MAX_NEW)
    assert never.token_ids == hf[0, inputs["input_ids"].shape[1] :].tolist()


def _questions(image_files):
    names = list(image_files)
    return [
        (image_files[names[0]], QUESTION, "router"),
        (image_files[names[1]], "how many?", "layer:1"),
        (image_files[names[-1]], "what shape is in the top right corner, please?", "never"),
        (None, QUESTION, "layer:2"),  # text-only: nothing to drop
    ]


def test_a_batch_with_mixed_images_exits_and_lengths_equals_single_answers(case, model, image_files):
    items = _questions(image_files)
    if "inplace" not in case.kv_flavours:  # rows of one cache need the in-place flavour: one line says so
        with pytest.raises(InputError, match="in-place KV flavour"):
            model.ask_batch([(i, q) for i, q, _ in items])
        return
    alone = [model.ask(i, q, exit=e, max_new_tokens=MAX_NEW, ignore_eos=True) for i, q, e in items]
    together = model.ask_batch(
        [(i, q) for i, q, _ in items], exit=[e for *_, e in items], max_new_tokens=MAX_NEW, ignore_eos=True
    )
    for single, batched in zip(alone, together, strict=True):
        assert batched.token_ids == single.token_ids and batched.text == single.text
        assert batched.exit_layer == single.exit_layer and batched.visual_tokens == single.visual_tokens
        assert batched.prefill_macs["actual"] == single.prefill_macs["actual"]
        assert batched.exit_probs == pytest.approx(single.exit_probs, abs=1e-5)
        assert batched.kv_cache_bytes == single.kv_cache_bytes  # a finished row stops growing
    assert together[3].exit_layer is None and together[1].exit_layer == 1


@pytest.mark.parametrize("chunk", [0, 5])
def test_the_engine_answers_requests_joining_a_running_batch_as_alone(case, model, image_files, chunk):
    """Three requests on two slots: the third joins when the first leaves. The first and third come
    with their images encoded before they are queued (as the server encodes them), the second not.
    Prefills run a step at a time between decode steps: a segment at a time (chunk 0; the first two
    share a prefill), or 5 prompt tokens at a time, each prompt alone."""
    from dyvte_rt.serving.engine import BatchEngine, ServeRequest

    if "inplace" not in case.kv_flavours:
        with pytest.raises(InputError, match="in-place KV flavour"):
            BatchEngine(model, max_batch=2)
        return
    items = _questions(image_files)[:3]
    alone = [model.ask(i, q, exit=e, max_new_tokens=MAX_NEW) for i, q, e in items]
    engine = BatchEngine(model, max_batch=2, max_queue=4, context=256, prefill_chunk=chunk)
    events = [queue.Queue() for _ in items]
    try:
        for index, ((image, question, exit), sink) in enumerate(zip(items, events, strict=True)):
            prepared = model.prepare_image(image) if image is not None else None
            if index != 1:
                prepared = model.pipeline.encode_image(prepared)
                assert prepared.encoded and prepared.encoded_ms > 0
            ids = model.prompts.encode(
                question, with_image=image is not None, visual_tokens=prepared.visual_tokens
            )
            request = ServeRequest(
                ids[0], prepared, model.policy(exit), model.stop_rule(MAX_NEW), Sampler(SamplingConfig()),
                lambda kind, payload, sink=sink: sink.put((kind, payload)),
            )  # fmt: skip
            engine.submit(request)
        for single, sink in zip(alone, events, strict=True):
            pieces, done = [], None
            while done is None:
                kind, payload = sink.get(timeout=60)
                assert kind != "error", payload
                pieces.append(payload) if kind == "piece" else None
                done = payload if kind == "done" else None
            assert done.token_ids == single.token_ids and done.exit_layer == single.exit_layer
            assert "".join(pieces) == done.text == single.text
    finally:
        engine.stop()


@pytest.mark.parametrize(
    ("exit", "prune"),
    [
        ("never", "none"),
        ("layer:1", "none"),
        ("router", "none"),
        ("never", "fastv:1:0.5"),
        ("layer:2", "dart:-1:0.5"),
    ],
)
def test_a_prefill_in_chunks_equals_the_whole_prefill(model, image_files, exit, prune):
    """A prompt through each segment 5 tokens at a time (what the server does with long prompts):
    the same exit, pruning, router probabilities, logits and KV cache as one call per segment."""
    from dyvte_rt.runtime.pipeline import PrefillRequest

    pipeline = model.pipeline
    image = model.prepare_image(next(iter(image_files.values())))
    ids = model.prompts.encode(QUESTION, visual_tokens=image.visual_tokens)[0]
    request = PrefillRequest(ids, image, model.policy(exit, threshold=0.5), model.prune_policy(prune))
    whole_cache, chunked_cache = (pipeline.new_cache(len(ids) + 4) for _ in range(2))
    whole = pipeline.prefill_batch([request], whole_cache).results[0]
    steps, count = pipeline.prefill_steps([request], chunked_cache, chunk=5), 0
    while True:  # each step is one yield of the generator
        try:
            next(steps)
            count += 1
        except StopIteration as done:
            chunked = done.value.results[0]
            break
    assert count > len(pipeline.segments) + 2  # vision, embeddings, and more than one step a segment
    assert chunked.exit_layer == whole.exit_layer and chunked.kept_visual == whole.kept_visual
    assert (whole.kept_visual is not None) == (prune != "none")
    assert chunked.exit_probs == pytest.approx(whole.exit_probs, abs=1e-5)
    np.testing.assert_allclose(chunked.logits, whole.logits, rtol=1e-4, atol=1e-4)
    assert (chunked_cache.lengths == whole_cache.lengths).all()
    for key, value in _kv_values(whole_cache).items():
        held = int(whole_cache.lengths[0, key[0]])
        expected = pipeline.backend.download(value)[..., :held, :]
        got = pipeline.backend.download(_kv_values(chunked_cache)[key])[..., :held, :]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def _kv_values(cache) -> dict:
    return cache.buffers if hasattr(cache, "buffers") else cache.values


@pytest.mark.parametrize("exit", ["never", "layer:1"])
def test_later_turns_equal_the_reference_on_the_whole_conversation(loaded, model, images, image_files, exit):
    reference = DyVTEReference(loaded.adapter)
    name = next(iter(images))
    image = loaded.adapter.image_input(hf_inputs(loaded.processor, images[name], QUESTION))
    visual = model.prepare_image(image_files[name]).visual_tokens
    policy = NeverExit() if exit == "never" else FixedLayerExit(1)
    with model.chat(image_files[name], exit=exit) as chat:
        fed: list[int] = []
        for index, question in enumerate((QUESTION, "and the square?", "how many shapes?")):
            if index == 0:
                ids = model.prompts.encode(question, visual_tokens=visual)[0].tolist()
            else:
                ids = model.prompts.encode_next_turn(chat.history, question, with_image=True)[0].tolist()
            answer = chat.ask(question, max_new_tokens=4)
            fed += ids
            expected = reference.generate(torch.tensor([fed]), image, policy, max_new_tokens=4)
            assert answer.token_ids == expected.tokens and answer.exit_layer == expected.exit_layer, index
            fed += answer.token_ids if answer.finish_reason == "length" else answer.token_ids[:-1]
        held = chat.layer_lengths
        assert held[0] == chat.tokens  # every position but a pending last token is in the cache
        if exit != "never":  # no visual rows above the exit
            assert held[2:] == [held[0] - visual] * (len(held) - 2)
