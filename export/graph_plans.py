"""What to export for each graph: module, I/O names, tracing inputs, dynamic axes, test cases.

Tracing inputs avoid sizes 0 and 1 (torch.export would specialise on them); verification cases
then cover them explicitly: past length 0, sequence length 1, batch 2, no visual tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.export import Dim

from dyvte_rt.bundle import io_names
from export.parts import (
    DartRankPart,
    DeepstackAddPart,
    EmbedPart,
    ExitGatherPart,
    FastvRankPart,
    HeadPart,
    RouterPart,
    SegmentPart,
)

if TYPE_CHECKING:
    from export.families import FamilyAdapter
    from export.reference.routers import RouterBank

ROLES = (
    "vision",
    "embed",
    "segment",
    "router",
    "exit_gather",
    "deepstack_add",
    "fastv_rank",
    "dart_rank",
    "head",
)

BATCH = Dim("batch", min=1, max=256)
SEQ = Dim("seq", min=1, max=1 << 16)
PAST = Dim("past", min=0, max=1 << 16)
CAPACITY = Dim("capacity", min=2, max=1 << 16)  # rows of an in-place KV buffer
PROMPT = Dim("prompt", min=1, max=1 << 16)
VISUAL = Dim("visual", min=0, max=1 << 16)
KEPT = Dim("kept", min=1, max=1 << 16)
VIEWS = Dim("views", min=1, max=256)  # views of one image (a base view and tiles)


@dataclass
class GraphPlan:
    name: str  # file stem and manifest key: vision, embed, segment_00, router_03, exit_gather, head
    role: str  # one of ROLES: what the graph is, whatever its name
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
    layers: range | None = None  # segment: the decoder layers it owns; router: the layer it reads

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"


def plan_segments(
    candidates: tuple[int, ...], num_layers: int, boundaries: tuple[int, ...] = ()
) -> list[tuple[int, int]]:
    """Consecutive layer ranges, each ending at a candidate exit layer, at a layer the family needs
    a boundary after (DeepStack's), or at the last layer."""
    ends = sorted(set(candidates) | set(boundaries) | {num_layers - 1})
    starts = [0, *(end + 1 for end in ends[:-1])]
    return list(zip(starts, ends, strict=True))


@dataclass
class RandomInputs:
    """Random tensors of the model's dtype, reproducible from one seed."""

    dtype: torch.dtype
    gen: torch.Generator

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen).to(self.dtype)

    def ids(self, batch: int, n: int, n_image: int, vocab: int, image_id: int) -> torch.Tensor:
        out = torch.randint(5, vocab, (batch, n), generator=self.gen)
        out[:, 1 : 1 + n_image] = image_id
        return out


def prune_layers(segments: list[tuple[int, int]]) -> tuple[int, ...]:
    """The layers a bundle can prune after: -1 (the input embeddings, DART only) and every
    segment's last layer but the model's last (FastV's scores come out of those segments)."""
    return (-1, *(last for _, last in segments[:-1]))


