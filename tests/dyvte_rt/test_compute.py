import pytest

from dyvte_rt.runtime.compute import DecoderDims, layer_macs, prefill_macs

LLAVA_7B = DecoderDims(hidden=4096, kv_width=4096, mlp=11008, num_layers=32)


def test_llava_7b_image_tokens_only_matches_pyramiddrop_figure():
    total = LLAVA_7B.num_layers * layer_macs(576, LLAVA_7B)
    assert total / 1e12 == pytest.approx(3.82, abs=0.005)


def test_exit_after_layer_15_with_60_text_tokens_saves_45_percent():
    macs = prefill_macs(LLAVA_7B, n_tokens=576 + 60, n_visual=576, exit_layer=15)
    assert macs.saved_fraction == pytest.approx(0.45, abs=0.01)
    assert macs.full == 32 * layer_macs(636, LLAVA_7B)
    assert macs.actual == 16 * layer_macs(636, LLAVA_7B) + 16 * layer_macs(60, LLAVA_7B)


def test_no_exit_costs_the_full_model():
    macs = prefill_macs(LLAVA_7B, 636, 576, None)
    assert macs.actual == macs.full and macs.saved_fraction == 0.0


def test_gqa_counts_the_narrower_kv_projection():
    mha = DecoderDims(hidden=64, kv_width=64, mlp=128, num_layers=4)
    gqa = DecoderDims(hidden=64, kv_width=32, mlp=128, num_layers=4)
    assert layer_macs(10, mha) - layer_macs(10, gqa) == 2 * 10 * 64 * 32


@pytest.mark.parametrize(("n", "v", "k"), [(10, 11, 0), (10, 5, 4), (10, 5, -1)])
def test_impossible_arguments_are_refused(n, v, k):
    with pytest.raises(ValueError):
        prefill_macs(DecoderDims(64, 64, 128, 4), n, v, k)
