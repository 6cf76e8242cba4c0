"""The runtime's model families, one module each, listed here once and chosen by the manifest's
`source.family` (the key the exporter's adapter writes). Adding a family: docs/adding-a-family.md."""

from __future__ import annotations

from dyvte_rt.bundle.manifest import BundleError, Dims, Manifest, VisionInfo
from dyvte_rt.families.base import Family
from dyvte_rt.families.internvl import InternVLFamily
from dyvte_rt.families.llava import LlavaFamily
from dyvte_rt.families.llava_next import LlavaNextFamily
from dyvte_rt.families.qwen2_vl import Qwen2VLFamily
from dyvte_rt.families.qwen3_vl import Qwen3VLFamily

FAMILIES: dict[str, type[Family]] = {
    "llava": LlavaFamily,
    "llava-next": LlavaNextFamily,
    "qwen2-vl": Qwen2VLFamily,
    "qwen2.5-vl": Qwen2VLFamily,  # the same images and positions; its windows are in the layout
    "internvl": InternVLFamily,
    "qwen3-vl": Qwen3VLFamily,
}


def family_for(manifest: Manifest) -> Family:
    """The family object of a bundle (its layout read strictly: a bad field is a BundleError)."""
    return make_family(manifest.source.family, manifest.vision, manifest.dims, manifest.tokens.image)


def make_family(name: str, vision: VisionInfo, dims: Dims, image_token: int = -1) -> Family:
    try:
        kind = FAMILIES[name]
    except KeyError:
        raise BundleError(
            f"the bundle's model family {name!r} is unknown to this dyvte-rt",
            hint=f"it knows {', '.join(FAMILIES)}; upgrade dyvte-rt or re-export the bundle",
        ) from None
    return kind(name, vision, dims, image_token)


__all__ = ["FAMILIES", "Family", "family_for", "make_family"]
