"""The one family of exceptions for user mistakes.

Every entry point runs through `dyvte_rt.commandline.run_command`, which prints a `DyvteError` as
a single line with its hint and exits with status 1; anything else escaping is a bug in dyvte-rt,
not in the user's input.
"""

from __future__ import annotations


class DyvteError(Exception):
    """A problem the user can fix: bad input, a missing model, a damaged bundle."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        text = self.message if self.hint is None else f"{self.message} (hint: {self.hint})"
        return " ".join(text.split())

    def __str__(self) -> str:
        return self.one_line()


class ModelNotFoundError(DyvteError):
    """A checkpoint could not be found locally (no download is ever attempted)."""


class UnsupportedModelError(DyvteError):
    """A checkpoint exists but its architecture or configuration is not supported."""


class PolicyError(DyvteError):
    """An exit policy string or threshold is malformed or does not fit the model."""


class InputError(DyvteError):
    """A request (image, question, options) cannot be processed as given."""


class BackendUnavailableError(DyvteError):
    """The backend or device asked for is not installed or cannot run here."""
