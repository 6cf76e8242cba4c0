"""Visual-token pruning policies (docs/exit-semantics.md, *Pruning*): which visual tokens leave
after one layer, before the exit removes the rest.

- `none`: no pruning (the default; exactly the behaviour without pruning).
- `fastv:K:R`: after layer K (K >= 0), keep the visual tokens the last prompt token attended to
  most in layer K (mean over heads of its softmax probabilities).
- `dart:K:R[:P]`: after layer K (K >= -1; -1 = the merged input embeddings), keep P pivots (the
  largest L2 norms) and the tokens least similar (cosine) to every pivot.

R is the fraction removed: `keep = V - round(R * V)` (Python's round). The same objects drive the
PyTorch reference and the runtime; the scores and rankings themselves are computed by graphs (or
by the reference's torch code), and only the ranking, a list of indices, reaches these functions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from dyvte_rt.errors import PolicyError

DART_PIVOTS = 8  # DART's default number of pivot tokens
METHODS = ("fastv", "dart")


@dataclass(frozen=True)
class PrunePolicy:
    """One pruning step: `method` after layer `layer`, removing the fraction `ratio` of the visual
    tokens. `method` None: no pruning."""

    method: str | None = None
    layer: int = 0
    ratio: float = 0.0
    pivots: int = DART_PIVOTS  # dart only

    @property
    def active(self) -> bool:
        return self.method is not None

    def keep(self, n_visual: int) -> int:
        """How many of `n_visual` visual tokens stay."""
        return n_visual - round(self.ratio * n_visual) if self.active else n_visual

    def spec(self) -> str:
        """The string `parse_prune` turns back into this policy."""
        if not self.active:
            return "none"
        text = f"{self.method}:{self.layer}:{self.ratio:g}"
        if self.method == "dart" and self.pivots != DART_PIVOTS:
            text += f":{self.pivots}"
        return text

    def describe(self) -> str:
        return self.spec()


NO_PRUNE = PrunePolicy()

_SPEC = re.compile(r"^(fastv|dart):(-?\d+):([0-9]*\.?[0-9]+)(?::(\d+))?$")
_HINT = (
    "use 'none', 'fastv:K:R' (K >= 0) or 'dart:K:R[:P]' (K >= -1), R the fraction removed, e.g. 'fastv:2:0.5'"
)


def parse_prune(spec: str | PrunePolicy | None) -> PrunePolicy:
    """`none`, `fastv:K:R` or `dart:K:R[:P]` (as on command lines, in requests and manifests)."""
    if isinstance(spec, PrunePolicy):
        return spec
    if spec is None:
        return NO_PRUNE
    if not isinstance(spec, str):
        raise PolicyError(f"a prune policy must be a string, got {type(spec).__name__}", hint=_HINT)
    text = spec.strip().lower()
    if text in ("none", ""):
        return NO_PRUNE
    match = _SPEC.match(text)
    if not match:
        raise PolicyError(f"unknown prune policy {spec!r}", hint=_HINT)
    method, layer, ratio, pivots = match.group(1), int(match.group(2)), float(match.group(3)), match.group(4)
    if not 0.0 <= ratio <= 1.0:
        raise PolicyError(f"prune ratio R must lie in [0, 1], got {ratio:g} in {spec!r}", hint=_HINT)
    if method == "fastv" and layer < 0:
        raise PolicyError(f"fastv prunes after a decoder layer (K >= 0), got {spec!r}", hint=_HINT)
    if method == "fastv" and pivots is not None:
        raise PolicyError(f"fastv takes no pivot count, got {spec!r}", hint=_HINT)
    n_pivots = DART_PIVOTS if pivots is None else int(pivots)
    if method == "dart" and n_pivots < 1:
        raise PolicyError(f"dart needs at least one pivot, got {spec!r}", hint=_HINT)
    return PrunePolicy(method, layer, ratio, n_pivots)


def check_prune_fits(policy: PrunePolicy, layers: tuple[int, ...] | None, num_layers: int) -> None:
    """Reject a policy this bundle cannot run, before any compute. `layers`: the layers the bundle
    can prune after (None: a bundle exported before pruning existed)."""
    if not policy.active:
        return
    if layers is None:
        raise PolicyError(
            "this bundle was exported before visual-token pruning existed, so it cannot prune",
            hint="re-export it with this dyvte-rt (python -m export.build ...) to prune with --prune",
        )
    if policy.layer >= num_layers - 1:
        raise PolicyError(
            f"cannot prune after layer {policy.layer}: the model has {num_layers} layers (0-indexed) "
            "and pruning needs a layer after it"
        )
    if policy.layer not in layers:
        raise PolicyError(
            f"this bundle cannot prune after layer {policy.layer}: it prunes after {_span(layers)}",
            hint="pick one of those, or re-export with --prune-layers to add it",
        )


def kept_from_ranking(ranking: np.ndarray, keep: int) -> np.ndarray:
    """The visual tokens that stay, as sorted ordinals (0..V-1), from a ranking [V] that lists
    the tokens best first (ties already broken toward the lower index by the ranking)."""
    ranking = np.asarray(ranking, dtype=np.int64).reshape(-1)
    return np.sort(ranking[:keep])


def _span(layers: tuple[int, ...]) -> str:
    if not layers:
        return "no layer"
    if len(layers) > 2 and layers == tuple(range(layers[0], layers[-1] + 1)):
        return f"layers {layers[0]}..{layers[-1]}"
    return "layers " + ", ".join(map(str, layers))
