"""Qwen2-VL's and Qwen2.5-VL's own arithmetic (dyvte_rt/families/qwen2_vl.py) at Qwen2.5-VL-7B's
true sizes: the threaded per-band patching against the plain one, and the vision graph's patch
positions and windows against transformers' own helpers, for many more grids than the conformance
suite exports."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

from dyvte_rt.bundle.manifest import ImagePreprocess
from dyvte_rt.families import qwen2_vl as patch_grid
from dyvte_rt.families.presets import QWEN25_VL_7B
from dyvte_rt.families.qwen2_vl import grid_patches
from dyvte_rt.inputs.preprocess import normalized

INFO = QWEN25_VL_7B.family_object().layout


def _image(width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "size",
    [(1280, 720), (640, 480), (3000, 2000), (333, 517), (90, 1400), (29, 31)],
    ids=["720p-up", "both-down", "big-down", "wide-up-tall-down", "tall", "tiny-up"],
)
def test_band_threads_equal_one_rgb_resize(size):
    """The per-band, threaded patch path is the plain one: RGB resize, patchify, normalise.
    Pillow picks the order of its two passes from the sizes; resizing band by band keeps it."""
    info = INFO
    spec = ImagePreprocess(
        None, None, None, 3, 1 / 255, tuple(OPENAI_CLIP_MEAN), tuple(OPENAI_CLIP_STD), True
    )
    image = _image(*size)
    height, width = patch_grid.smart_resize(image.height, image.width, info)
    pixels = np.moveaxis(np.asarray(image.resize((width, height), Image.Resampling.BICUBIC)), -1, 0)
    p, m = info.patch_size, info.merge_size
    blocks = normalized(pixels, spec).reshape(3, height // p // m, m, p, width // p // m, m, p)
    blocks = blocks.transpose(1, 4, 2, 5, 0, 3, 6).reshape(-1, 3, 1, p, p)
    expected = np.repeat(blocks, info.temporal_patch_size, axis=2).reshape(len(blocks), -1)
    got, grid = grid_patches(image, info, spec)
    assert grid == patch_grid.grid_for(image.height, image.width, info)
    assert got.shape == expected.shape and np.abs(got - expected).max() <= 5e-7


@pytest.mark.parametrize("size", [(1280, 720), (720, 1280), (224, 224), (97, 131), (3000, 500), (28, 28)])
def test_vision_positions_and_windows_equal_transformers(size):
    grid = patch_grid.grid_for(size[1], size[0], INFO)
    grid_thw = torch.tensor([grid])
    positions = patch_grid.vision_positions(grid, INFO)
    assert (positions == get_vision_position_ids(grid_thw, INFO.merge_size).numpy()).all()
    index, cu = get_vision_window_index(grid_thw, INFO.merge_size, INFO.window_size, INFO.patch_size)
    window_index, window_ids = patch_grid.vision_windows(grid, INFO)
    assert (window_index == index.numpy()).all()
    starts = np.r_[0, np.flatnonzero(np.diff(window_ids)) + 1, len(positions)]
    assert list(starts) == cu.tolist()


def test_qwen25_vl_7b_takes_1196_visual_tokens_for_a_720p_image():
    assert patch_grid.smart_resize(720, 1280, INFO) == (728, 1288)
    assert patch_grid.visual_tokens(patch_grid.grid_for(720, 1280, INFO), INFO) == 1196


@pytest.mark.parametrize("size", [(1280, 720), (224, 224), (97, 131), (3000, 500), (28, 28)])
def test_window_slots_hold_each_window_in_order_and_give_each_patch_back(size):
    grid = patch_grid.grid_for(size[1], size[0], INFO)
    _, window_ids = patch_grid.vision_windows(grid, INFO)
    gather, slots = patch_grid.window_slots(window_ids, INFO.window_slots)
    assert INFO.window_slots == 64 and gather.shape == (len(np.unique(window_ids)), 64)
    assert (gather.reshape(-1)[slots] == np.arange(len(window_ids))).all()  # every patch, once
    for window, row in zip(np.unique(window_ids), gather, strict=True):
        members = np.flatnonzero(window_ids == window)
        assert (row[: len(members)] == members).all() and (row[len(members) :] == -1).all()


def test_windowed_attention_equals_one_attention_masked_to_the_windows():
    """The vision graph's slot form against the masked P x P form it replaced."""
    from export.families.qwen2_vl import _windowed_attention

    grid = patch_grid.grid_for(200, 330, INFO)
    _, window_ids = patch_grid.vision_windows(grid, INFO)
    gather, slots = (torch.from_numpy(a) for a in patch_grid.window_slots(window_ids, INFO.window_slots))
    q, k, v = torch.randn(3, len(window_ids), 4, 8, generator=torch.Generator().manual_seed(0))
    ids = torch.from_numpy(window_ids)
    mask = ids[:, None] == ids[None, :]
    masked = torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(0, 1) for t in (q, k, v)), attn_mask=mask
    ).transpose(0, 1)
    assert torch.allclose(_windowed_attention(q, k, v, gather, slots), masked, atol=1e-6)


