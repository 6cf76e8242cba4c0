"""dyvte-rt runtime: runs exported DyVTE bundles with numpy + ONNX Runtime / TensorRT.

The names a user needs are exported here: `from dyvte_rt import DyvteModel, demo_bundle_dir`.
The heavier ones (the model, which loads the engine packages) are imported on first use, so
`import dyvte_rt` stays cheap for the CLI's `--help`.

This package must never import torch or transformers (a test enforces it).
"""

from importlib import import_module
from typing import Any

from dyvte_rt.errors import DyvteError
from dyvte_rt.runtime.compute import DecoderDims, PrefillMacs, layer_macs, prefill_macs
from dyvte_rt.runtime.policy import ExitPolicy, FixedLayerExit, NeverExit, RouterExit, parse_policy

__version__ = "0.1.0"

# public name -> module that defines it, imported when the name is first read
_LAZY = {
    "Answer": "dyvte_rt.api.answer",
    "Conversation": "dyvte_rt.api.conversation",
    "DyvteModel": "dyvte_rt.api.model",
    "Generation": "dyvte_rt.api.answer",
    "SamplingConfig": "dyvte_rt.runtime.sampling",
    "default_bundle": "dyvte_rt.bundle.locations",
    "demo_bundle_dir": "dyvte_rt.bundle.locations",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dyvte_rt' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Answer",
    "Conversation",
    "DecoderDims",
    "DyvteError",
    "DyvteModel",
    "ExitPolicy",
    "FixedLayerExit",
    "Generation",
    "NeverExit",
    "PrefillMacs",
    "RouterExit",
    "SamplingConfig",
    "__version__",
    "default_bundle",
    "demo_bundle_dir",
    "layer_macs",
    "parse_policy",
    "prefill_macs",
]
