"""Training the bundled demo model (`python -m calibrate.train_demo`): a small LLaVA-architecture
model on the coloured-shapes task.

Deterministic (fixed seeds, fixed step count, 2 CPU threads). Training data are drawn fresh each
step from `calibrate.shapes` with a training seed; evaluation uses a different seed.

Early fusion: a plainly trained small model reads the image until its last layer, unlike large
MLLMs. For a random half of each batch we pick an exit layer K and hide the visual keys from the
text tokens in layers > K (exactly equivalent to removing the visual tokens, which the reference
tests prove), so the model learns to move what it needs from the image into the text tokens
early. The demo's savings therefore come from this training recipe, not from LLaVA's behaviour.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from calibrate.shapes import draw, generate, question_kind, vocabulary
from calibrate.train_demo import Phase, TrainConfig
from dyvte_rt.inputs.preprocess import preprocess
from export.families.llava import LlavaAdapter, llama_decoder, new_llava
from export.manifest_builder import image_preprocess
from export.prompting import hf_inputs
from export.reference.masks import additive
from export.reference.model import merge_image_features
from export.tiny_models import TinySpec

DEMO_SPEC = TinySpec(
    image_size=64,
    patch_size=8,
    vision_hidden=96,
    vision_layers=3,
    vision_heads=4,
    vision_mlp=192,
    max_positions=256,
    hidden=128,
    heads=4,
    kv_heads=4,
    layers=6,
    mlp=256,
    init_std=0.02,
    head_std=0.02,
)


class Batcher:
    """Turns (image, question, answer) samples into padded tensors; caches token ids per string."""

    def __init__(self, processor, adapter: LlavaAdapter) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.preprocess = image_preprocess(processor.image_processor)
        self.pad = self.tokenizer.pad_token_id
        self.eos = self.tokenizer.eos_token_id
        self._prompt_ids: dict[str, list[int]] = {}
        self._answer_ids: dict[str, list[int]] = {}

    def prompt_ids(self, question: str) -> list[int]:
        if question not in self._prompt_ids:
            dummy = Image.new("RGB", (64, 64))
            self._prompt_ids[question] = hf_inputs(self.processor, dummy, question)["input_ids"][0].tolist()
        return self._prompt_ids[question]

    def answer_ids(self, answer: str) -> list[int]:
        if answer not in self._answer_ids:
            self._answer_ids[answer] = [*self.tokenizer.encode(answer, add_special_tokens=False), self.eos]
        return self._answer_ids[answer]

    def __call__(self, samples) -> dict[str, torch.Tensor]:
        rows, targets, pixels = [], [], []
        for scene, question, answer, draw_seed in samples:
            prompt, reply = self.prompt_ids(question), self.answer_ids(answer)
            rows.append(prompt + reply)
            targets.append([-100] * (len(prompt) - 1) + reply + [-100])  # predict reply from position N-1
            pixels.append(preprocess(draw(scene, random.Random(draw_seed)), self.preprocess)[0])
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (row, target) in enumerate(zip(rows, targets, strict=True)):
            ids[i, : len(row)] = torch.tensor(row)
            labels[i, : len(target)] = torch.tensor(target)[:width]
        return {"input_ids": ids, "labels": labels, "pixel_values": torch.from_numpy(np.stack(pixels))}


def forward(adapter: LlavaAdapter, batch: dict[str, torch.Tensor], exit_after: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, vocab]; sample b's visual keys are hidden from text queries after layer exit_after[b]."""
    ids = batch["input_ids"]  # [B, T]
    image_id = adapter.image_token_id
    embeds = adapter.embed_tokens(ids.masked_fill(ids == image_id, 0))
    hidden = merge_image_features(embeds, ids, adapter.image_features(batch["pixel_values"]), image_id)
    t = ids.shape[1]
    positions = torch.arange(t)[None].expand(ids.shape[0], -1)  # [B, T]
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))[None, None]  # [1, 1, T, T]
    visual_key = (ids == image_id)[:, None, None, :]  # [B, 1, 1, T]
    text_only = causal & (~visual_key | torch.eye(t, dtype=torch.bool))  # [B, 1, T, T]
    full_mask, exit_mask = additive(causal, hidden.dtype), additive(text_only, hidden.dtype)
    cos_sin = adapter.rotary(hidden, positions)
    for index, layer in enumerate(adapter.decoder_layers):
        exited = (exit_after < index)[:, None, None, None]  # [B, 1, 1, 1]
        mask = torch.where(exited, exit_mask, full_mask)
        hidden = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=cos_sin)
    return adapter.head(hidden)