def test_bundles_from_before_the_slots_get_the_masked_form_s_window_ids():
    """A manifest without `window_slots` came with a vision graph that takes each patch's window
    (window_ids); one with it takes the slots."""
    import dataclasses

    from dyvte_rt.bundle import io_names

    family = QWEN25_VL_7B.family_object()
    image = _image(300, 200)
    slotted = family.prepare_image(image).feeds
    assert set(slotted) == {
        io_names.VISION_POSITIONS,
        io_names.WINDOW_INDEX,
        io_names.WINDOW_GATHER,
        io_names.WINDOW_SLOTS,
    }
    family.layout = dataclasses.replace(family.layout, window_slots=None)
    older = family.prepare_image(image).feeds
    assert set(older) == {io_names.VISION_POSITIONS, io_names.WINDOW_INDEX, io_names.WINDOW_IDS}
    windows = older[io_names.WINDOW_IDS]
    assert (
        slotted[io_names.WINDOW_GATHER].reshape(-1)[slotted[io_names.WINDOW_SLOTS]] == np.arange(len(windows))
    ).all()


class _FullAttention(torch.nn.Module):
    def forward(self, q, k, v):
        from export.families.qwen2_vl import _query_blocked_attention

        return _query_blocked_attention(q, k, v)


def test_query_blocked_attention_equals_one_attention_in_torch_and_onnx_runtime(tmp_path):
    """A full-attention block's queries in QUERY_BLOCKS slices: the same rows as one attention, in
    PyTorch and exported (one graph for every patch count, fewer patches than slices included,
    whose empty slices ONNX Runtime must run)."""
    import onnxruntime as ort
    from torch.export import Dim

    from export.families.qwen2_vl import QUERY_BLOCKS

    def one_attention(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(0, 1)[None] for t in (q, k, v))
        )[0].transpose(0, 1)

    rng = torch.Generator().manual_seed(0)
    example = tuple(torch.randn(3, 40, 4, 8, generator=rng))
    patches = Dim("patches", min=1, max=1 << 14)
    program = torch.onnx.export(
        _FullAttention().eval(), example, dynamo=True, dynamic_shapes=({0: patches},) * 3, opset_version=18
    )
    program.save(tmp_path / "attention.onnx")
    session = ort.InferenceSession(tmp_path / "attention.onnx", providers=["CPUExecutionProvider"])
    for count in (1, QUERY_BLOCKS - 3, QUERY_BLOCKS, 301):
        q, k, v = torch.randn(3, count, 4, 8, generator=rng)
        expected = one_attention(q, k, v)
        assert torch.allclose(_FullAttention()(q, k, v), expected, atol=1e-6)
        got = session.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()})[0]
        assert got.shape == (count, 4, 8) and np.abs(got - expected.numpy()).max() < 1e-5
