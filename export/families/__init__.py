"""The registry of model families: one adapter per Hugging Face architecture, listed here once.

Adding a family is one adapter file here, one runtime file under `dyvte_rt/families/`, a line in
each registry and its tests (docs/adding-a-family.md); a guard test fails if a registered family
has no tiny test checkpoint.
"""

from __future__ import annotations

from dyvte_rt.errors import UnsupportedModelError
from export.families.base import FamilyAdapter
from export.families.internvl import InternVLAdapter
from export.families.llava import LlavaAdapter
from export.families.llava_next import LlavaNextAdapter
from export.families.qwen2_vl import Qwen2VLAdapter, Qwen25VLAdapter
from export.families.qwen3_vl import Qwen3VLAdapter

FAMILIES: dict[str, type[FamilyAdapter]] = {
    "LlavaForConditionalGeneration": LlavaAdapter,
    "LlavaNextForConditionalGeneration": LlavaNextAdapter,
    "Qwen2VLForConditionalGeneration": Qwen2VLAdapter,
    "Qwen2_5_VLForConditionalGeneration": Qwen25VLAdapter,
    "InternVLForConditionalGeneration": InternVLAdapter,
    "Qwen3VLForConditionalGeneration": Qwen3VLAdapter,
}

# --model alias -> Hugging Face repo id, from every family
ALIASES: dict[str, str] = {alias: repo for a in FAMILIES.values() for alias, repo in a.ALIASES.items()}


def adapter_class_for(architecture: str) -> type[FamilyAdapter]:
    try:
        return FAMILIES[architecture]
    except KeyError:
        raise UnsupportedModelError(
            f"architecture {architecture!r} is not supported",
            hint=f"supported architectures: {', '.join(sorted(FAMILIES))}",
        ) from None


def adapter_class_for_family(family: str) -> type[FamilyAdapter]:
    """The adapter whose manifest key is `family` (e.g. "llava-next")."""
    for adapter in FAMILIES.values():
        if adapter.family == family:
            return adapter
    raise UnsupportedModelError(
        f"unknown family {family!r}", hint=f"families: {', '.join(a.family for a in FAMILIES.values())}"
    )


__all__ = ["ALIASES", "FAMILIES", "FamilyAdapter", "adapter_class_for", "adapter_class_for_family"]
