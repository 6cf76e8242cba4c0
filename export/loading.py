"""Resolve `--model` to a local checkpoint and load it safely.

`--model` is an alias (`llava-7b`), a local checkpoint directory (Hugging Face layout) or a repo id
already in the local Hugging Face cache. Nothing is ever downloaded: a missing model is one
clear error naming the repo id and how to obtain it. Weights load from safetensors only, and
remote code runs only when the user passes `trust_remote_code`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dyvte_rt.errors import DyvteError, ModelNotFoundError, UnsupportedModelError

if TYPE_CHECKING:
    from export.families import FamilyAdapter

DTYPES = ("fp32", "fp16", "bf16")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class LoadedModel:
    """A checkpoint in memory with everything the reference and the exporter need."""

    source: str  # what the user asked for (alias, path or repo id)
    repo_id: str | None  # the Hugging Face repo id, where one is known
    path: Path  # local checkpoint directory
    model: Any  # transformers PreTrainedModel, in eval mode
    processor: Any  # transformers processor (image processor + tokenizer + chat template)
    adapter: FamilyAdapter


DEMO_CHECKPOINT = Path(__file__).resolve().parent / "demo_checkpoint"  # `--model demo`


def resolve_checkpoint(spec: str) -> tuple[Path, str | None]:
    """Map `--model` to (local directory, repo id or None) without touching the network."""
    if spec == "demo":
        if not (DEMO_CHECKPOINT / "model.safetensors").is_file():
            raise ModelNotFoundError(
                f"the demo checkpoint is missing from {DEMO_CHECKPOINT}",
                hint="reinstall dyvte-rt, or retrain it with python -m calibrate.train_demo --out "
                + str(DEMO_CHECKPOINT),
            )
        return DEMO_CHECKPOINT, None
    local = Path(spec).expanduser()
    if local.is_dir():
        return local.resolve(), None
    from export.families import ALIASES

    repo_id = ALIASES.get(spec, spec)
    if not _REPO_ID.match(repo_id):
        raise ModelNotFoundError(
            f"model {spec!r} is not a checkpoint directory, a known alias or a Hugging Face repo id",
            hint=f"aliases: demo, {', '.join(sorted(ALIASES))}; or pass a checkpoint directory "
            "(Hugging Face layout)",
        )
    return _from_hf_cache(spec, repo_id), repo_id


def _from_hf_cache(spec: str, repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    named = repo_id if spec == repo_id else f"{spec} ({repo_id})"
    try:
        path = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        raise ModelNotFoundError(
            f"model {named} is not in the local Hugging Face cache ({_hub_cache()}) and dyvte-rt never "
            f"downloads",
            hint=f"on a machine with network access run `hf download {repo_id}` and copy the cache here, "
            f"or pass --model /path/to/checkpoint",
        ) from None
    if not any(path.glob("*.safetensors")):
        raise ModelNotFoundError(
            f"model {named} is in the local cache but its safetensors weights are missing",
            hint=f"complete the download with `hf download {repo_id}`",
        )
    return path


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def read_architecture(path: Path) -> str:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelNotFoundError(f"{path} has no config.json; it is not a Hugging Face checkpoint directory")
    try:
        config = json.loads(config_file.read_text())
        return config["architectures"][0]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError):
        raise UnsupportedModelError(f"{config_file} does not name the model's architecture") from None


def _check_weights(path: Path) -> None:
    if any(path.glob("*.safetensors")):
        return
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise UnsupportedModelError(
            f"{path} has only pickle weights (.bin/.pt), which dyvte-rt does not load",
            hint="convert the checkpoint to safetensors (save_pretrained(..., safe_serialization=True))",
        )
    raise ModelNotFoundError(f"{path} holds no safetensors weights")


def torch_dtype(name: str):
    import torch

    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in table:
        raise DyvteError(f"unknown dtype {name!r}", hint=f"choose one of {', '.join(DTYPES)}")
    return table[name]


@dataclass(frozen=True)
class CheckpointInfo:
    """What can be known about a checkpoint without loading its weights."""

    source: str
    repo_id: str | None
    path: Path
    architecture: str
    config: dict  # config.json as written

    @property
    def adapter_class(self) -> type[FamilyAdapter]:
        from export.families import adapter_class_for

        return adapter_class_for(self.architecture)

    @property
    def num_layers(self) -> int:
        return self.adapter_class.num_layers_in(self.config)


def inspect_checkpoint(spec: str) -> CheckpointInfo:
    """Resolve `--model` and read its config: every cheap check happens before weights load."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: never reach for the hub
    path, repo_id = resolve_checkpoint(spec)
    architecture = read_architecture(path)
    info = CheckpointInfo(spec, repo_id, path, architecture, json.loads((path / "config.json").read_text()))
    info.adapter_class  # noqa: B018 - raises for unsupported architectures
    _check_weights(path)
    return info


def load_checkpoint(
    spec: str | CheckpointInfo, dtype: str = "fp32", device: str = "cpu", trust_remote_code: bool = False
) -> LoadedModel:
    """Load a checkpoint for the reference / exporter; every failure a user can fix is a DyvteError."""
    info = spec if isinstance(spec, CheckpointInfo) else inspect_checkpoint(spec)
    import transformers

    model_cls = getattr(transformers, info.architecture)
    with _user_errors(info):
        model = model_cls.from_pretrained(
            info.path,
            dtype=torch_dtype(dtype),
            use_safetensors=True,
            local_files_only=True,
            trust_remote_code=trust_remote_code,
        )
        processor = _processor(info, trust_remote_code)
    model = model.to(device).eval()
    return _loaded(info, model, processor, info.adapter_class(model))


@contextlib.contextmanager
def _user_errors(info: CheckpointInfo) -> Iterator[None]:
    """transformers' errors for an unreadable checkpoint as one line."""
    try:
        yield
    except (OSError, ValueError) as err:
        raise UnsupportedModelError(
            f"cannot load the checkpoint at {info.path}: {_first_line(err)}"
        ) from None


def _processor(info: CheckpointInfo, trust_remote_code: bool):
    return info.adapter_class.load_processor(info.path, trust_remote_code)


def _loaded(info: CheckpointInfo, model, processor, adapter) -> LoadedModel:
    return LoadedModel(
        source=info.source,
        repo_id=info.repo_id,
        path=info.path,
        model=model,
        processor=processor,
        adapter=adapter,
    )


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_checkpoint_lazily(
    spec: str | CheckpointInfo, dtype: str = "fp32", trust_remote_code: bool = False
) -> tuple[LoadedModel, object]:
    """The model with its parameters left on disk, and the `WeightLoader` that brings them in graph
    by graph (export.lazy_weights). Checks every parameter against the checkpoint first."""
    info = spec if isinstance(spec, CheckpointInfo) else inspect_checkpoint(spec)
    import transformers

    from export.lazy_weights import CheckpointWeights, WeightLoader, skeleton, tied_parameters

    model_cls = getattr(transformers, info.architecture)
    with _user_errors(info):
        config = transformers.AutoConfig.from_pretrained(
            info.path, local_files_only=True, trust_remote_code=trust_remote_code
        )
        processor = _processor(info, trust_remote_code)
    model = skeleton(lambda c: model_cls._from_config(c, dtype=torch_dtype(dtype)), config)
    if (info.path / "generation_config.json").is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(
            info.path, local_files_only=True
        )
    adapter = info.adapter_class(model)
    loader = WeightLoader(
        model, CheckpointWeights(info.path), adapter.checkpoint_keys, tied_parameters(model)
    )
    return _loaded(info, model, processor, adapter), loader
