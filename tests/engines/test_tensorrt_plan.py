"""TensorRT planning without TensorRT: profiles, buffers, the engine record, ORT's TRT EP options.
Hand-computed for LLaVA-1.5-7B (V = 576, d = 4096, 32 layers, 32 KV heads of 128)."""

import dataclasses
import json

import pytest

from engines import BackendError
from engines.onnxruntime_backend import tensorrt_provider_options
from engines.tensorrt.buffers import plan_buffers
from engines.tensorrt.profiles import EngineSettings, PlanError, graph_profiles, phase_ranges
from engines.tensorrt.record import EngineFile, EngineRecord, check_compatible, check_files, sha256

SETTINGS = EngineSettings(max_batch=2, max_context=2048, max_text_tokens=512, typical_text_tokens=64)
SEGMENT = {
    "hidden_states": ("batch", "seq", 4096),
    "position_ids": ("batch", "seq"),
    "past.3.key": ("batch", 32, "past", 128),
}


def test_a_7b_segment_gets_one_profile_per_phase_with_hand_computed_bounds():
    profiles = graph_profiles(SEGMENT, phase_ranges(576, SETTINGS))
    assert [p.phase for p in profiles] == ["prefill_visual", "prefill_text", "decode"]
    visual, text, decode = (p.shapes for p in profiles)
    assert visual["hidden_states"] == ((1, 1, 4096), (1, 640, 4096), (2, 1088, 4096))  # 576 + 64, 576 + 512
    assert visual["past.3.key"] == ((1, 32, 0, 128),) * 2 + ((2, 32, 0, 128),)
    assert text["hidden_states"] == ((1, 1, 4096), (1, 64, 4096), (2, 512, 4096))
    assert text["past.3.key"] == ((1, 32, 0, 128), (1, 32, 0, 128), (2, 32, 2047, 128))
    assert decode["position_ids"] == ((1, 1), (1, 1), (2, 1))
    assert decode["past.3.key"] == ((1, 32, 0, 128), (1, 32, 640, 128), (2, 32, 2047, 128))


def test_graphs_whose_inputs_do_not_tell_phases_apart_get_one_profile():
    ranges = phase_ranges(576, SETTINGS)
    (vision,) = graph_profiles({"pixel_values": ("batch", 3, 336, 336)}, ranges)
    assert vision.serves == ("prefill_visual", "prefill_text", "decode")
    assert vision.shapes["pixel_values"] == ((1, 3, 336, 336), (1, 3, 336, 336), (2, 3, 336, 336))
    embed = graph_profiles(
        {"input_ids": ("batch", "prompt"), "image_features": ("batch", "visual", 4096)}, ranges
    )
    assert embed[0].shapes["image_features"][2] == (2, 576, 4096)
    assert embed[2].shapes["image_features"][2] == (2, 0, 4096)  # no image while decoding


def test_a_short_context_bounds_the_text_and_impossible_settings_are_refused():
    ranges = phase_ranges(576, dataclasses.replace(SETTINGS, max_context=700))
    assert ranges["prefill_visual"]["seq"].max == 700  # 576 + 124 text tokens fit
    assert ranges["prefill_text"]["seq"].max == 124
    with pytest.raises(PlanError, match="no room"):
        phase_ranges(576, dataclasses.replace(SETTINGS, max_context=576))
    with pytest.raises(PlanError, match="max-batch"):
        EngineSettings(max_batch=0)
    with pytest.raises(PlanError, match="--kv concat"):
        graph_profiles({"past.0.key": ("batch", 32, "capacity", 128)}, phase_ranges(576, SETTINGS))


def test_buffers_for_llava_7b_fp16():
    plan = plan_buffers(
        num_layers=32, num_kv_heads=32, head_dim=128, hidden=4096, vocab_size=32064, visual_tokens=576,
        dtype="float16", settings=dataclasses.replace(SETTINGS, max_batch=1),
    )  # fmt: skip
    assert plan.kv_bytes_per_token == 32 * 2 * 32 * 128 * 2 == 524288  # 0.5 MiB per position
    assert plan.kv_bytes == 2 * 2048 * 524288 == 2 << 30  # two alternating 1 GiB caches
    assert plan.hidden_bytes == 2 * 1088 * 4096 * 2
    assert plan.logits_bytes == 32064 * 4
    assert plan.to_json()["total_bytes"] == plan.kv_bytes + plan.hidden_bytes + plan.logits_bytes


