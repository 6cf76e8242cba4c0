"""dyvte-rt runtime: runs exported DyVTE bundles with numpy + ONNX Runtime / TensorRT.

This package must never import torch or transformers (a test enforces it).
"""

from dyvte_rt.errors import DyvteError
from dyvte_rt.runtime.compute import DecoderDims, PrefillMacs, layer_macs, prefill_macs
from dyvte_rt.runtime.policy import ExitPolicy, FixedLayerExit, NeverExit, RouterExit, parse_policy

__version__ = "0.1.0"

__all__ = [
    "DecoderDims",
    "DyvteError",
    "ExitPolicy",
    "FixedLayerExit",
    "NeverExit",
    "PrefillMacs",
    "RouterExit",
    "__version__",
    "layer_macs",
    "parse_policy",
    "prefill_macs",
]
