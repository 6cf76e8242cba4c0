"""Which prompt positions the routers average over (docs/exit-semantics.md), for the reference and
the runtime alike."""

from __future__ import annotations

import numpy as np


def text_feature_positions(input_ids: np.ndarray, image_token_id: int) -> np.ndarray:
    """Indices of text_after_image[:-1] for one prompt ([N] ids); the last token alone if empty.

    text_after_image are the prompt tokens after the last image token (all tokens when there is
    no image). The mean is never taken over an empty set, so features are never NaN.
    """
    ids = np.asarray(input_ids).reshape(-1)
    n = ids.shape[0]
    image_at = np.flatnonzero(ids == image_token_id)
    first_text = int(image_at[-1]) + 1 if image_at.size else 0
    if first_text >= n - 1:
        return np.array([n - 1], dtype=np.int64)
    return np.arange(first_text, n - 1, dtype=np.int64)


def router_pool(input_ids: np.ndarray, image_token_id: int, dtype: np.dtype = np.float32) -> np.ndarray:
    """Mean weights [1, N]: 1/M at the M averaged positions, 0 elsewhere (a segment graph input)."""
    ids = np.asarray(input_ids).reshape(-1)
    pool = np.zeros((1, ids.shape[0]), dtype=dtype)
    positions = text_feature_positions(ids, image_token_id)
    pool[0, positions] = 1.0 / positions.size
    return pool
