"""The first step of an export: every check that needs no weights, so a mistake costs a second,
not a half-finished export. Produces what the later steps (plan, export, assemble) need."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dyvte_rt.errors import InputError
from dyvte_rt.runtime.policy import DEFAULT_THRESHOLD, ExitPolicy, check_policy_fits, parse_policy
from dyvte_rt.runtime.prune import NO_PRUNE, PrunePolicy, parse_prune
from export.staging import check_destination

if TYPE_CHECKING:
    from export.build import BuildConfig
    from export.loading import CheckpointInfo

CHECKPOINT_ROUTERS = "routers.safetensors"  # routers a checkpoint ships with (the demo's)
EXPORT_DTYPES = ("fp32", "fp16")
# ONNX Runtime's CPU GroupQueryAttention (the in-place KV flavour) refuses other head sizes
GQA_HEAD_MULTIPLE = 8


@dataclass(frozen=True)
class ExportInputs:
    """What validation found: where the bundle goes, the checkpoint, routers and exit settings."""

    out: Path
    checkpoint: CheckpointInfo
    routers: Any  # export.reference.routers.RouterBank | None
    candidates: tuple[int, ...]
    threshold: float
    default_policy: ExitPolicy
    kv: str  # the KV flavour to export
    extra_prune_layers: tuple[int, ...] = ()  # --prune-layers: segment ends besides the exit layers
    default_prune: PrunePolicy = NO_PRUNE


def validate(config: BuildConfig) -> ExportInputs:
    from export.loading import inspect_checkpoint
    from export.reference.routers import RouterBank

    if config.dtype not in EXPORT_DTYPES:
        raise InputError(f"--dtype must be one of {EXPORT_DTYPES}, got {config.dtype!r}")
    if config.block_size < 16 or config.block_size & (config.block_size - 1):
        raise InputError(f"--block-size must be a power of two of at least 16, got {config.block_size}")
    out = config.out.expanduser().absolute()
    check_destination(out, config.overwrite)
    checkpoint = inspect_checkpoint(config.model)
    routers_file = routers_path(config, checkpoint.path)
    routers = RouterBank.load(routers_file) if routers_file else None
    num_layers = checkpoint.num_layers
    candidates = parse_exit_layers(config.exit_layers, num_layers)
    if routers is not None:
        check_routers(routers, candidates)
    threshold = (
        config.threshold
        if config.threshold is not None
        else (routers.threshold if routers is not None else DEFAULT_THRESHOLD)
    )
    default_exit = config.default_exit or ("router" if routers is not None else "never")
    default_policy = parse_policy(default_exit, threshold)
    if default_policy.needs_routers and routers is None:
        raise InputError(
            "--default-exit router needs --routers", hint="train routers with python -m calibrate.routers"
        )
    check_policy_fits(default_policy, num_layers, candidates)
    kv = kv_flavour(config.kv, checkpoint.adapter_class.head_dim_in(checkpoint.config), config.quiet)
    extra = (
        parse_exit_layers(config.prune_layers, num_layers, "--prune-layers") if config.prune_layers else ()
    )
    default_prune = parse_prune(config.default_prune)
    if default_prune.active and default_prune.layer not in (-1, *candidates, *extra):
        raise InputError(
            f"--default-prune {default_prune.spec()} prunes after layer {default_prune.layer}, "
            "which is neither -1 nor an exit layer",
            hint=f"add --prune-layers {default_prune.layer}",
        )
    return ExportInputs(
        out, checkpoint, routers, candidates, threshold, default_policy, kv, extra, default_prune
    )


def kv_flavour(asked: str | None, head_dim: int | None, quiet: bool = False) -> str:
    """The KV flavour to export: `asked`, else in-place unless the model's head size rules it out
    (then concat, saying so). Asking for in-place where it cannot work is refused in one line."""
    fits = head_dim is None or head_dim % GQA_HEAD_MULTIPLE == 0
    if asked == "inplace" and not fits:
        raise InputError(
            f"the decoder's attention head size is {head_dim}, and the in-place KV flavour (ONNX "
            f"Runtime's GroupQueryAttention) needs a multiple of {GQA_HEAD_MULTIPLE}",
            hint="export with --kv concat",
        )
    if asked is not None:
        return asked
    if fits:
        return "inplace"
    if not quiet:
        print(
            f"note: the decoder's attention head size {head_dim} is not a multiple of {GQA_HEAD_MULTIPLE}, "
            "which ONNX Runtime's GroupQueryAttention needs: exporting the concat KV flavour",
            file=sys.stderr,
        )
    return "concat"


def parse_exit_layers(spec: str | None, num_layers: int, option: str = "--exit-layers") -> tuple[int, ...]:
    """`None` -> 1..L-2; otherwise `a-b`, `a..b`, `a,b,c`, or mixes such as `1-4,8`."""
    if spec is None:
        return tuple(range(1, num_layers - 1))
    layers: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        match = re.fullmatch(r"(\d+)\s*(?:-|\.\.)\s*(\d+)", part)
        if match:
            low, high = int(match.group(1)), int(match.group(2))
            if low > high:
                raise InputError(f"{option} range {part!r} runs backwards")
            layers.update(range(low, high + 1))
        elif part.isdigit():
            layers.add(int(part))
        else:
            raise InputError(f"{option}: cannot read {part!r}", hint="use e.g. '1-30', '4,8,12' or '2..5,9'")
    bad = sorted(k for k in layers if k > num_layers - 2)
    if bad:
        raise InputError(
            f"{option} {bad} are not possible exits for a {num_layers}-layer decoder",
            hint=f"an exit needs a layer after it: use layers 0..{num_layers - 2}",
        )
    return tuple(sorted(layers))


def routers_path(config: BuildConfig, checkpoint: Path) -> Path | None:
    """--routers, else the checkpoint's own routers file (unless --no-routers)."""
    if config.no_routers:
        return None
    if config.routers is not None:
        return config.routers
    shipped = checkpoint / CHECKPOINT_ROUTERS
    return shipped if shipped.is_file() else None


def check_routers(routers, candidates: tuple[int, ...]) -> None:
    missing = sorted(set(candidates) - set(routers.layers))
    if missing:
        raise InputError(
            f"the routers file has no router for exit layers {missing}",
            hint=f"pass --exit-layers within the routers' layers {list(routers.layers)}",
        )


def check_routers_fit(routers, hidden: int) -> None:
    """After the model's config is loaded: the routers read this model's hidden states."""
    if routers is not None and routers.hidden != hidden:
        raise InputError(f"the routers were trained for hidden size {routers.hidden}, the model has {hidden}")
