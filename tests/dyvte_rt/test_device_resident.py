"""Runtime v2: tensors stay on the backend, the KV cache is written in place, decoding does no
prefill-only work."""

import numpy as np
import pytest

from dyvte_rt.api.model import DyvteModel
from dyvte_rt.runtime.policy import FixedLayerExit
from export.reference import DyVTEReference


@pytest.mark.parametrize("flavour", ["inplace", "concat"])
def test_a_decode_step_moves_only_ids_positions_lengths_and_logits(
    bundles, concat_bundles, sample_image, flavour
):
    path = (bundles if flavour == "inplace" else concat_bundles)["llama-gqa"]
    with DyvteModel.load(path) as model:
        vocab = model.manifest.dims.vocab_size
        short = model.ask(sample_image, "what?", max_new_tokens=6, ignore_eos=True)
        long = model.ask(sample_image, "what " * 120, max_new_tokens=6, ignore_eos=True)
        for answer in (short, long):
            assert answer.host_bytes["per_decode_token"] <= 4 * vocab + 1024
        # independent of the context: the KV cache never crosses
        assert long.host_bytes["per_decode_token"] == short.host_bytes["per_decode_token"]
        assert long.kv_cache_bytes > 2 * short.kv_cache_bytes


def test_prefill_downloads_only_logits_and_router_decisions(router_bundle, sample_image):
    with DyvteModel.load(router_bundle[0]) as model:
        transfers = model.bundle.backend.transfers
        before = transfers.snapshot()
        answer = model.ask(sample_image, "what color?", max_new_tokens=1)
        moved = transfers.since(before)
        assert answer.exit_layer == 2 and set(answer.exit_probs) == {1, 2}  # two routers asked
        itemsize = 4
        assert moved.to_host == itemsize * (
            model.manifest.dims.vocab_size + 2 * 2
        )  # logits + 2 x 2 router logits
        assert moved.downloads == 3


def _count_calls(model, graphs):
    calls = {name: 0 for name in graphs}
    for name in graphs:
        session = model.bundle.sessions[name]
        run = session.run

        def counted(feeds, into=None, run=run, name=name):
            calls[name] += 1
            return run(feeds, into)

        session.run = counted
    return calls


def test_routers_run_in_prefill_only_and_only_until_the_exit(router_bundle, sample_image):
    with DyvteModel.load(router_bundle[0]) as model:
        calls = _count_calls(model, ["router_01", "router_02", "exit_gather", "segment_02"])
        model.ask(sample_image, "what?", exit="router", max_new_tokens=5, ignore_eos=True)
        # the router graph gathers the text rows itself: no separate exit_gather call
        assert calls == {"router_01": 1, "router_02": 1, "exit_gather": 0, "segment_02": 5}
        for name in calls:
            calls[name] = 0
        model.ask(sample_image, "what?", exit="layer:1", max_new_tokens=5, ignore_eos=True)
        assert calls == {"router_01": 0, "router_02": 0, "exit_gather": 1, "segment_02": 5}
        for name in calls:
            calls[name] = 0
        model.ask(sample_image, "what?", exit="never", max_new_tokens=5, ignore_eos=True)
        assert calls == {"router_01": 0, "router_02": 0, "exit_gather": 0, "segment_02": 5}


def test_inplace_buffers_are_written_where_they_are_and_hold_the_reference_cache(
    bundles, loaded_models, prompt_factory
):
    loaded = loaded_models["qwen2"]
    prompt = prompt_factory(loaded)
    with DyvteModel.load(bundles["qwen2"]) as model:
        pipeline = model.pipeline
        result = pipeline.prefill(prompt.input_ids.numpy(), prompt.pixel_values.numpy(), FixedLayerExit(1))
        cache = result.cache
        buffers = dict(cache.buffers)
        addresses = {key: value.data_ptr() for key, value in buffers.items()}
        pipeline.decode_one_token(7, result.n_tokens, cache)
        assert all(cache.buffers[key] is buffers[key] for key in buffers)  # no buffer was replaced
        assert {key: value.data_ptr() for key, value in cache.buffers.items()} == addresses
        expected = DyVTEReference(loaded.adapter).prefill(
            prompt.input_ids, prompt.pixel_values, FixedLayerExit(1)
        )
        import torch

        expected.cache.keys[3] = torch.cat([expected.cache.keys[3], torch.zeros(1, 2, 1, 16)], dim=2)[
            :, :, :-1
        ]
        for layer, rows in ((0, result.n_tokens), (3, result.n_tokens - result.n_visual)):
            held = cache.buffers[layer, "key"].numpy()[:, :, :rows]
            assert np.abs(held - expected.cache.keys[layer].numpy()).max() <= 1e-5, layer
        assert cache.layer_lengths() == [30 + 1, 30 + 1, 14 + 1, 14 + 1]
