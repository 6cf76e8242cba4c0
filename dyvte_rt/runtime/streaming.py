"""An answer's text as its tokens arrive: one helper for the Python API and the server alike."""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class AnswerPieces:
    """Text pieces for one token at a time (tokenizers' `DecodeStream`: no re-decoding of the whole
    answer, no dropped pieces), the answer's leading space dropped: it follows the prompt's."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._started = False

    def step(self, token: int) -> str:
        piece = self._stream.step(self._tokenizer, token) or ""
        if not self._started:
            piece = piece.lstrip()
            self._started = bool(piece)
        return piece
