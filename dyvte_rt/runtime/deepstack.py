"""DeepStack (Qwen3-VL, docs/exit-semantics.md): during prefill, after decoder layer i for each
level i the vision graph gave, the level joins the rows of the visual tokens still present — a
gather-and-add on the backend (`deepstack_add`). A sample that has exited has none left, so the
levels still to come are dropped for it; decoding never adds any (its tokens are text)."""

from __future__ import annotations

import numpy as np

from dyvte_rt.bundle import io_names as names
from engines import Session, Value


class DeepStackAdder:
    def __init__(
        self, session: Session, levels: int, features: Value, ids: list[np.ndarray], image_token: int
    ) -> None:
        self.session, self.levels, self.features = session, levels, features
        self._visual = [np.flatnonzero(sample == image_token) for sample in ids]  # each sample's visual rows
        self._none = max(len(rows) for rows in self._visual)  # the slot of "no visual token" (V)

    def __call__(self, layer: int, hidden: Value, length: int, exited: list[bool]) -> Value:
        """`hidden` [B, length, D] after decoder layer `layer`, with its level added to the visual
        rows of the samples that have not exited."""
        if layer >= self.levels or all(exited[b] or not len(v) for b, v in enumerate(self._visual)):
            return hidden
        slots = np.full((len(self._visual), length), self._none, dtype=np.int64)  # [B, S]
        for b, rows in enumerate(self._visual):
            if not exited[b]:  # a sample that stays keeps its rows where they were
                slots[b, rows] = np.arange(len(rows))
        feeds = {
            names.HIDDEN_OUT: hidden,
            names.DEEPSTACK_FEATURES: self.features,
            names.DEEPSTACK_LEVEL: np.array([layer], dtype=np.int64),
            names.VISUAL_SLOTS: slots,
        }
        return self.session.run(feeds)[names.HIDDEN_IN]
