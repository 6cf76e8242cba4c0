"""DeepStack (Qwen3-VL, docs/exit-semantics.md): during prefill, after decoder layer i for each
level i the vision graph gave, the level joins the rows of the visual tokens still present — a
gather-and-add on the backend (`deepstack_add`). A sample that has exited has none left, so the
levels still to come are dropped for it, and after a prune only the visual tokens that stayed take
them; decoding never adds any (its tokens are text)."""

from __future__ import annotations

import numpy as np

from dyvte_rt.bundle import io_names as names
from dyvte_rt.runtime.exit_switch import ExitSwitch
from engines import Session, Value


class DeepStackAdder:
    def __init__(self, session: Session, levels: int, features: Value, n_visual: list[int]) -> None:
        self.session, self.levels, self.features = session, levels, features
        self._none = max(n_visual)  # the slot of "no visual token" (V: the features' padded length)

    def __call__(self, layer: int, hidden: Value, length: int, switch: ExitSwitch) -> Value:
        """`hidden` [B, length, D] after decoder layer `layer`, with its level added to the rows of
        the visual tokens still present (the switch knows which)."""
        if layer >= self.levels:
            return hidden
        present = [switch.visual_rows(b) for b in range(len(switch.policies))]
        if not any(len(rows) for rows, _ in present):
            return hidden
        slots = np.full((len(present), length), self._none, dtype=np.int64)  # [B, S]
        for b, (rows, ordinals) in enumerate(present):
            slots[b, rows] = ordinals
        feeds = {
            names.HIDDEN_OUT: hidden,
            names.DEEPSTACK_FEATURES: self.features,
            names.DEEPSTACK_LEVEL: np.array([layer], dtype=np.int64),
            names.VISUAL_SLOTS: slots,
        }
        return self.session.run(feeds)[names.HIDDEN_IN]
