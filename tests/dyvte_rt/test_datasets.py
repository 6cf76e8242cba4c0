"""One way to read question sets: a bad row is refused with its place, never skipped silently."""

import json

import pytest

from dyvte_rt.errors import InputError
from dyvte_rt.inputs.datasets import read_examples, read_jsonl, read_llava_json


def test_jsonl_rows_become_examples_relative_to_the_file(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [
        {"image": "a.png", "question": "q1", "answer": "x"},
        {"image": "b.png", "question": "q2", "answer": "y"},
    ]
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    examples = read_jsonl(path)
    assert [(e.image, e.question, e.answer) for e in examples] == [
        (tmp_path / "a.png", "q1", "x"),
        (tmp_path / "b.png", "q2", "y"),
    ]
    assert len(read_jsonl(path, limit=1)) == 1
    for limit in (0, -1):  # -1 read one example
        with pytest.raises(InputError, match=f"--limit must be at least 1, not {limit}"):
            read_jsonl(path, limit=limit)
        with pytest.raises(InputError, match=f"--limit must be at least 1, not {limit}"):
            read_examples(path, limit=limit)


@pytest.mark.parametrize(
    "bad_row",
    [
        '{"image": "a.png", "question": "q"}',
        "not json",
        '["a", "b"]',
        '{"image": "a.png", "question": 3, "answer": "x"}',
    ],
)
def test_a_bad_jsonl_row_is_refused_with_its_line_number(tmp_path, bad_row):
    path = tmp_path / "data.jsonl"
    path.write_text('{"image": "a.png", "question": "q", "answer": "x"}\n' + bad_row + "\n")
    with pytest.raises(InputError, match=r"data\.jsonl:2 "):
        read_jsonl(path)


def test_llava_json_takes_the_first_turns_and_counts_text_only_chats(tmp_path):
    rows = [
        {
            "image": "coco/1.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"},
                {"from": "gpt", "value": " A cat. "},
            ],
        },
        {
            "id": "text-only",
            "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}],
        },
    ]
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(rows))
    examples, text_only = read_llava_json(path, image_root=tmp_path / "images")
    assert text_only == 1
    assert [(e.image, e.question, e.answer) for e in examples] == [
        (tmp_path / "images/coco/1.jpg", "What is it?", "A cat.")
    ]
    assert read_examples(path, tmp_path / "images") == examples


def test_a_malformed_llava_conversation_is_refused_with_its_index(tmp_path):
    rows = [
        {"image": "1.jpg", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"image": "2.jpg", "conversations": [{"from": "human", "value": "q"}]},
    ]
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(InputError, match=r"mix\.json\[1\] is not a LLaVA conversation"):
        read_examples(path)


def test_missing_and_empty_datasets(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_examples(tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InputError, match="holds no examples"):
        read_examples(tmp_path / "empty.jsonl")
