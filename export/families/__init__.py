"""The registry of model families: one adapter per Hugging Face architecture, listed here once.

Adding a family (InternVL, LLaVA-NeXT, ...) is one adapter file and one line below, plus a tiny
test model (a guard test fails if a registered family has none).
"""

from __future__ import annotations

from dyvte_rt.errors import UnsupportedModelError
from export.families.base import FamilyAdapter
from export.families.llava import LlavaAdapter
from export.families.llava_next import LlavaNextAdapter
from export.families.qwen2_vl import Qwen2VLAdapter, Qwen25VLAdapter

FAMILIES: dict[str, type[FamilyAdapter]] = {
    "LlavaForConditionalGeneration": LlavaAdapter,
    "LlavaNextForConditionalGeneration": LlavaNextAdapter,
    "Qwen2VLForConditionalGeneration": Qwen2VLAdapter,
    "Qwen2_5_VLForConditionalGeneration": Qwen25VLAdapter,
}


def adapter_class_for(architecture: str) -> type[FamilyAdapter]:
    try:
        return FAMILIES[architecture]
    except KeyError:
        raise UnsupportedModelError(
            f"architecture {architecture!r} is not supported",
            hint=f"supported architectures: {', '.join(sorted(FAMILIES))}",
        ) from None


__all__ = ["FAMILIES", "FamilyAdapter", "adapter_class_for"]
