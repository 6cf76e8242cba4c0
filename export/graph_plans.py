"""What to export for each graph: module, I/O names, tracing inputs, dynamic axes, test cases.

Tracing inputs avoid sizes 0 and 1 (torch.export would specialise on them); verification cases
then cover them explicitly: past length 0, sequence length 1, batch 2, no visual tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.export import Dim

from dyvte_rt.bundle import io_names
from dyvte_rt.families import llava_next as anyres
from export.families import FamilyAdapter
from export.parts import EmbedPart, ExitGatherPart, HeadPart, RouterPart, SegmentPart, VisionPart
from export.reference.routers import RouterBank

BATCH = Dim("batch", min=1, max=256)
SEQ = Dim("seq", min=1, max=1 << 16)
PAST = Dim("past", min=0, max=1 << 16)
CAPACITY = Dim("capacity", min=2, max=1 << 16)  # rows of an in-place KV buffer
PROMPT = Dim("prompt", min=1, max=1 << 16)
VISUAL = Dim("visual", min=0, max=1 << 16)
KEPT = Dim("kept", min=1, max=1 << 16)
VIEWS = Dim("views", min=1, max=256)  # any-res: base view + tiles of one image


@dataclass
class GraphPlan:
    name: str  # file stem and manifest key: vision, embed, segment_00, router_03, exit_gather, head
    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    sample: tuple  # tracing inputs
    dynamic_shapes: tuple
    dtype: torch.dtype
    tolerance: float  # verification tolerance in fp32 (fp16 graphs get a looser one)
    # verification inputs, made when the graph is checked: held for every plan at once they took
    # 1.6 GB for a 7B model's 31 segments
    cases: Callable[[], list[tuple]] = lambda: []
    # in-place KV buffers: the rows of a case's present outputs that hold data (the rest is unspecified)
    valid_rows: Callable[[tuple], int] | None = None

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"


def _anyres_vision_plan(adapter: FamilyAdapter, rand: _Sampler, dtype: torch.dtype, tol: float) -> GraphPlan:
    """Any-res (LLaVA-NeXT): the views of one image and its packing index. Traced on a tall image's
    views; checked on a square, a wide and a tall one (view and token counts differ)."""
    info = adapter.anyres
    side = info.tile_size

    def image(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        views = anyres.tile_count(height, width, info)
        index = torch.from_numpy(anyres.pack_index(height, width, info))
        return rand.randn(views, 3, side, side), index

    largest = max(info.grid_pinpoints, key=lambda p: p[0] * p[1])
    return GraphPlan(
        "vision",
        VisionPart(adapter),
        [io_names.PIXEL_VALUES, io_names.PACK_INDEX],
        [io_names.IMAGE_FEATURES],
        sample=image(3 * side, 2 * side),
        dynamic_shapes=({0: VIEWS}, ({0: VISUAL},)),  # VisionPart(pixel_values, *per_image)
        dtype=dtype,
        tolerance=tol,
        cases=lambda: [image(*largest), image(side, 3 * side), image(2 * side + 5, side // 2 + 3)],
    )


def _patch_grid_vision_plan(
    adapter: FamilyAdapter, rand: _Sampler, dtype: torch.dtype, tol: float
) -> GraphPlan:
    """Qwen2-VL family: one image's patches with their positions (and Qwen2.5-VL's windows).
    Traced on one grid; checked on grids of other sizes and aspect ratios."""
    info = adapter.patch_grid
    m = info.merge_size
    width = 3 * info.temporal_patch_size * info.patch_size**2

    def image(rows: int, cols: int) -> tuple[torch.Tensor, ...]:
        grid = (1, rows * m, cols * m)
        pixels = rand.randn(rows * cols * m * m, width)
        return adapter.vision_inputs(pixels, grid)

    names = [io_names.PIXEL_VALUES, io_names.VISION_POSITIONS]
    merged = Dim("merged", min=1, max=1 << 14)
    per_image: tuple = ({0: m * m * merged},)
    if info.window_size is not None:
        names += [io_names.WINDOW_INDEX, io_names.WINDOW_IDS]
        per_image = (*per_image, {0: merged}, {0: m * m * merged})
    return GraphPlan(
        "vision",
        VisionPart(adapter),
        names,
        [io_names.IMAGE_FEATURES],
        sample=image(4, 6),
        dynamic_shapes=({0: m * m * merged}, per_image),  # VisionPart(pixel_values, *per_image)
        dtype=dtype,
        tolerance=tol,
        cases=lambda: [image(1, 1), image(5, 3), image(9, 10)],
    )


def plan_segments(candidates: tuple[int, ...], num_layers: int) -> list[tuple[int, int]]:
    """Consecutive layer ranges, each ending at a candidate exit layer or at the last layer."""
    ends = sorted(set(candidates) | {num_layers - 1})
    starts = [0, *(end + 1 for end in ends[:-1])]
    return list(zip(starts, ends, strict=True))


@dataclass
class _Sampler:
    """Random tensors of the model's dtype, reproducible from one seed."""

    dtype: torch.dtype
    gen: torch.Generator

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen).to(self.dtype)

    def ids(self, batch: int, n: int, n_image: int, vocab: int, image_id: int) -> torch.Tensor:
        out = torch.randint(5, vocab, (batch, n), generator=self.gen)
        out[:, 1 : 1 + n_image] = image_id
        return out


