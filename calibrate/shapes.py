"""A procedural visual-question task: coloured shapes in the four quadrants of an image.

    python -m calibrate.shapes --out DIR --n N --seed S

writes DIR/images/*.png and DIR/data.jsonl, one {"image", "question", "answer"} object per line
(image paths relative to DIR) — the project's calibration/evaluation format. The same seed gives
the same files byte for byte.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from dyvte_rt.cli.commandline import new_parser, run_command
from dyvte_rt.errors import InputError

IMAGE_SIZE = 64
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
COUNT_WORDS = ("zero", "one", "two", "three")


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    position: str


def draw(shapes: tuple[Shape, ...], rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    half = IMAGE_SIZE // 2
    for shape in shapes:
        row, col = POSITIONS.index(shape.position) // 2, POSITIONS.index(shape.position) % 2
        size = rng.randint(22, 28)  # smaller circles and squares differ in too few 8x8 patches
        x0 = col * half + rng.randint(2, half - size - 2)
        y0 = row * half + rng.randint(2, half - size - 2)
        box = (x0, y0, x0 + size, y0 + size)
        fill = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLORS[shape.color])
        if shape.kind == "circle":
            pen.ellipse(box, fill=fill)
        elif shape.kind == "square":
            pen.rectangle(box, fill=fill)
        else:
            pen.polygon([(x0 + size / 2, y0), (x0, y0 + size), (x0 + size, y0 + size)], fill=fill)
    return image


def random_scene(rng: random.Random) -> tuple[Shape, ...]:
    count = rng.randint(1, 3)
    positions = rng.sample(POSITIONS, count)
    return tuple(
        Shape(rng.choice(SHAPES), rng.choice(list(COLORS)), p) for p in sorted(positions, key=POSITIONS.index)
    )


def questions(shapes: tuple[Shape, ...]) -> list[tuple[str, str]]:
    """Every question with a unique answer for this scene, as (question, answer).

    Shapes are looked up by position or by colour, never by kind: "find the triangle, then say its
    colour" asks a from-scratch model for shape search on top of shape recognition, which the
    demo's CPU training budget does not buy (such a model plateaued at ~64%).
    """
    qa = [("how many shapes are there?", COUNT_WORDS[len(shapes)])]
    by_position = {s.position: s for s in shapes}
    for position in POSITIONS:
        shape = by_position.get(position)
        qa.append((f"what shape is in the {position}?", shape.kind if shape else "nothing"))
        if shape:
            qa.append((f"what color is the shape in the {position}?", shape.color))
    for color in COLORS:
        same = [s for s in shapes if s.color == color]
        qa.append((f"how many {color} shapes are there?", COUNT_WORDS[len(same)]))
        if len(same) == 1:
            qa.append((f"where is the {color} shape?", same[0].position))
    return qa


def question_kind(question: str) -> str:
    """colour / shape / count / position, for balancing and per-kind accuracy."""
    if question.startswith("how many"):
        return "count"
    if question.startswith("where"):
        return "position"
    return "colour" if question.startswith("what color") else "shape"


def generate(
    n: int, seed: int, kind_weights: dict[str, float] | None = None
) -> list[tuple[tuple[Shape, ...], str, str, int]]:
    """n (scene, question, answer, drawing seed) tuples; question kinds are balanced unless
    `kind_weights` (kind -> weight, default 1) says otherwise."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = random_scene(rng)
        groups: dict[str, list[tuple[str, str]]] = {}
        for question, answer in questions(scene):
            groups.setdefault(question_kind(question), []).append((question, answer))
        kinds = sorted(groups)
        if kind_weights is None:
            kind = rng.choice(kinds)
        else:
            kind = rng.choices(kinds, weights=[kind_weights.get(k, 1.0) for k in kinds])[0]
        question, answer = rng.choice(groups[kind])
        out.append((scene, question, answer, rng.randrange(1 << 30)))
    return out


def write_dataset(out: Path, n: int, seed: int) -> Path:
    """Write `n` samples to out/images and out/data.jsonl; returns the JSONL path."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, (scene, question, answer, draw_seed) in enumerate(generate(n, seed)):
        name = f"images/{seed}_{index:06d}.png"
        draw(scene, random.Random(draw_seed)).save(out / name, optimize=False)
        lines.append(json.dumps({"image": name, "question": question, "answer": answer}))
    data = out / "data.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return data


def vocabulary() -> list[str]:
    """Every word the task's prompts and answers use (for the demo model's word-level tokenizer)."""
    words = [
        "user",
        "assistant",
        ":",
        "?",
        "nothing",
        "what",
        "shape",
        "shapes",
        "color",
        "is",
        "in",
        "the",
        "where",
        "how",
        "many",
        "are",
        "there",
    ]
    words += [*COLORS, *SHAPES, *COUNT_WORDS, *sorted({w for p in POSITIONS for w in p.split()})]
    return list(dict.fromkeys(words))


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(
        "python -m calibrate.shapes",
        "Write a coloured-shapes visual-question dataset (images/*.png + data.jsonl).",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="dataset directory")
    parser.add_argument("--n", type=int, default=1000, help="number of questions (one image each)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed writes the same files")
    return parser


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.n < 1:
            raise InputError("--n must be at least 1")
        path = write_dataset(args.out, args.n, args.seed)
        print(f"wrote {args.n} questions to {path}")

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
