"""Batches: every sample exits at its own layer and gets exactly the answer it gets alone."""

import pytest

from dyvte_rt.api.model import DyvteModel
from dyvte_rt.errors import InputError
from dyvte_rt.runtime.compute import layer_macs

QUESTIONS = [
    "what color is the circle on the left?",
    "how many?",
    "what shape is in the top right corner, please?",
]


def test_a_batch_with_mixed_exits_lengths_and_images_equals_one_request_at_a_time(
    router_bundle, sample_image
):
    items = [
        (sample_image, QUESTIONS[0], "router"),  # the routers fire at layer 2
        (sample_image, QUESTIONS[1], "layer:1"),
        (sample_image, QUESTIONS[2], "never"),
        (None, QUESTIONS[0], "router"),  # text-only: nothing to drop
    ]
    with DyvteModel.load(router_bundle[0]) as model:
        alone = [model.ask(i, q, exit=e, max_new_tokens=6, stop_at_eos=False) for i, q, e in items]
        together = model.ask_batch(
            [(i, q) for i, q, _ in items], exit=[e for *_, e in items], max_new_tokens=6, stop_at_eos=False
        )
    assert [a.exit_layer for a in together] == [2, 1, None, None] == [a.exit_layer for a in alone]
    for single, batched in zip(alone, together, strict=True):
        assert batched.token_ids == single.token_ids
        assert batched.prefill_macs["full"] == single.prefill_macs["full"]
        assert batched.prefill_macs["actual"] == single.prefill_macs["actual"]
        assert batched.exit_probs == pytest.approx(single.exit_probs, abs=1e-5)
    computed = together[0].prefill_macs["batch_computed"]
    assert computed >= sum(a.prefill_macs["actual"] for a in together)  # the padding is paid, and shown
    # the "never" sample is the longest and keeps its visual rows: every layer runs 4 rows of its length
    longest = max(a.prompt_tokens for a in together)
    assert computed == 4 * 4 * layer_macs(longest, model.pipeline.decoder_dims)


def test_batched_decoding_keeps_per_sample_kv_lengths(bundles, sample_image):
    with DyvteModel.load(bundles["qwen2"]) as model:
        answers = model.ask_batch(
            [(sample_image, QUESTIONS[0]), (sample_image, QUESTIONS[2])],
            exit="layer:1",
            max_new_tokens=4,
            stop_at_eos=False,
        )
        n = [a.prompt_tokens for a in answers]
        assert n[0] != n[1]
        dims = model.manifest.dims
        row = 2 * dims.num_kv_heads * dims.head_dim * 4
        for answer in answers:
            expected = (2 * (answer.prompt_tokens + 3) + 2 * (answer.prompt_tokens - 16 + 3)) * row
            assert answer.kv_cache_bytes == expected


def test_batches_need_the_inplace_flavour(concat_bundles, sample_image):
    with DyvteModel.load(concat_bundles["qwen2"]) as model, pytest.raises(InputError, match="in-place KV"):
        model.ask_batch([(sample_image, "a?"), (sample_image, "b?")])


def test_engine_slots_answer_like_single_requests(demo_bundle, fresh_questions):
    """The server's continuous batching: requests joining a running batch between decode steps."""
    import json
    import queue
    import threading

    from dyvte_rt.runtime.sampling import Sampler, SamplingConfig
    from dyvte_rt.serving.engine import BatchEngine, ServeRequest

    rows = [json.loads(line) for line in fresh_questions.read_text().splitlines()[:10]]
    with DyvteModel.load(demo_bundle) as model:
        alone = [
            model.ask(fresh_questions.parent / r["image"], r["question"], max_new_tokens=8) for r in rows
        ]
        engine = BatchEngine(model, max_batch=3, max_queue=16, context=128)
        results: dict[int, queue.Queue] = {}
        try:
            for index, row in enumerate(rows):
                from dyvte_rt.inputs.images import load_image
                from dyvte_rt.inputs.preprocess import prepare_image

                ids = model.prompts.encode(row["question"])
                image = prepare_image(
                    load_image(fresh_questions.parent / row["image"]), model.manifest.vision
                )
                results[index] = queue.Queue()
                emit = lambda kind, payload, q=results[index]: q.put((kind, payload))  # noqa: E731
                engine.submit(
                    ServeRequest(ids[0], image, model.policy(None), 8, Sampler(SamplingConfig()), (), emit)
                )
            for index, single in enumerate(alone):
                pieces, done = [], None
                while done is None:
                    kind, payload = results[index].get(timeout=60)
                    if kind == "piece":
                        pieces.append(payload)
                    else:
                        done = payload
                assert done.token_ids == single.token_ids and done.exit_layer == single.exit_layer, index
                assert "".join(pieces).strip() == single.answer
        finally:
            engine.stop()
        assert not threading.enumerate()[1:] or all(t.name != "dyvte-engine" for t in threading.enumerate())
