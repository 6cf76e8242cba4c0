"""DyVTE routers: one tiny classifier per candidate layer, reading the text tokens' states.

The reference router is 2d→2048→2 (`width=2048`); `width=0` gives a single linear layer. The
width is a parameter because the paper's choice costs ~1 GB for a 7B model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dyvte_rt.errors import DyvteError
from dyvte_rt.runtime.features import text_feature_positions

ROUTERS_FORMAT = "dyvte-routers/1"


class Router(nn.Module):
    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        if width > 0:
            self.net = nn.Sequential(nn.Linear(2 * hidden, width), nn.GELU(), nn.Linear(width, 2))
        else:
            self.net = nn.Sequential(nn.Linear(2 * hidden, 2))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)  # [B, 2D] -> [B, 2]; class 1 = "exit"


class RouterBank(nn.Module):
    """Routers for a set of layers; router k reads the output of decoder layer k."""

    def __init__(self, hidden: int, layers: Iterable[int], width: int = 2048, threshold: float = 0.5) -> None:
        super().__init__()
        self.hidden = hidden
        self.width = width
        self.threshold = threshold
        self.layers = tuple(sorted(set(int(k) for k in layers)))
        self.routers = nn.ModuleDict({str(k): Router(hidden, width) for k in self.layers})

    def logits(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        return self.routers[str(layer)](features)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save(self, path: str | Path) -> None:
        meta = {
            "format": ROUTERS_FORMAT,
            "hidden": str(self.hidden),
            "width": str(self.width),
            "threshold": repr(float(self.threshold)),
            "layers": json.dumps(list(self.layers)),
        }
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> RouterBank:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
        except (OSError, SafetensorError) as err:
            raise DyvteError(f"cannot read routers file {path}: {err}") from None
        if meta.get("format") != ROUTERS_FORMAT:
            raise DyvteError(
                f"{path} is not a dyvte routers file (format {meta.get('format')!r})",
                hint="produce one with `python -m calibrate.routers`",
            )
        bank = cls(
            hidden=int(meta["hidden"]),
            layers=json.loads(meta["layers"]),
            width=int(meta["width"]),
            threshold=float(meta["threshold"]),
        )
        bank.load_state_dict(load_file(str(path)), strict=True)
        return bank


def constant_routers(
    hidden: int, layers: Iterable[int], fire_at: int, width: int = 4, p_exit: float = 0.99
) -> RouterBank:
    """Routers that ignore their input: p(exit) = p_exit at `fire_at`, 1 - p_exit elsewhere.

    For tests (a known exit layer) and benchmarks of untrained models (the router's cost at a given
    width, with the exit where the benchmark wants it).
    """
    bank = RouterBank(hidden, layers, width=width)
    logit = torch.logit(torch.tensor(p_exit)).item()
    with torch.no_grad():
        for k in bank.layers:
            for module in bank.routers[str(k)].net:
                if isinstance(module, nn.Linear):
                    module.weight.zero_()
                    module.bias.zero_()
            bank.routers[str(k)].net[-1].bias.copy_(torch.tensor([0.0, logit if k == fire_at else -logit]))
    return bank


def feature_positions(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Indices averaged by the router features (docs/exit-semantics.md), for a batch-1 prompt [1, N]."""
    return torch.from_numpy(text_feature_positions(input_ids[0].cpu().numpy(), image_token_id))


def router_features(hidden: torch.Tensor, mean_positions: torch.Tensor) -> torch.Tensor:
    """f_k = concat(mean(h_k[text_after_image[:-1]]), h_k[last]): [B, N, D] -> [B, 2D]."""
    pooled = hidden[:, mean_positions].mean(dim=1)  # [B, D]
    last = hidden[:, -1]  # [B, D]
    return torch.cat([pooled, last], dim=-1)
