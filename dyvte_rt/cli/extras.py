"""Optional extras, checked before a command starts its work: a missing one is one line naming the
extra to install, never a traceback minutes into an export or a training run."""

from __future__ import annotations

import importlib.util

from dyvte_rt.errors import DyvteError

# extra -> the import names it provides (pyproject.toml's optional dependencies)
EXTRAS: dict[str, tuple[str, ...]] = {
    "export": ("torch", "transformers", "onnx", "onnxscript", "safetensors"),
    "calibrate": ("torch", "transformers", "onnx", "onnxscript", "safetensors", "matplotlib"),
    "serve": ("starlette", "uvicorn", "prometheus_client"),
    "ray": ("ray", "starlette", "uvicorn", "prometheus_client"),
    "peers": ("onnxruntime_genai", "llama_cpp", "gguf"),
}


class MissingExtraError(DyvteError):
    """A command needs an optional extra that is not installed."""


def require(extra: str, command: str) -> None:
    """Raise MissingExtraError unless every package of `extra` can be imported."""
    missing = [name for name in EXTRAS[extra] if not _installed(name)]
    if missing:
        raise MissingExtraError(
            f"{command} needs the [{extra}] extra ({', '.join(missing)} not installed)",
            hint=f"pip install 'dyvte-rt[{extra}]'",
        )


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken or half-removed installation
        return False


def extra_of(module: str | None) -> str | None:
    """The extra that provides the top-level package of `module` (None: not an optional one)."""
    top = (module or "").split(".")[0]
    return next((extra for extra, names in EXTRAS.items() if top in names), None)
