"""Prompts for the Hugging Face side (reference, calibration, training, benchmarks, tests).

One function renders the checkpoint's chat template and runs its processor, so every torch-side
component sees exactly the token ids and pixels Hugging Face would; the torch-free runtime builds
its own prompts (`dyvte_rt.inputs.prompt`) and is tested against this.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from dyvte_rt.inputs.images import load_image


def conversation(question: str, with_image: bool = True) -> list[dict]:
    """One user turn in the processor's chat format: the image first, then the question."""
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def hf_inputs(processor, image: Image.Image | str | Path | None, question: str):
    """The processor's output (input_ids, attention_mask, pixel_values) for one question.

    `image` may be a path: it is opened as the runtime opens it (`dyvte_rt.images.load_image`:
    EXIF orientation applied, size limits checked), so calibration sees the runtime's pixels.
    """
    if image is not None and not isinstance(image, Image.Image):
        image = load_image(image)
    text = processor.apply_chat_template(
        conversation(question, image is not None), add_generation_prompt=True
    )
    if image is None:
        return processor(text=text, return_tensors="pt")
    return processor(images=image, text=text, return_tensors="pt")
