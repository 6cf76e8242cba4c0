"""Helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations


def routers_firing_at(hidden: int, layers, fire_at: int, p_exit: float = 0.99):
    """A RouterBank whose routers ignore their input: p(exit) = p_exit at `fire_at`, 1 - p_exit elsewhere."""
    import torch

    from export.reference import RouterBank

    bank = RouterBank(hidden, layers, width=4)
    logit = torch.logit(torch.tensor(p_exit)).item()
    with torch.no_grad():
        for k in bank.layers:
            first, last = bank.routers[str(k)].net[0], bank.routers[str(k)].net[2]
            first.weight.zero_()
            first.bias.zero_()
            last.weight.zero_()
            last.bias.copy_(torch.tensor([0.0, logit if k == fire_at else -logit]))
    return bank
