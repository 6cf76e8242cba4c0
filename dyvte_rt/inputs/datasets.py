"""Question sets on disk: the project's JSONL and the LLaVA conversation JSON, read one way.

A row that cannot be used is refused with its line (JSONL) or index (JSON), never skipped
silently. The one deliberate exception: LLaVA conversations without an image (text-only chats in
mixes such as llava_v1_5_mix665k) are left out, because they carry no visual tokens; the count of
those is returned with the examples.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dyvte_rt.errors import InputError


@dataclass(frozen=True)
class Example:
    image: Path
    question: str
    answer: str


def read_jsonl(path: Path, limit: int | None = None) -> list[Example]:
    """{"image", "question", "answer"} per line; image paths relative to the file's directory."""
    _check_limit(limit)
    path = Path(path)
    if not path.is_file():
        raise InputError(f"dataset {path} does not exist")
    examples = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                example = _example(path.parent, row["image"], row["question"], row["answer"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise InputError(
                    f"{path}:{number} is not an {{'image', 'question', 'answer'}} JSON object ({err})"
                ) from None
            examples.append(example)
            if limit is not None and len(examples) >= limit:
                break
    if not examples:
        raise InputError(f"dataset {path} holds no examples")
    return examples


def read_llava_json(
    path: Path, image_root: Path | None = None, limit: int | None = None
) -> tuple[list[Example], int]:
    """LLaVA conversations -> (examples from each one's first question/answer pair, text-only skipped)."""
    _check_limit(limit)
    path = Path(path)
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"{path} is neither JSONL nor valid JSON: {err}") from None
    if not isinstance(rows, list):
        raise InputError(f"{path} must hold a list of LLaVA conversations")
    root = image_root or path.parent
    examples, text_only = [], 0
    for index, row in enumerate(rows):
        if isinstance(row, dict) and "image" not in row:
            text_only += 1
            continue
        try:
            turns = row["conversations"]
            question = next(t["value"] for t in turns if t["from"] == "human")
            answer = next(t["value"] for t in turns if t["from"] == "gpt")
            example = _example(root, row["image"], _text(question).replace("<image>", ""), answer)
        except (KeyError, TypeError, StopIteration) as err:
            raise InputError(
                f"{path}[{index}] is not a LLaVA conversation with a human and a gpt turn "
                f"({type(err).__name__}: {err})"
            ) from None
        examples.append(example)
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise InputError(f"{path} holds no conversations with an image and a question/answer pair")
    return examples, text_only


def read_examples(path: Path, image_root: Path | None = None, limit: int | None = None) -> list[Example]:
    """JSONL (`.jsonl`) or LLaVA conversation JSON (anything else)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"dataset {path} does not exist")
    if path.suffix == ".jsonl":
        return read_jsonl(path, limit)
    return read_llava_json(path, image_root, limit)[0]


def _example(root: Path, image: object, question: object, answer: object) -> Example:
    return Example(root / _text(image), _text(question).strip(), _text(answer).strip())


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _check_limit(limit: int | None) -> None:
    """A limit reads the first `limit` examples: below 1 it would read none (or, sliced, the wrong ones)."""
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, not {limit}")
