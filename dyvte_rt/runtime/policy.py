"""Exit policies (docs/exit-semantics.md): when to drop all visual tokens.

A policy is asked once per candidate layer during prefill, in layer order, and answers whether
the visual tokens leave after that layer. The same objects drive the PyTorch reference and the
numpy runtime, so they take router logits as plain numpy arrays.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from dyvte_rt.errors import PolicyError

DEFAULT_THRESHOLD = 0.5  # reproduces the reference's argmax rule (class 1 = "exit")
EXIT_CLASS = 1


def exit_probability(router_logits: np.ndarray) -> float:
    """p(exit) from a router's two logits ([..., 2]; batch 1), computed stably.

    Plain float arithmetic: this runs inside the exit switch, where every numpy call counts.
    """
    logits = np.asarray(router_logits).ravel().tolist()
    if len(logits) != 2:
        raise ValueError(f"router logits must hold 2 values for batch 1, got {len(logits)}")
    margin = logits[1 - EXIT_CLASS] - logits[EXIT_CLASS]  # softmax of two logits = sigmoid(-margin)
    if margin >= 0:
        decay = math.exp(-margin)
        return decay / (1.0 + decay)
    return 1.0 / (1.0 + math.exp(margin))


class ExitPolicy(Protocol):
    """Decides at a candidate layer whether the visual tokens exit after it."""

    needs_routers: bool

    def decide(self, layer: int, exit_prob: float | None) -> bool: ...

    def describe(self) -> str: ...

    def spec(self) -> str:
        """The string `parse_policy` turns back into this policy (thresholds travel separately)."""
        ...


@dataclass(frozen=True)
class NeverExit:
    """The full model: visual tokens take part in every layer."""

    needs_routers: bool = False

    def decide(self, layer: int, exit_prob: float | None) -> bool:
        return False

    def describe(self) -> str:
        return "never"

    def spec(self) -> str:
        return "never"


@dataclass(frozen=True)
class FixedLayerExit:
    """Exit after a fixed layer for every request (VTW-style; needs no routers)."""

    layer: int
    needs_routers: bool = False

    def decide(self, layer: int, exit_prob: float | None) -> bool:
        return layer == self.layer

    def describe(self) -> str:
        return f"layer:{self.layer}"

    def spec(self) -> str:
        return f"layer:{self.layer}"


@dataclass(frozen=True)
class RouterExit:
    """DyVTE: exit at the first candidate layer whose router gives p(exit) >= threshold."""

    threshold: float = DEFAULT_THRESHOLD
    needs_routers: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0 or np.isnan(self.threshold):
            raise PolicyError(f"threshold must lie in [0, 1], got {self.threshold}")

    def decide(self, layer: int, exit_prob: float | None) -> bool:
        if exit_prob is None:
            raise PolicyError(f"layer {layer} has no router, but policy 'router' needs one")
        return exit_prob >= self.threshold

    def describe(self) -> str:
        return f"router(threshold={self.threshold:g})"

    def spec(self) -> str:
        return "router"


@dataclass(frozen=True)
class RouterProbe:
    """Asks every router and never exits: for calibration, which needs p(exit) at every layer."""

    needs_routers: bool = True

    def decide(self, layer: int, exit_prob: float | None) -> bool:
        return False

    def describe(self) -> str:
        return "probe"

    def spec(self) -> str:
        return "never"


_LAYER_SPEC = re.compile(r"^layer:(\d+)$")


def parse_policy(spec: str, threshold: float = DEFAULT_THRESHOLD) -> ExitPolicy:
    """Parse `never`, `layer:K` or `router` (as given on command lines and in manifests)."""
    text = spec.strip().lower()
    if text == "never":
        return NeverExit()
    if text == "router":
        return RouterExit(threshold)
    match = _LAYER_SPEC.match(text)
    if match:
        return FixedLayerExit(int(match.group(1)))
    raise PolicyError(
        f"unknown exit policy {spec!r}",
        hint="use 'never', 'router' or 'layer:K' with K a layer index such as 'layer:15'",
    )


def check_policy_fits(policy: ExitPolicy, num_layers: int, candidate_layers: tuple[int, ...]) -> None:
    """Reject a policy that cannot fire for this model, before any compute."""
    if isinstance(policy, FixedLayerExit) and policy.layer not in candidate_layers:
        raise PolicyError(
            f"cannot exit after layer {policy.layer}: this model's candidate exit layers are "
            f"{_span(candidate_layers)} (of {num_layers} layers, 0-indexed)",
        )


def _span(layers: tuple[int, ...]) -> str:
    if not layers:
        return "none"
    if layers == tuple(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return ", ".join(map(str, layers))
