"""The exit switch as device copies (engines.exit_copy): the plan, applied to numpy arrays, gives the
rows the runtime's own gather gives, for the keep matrices the runtime really builds."""

import numpy as np
import pytest

from dyvte_rt.api.model import DyvteModel
from engines import BackendError
from engines.exit_copy import CopyRun, apply_copy_plan, exit_copy_plan


def test_a_llava_prompt_is_two_copies_and_padding_is_never_copied():
    text = np.r_[0:6, 582:637]  # 6 text rows, 576 visual rows, 55 text rows
    keep = np.zeros((3, 637), dtype=np.int64)
    keep[0, : len(text)] = text  # exits: padded with row 0
    keep[1] = np.arange(637)  # stays
    keep[2, :300] = np.arange(300)  # a shorter sample that stays
    plan = exit_copy_plan(keep, 637)
    assert plan == [
        CopyRun(0, 0, 6),
        CopyRun(582, 6, 55),
        CopyRun(637, 637, 637),
        CopyRun(2 * 637, 2 * 637, 300),
    ]
    assert plan[1].byte_range(8192) == (582 * 8192, 6 * 8192, 55 * 8192)


def test_bad_keep_matrices_are_refused():
    with pytest.raises(ValueError, match="outside"):
        exit_copy_plan(np.array([[0, 5]]), 5)
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        exit_copy_plan(np.arange(4), 5)


def test_the_plan_gives_the_runtimes_gather_on_every_row_that_is_attended(router_bundle, sample_image):
    """Capture what the runtime feeds its exit_gather graph in a mixed batch and what it gets back."""
    seen = []
    with DyvteModel.load(router_bundle[0]) as model:
        session = model.bundle.sessions["exit_gather"]
        run, download = session.run, model.pipeline.backend.download

        def spy(feeds, into=None):
            out = run(feeds, into)
            hidden, keep = (download(v) if not isinstance(v, np.ndarray) else v for v in feeds.values())
            seen.append((hidden, keep, download(next(iter(out.values())))))
            return out

        session.run = spy
        items = [
            (sample_image, "what color is the circle on the left?"),
            (sample_image, "how many?"),
            (None, "hi"),
        ]
        model.ask_batch(items, exit=["layer:1", "never", "layer:1"], max_new_tokens=2, ignore_eos=True)
    assert len(seen) == 1
    hidden, keep, gathered = seen[0]
    assert hidden.ndim == 3 and keep.shape[0] == 3
    plan = exit_copy_plan(keep, hidden.shape[1])
    copied = apply_copy_plan(plan, hidden, keep.shape[1])
    assert any(run.rows > 1 for run in plan) and len(plan) < keep.size / 4  # runs, not rows
    for b in range(3):
        rows = sum(run.rows for run in plan if run.dst_row // keep.shape[1] == b)
        assert rows == len(np.unique(keep[b])) or rows == keep.shape[1]
        np.testing.assert_array_equal(copied[b, :rows], gathered[b, :rows])
    assert sum(run.rows for run in plan) < keep.size  # the exiting sample's padding is not copied


def test_device_buffers_refuse_with_one_line_where_there_is_no_gpu():
    pytest.importorskip("cuda.bindings", reason="cuda-bindings is not installed here (the gpu extra)")
    from engines.cuda_memory import DeviceBuffer, device_name

    try:
        name = device_name()
    except BackendError as err:
        assert "\n" not in str(err) and ("CUDA" in str(err) or "no CUDA device" in str(err))
        with pytest.raises(BackendError):
            DeviceBuffer(1024)
    else:
        pytest.skip(f"a GPU is present ({name}): the GPU check script covers it")
