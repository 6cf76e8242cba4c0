"""Prompt rendering and tokenization without transformers.

The chat template is the checkpoint's own jinja template, rendered in the same sandboxed jinja
environment transformers uses; the image placeholder is expanded to one token per visual token,
as the LLaVA processors do (a count per image for any-resolution models); `tokenizers` encodes the result.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import numpy as np
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from dyvte_rt.bundle.manifest import Manifest
from dyvte_rt.errors import InputError
from dyvte_rt.families import family_for


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (HF's assistant-mask marker) renders its body."""

    tags = {"generation"}  # noqa: RUF012 - jinja's Extension API

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: jinja2.runtime.Macro) -> str:
        return caller()


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: (
        json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    )
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class PromptBuilder:
    """question (+ one image) -> prompt token ids [1, N], ready for `Pipeline.prefill`."""

    def __init__(self, manifest: Manifest, tokenizer_file: Path) -> None:
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.template = _environment().from_string(manifest.chat_template)
        self.tokens = manifest.tokens
        self.image_text = family_for(manifest).image_text  # how the image's placeholder expands
        self.visual_tokens = manifest.vision.visual_tokens
        self.max_positions = manifest.dims.max_positions
        self._special = {
            name: self.tokenizer.id_to_token(token_id)
            for name, token_id in (("bos_token", manifest.tokens.bos), ("pad_token", manifest.tokens.pad))
            if token_id is not None
        }
        if manifest.tokens.eos:
            self._special["eos_token"] = self.tokenizer.id_to_token(manifest.tokens.eos[0])

    def render(self, question: str, with_image: bool = True) -> str:
        return self.render_turns([(question, None)], with_image)

    def render_turns(
        self, turns: list[tuple[str, str | None]], with_image: bool, add_generation_prompt: bool = True
    ) -> str:
        """A conversation of (question, answer) turns (the image in the first question); the last
        answer may be None (the model's turn comes next)."""
        messages = []
        for index, (question, answer) in enumerate(turns):
            image = [{"type": "image"}] if with_image and index == 0 else []
            messages.append({"role": "user", "content": [*image, {"type": "text", "text": question}]})
            if answer is not None:
                messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return self.template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self._special
        )

    def encode_next_turn(self, history: list[tuple[str, str]], question: str, with_image: bool) -> np.ndarray:
        """Token ids [1, M] a conversation adds for a new question after `history` (text the template
        puts after the last answer, then the question and the generation prompt)."""
        before = self.render_turns(history, with_image, add_generation_prompt=False)
        after = self.render_turns([*history, (question, None)], with_image, add_generation_prompt=True)
        if not after.startswith(before):
            raise InputError("this model's chat template does not render a conversation turn by turn")
        ids = self.tokenizer.encode(after[len(before) :], add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int64)[None]

    def encode(self, question: str, with_image: bool = True, visual_tokens: int | None = None) -> np.ndarray:
        return self.encode_turns([(question, None)], with_image, visual_tokens)

    def encode_turns(
        self, turns: list[tuple[str, str | None]], with_image: bool, visual_tokens: int | None = None
    ) -> np.ndarray:
        """A whole conversation (the image in its first question), ready to prefill -> [1, N].
        `visual_tokens`: the image's count where it depends on the image (PreparedImage.visual_tokens);
        None: the bundle's fixed count."""
        count = self.visual_tokens if visual_tokens is None else visual_tokens
        text = self.render_turns(turns, with_image)
        placeholder = self.tokens.image_placeholder
        text = text.replace(placeholder, self.image_text(placeholder, count))
        ids = np.asarray(self.tokenizer.encode(text, add_special_tokens=True).ids, dtype=np.int64)[None]
        if with_image and int((ids == self.tokens.image).sum()) != count:
            raise InputError("the rendered prompt does not hold the image placeholder the model expects")
        return ids

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)
