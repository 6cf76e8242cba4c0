"""The settings every command that runs a bundle takes, and how they open a model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dyvte_rt.bundle.locations import resolve_bundle


@dataclass(frozen=True, kw_only=True)
class RunnerConfig:
    bundle: Path | None = None  # None: $DYVTE_RT_BUNDLE, else the demo bundle
    device: str = "cpu"
    dtype: str | None = None  # None: the bundle's
    threads: int = 0  # 0: ONNX Runtime's default
    spin: bool = False
    vision_priority: str = "normal"  # "low": the image encoder's threads at the lowest CPU priority


def open_model(config: RunnerConfig):
    from dyvte_rt.api.model import DyvteModel

    return DyvteModel.load(
        resolve_bundle(config.bundle),
        device=config.device,
        threads=config.threads,
        spin=config.spin,
        dtype=config.dtype,
        vision_priority=config.vision_priority,
    )