def build_plans(
    adapter: FamilyAdapter, candidates: tuple[int, ...], routers: RouterBank | None, kv: str, seed: int = 0
) -> list[GraphPlan]:
    model = adapter.model
    dtype = next(model.parameters()).dtype
    rand = _Sampler(dtype, torch.Generator().manual_seed(seed))
    text = model.config.text_config
    dims = adapter.dims
    vision = model.config.vision_config
    # patch-grid models: a 4 x 6 grid of merged patches in the traced prompts
    v_tokens = (vision.image_size // vision.patch_size) ** 2 if adapter.patch_grid is None else 24
    n_prompt = v_tokens + 9
    tol = adapter.tolerance

    def ids(batch: int, n: int, n_image: int) -> torch.Tensor:
        return rand.ids(batch, n, n_image, text.vocab_size, adapter.image_token_id)

    if adapter.anyres is not None:
        vision_plan = _anyres_vision_plan(adapter, rand, dtype, tol)
    elif adapter.patch_grid is not None:
        vision_plan = _patch_grid_vision_plan(adapter, rand, dtype, tol)
    else:
        pixels = (3, vision.image_size, vision.image_size)
        vision_plan = GraphPlan(
            "vision",
            VisionPart(adapter),
            [io_names.PIXEL_VALUES],
            [io_names.IMAGE_FEATURES],
            sample=(rand.randn(2, *pixels),),
            dynamic_shapes=({0: BATCH},),
            dtype=dtype,
            tolerance=tol,
            cases=lambda: [(rand.randn(1, *pixels),), (rand.randn(2, *pixels),)],
        )
    plans = [
        vision_plan,
        GraphPlan(
            "embed",
            EmbedPart(adapter),
            [io_names.INPUT_IDS, io_names.IMAGE_FEATURES],
            [io_names.INPUT_EMBEDS],
            sample=(ids(2, v_tokens + 6, v_tokens), rand.randn(2, v_tokens, dims.hidden)),
            dynamic_shapes=({0: BATCH, 1: PROMPT}, {0: BATCH, 1: VISUAL}),
            dtype=dtype,
            tolerance=tol,
            cases=lambda: [
                (ids(1, v_tokens + 9, v_tokens), rand.randn(1, v_tokens, dims.hidden)),
                (ids(1, 1, 0), rand.randn(1, 0, dims.hidden)),  # a decode step: no image
                (ids(2, 7, 0), rand.randn(2, 0, dims.hidden)),
            ],
        ),
    ]
    head_dim = dims.kv_width // text.num_key_value_heads
    for index, (first, last) in enumerate(plan_segments(candidates, dims.num_layers)):
        segment = SegmentPart(adapter, first, last, kv)
        plans.append(
            _segment_plan(f"segment_{index:02d}", segment, n_prompt, rand, text.num_key_value_heads, head_dim)
        )
    if routers is not None:
        plans += [
            _router_plan(f"router_{k:02d}", RouterPart(adapter, routers.routers[str(k)]), n_prompt, rand, tol)
            for k in candidates
        ]
    plans.append(
        GraphPlan(
            "exit_gather",
            ExitGatherPart(),
            [io_names.HIDDEN_OUT, io_names.KEEP_INDEX],
            [io_names.HIDDEN_IN],
            sample=(rand.randn(2, 7, dims.hidden), torch.tensor([[0, 2, 5], [1, 3, 6]])),
            dynamic_shapes=({0: BATCH, 1: SEQ}, {0: BATCH, 1: KEPT}),
            dtype=dtype,
            tolerance=0.0,  # a copy
            cases=lambda: [
                (rand.randn(1, n_prompt, dims.hidden), torch.arange(v_tokens + 1, n_prompt)[None]),
                (rand.randn(2, 4, dims.hidden), torch.tensor([[3], [0]])),
            ],
        )
    )
    plans.append(
        GraphPlan(
            "head",
            HeadPart(adapter),
            [io_names.HIDDEN_OUT, io_names.LAST_INDEX],
            [io_names.LOGITS],
            sample=(rand.randn(2, 5, dims.hidden), torch.tensor([4, 2])),
            dynamic_shapes=({0: BATCH, 1: SEQ}, {0: BATCH}),
            dtype=dtype,
            tolerance=tol,
            cases=lambda: [
                (rand.randn(1, 1, dims.hidden), torch.tensor([0])),
                (rand.randn(2, 7, dims.hidden), torch.tensor([6, 3])),
            ],
        )
    )
    return plans


def _segment_plan(
    name: str, segment: SegmentPart, n_prompt: int, rand: _Sampler, kv_heads: int, head_dim: int
) -> GraphPlan:
    layers = segment.layers
    hidden = segment.adapter.dims.hidden
    inplace = segment.kv == "inplace"

    sections = segment.adapter.position_sections

    def inputs(batch: int, seq: int, past: int) -> tuple:
        positions = torch.arange(past, past + seq).repeat(batch, 1)  # [B, S]
        if sections > 1:  # multimodal rotary: sections that differ, as on an image's rows
            positions = torch.stack([positions + 3 * i for i in range(sections)])  # [3, B, S]
        if not inplace:
            kv = [rand.randn(batch, kv_heads, past, head_dim) for _ in range(2 * len(layers))]
            return (rand.randn(batch, seq, hidden), positions, *kv)
        capacity = past + seq + 3  # rows beyond the valid ones hold noise the operator must ignore
        kv = [rand.randn(batch, kv_heads, capacity, head_dim) for _ in range(2 * len(layers))]
        total = torch.full((batch,), past + seq, dtype=torch.int32)
        return (rand.randn(batch, seq, hidden), positions, total, *kv)

    position_axes = {1: BATCH, 2: SEQ} if sections > 1 else {0: BATCH, 1: SEQ}
    if inplace:
        names = [
            io_names.HIDDEN_IN,
            io_names.POSITION_IDS,
            io_names.TOTAL_LENGTHS,
            *io_names.kv_names(layers, "past"),
        ]
        kv_axes = {0: BATCH, 2: CAPACITY}
        rest = ({0: BATCH}, *(kv_axes for _ in range(2 * len(layers))))  # total_lengths, then the buffers
        shapes = ({0: BATCH, 1: SEQ}, position_axes, rest)
    else:
        names = [io_names.HIDDEN_IN, io_names.POSITION_IDS, *io_names.kv_names(layers, "past")]
        shapes = (
            {0: BATCH, 1: SEQ},
            position_axes,
            tuple({0: BATCH, 2: PAST} for _ in range(2 * len(layers))),
        )
    return GraphPlan(
        name,
        segment,
        names,
        [io_names.HIDDEN_OUT, *io_names.kv_names(layers, "present")],
        sample=inputs(2, 5, 3),
        dynamic_shapes=shapes,
        dtype=rand.dtype,
        tolerance=segment.adapter.tolerance,
        valid_rows=(lambda case: int(case[2].max())) if inplace else None,
        # full prompt, text-only prompt after an exit, decode steps (incl. empty past), a later
        # turn's several tokens after a past, batch 2
        cases=lambda: [
            inputs(1, n_prompt, 0),
            inputs(1, 9, 0),
            inputs(1, 1, n_prompt),
            inputs(1, 1, 0),
            inputs(1, 3, 11),
            inputs(2, 4, 0),
            inputs(2, 1, 6),  # (GroupQueryAttention takes several new tokens after a past at batch 1 only)
        ],
    )


def _router_plan(name: str, router: RouterPart, n_prompt: int, rand: _Sampler, tolerance: float) -> GraphPlan:
    hidden = router.adapter.dims.hidden

    def inputs(batch: int, seq: int, kept: int) -> tuple:
        pool = torch.zeros(batch, seq, dtype=rand.dtype)  # mean over all but the last position
        pool[:, : max(seq - 1, 1)] = 1.0 / max(seq - 1, 1)
        keep = torch.arange(seq - kept, seq).repeat(batch, 1)  # the text rows, after the image
        return (rand.randn(batch, seq, hidden), pool, torch.full((batch,), seq - 1), keep)

    return GraphPlan(
        name,
        router,
        [io_names.HIDDEN_OUT, io_names.ROUTER_POOL, io_names.LAST_INDEX, io_names.KEEP_INDEX],
        [io_names.ROUTER_LOGITS, io_names.HIDDEN_IN],
        sample=inputs(2, 5, 3),
        dynamic_shapes=({0: BATCH, 1: SEQ}, {0: BATCH, 1: SEQ}, {0: BATCH}, {0: BATCH, 1: KEPT}),
        dtype=rand.dtype,
        tolerance=tolerance,
        cases=lambda: [inputs(1, n_prompt, 9), inputs(1, 1, 1), inputs(2, 6, 2)],
    )
