"""The PyTorch reference with policy `never` is the plain Hugging Face model: the same greedy
tokens, and every step's logits within 1e-4 (a constant answer must not hide a wrong KV cache)."""

import torch

from dyvte_rt.runtime.policy import NeverExit
from export.prompting import hf_inputs
from export.reference import DyVTEReference
from tests.conformance.conftest import QUESTION

MAX_NEW = 8


def _hf_greedy(model, inputs) -> tuple[list[int], torch.Tensor]:
    """Hugging Face `generate`'s greedy tokens and each step's logits [steps, vocab]."""
    out = model.generate(
        **inputs, do_sample=False, max_new_tokens=MAX_NEW, return_dict_in_generate=True, output_logits=True
    )
    return out.sequences[0, inputs["input_ids"].shape[1] :].tolist(), torch.cat(out.logits, dim=0)


def _reference_steps(reference, input_ids, image, tokens) -> torch.Tensor:
    """The reference's logits at every step of `tokens` [steps, vocab] (prefill, then decoding)."""
    result = reference.prefill(input_ids, image, NeverExit())
    steps = [result.logits[:, -1]]
    for offset, token in enumerate(tokens[:-1]):
        steps.append(
            reference.decode_one_token(torch.tensor([[token]]), result.n_tokens + offset, result.cache)
        )
    return torch.cat(steps, dim=0)


def test_never_is_hugging_face_token_for_token(loaded, images):
    reference = DyVTEReference(loaded.adapter)
    names = list(images)[:2]
    prompts = [(name, images[name], QUESTION) for name in names] + [("text only", None, QUESTION)]
    prompts.append(("empty question", images[names[0]], ""))
    for name, image, question in prompts:
        inputs = hf_inputs(loaded.processor, image, question)
        pixels = loaded.adapter.image_input(inputs).to(loaded.model.dtype) if image is not None else None
        with torch.no_grad():
            tokens, hf_steps = _hf_greedy(loaded.model, inputs)
            generated = reference.generate(inputs["input_ids"], pixels, NeverExit(), max_new_tokens=MAX_NEW)
            assert generated.exit_layer is None
            assert generated.tokens == tokens[: len(generated.tokens)], name
            ours = _reference_steps(reference, inputs["input_ids"], pixels, tokens)
        assert float((ours - hf_steps[: len(ours)]).abs().max()) <= 1e-4, name


def test_the_adapter_reports_the_decoder_it_wraps(loaded):
    text = loaded.model.config.text_config
    dims = loaded.adapter.dims
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    assert dims.num_layers == text.num_hidden_layers == len(loaded.adapter.decoder_layers)
    assert dims.kv_width == text.num_key_value_heads * head_dim and dims.hidden == text.hidden_size


def test_the_llava_decoders_cover_mha_gqa_attention_biases_and_an_odd_head_size():
    from export.loading import load_checkpoint
    from tests.conformance.cases import CASES
    from tests.conftest import tiny_checkpoint

    llava = {
        c.variant: load_checkpoint(str(tiny_checkpoint(c.family, c.variant, c.seed)))
        for c in CASES
        if c.family == "llava"
    }
    text = {name: loaded.model.config.text_config for name, loaded in llava.items()}
    assert text["llama-mha"].num_key_value_heads == text["llama-mha"].num_attention_heads
    assert text["llama-gqa"].num_key_value_heads < text["llama-gqa"].num_attention_heads
    assert llava["qwen2"].adapter.decoder_layers[0].self_attn.q_proj.bias is not None
    assert (text["llama-head12"].hidden_size // text["llama-head12"].num_attention_heads) % 8 != 0
