"""Errors a backend raises; the runtime turns them into its own user-facing errors.

`engines` never imports the runtime (`dyvte_rt` depends on `engines`, not the other way round), so
it has its own small exception type carrying the same message-and-hint pair.
"""

from __future__ import annotations


class BackendError(Exception):
    """A backend cannot do what was asked: not installed, a damaged graph, a failed run."""

    def __init__(self, message: str, hint: str | None = None, unavailable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.unavailable = unavailable  # True: the backend or device is missing, not the graph

    def __str__(self) -> str:
        return self.message if self.hint is None else f"{self.message} (hint: {self.hint})"
