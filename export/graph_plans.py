"""What to export for each graph: module, I/O names, tracing inputs, dynamic axes, test cases.

Tracing inputs avoid sizes 0 and 1 (torch.export would specialise on them); verification cases
then cover them explicitly: past length 0, sequence length 1, batch 2, no visual tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.export import Dim

from dyvte_rt import io_names
from export.families import FamilyAdapter
from export.parts import EmbedPart, HeadPart, SegmentPart, VisionPart
from export.reference.routers import RouterBank

BATCH = Dim("batch", min=1, max=256)
SEQ = Dim("seq", min=1, max=1 << 16)
PAST = Dim("past", min=0, max=1 << 16)
PROMPT = Dim("prompt", min=1, max=1 << 16)
VISUAL = Dim("visual", min=0, max=1 << 16)


@dataclass
class GraphPlan:
    name: str  # file stem and manifest key: vision, embed, segment_00, head
    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    sample: tuple  # tracing inputs
    dynamic_shapes: tuple
    cases: list[tuple] = field(default_factory=list)  # verification inputs

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"


def plan_segments(candidates: tuple[int, ...], num_layers: int) -> list[tuple[int, int]]:
    """Consecutive layer ranges, each ending at a candidate exit layer or at the last layer."""
    ends = sorted(set(candidates) | {num_layers - 1})
    starts = [0, *(end + 1 for end in ends[:-1])]
    return list(zip(starts, ends, strict=True))


def build_plans(
    adapter: FamilyAdapter, candidates: tuple[int, ...], routers: RouterBank | None, seed: int = 0
) -> list[GraphPlan]:
    gen = torch.Generator().manual_seed(seed)
    model = adapter.model
    dtype = next(model.parameters()).dtype
    config = model.config
    text = config.text_config
    dims = adapter.dims
    head_dim = dims.kv_width // text.num_key_value_heads
    vision = config.vision_config
    v_tokens = (vision.image_size // vision.patch_size) ** 2

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    def ids(batch: int, n: int, n_image: int) -> torch.Tensor:
        out = torch.randint(5, text.vocab_size, (batch, n), generator=gen)
        out[:, 1 : 1 + n_image] = adapter.image_token_id
        return out

    plans = [
        GraphPlan(
            "vision",
            VisionPart(adapter),
            [io_names.PIXEL_VALUES],
            [io_names.IMAGE_FEATURES],
            sample=(randn(2, 3, vision.image_size, vision.image_size),),
            dynamic_shapes=({0: BATCH},),
            cases=[
                (randn(1, 3, vision.image_size, vision.image_size),),
                (randn(2, 3, vision.image_size, vision.image_size),),
            ],
        ),
        GraphPlan(
            "embed",
            EmbedPart(adapter),
            [io_names.INPUT_IDS, io_names.IMAGE_FEATURES],
            [io_names.INPUT_EMBEDS],
            sample=(ids(2, v_tokens + 6, v_tokens), randn(2, v_tokens, dims.hidden)),
            dynamic_shapes=({0: BATCH, 1: PROMPT}, {0: BATCH, 1: VISUAL}),
            cases=[
                (ids(1, v_tokens + 9, v_tokens), randn(1, v_tokens, dims.hidden)),
                (ids(1, 1, 0), randn(1, 0, dims.hidden)),  # a decode step: no image
                (ids(2, 7, 0), randn(2, 0, dims.hidden)),
            ],
        ),
    ]
    for index, (first, last) in enumerate(plan_segments(candidates, dims.num_layers)):
        router = routers.routers[str(last)] if routers is not None and last in candidates else None
        segment = SegmentPart(adapter, first, last, router)
        plans.append(
            _segment_plan(
                f"segment_{index:02d}",
                segment,
                v_tokens + 9,
                randn,
                text.num_key_value_heads,
                head_dim,
                dims.hidden,
            )
        )
    plans.append(
        GraphPlan(
            "head",
            HeadPart(adapter),
            [io_names.HIDDEN_OUT],
            [io_names.LOGITS],
            sample=(randn(2, 5, dims.hidden),),
            dynamic_shapes=({0: BATCH, 1: SEQ},),
            cases=[(randn(1, 1, dims.hidden),), (randn(2, 7, dims.hidden),)],
        )
    )
    return plans


def _segment_plan(
    name: str, segment: SegmentPart, n_prompt: int, randn, kv_heads: int, head_dim: int, hidden: int
) -> GraphPlan:
    layers = segment.layers
    with_pool = segment.router is not None
    dtype = randn(1).dtype

    def inputs(batch: int, seq: int, past: int) -> tuple:
        positions = torch.arange(past, past + seq).repeat(batch, 1)  # [B, S]
        kv = [randn(batch, kv_heads, past, head_dim) for _ in range(2 * len(layers))]
        if not with_pool:
            return (randn(batch, seq, hidden), positions, *kv)
        pool = torch.zeros(batch, seq, dtype=dtype)  # mean over all but the last position
        pool[:, : max(seq - 1, 1)] = 1.0 / max(seq - 1, 1)
        return (randn(batch, seq, hidden), positions, pool, *kv)

    names = [io_names.HIDDEN_IN, io_names.POSITION_IDS]
    outputs = [io_names.HIDDEN_OUT, *io_names.kv_names(layers, "present")]
    rest_shapes: tuple = tuple({0: BATCH, 2: PAST} for _ in range(2 * len(layers)))
    if with_pool:
        names.append(io_names.ROUTER_POOL)
        outputs.append(io_names.ROUTER_LOGITS)
        rest_shapes = ({0: BATCH, 1: SEQ}, *rest_shapes)
    return GraphPlan(
        name,
        segment,
        [*names, *io_names.kv_names(layers, "past")],
        outputs,
        sample=inputs(2, 5, 3),
        dynamic_shapes=({0: BATCH, 1: SEQ}, {0: BATCH, 1: SEQ}, rest_shapes),
        # full prompt, text-only prompt after an exit, decode steps (incl. empty past), batch 2
        cases=[
            inputs(1, n_prompt, 0),
            inputs(1, 9, 0),
            inputs(1, 1, n_prompt),
            inputs(1, 1, 0),
            inputs(2, 4, 6),
        ],
    )
