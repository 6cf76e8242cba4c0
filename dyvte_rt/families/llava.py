"""LLaVA-1.5 (`llava`): one fixed-size view per image (a CLIP-style resize and centre crop), a
fixed number of visual tokens, plain position ids — the answers `Family` gives by default."""

from __future__ import annotations

from dyvte_rt.families.base import Family


class LlavaFamily(Family):
    """LLaVA-1.5 images: one view of the checkpoint's size, `vision.visual_tokens` tokens each."""
