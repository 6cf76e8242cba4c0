"""The coloured-shapes task generator."""

import json
import random
import subprocess
import sys

import numpy as np
from PIL import Image

from calibrate.shapes import (
    POSITIONS,
    Shape,
    draw,
    generate,
    question_kind,
    questions,
    vocabulary,
    write_dataset,
)


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    a, b, c = (write_dataset(tmp_path / name, 25, seed) for name, seed in (("a", 5), ("b", 5), ("c", 6)))
    assert a.read_bytes() == b.read_bytes() and a.read_bytes() != c.read_bytes()
    for line in a.read_text().splitlines():
        image = json.loads(line)["image"]
        assert (tmp_path / "a" / image).read_bytes() == (tmp_path / "b" / image).read_bytes()


def test_hand_checked_answers():
    scene = (
        Shape("circle", "red", "top left"),
        Shape("triangle", "yellow", "top right"),
        Shape("circle", "red", "bottom right"),
    )
    qa = dict(questions(scene))
    assert qa["how many shapes are there?"] == "three"
    assert qa["what shape is in the top right?"] == "triangle"
    assert qa["what shape is in the bottom left?"] == "nothing"
    assert qa["what color is the shape in the bottom right?"] == "red"
    assert qa["where is the yellow shape?"] == "top right"
    assert qa["how many red shapes are there?"] == "two"
    assert qa["how many green shapes are there?"] == "zero"
    assert "where is the red shape?" not in qa  # two red shapes: no unique answer
    assert "what color is the shape in the bottom left?" not in qa  # nothing there


def test_drawn_shapes_sit_in_their_quadrant_with_their_colour():
    image = np.asarray(draw((Shape("square", "blue", "bottom left"),), random.Random(0)))
    painted = np.argwhere((image != 255).any(axis=-1))
    assert painted.size and painted[:, 0].min() >= 32 and painted[:, 1].max() < 32  # rows low, columns left
    blue = image[tuple(painted[len(painted) // 2])]
    assert blue[2] > 150 and blue[0] < 100


def test_task_covers_the_required_variety():
    samples = generate(3000, 11)
    colours = {s.color for scene, *_ in samples for s in scene}
    shapes = {s.kind for scene, *_ in samples for s in scene}
    counts = {len(scene) for scene, *_ in samples}
    positions = {s.position for scene, *_ in samples for s in scene}
    kinds = {question_kind(q) for _, q, _, _ in samples}
    assert len(colours) >= 4 and len(shapes) == 3 and counts == {1, 2, 3} and positions == set(POSITIONS)
    assert kinds == {"colour", "shape", "count", "position"}
    words = set(vocabulary())
    for _, question, answer, _ in samples:
        assert 1 <= len(answer.split()) <= 2
        assert set(question.replace("?", " ?").split()) | set(answer.split()) <= words


def test_cli_writes_the_jsonl_format(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "calibrate.shapes", "--out", str(tmp_path), "--n", "3", "--seed", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (tmp_path / "data.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(set(r) == {"image", "question", "answer"} for r in rows)
    assert Image.open(tmp_path / rows[0]["image"]).size == (64, 64)
