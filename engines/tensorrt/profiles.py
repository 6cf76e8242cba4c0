"""Optimisation profiles: the (min, opt, max) shape of every dynamic input, per graph and phase.

A bundle graph's inputs have named dynamic axes (`batch`, `seq`, `past`, `prompt`, `visual`,
`kept`; dyvte_rt/io_names.py, export/graph_plans.py). A segment runs in three regimes that need
very different kernels, so it gets one profile for each:
- `prefill_visual`: the prompt with its visual tokens (up to V + text tokens), empty past;
- `prefill_text`: text rows only (after the exit, a text-only prompt, a later turn), any past;
- `decode`: one token, a past up to the context.
Graphs whose inputs do not tell the regimes apart get fewer profiles (identical ones merge).
Pure functions of the bundle's sizes, so they are tested without TensorRT.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

Shape = tuple[int, ...]
PHASES = ("prefill_visual", "prefill_text", "decode")


class PlanError(ValueError):
    """The bundle or the settings cannot be turned into TensorRT profiles."""


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 0 <= self.min <= self.opt <= self.max:
            raise PlanError(f"a profile needs 0 <= min <= opt <= max, got {self.min}, {self.opt}, {self.max}")


@dataclass(frozen=True)
class EngineSettings:
    max_batch: int = 1
    max_context: int = 2048  # prompt + generated tokens, per sample
    max_text_tokens: int = 512  # text tokens in one prompt (besides its visual tokens)
    typical_text_tokens: int = 64  # the `opt` point TensorRT tunes kernels for

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_context", "max_text_tokens", "typical_text_tokens"):
            if getattr(self, name) < 1:
                raise PlanError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


def phase_ranges(
    visual_tokens: int, settings: EngineSettings, fewest_visual: int | None = None, most_views: int = 1
) -> dict[str, dict[str, DimRange]]:
    """Each phase's range for every named dynamic axis a bundle graph uses. Any-resolution images
    (LLaVA-NeXT) take `fewest_visual`..`visual_tokens` visual tokens from 1..`most_views` views."""
    s, v = settings, visual_tokens
    least = v if fewest_visual is None else fewest_visual
    if v + 1 > s.max_context:
        raise PlanError(f"max-context {s.max_context} leaves no room for a prompt of {v} visual tokens")
    text = min(s.max_text_tokens, s.max_context - v)  # text tokens that fit beside the image
    typical = min(s.typical_text_tokens, text)
    prompt = DimRange(1, v + typical, v + text)
    batch = DimRange(1, 1, s.max_batch)
    return {
        "prefill_visual": {
            "batch": batch,
            "seq": prompt,
            "prompt": prompt,
            "visual": DimRange(least, v, v),
            "views": DimRange(1, most_views, most_views),
            "kept": DimRange(1, typical, v + text),  # a batch keeps every row of a sample that stays
            "past": DimRange(0, 0, 0),
        },
        "prefill_text": {
            "batch": batch,
            "seq": DimRange(1, typical, text),
            "prompt": DimRange(1, typical, text),
            "visual": DimRange(0, 0, 0),
            "views": DimRange(1, 1, 1),
            "kept": DimRange(1, typical, text),
            "past": DimRange(0, 0, s.max_context - 1),
        },
        "decode": {
            "batch": batch,
            "seq": DimRange(1, 1, 1),
            "prompt": DimRange(1, 1, 1),
            "visual": DimRange(0, 0, 0),
            "views": DimRange(1, 1, 1),
            "kept": DimRange(1, 1, 1),
            "past": DimRange(0, min(v + typical, s.max_context - 1), s.max_context - 1),
        },
    }


@dataclass(frozen=True)
class Profile:
    phase: str  # the first phase this profile serves (identical phases merge into one profile)
    serves: tuple[str, ...]
    shapes: dict[str, tuple[Shape, Shape, Shape]]  # input -> (min, opt, max)

    @classmethod
    def from_json(cls, data: dict) -> Profile:
        shapes = {
            name: (tuple(s["min"]), tuple(s["opt"]), tuple(s["max"])) for name, s in data["shapes"].items()
        }
        return cls(data["phase"], tuple(data["serves"]), shapes)

    def to_json(self) -> dict:
        return {
            "phase": self.phase,
            "serves": list(self.serves),
            "shapes": {
                name: {"min": lo, "opt": opt, "max": hi} for name, (lo, opt, hi) in self.shapes.items()
            },
        }


def graph_profiles(
    inputs: Mapping[str, Sequence[int | str]],
    ranges: Mapping[str, Mapping[str, DimRange]],
    phases: Sequence[str] = PHASES,
) -> list[Profile]:
    """The profiles of one graph whose inputs have the given shapes (ints fixed, strings named axes)."""
    profiles: list[Profile] = []
    for phase in phases:
        shapes = {name: _bounds(name, shape, ranges[phase]) for name, shape in inputs.items()}
        same = next((p for p in profiles if p.shapes == shapes), None)
        if same is not None:
            profiles[profiles.index(same)] = Profile(same.phase, (*same.serves, phase), same.shapes)
        else:
            profiles.append(Profile(phase, (phase,), shapes))
    return profiles


def _bounds(
    name: str, shape: Sequence[int | str], ranges: Mapping[str, DimRange]
) -> tuple[Shape, Shape, Shape]:
    lo, opt, hi = [], [], []
    for dim in shape:
        if isinstance(dim, int):
            lo.append(dim), opt.append(dim), hi.append(dim)
            continue
        if dim == "capacity":
            raise PlanError(
                "this bundle's KV cache is the in-place flavour (ONNX Runtime's GroupQueryAttention), which "
                "TensorRT cannot parse: export it with --kv concat"
            )
        factor, _, axis = dim.rpartition("*")  # torch.export writes a multiple of an axis as "4*merged"
        if axis not in ranges or (factor and not factor.isdigit()):
            raise PlanError(f"input {name} has an axis {dim!r} no profile knows")
        r, times = ranges[axis], int(factor or 1)
        lo.append(times * r.min), opt.append(times * r.opt), hi.append(times * r.max)
    return tuple(lo), tuple(opt), tuple(hi)