NO_EXIT = 10_000  # an exit layer beyond the last: the full model


def run_phase(
    config: TrainConfig, phase: Phase, number: int, adapter, batcher, evaluation, log, started
) -> None:
    model = adapter.model
    layers = DEMO_SPEC.layers
    data = generate(phase.steps * config.batch, config.seed + phase.data_seed, dict(config.kind_weights))
    optimizer = torch.optim.AdamW(model.parameters(), lr=phase.lr, weight_decay=0.01, betas=(0.9, 0.98))
    rng = torch.Generator().manual_seed(config.seed + phase.data_seed)
    for step in range(phase.steps):
        lr = (
            phase.lr
            * min(1.0, (step + 1) / config.warmup)
            * 0.5
            * (1 + math.cos(math.pi * step / phase.steps))
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = batcher(data[step * config.batch : (step + 1) * config.batch])
        exits = torch.randint(phase.min_exit_layer, layers - 1, (config.batch,), generator=rng)
        keep_full = torch.rand(config.batch, generator=rng) >= config.exit_fraction
        exits = torch.where(keep_full, torch.full_like(exits, NO_EXIT), exits)
        logits = forward(adapter, batch, exits)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == phase.steps - 1:
            entry = {
                "phase": number + 1,
                "step": step,
                "loss": round(loss.item(), 4),
                "lr": lr,
                "minutes": round((time.perf_counter() - started) / 60, 2),
            }
            if step % 1000 == 0 and step:  # progress check on a slice of the held-out set
                model.eval()
                entry["eval200_never"] = exact_match(adapter, batcher, evaluation[:200], None)
                entry["eval200_exit1"] = exact_match(adapter, batcher, evaluation[:200], 1)
                model.train()
            log.append(entry)
            print(json.dumps(entry), flush=True)


@torch.no_grad()
def exact_match(adapter, batcher, samples, exit_layer: int | None, batch: int = 100) -> float:
    """Share of samples whose answer tokens (EOS included) are all argmax under teacher forcing —
    the same as greedy generation getting the answer exactly."""
    correct = 0
    for start in range(0, len(samples), batch):
        data = batcher(samples[start : start + batch])
        k = NO_EXIT if exit_layer is None else exit_layer
        logits = forward(adapter, data, torch.full((data["input_ids"].shape[0],), k))
        labels = data["labels"]
        ok = (logits.argmax(-1) == labels) | (labels == -100)
        correct += int(ok.all(dim=1).sum())
    return correct / len(samples)


def train(config: TrainConfig) -> dict:
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    model, processor = new_llava(llama_decoder, DEMO_SPEC, vocabulary(), seed=config.seed)
    if config.init is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(config.init / "model.safetensors")), strict=True)
    model.train()
    adapter = LlavaAdapter(model)
    batcher = Batcher(processor, adapter)
    evaluation = generate(config.eval_n, config.eval_seed)
    started, log = time.perf_counter(), []
    for number, phase in enumerate(config.phases):
        if number < config.first_phase:
            continue
        run_phase(config, phase, number, adapter, batcher, evaluation, log, started)
    model.eval()
    layers = DEMO_SPEC.layers
    accuracy = {"never": exact_match(adapter, batcher, evaluation, None)}
    by_kind = {}
    for kind in ("colour", "shape", "count", "position"):
        subset = [e for e in evaluation if question_kind(e[1]) == kind]
        by_kind[kind] = {
            "n": len(subset),
            "never": exact_match(adapter, batcher, subset, None),
            "exit after layer 1": exact_match(adapter, batcher, subset, 1),
        }
    for k in range(layers - 1):
        accuracy[f"exit after layer {k}"] = exact_match(adapter, batcher, evaluation, k)
    config.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(config.out, safe_serialization=True)
    processor.save_pretrained(config.out)
    report = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "spec": asdict(DEMO_SPEC),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_minutes": round((time.perf_counter() - started) / 60, 1),
        "eval_accuracy": accuracy,
        "eval_accuracy_by_kind": by_kind,
        "log": log,
    }
    (config.out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
