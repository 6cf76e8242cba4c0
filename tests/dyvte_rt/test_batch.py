"""Batches: every sample exits at its own layer, gets exactly the answer it gets alone (the
conformance suite checks that for every family), and leaves the batch when it is done."""

import pytest

from dyvte_rt.api.model import DyvteModel
from dyvte_rt.errors import InputError
from dyvte_rt.runtime.compute import layer_macs
from dyvte_rt.runtime.policy import FixedLayerExit, NeverExit
from dyvte_rt.runtime.sampling import Sampler

QUESTIONS = [
    "what color is the circle on the left?",
    "how many?",
    "what shape is in the top right corner, please?",
]


def test_the_padding_a_batch_pays_is_reported(router_bundle, sample_image):
    items = [
        (sample_image, QUESTIONS[0], "router"),  # the routers fire at layer 2
        (sample_image, QUESTIONS[1], "layer:1"),
        (sample_image, QUESTIONS[2], "never"),
        (None, QUESTIONS[0], "router"),  # text-only: nothing to drop
    ]
    with DyvteModel.load(router_bundle[0]) as model:
        together = model.ask_batch(
            [(i, q) for i, q, _ in items], exit=[e for *_, e in items], max_new_tokens=2, ignore_eos=True
        )
        assert [a.exit_layer for a in together] == [2, 1, None, None]
        computed = {a.prefill_macs["batch_computed"] for a in together}
        assert len(computed) == 1  # one prefill call for all four
        # the "never" sample is the longest and keeps its visual rows: every layer runs 4 rows of its length
        longest = max(a.prompt_tokens for a in together)
        assert computed.pop() == 4 * 4 * layer_macs(longest, model.pipeline.decoder_dims)


def test_a_short_sample_that_exits_beside_a_longer_one_keeps_its_positions(bundles, sample_image):
    """The exit gathers a sample's position ids too, even where the batch's padded length stays."""
    with DyvteModel.load(bundles["llama-gqa"]) as model:
        pipeline = model.pipeline
        short, image = model._prepare(sample_image, QUESTIONS[1], 4)
        long, _ = model._prepare(sample_image, QUESTIONS[2], 4)
        from dyvte_rt.runtime.pipeline import PrefillRequest

        cache = pipeline.new_cache(80, 2)
        requests = [
            PrefillRequest(short[0], image, FixedLayerExit(1)),
            PrefillRequest(long[0], image, NeverExit()),
        ]
        batch = pipeline.prefill_batch(requests, cache).results
        alone = pipeline.prefill(short, image, FixedLayerExit(1), capacity=80)
        assert abs(batch[0].logits - alone.logits).max() <= 1e-5


def test_a_finished_answer_leaves_the_batch(bundles, sample_image, monkeypatch):
    with DyvteModel.load(bundles["llama-gqa"]) as model:
        eos = model.manifest.tokens.eos[0]
        red = model.prompts.tokenizer.token_to_id("red")
        calls = []
        real = Sampler.__call__

        def script(self, logits):  # the first question ends at once, the second runs on
            calls.append(id(self))
            return eos if calls.count(id(self)) == 1 and len(set(calls)) == 1 else red

        monkeypatch.setattr(Sampler, "__call__", script)
        batch_rows = []
        forward = model.pipeline.forward_tokens
        monkeypatch.setattr(
            model.pipeline, "forward_tokens", lambda t, p, c: batch_rows.append(len(t)) or forward(t, p, c)
        )
        answers = model.ask_batch(
            [(sample_image, QUESTIONS[1]), (sample_image, QUESTIONS[0])], max_new_tokens=4
        )
        monkeypatch.setattr(Sampler, "__call__", real)
    assert [len(a.token_ids) for a in answers] == [1, 4] and answers[0].finish_reason == "stop"
    assert answers[0].host_bytes["decode"] == 0 and answers[1].host_bytes["decode"] > 0
    # the second row decodes 3 steps; the finished first row is carried as padding, never sampled
    assert batch_rows == [2, 2, 2] and calls.count(calls[0]) == 1


def test_batches_need_the_inplace_flavour(concat_bundles, sample_image):
    with DyvteModel.load(concat_bundles["qwen2"]) as model, pytest.raises(InputError, match="in-place KV"):
        model.ask_batch([(sample_image, "a?"), (sample_image, "b?")])


def test_a_prefill_run_a_step_at_a_time_leaves_its_rows_to_it_while_others_decode(
    bundles, sample_image, monkeypatch
):
    """Row 1 decodes while row 0, below it, is prefilled 4 tokens at a time: decode steps leave row 0
    out (the step's call covers row 1 alone), and both answers equal the answers alone."""
    from dyvte_rt.runtime.batch import DecodeBatch

    with DyvteModel.load(bundles["llama-gqa"]) as model:
        alone = [
            model.ask(sample_image, q, exit=e, max_new_tokens=8, ignore_eos=True)
            for q, e in ((QUESTIONS[0], "layer:1"), (QUESTIONS[2], "never"))
        ]
        rule = model.stop_rule(8, ignore_eos=True)
        entries = [
            (slot, *model._request(sample_image, q, e, None, rule, None, None))
            for slot, (q, e) in ((1, (QUESTIONS[0], "layer:1")), (0, (QUESTIONS[2], "never")))
        ]
        batch = DecodeBatch(model.pipeline, model.pipeline.new_cache(128, batch=3))
        batch.prefill(entries[:1])
        rows = []
        forward = model.pipeline.forward_tokens
        monkeypatch.setattr(
            model.pipeline, "forward_tokens", lambda t, p, c: rows.append(c.batch) or forward(t, p, c)
        )
        starting = batch.begin(entries[1:], chunk=4)
        assert batch.free_slots() == [2]  # row 0 is held
        steps = 0
        while not starting.done:
            starting.advance()
            if not starting.done:
                batch.step()
                steps += 1
        assert steps > len(model.pipeline.segments) + 2  # vision, embeddings, segments in chunks
        assert rows == [1] * 7  # row 1 alone, until it had its 8 tokens
        while batch.active:
            batch.step()
        answers = [batch.slots[1].state, batch.slots[0].state]
    assert [a.tokens for a in answers] == [a.token_ids for a in alone]
