"""A checkpoint held on disk while it is exported: each graph's weights are read when it is exported
and dropped after, so the export's memory follows the largest graph, not the whole model.

- `skeleton`: the Hugging Face model with every parameter on the meta device (no memory); buffers
  (rotary frequencies, position ids) are built as usual because they are computed, not stored.
- `CheckpointWeights`: the safetensors shards, memory-mapped, read one tensor at a time.
- `WeightLoader.materialize(modules)` / `release(modules)`: real parameters for the modules a graph
  uses, then back to meta.

Every parameter is matched to a checkpoint tensor of the expected shape before anything is exported
(nothing loads silently); a missing or mis-shaped tensor is one error naming it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from dyvte_rt.errors import UnsupportedModelError


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside put every parameter on the meta device the moment it is registered.

    A parameter's storage is created (uninitialised, so never touched) and released at once;
    buffers stay real.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def skeleton(build, config) -> nn.Module:
    """`build(config)` with meta parameters and real buffers, in eval mode."""
    with parameters_on_meta():
        model = build(config)
    return model.eval()


class CheckpointWeights:
    """Tensors of a safetensors checkpoint by name: shapes from the headers, data on demand.

    A shard is memory-mapped only while a tensor is read from it: a mapping held open keeps every
    page read through it resident in this process, which grew a full-depth 7B export's resident
    memory by each layer's weights (docs/benchmarks.md, *Export*).
    """

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open

        self.directory = Path(directory)
        self._shard_of: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._shards = sorted(self.directory.glob("*.safetensors"))
        if not self._shards:
            raise UnsupportedModelError(f"{self.directory} holds no safetensors weights")
        for shard in self._shards:
            with safe_open(str(shard), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                    self._shard_of[key] = shard
                    self.shapes[key] = tuple(handle.get_slice(key).get_shape())

    def __contains__(self, key: str) -> bool:
        return key in self._shard_of

    def load(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._shard_of[key]), framework="pt") as handle:
            tensor = handle.get_tensor(key)
        return tensor.to(dtype) if tensor.dtype != dtype else tensor.clone()  # memory of its own

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self._shards)


class WeightLoader:
    """Matches a skeleton's parameters to checkpoint tensors and swaps them in and out."""

    def __init__(
        self, model: nn.Module, weights: CheckpointWeights, candidates, tied: dict[str, str]
    ) -> None:
        """`candidates(name)`: checkpoint keys a parameter may be stored under, in order of preference;
        `tied`: parameter -> parameter it shares its tensor with when the checkpoint omits it."""
        self.model = model
        self.weights = weights
        self.keys: dict[str, str] = {}
        names = dict(model.named_parameters(remove_duplicate=False))
        for name, param in names.items():
            key = next((k for k in candidates(name) if k in weights), None)
            if key is None and name in tied:
                key = next((k for k in candidates(tied[name]) if k in weights), None)
            if key is None:
                raise UnsupportedModelError(
                    f"the checkpoint at {weights.directory} has no tensor for {name} "
                    f"(looked for {', '.join(candidates(name))})"
                )
            if weights.shapes[key] != tuple(param.shape):
                raise UnsupportedModelError(
                    f"checkpoint tensor {key} has shape {list(weights.shapes[key])}, the model's {name} "
                    f"needs {list(param.shape)}"
                )
            self.keys[name] = key
        used = set(self.keys.values())
        self.unused = sorted(k for k in weights.shapes if k not in used)

    def parameter_bytes(self, modules: list[nn.Module]) -> int:
        return sum(p.numel() * p.element_size() for _, p in self._parameters(modules))

    def materialize(self, modules: list[nn.Module]) -> None:
        for (module, name), param in self._parameters(modules):
            tensor = self.weights.load(self.keys[self._qualified[id(module), name]], param.dtype)
            module._parameters[name] = nn.Parameter(tensor, requires_grad=False)

    def release(self, modules: list[nn.Module]) -> None:
        for (module, name), param in self._parameters(modules):
            module._parameters[name] = nn.Parameter(
                torch.empty_like(param, device="meta"), requires_grad=False
            )

    @property
    def _qualified(self) -> dict[tuple[int, str], str]:
        if not hasattr(self, "_names"):
            self._names = {}
            for prefix, module in self.model.named_modules(remove_duplicate=False):
                for name in module._parameters:
                    self._names[id(module), name] = f"{prefix}.{name}" if prefix else name
        return self._names

    def _parameters(self, modules: list[nn.Module]):
        seen = set()
        for root in modules:
            for module in root.modules():
                for name, param in module._parameters.items():
                    if param is not None and (id(module), name) not in seen:
                        seen.add((id(module), name))
                        yield (module, name), param


def tied_parameters(model: nn.Module) -> dict[str, str]:
    """lm_head.weight -> the input embedding's parameter name, where the config ties them."""
    ties = getattr(model, "_tied_weights_keys", None) or {}
    text = getattr(model.config, "text_config", model.config)
    if not getattr(text, "tie_word_embeddings", getattr(model.config, "tie_word_embeddings", False)):
        return {}
    return dict(ties) if isinstance(ties, dict) else {}


class OwnParameters:
    """A module's own parameters, not its children's, as a loader root: LLaVA-NeXT's
    `image_newline` sits on the model that also holds every layer."""

    def __init__(self, owner: nn.Module) -> None:
        self.owner = owner

    def modules(self) -> Iterator[nn.Module]:
        yield self.owner
