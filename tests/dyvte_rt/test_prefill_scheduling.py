"""The batch engine runs prefills a step at a time between decode steps: a running stream keeps
decoding while a long prompt is prefilled, a request arriving during another's prefill starts its
own at once, and a prefill whose request left stops and frees its slot. Tokens equal the request
alone (the conformance suite checks that for every family)."""

from __future__ import annotations

import queue
import threading

import pytest

from dyvte_rt.runtime.sampling import Sampler, SamplingConfig
from tests.dyvte_rt.served import IMAGE, QUESTIONS


@pytest.fixture(scope="module")
def model(demo_bundle):
    from dyvte_rt import DyvteModel

    with DyvteModel.load(demo_bundle) as loaded:
        yield loaded


def _request(model, question: str, max_new: int, sink: queue.Queue, exit: str = "never"):
    from dyvte_rt.serving.engine import ServeRequest

    image = model.pipeline.encode_image(model.prepare_image(IMAGE))
    ids = model.prompts.encode(question, visual_tokens=image.visual_tokens)[0]
    return ServeRequest(
        ids, image, model.policy(exit), model.stop_rule(max_new, ignore_eos=True), Sampler(SamplingConfig()),
        lambda kind, payload: sink.put((kind, payload)),
    )  # fmt: skip


def _answer(sink: queue.Queue, timeout: float = 60):
    while True:
        kind, payload = sink.get(timeout=timeout)
        assert kind != "error", payload
        if kind == "done":
            return payload


def test_a_stream_decodes_while_a_long_prompt_is_prefilled_in_chunks(model):
    """A stream runs; a second request's prompt (far longer than the 4-token chunk) is prefilled a
    chunk at a time: one decode step of the stream between each of its steps, not none."""
    from dyvte_rt.serving.engine import BatchEngine

    alone = [
        model.ask(IMAGE, q, exit=e, max_new_tokens=n, ignore_eos=True)
        for q, e, n in ((QUESTIONS[0], "never", 150), (QUESTIONS[1], "layer:1", 6))
    ]
    engine = BatchEngine(model, max_batch=2, max_queue=2, context=256, prefill_chunk=4)
    steps, marks = [], {}
    engine.on_step = steps.append
    first, second = queue.Queue(), queue.Queue()
    try:
        engine.submit(_request(model, QUESTIONS[0], 150, first))
        assert first.get(timeout=60)[0] == "piece"  # the stream is running
        request = _request(model, QUESTIONS[1], 6, second, exit="layer:1")
        marks["submitted"] = len(steps)
        engine.submit(request)
        assert second.get(timeout=60)[0] == "piece"
        marks["first token"] = len(steps)
        answers = [_answer(first), _answer(second)]
    finally:
        engine.stop()
    chunks = -(-request.prompt_ids.shape[0] // 4)  # the first segment's alone, before the exit
    assert marks["first token"] - marks["submitted"] >= chunks
    assert [a.token_ids for a in answers] == [a.token_ids for a in alone]
    assert answers[1].exit_layer == 1
    assert len(answers[0].token_gaps_ms) == 149 and min(answers[0].token_gaps_ms) > 0


def test_a_request_arriving_during_a_prefill_starts_its_own_and_finishes_first(model, monkeypatch):
    """The first prefill is held after its first step; a short request arriving then is prefilled
    (a segment at a time, beside the held one) and answered while the first still waits."""
    from dyvte_rt.runtime.batch import StartingPrefill
    from dyvte_rt.serving.engine import BatchEngine

    release, calls = threading.Event(), {}
    real = StartingPrefill.advance

    def advance(self):
        calls[id(self)] = calls.get(id(self), 0) + 1
        if id(self) == next(iter(calls)) and calls[id(self)] > 1 and not release.is_set():
            return []  # the first prefill makes no progress after its first step until released
        return real(self)

    monkeypatch.setattr(StartingPrefill, "advance", advance)
    engine = BatchEngine(model, max_batch=2, max_queue=2, context=256, prefill_chunk=4)
    long_sink, short_sink = queue.Queue(), queue.Queue()
    try:
        engine.submit(_request(model, QUESTIONS[2], 4, long_sink))
        for _ in range(1000):  # until its first step ran
            if calls:
                break
            threading.Event().wait(0.01)
        engine.submit(_request(model, "hi", 4, short_sink))
        short = _answer(short_sink)
        assert long_sink.empty()  # the first request still waits for its prefill
        release.set()
        long = _answer(long_sink)
    finally:
        engine.stop()
    for answer, question in ((short, "hi"), (long, QUESTIONS[2])):
        alone = model.ask(IMAGE, question, exit="never", max_new_tokens=4, ignore_eos=True)
        assert answer.token_ids == alone.token_ids


def test_a_prefill_whose_request_left_stops_and_frees_its_slot(model, monkeypatch):
    from dyvte_rt.runtime.batch import StartingPrefill
    from dyvte_rt.serving.engine import BatchEngine

    started, gate = threading.Event(), threading.Event()
    real = StartingPrefill.advance

    def advance(self):
        started.set()
        gate.wait(10)  # the test cancels the request meanwhile
        return real(self)

    monkeypatch.setattr(StartingPrefill, "advance", advance)
    engine = BatchEngine(model, max_batch=1, max_queue=1, context=256, prefill_chunk=4)
    cancelled = []
    engine.on_cancelled = cancelled.append
    sink = queue.Queue()
    try:
        request = _request(model, QUESTIONS[2], 4, sink)
        engine.submit(request)
        assert started.wait(10)
        request.cancelled.set()
        gate.set()
        for _ in range(500):
            if cancelled:
                break
            threading.Event().wait(0.01)
        assert cancelled == [request] and engine.active == 0 and engine.batch.free_slots() == [0]
        monkeypatch.setattr(StartingPrefill, "advance", real)
        again = queue.Queue()
        engine.submit(_request(model, QUESTIONS[0], 4, again))  # the one slot serves the next
        assert (
            _answer(again).token_ids
            == model.ask(IMAGE, QUESTIONS[0], exit="never", max_new_tokens=4, ignore_eos=True).token_ids
        )
    finally:
        engine.stop()
    assert sink.empty()
