"""Calibration data: the project's JSONL format, or the LLaVA conversation JSON the reference
implementation trains on ({"image", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}]}; the first question/answer pair of each conversation is used)."""

from __future__ import annotations

import json
from pathlib import Path

from dyvte_rt.errors import InputError
from dyvte_rt.evaluate import Example, read_jsonl


def read_examples(path: Path, image_root: Path | None = None, limit: int | None = None) -> list[Example]:
    if not path.is_file():
        raise InputError(f"calibration data {path} does not exist")
    if path.suffix == ".jsonl":
        return read_jsonl(path, limit)
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"{path} is neither JSONL nor valid JSON: {err}") from None
    if not isinstance(rows, list):
        raise InputError(f"{path} must hold a list of LLaVA conversations")
    root = image_root or path.parent
    examples = []
    for row in rows:
        try:
            turns = row["conversations"]
            question = next(t["value"] for t in turns if t["from"] == "human")
            answer = next(t["value"] for t in turns if t["from"] == "gpt")
            image = row["image"]
        except (KeyError, TypeError, StopIteration):
            continue  # text-only or malformed conversations carry no visual-token signal
        question = question.replace("<image>", "").strip()
        examples.append(Example(root / image, question, answer.strip()))
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise InputError(f"{path} holds no conversations with an image and a question/answer pair")
    return examples
