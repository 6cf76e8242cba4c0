"""Helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations


def routers_firing_at(hidden: int, layers, fire_at: int, p_exit: float = 0.99):
    """A RouterBank whose routers ignore their input: p(exit) = p_exit at `fire_at`, 1 - p_exit elsewhere."""
    from export.reference.routers import constant_routers

    return constant_routers(hidden, layers, fire_at, width=4, p_exit=p_exit)