def _record(tmp_path):
    engine = tmp_path / "tensorrt" / "head.engine"
    engine.parent.mkdir()
    engine.write_bytes(b"serialized engine")
    files = {"head": EngineFile("head.engine", sha256(engine), engine.stat().st_size, [])}
    return EngineRecord("10.3.0.26", "Orin", "8.7", "fp16", {"max_batch": 1}, files), engine


def test_engines_for_another_gpu_or_tensorrt_are_refused_with_one_line(tmp_path):
    record, engine = _record(tmp_path)
    record.write(tmp_path)
    again = EngineRecord.read(tmp_path)
    assert again == record
    check_compatible(again, "10.3.1", "8.7")  # a patch release builds the same engines
    with pytest.raises(BackendError, match=r"built with TensorRT 10\.3\.0\.26, this machine has 11\.0"):
        check_compatible(again, "11.0.0", "8.7")
    with pytest.raises(BackendError, match=r"compute capability 8.7 \(Orin\), this GPU is 9.0"):
        check_compatible(again, "10.3.0", "9.0")
    check_files(again, tmp_path)
    engine.write_bytes(b"something else entirely")
    with pytest.raises(BackendError, match="missing or changed"):
        check_files(again, tmp_path)
    with pytest.raises(BackendError, match="has no TensorRT engines"):
        EngineRecord.read(tmp_path / "elsewhere")
    (tmp_path / "tensorrt" / "engines.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(BackendError, match="not a dyvte-tensorrt/1 record"):
        EngineRecord.read(tmp_path)


def test_onnx_runtime_tensorrt_ep_gets_every_profile_explicitly(tmp_path):
    profiles = [p.to_json() for p in graph_profiles(SEGMENT, phase_ranges(576, SETTINGS))]
    options = tensorrt_provider_options(profiles, tmp_path)
    first = "hidden_states:1x1x4096,position_ids:1x1,past.3.key:1x32x0x128"
    assert options["trt_profile_min_shapes"].startswith(first)
    assert options["trt_profile_max_shapes"].count("hidden_states:") == 3  # one entry per profile
    assert "hidden_states:2x1088x4096" in options["trt_profile_max_shapes"]
    assert options["trt_engine_cache_enable"] == "True" and options["trt_engine_cache_path"] == str(tmp_path)


def test_kv_buffers_alternate_and_are_allocated_once():
    from engines.tensorrt.buffers import AlternatingBuffers

    made = []

    class Buffer:
        def __init__(self, nbytes):
            self.nbytes = nbytes
            made.append(self)

    pool = AlternatingBuffers(Buffer)
    steps = [pool.next("present.0.key", 1024) for _ in range(6)]
    assert steps[0] is not steps[1] and steps[0::2] == [steps[0]] * 3 and steps[1::2] == [steps[1]] * 3
    assert len(made) == 2  # decoding allocates nothing per token
    assert pool.next("present.1.key", 1024) not in steps  # each layer has its own pair
    bigger = pool.next("present.0.key", 4096)
    assert bigger.nbytes == 4096 and len(made) == 4


def test_profiles_read_back_from_json_as_they_were_written():
    from engines.tensorrt.profiles import Profile

    for profile in graph_profiles(SEGMENT, phase_ranges(576, SETTINGS)):
        assert Profile.from_json(json.loads(json.dumps(profile.to_json()))) == profile


def test_profiles_cover_pruned_prefills_and_the_ranking_graphs():
    """After a prune a segment sees the text and the kept visual tokens (past 0): within the
    prefill_visual profile; the ranking graphs rank one sample's V visual rows there."""
    ranges = phase_ranges(576, SETTINGS)
    segment = {**SEGMENT, "last_index": ("batch",)}
    visual = graph_profiles(segment, ranges)[0]
    lo, _, hi = visual.shapes["hidden_states"]
    for kept in (0, 144, 288, 575):  # fastv/dart keep 0..V-1 of 576, with 1..512 text tokens
        for text in (1, 512):
            assert lo[1] <= kept + text <= hi[1]
    assert visual.shapes["last_index"] == ((1,), (1,), (2,))
    fastv = graph_profiles(
        {"prune_scores": ("batch", "seq"), "sample_index": (1,), "visual_rows": (1, "visual")}, ranges
    )
    assert fastv[0].shapes["visual_rows"] == ((1, 576), (1, 576), (1, 576))
    assert fastv[0].shapes["prune_scores"][2] == (2, 1088)
    dart = graph_profiles(
        {
            "hidden_states_out": ("batch", "seq", 4096),
            "sample_index": (1,),
            "visual_rows": (1, "visual"),
            "prune_pivots": (1,),
        },
        ranges,
    )
    assert dart[0].shapes["hidden_states_out"][2] == (2, 1088, 4096)
