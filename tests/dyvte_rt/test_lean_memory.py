"""The runtime returns freed heap pages after loading, after each prefill and after each request
(engines/host_memory.py), unless told not to; answers are the same either way."""

import pytest

import dyvte_rt.bundle.loaded as loaded
from dyvte_rt.api.model import DyvteModel

QUESTION = "what color is the circle on the left?"


@pytest.fixture
def trims(monkeypatch):
    calls = []
    monkeypatch.setattr(loaded, "release_freed_heap", lambda: calls.append(1) or True)
    return calls


def test_freed_heap_pages_are_returned_after_loading_each_prefill_and_each_request(
    demo_bundle, sample_image, trims, monkeypatch
):
    with DyvteModel.load(demo_bundle) as model:
        assert len(trims) == 1  # loading
        small = model.ask(sample_image, QUESTION, max_new_tokens=4)
        assert len(trims) == 1  # the demo's requests free too little to be worth a trim
        monkeypatch.setattr(loaded, "TRIM_MIN_BYTES", 1)  # as a 7B model's would
        lean = model.ask(sample_image, QUESTION, max_new_tokens=4)
        assert len(trims) == 3  # its prefill, then its end
        model.ask_batch([(sample_image, QUESTION)] * 2, max_new_tokens=4)
        assert len(trims) == 5
        assert small.token_ids == lean.token_ids
    trims.clear()
    with DyvteModel.load(demo_bundle, lean_memory=False) as model:
        plain = model.ask(sample_image, QUESTION, max_new_tokens=4)
    assert trims == [] and plain.token_ids == lean.token_ids