def build_plans(
    adapter: FamilyAdapter,
    candidates: tuple[int, ...],
    routers: RouterBank | None,
    kv: str,
    seed: int = 0,
    extra_prune_layers: tuple[int, ...] = (),
) -> list[GraphPlan]:
    model = adapter.model
    dtype = next(model.parameters()).dtype
    rand = RandomInputs(dtype, torch.Generator().manual_seed(seed))
    text = model.config.text_config
    dims = adapter.dims
    v_tokens = adapter.traced_visual_tokens
    n_prompt = v_tokens + 9
    tol = adapter.tolerance

    def ids(batch: int, n: int, n_image: int) -> torch.Tensor:
        return rand.ids(batch, n, n_image, text.vocab_size, adapter.image_token_id)

    vision_plan = adapter.vision_plan(rand, tol)
    plans = [
        vision_plan,
        GraphPlan(
            "embed",
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
    boundaries = (*adapter.segment_boundaries, *extra_prune_layers)
    segments = plan_segments(candidates, dims.num_layers, boundaries)
    for index, (first, last) in enumerate(segments):
        segment = SegmentPart(adapter, first, last, kv, scores=last < dims.num_layers - 1)
        plans.append(
            _segment_plan(f"segment_{index:02d}", segment, n_prompt, rand, text.num_key_value_heads, head_dim)
        )
    if routers is not None:
        for k in candidates:
            router = RouterPart(adapter, routers.routers[str(k)])
            plans.append(_router_plan(f"router_{k:02d}", router, k, n_prompt, rand, tol))
    plans.append(
        GraphPlan(
            "exit_gather",
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
    plans.extend(_rank_plans(v_tokens, n_prompt, dims.hidden, rand))
    if adapter.deepstack_layers:
        plans.append(_deepstack_plan(adapter.deepstack_layers, v_tokens, n_prompt, dims.hidden, rand))
    plans.append(
        GraphPlan(
            "head",
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
    name: str, segment: SegmentPart, n_prompt: int, rand: RandomInputs, kv_heads: int, head_dim: int
) -> GraphPlan:
    layers = segment.layers
    hidden = segment.adapter.dims.hidden
    inplace = segment.kv == "inplace"

    sections = segment.adapter.position_sections

    scores = segment.scores

    def inputs(batch: int, seq: int, past: int) -> tuple:
        positions = torch.arange(past, past + seq).repeat(batch, 1)  # [B, S]
        if sections > 1:  # multimodal rotary: sections that differ, as on an image's rows
            positions = torch.stack([positions + 3 * i for i in range(sections)])  # [3, B, S]
        # FastV's last token: the last row, and in a batch of two a padded sample's earlier one
        last = (torch.tensor([seq - 1, max(seq - 3, 0)])[:batch],) if scores else ()
        if not inplace:
            kv = [rand.randn(batch, kv_heads, past, head_dim) for _ in range(2 * len(layers))]
            return (rand.randn(batch, seq, hidden), positions, *kv, *last)
        capacity = past + seq + 3  # rows beyond the valid ones hold noise the operator must ignore
        kv = [rand.randn(batch, kv_heads, capacity, head_dim) for _ in range(2 * len(layers))]
        total = torch.full((batch,), past + seq, dtype=torch.int32)
        return (rand.randn(batch, seq, hidden), positions, total, *kv, *last)

    position_axes = {1: BATCH, 2: SEQ} if sections > 1 else {0: BATCH, 1: SEQ}
    last_names, last_axes = ([io_names.LAST_INDEX], ({0: BATCH},)) if scores else ([], ())
    last_outputs = [io_names.PRUNE_SCORES] if scores else []
    if inplace:
        names = [
            io_names.HIDDEN_IN,
            io_names.POSITION_IDS,
            io_names.TOTAL_LENGTHS,
            *io_names.kv_names(layers, "past"),
            *last_names,
        ]
        kv_axes = {0: BATCH, 2: CAPACITY}
        # total_lengths, then the buffers (and FastV's last index)
        rest = ({0: BATCH}, *(kv_axes for _ in range(2 * len(layers))), *last_axes)
        shapes = ({0: BATCH, 1: SEQ}, position_axes, rest)
    else:
        names = [io_names.HIDDEN_IN, io_names.POSITION_IDS, *io_names.kv_names(layers, "past"), *last_names]
        shapes = (
            {0: BATCH, 1: SEQ},
            position_axes,
            (*({0: BATCH, 2: PAST} for _ in range(2 * len(layers))), *last_axes),
        )
    return GraphPlan(
        name,
        "segment",
        segment,
        names,
        [io_names.HIDDEN_OUT, *io_names.kv_names(layers, "present"), *last_outputs],
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
        layers=layers,
    )


def _rank_plans(v_tokens: int, n_prompt: int, hidden: int, rand: RandomInputs) -> list[GraphPlan]:
    """FastV's and DART's rankings of one sample's visual tokens (export.prune_scoring)."""

    def rows(seq: int, visual: int) -> torch.Tensor:
        return torch.sort(torch.randperm(seq, generator=rand.gen)[:visual]).values[None]  # [1, V]

    def fastv(batch: int, seq: int, visual: int, tie: bool = False) -> tuple:
        scores = torch.rand(batch, seq, generator=rand.gen)
        if tie:  # equal scores: the lower index first
            scores[:] = 0.25
        return (scores, torch.tensor([batch - 1]), rows(seq, visual))

    def dart(batch: int, seq: int, visual: int, pivots: int, zero: bool = False) -> tuple:
        states = rand.randn(batch, seq, hidden)
        if zero:  # a zero vector: cosine 0 to every pivot
            states[:, :] = 0
        return (states, torch.tensor([batch - 1]), rows(seq, visual), torch.tensor([pivots]))

    return [
        GraphPlan(
            "fastv_rank",
            "fastv_rank",
            FastvRankPart(),
            [io_names.PRUNE_SCORES, io_names.SAMPLE_INDEX, io_names.VISUAL_ROWS],
            [io_names.PRUNE_RANKING],
            sample=fastv(2, v_tokens + 4, v_tokens),
            dynamic_shapes=({0: BATCH, 1: SEQ}, None, {1: VISUAL}),
            dtype=torch.float32,  # the scores are fp32 in every bundle
            tolerance=0.0,  # indices
            cases=lambda: [fastv(1, n_prompt, v_tokens), fastv(2, 9, 3), fastv(1, 6, 4, tie=True)],
        ),
        GraphPlan(
            "dart_rank",
            "dart_rank",
            DartRankPart(),
            [io_names.HIDDEN_OUT, io_names.SAMPLE_INDEX, io_names.VISUAL_ROWS, io_names.PRUNE_PIVOTS],
            [io_names.PRUNE_RANKING],
            sample=dart(2, v_tokens + 4, v_tokens, 2),
            dynamic_shapes=({0: BATCH, 1: SEQ}, None, {1: VISUAL}, None),
            dtype=rand.dtype,
            tolerance=0.0,
            cases=lambda: [
                dart(1, n_prompt, v_tokens, 8),
                dart(2, 9, 3, 1),
                dart(1, 7, 5, 0),
                dart(1, 7, 4, 2, zero=True),
            ],
        ),
    ]


def _deepstack_plan(levels: int, v_tokens: int, n_prompt: int, hidden: int, rand: RandomInputs) -> GraphPlan:
    def inputs(batch: int, seq: int, visual: int, level: int) -> tuple:
        slots = torch.full((batch, seq), visual, dtype=torch.long)  # none
        for b in range(batch):
            rows = torch.randperm(seq, generator=rand.gen)[: visual - b]  # the last sample: one fewer
            slots[b, rows] = torch.arange(len(rows))
        return (
            rand.randn(batch, seq, hidden),
            rand.randn(batch, levels, visual, hidden),
            torch.tensor([level]),
            slots,
        )

    return GraphPlan(
        "deepstack_add",
        "deepstack_add",
        DeepstackAddPart(),
        [io_names.HIDDEN_OUT, io_names.DEEPSTACK_FEATURES, io_names.DEEPSTACK_LEVEL, io_names.VISUAL_SLOTS],
        [io_names.HIDDEN_IN],
        sample=inputs(2, v_tokens + 4, v_tokens, levels - 1),
        dynamic_shapes=({0: BATCH, 1: SEQ}, {0: BATCH, 2: VISUAL}, None, {0: BATCH, 1: SEQ}),
        dtype=rand.dtype,
        tolerance=1e-6,  # additions
        cases=lambda: [inputs(1, n_prompt, v_tokens, 0), inputs(2, 9, 3, levels - 1)],
    )


def _router_plan(
    name: str, router: RouterPart, layer: int, n_prompt: int, rand: RandomInputs, tolerance: float
) -> GraphPlan:
    hidden = router.adapter.dims.hidden

    def inputs(batch: int, seq: int, kept: int) -> tuple:
        pool = torch.zeros(batch, seq, dtype=rand.dtype)  # mean over all but the last position
        pool[:, : max(seq - 1, 1)] = 1.0 / max(seq - 1, 1)
        keep = torch.arange(seq - kept, seq).repeat(batch, 1)  # the text rows, after the image
        return (rand.randn(batch, seq, hidden), pool, torch.full((batch,), seq - 1), keep)

    return GraphPlan(
        name,
        "router",
        router,
        [io_names.HIDDEN_OUT, io_names.ROUTER_POOL, io_names.LAST_INDEX, io_names.KEEP_INDEX],
        [io_names.ROUTER_LOGITS, io_names.HIDDEN_IN],
        sample=inputs(2, 5, 3),
        dynamic_shapes=({0: BATCH, 1: SEQ}, {0: BATCH, 1: SEQ}, {0: BATCH}, {0: BATCH, 1: KEPT}),
        dtype=rand.dtype,
        tolerance=tolerance,
        cases=lambda: [inputs(1, n_prompt, 9), inputs(1, 1, 1), inputs(2, 6, 2)],
        layers=range(layer, layer + 1),
    )
