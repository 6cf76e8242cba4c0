"""The reference with policy `never` is the plain Hugging Face model, token for token."""

import torch

from dyvte_rt.runtime.policy import NeverExit
from export.reference import DyVTEReference

MAX_NEW = 12


def _hf_greedy(model, prompt) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and each step's logits [steps, vocab] from Hugging Face `generate`."""
    out = model.generate(
        **prompt.inputs,
        do_sample=False,
        max_new_tokens=MAX_NEW,
        return_dict_in_generate=True,
        output_logits=True,
    )
    return out.sequences[0, prompt.input_ids.shape[1] :].tolist(), torch.cat(out.logits, dim=0)


def _reference_step_logits(reference, prompt, tokens) -> torch.Tensor:
    """Logits of every greedy step [steps, vocab], replaying `tokens` through prefill + decode."""
    result = reference.prefill(prompt.input_ids, prompt.pixel_values, NeverExit())
    steps = [result.logits[:, -1]]
    for offset, token in enumerate(tokens[:-1]):
        steps.append(
            reference.decode_one_token(torch.tensor([[token]]), result.n_tokens + offset, result.cache)
        )
    return torch.cat(steps, dim=0)


def test_never_matches_hf_generate_and_prefill_logits(loaded_models, backbone, prompt_factory):
    loaded = loaded_models[backbone]
    prompt = prompt_factory(loaded)
    reference = DyVTEReference(loaded.adapter)
    result = reference.generate(prompt.input_ids, prompt.pixel_values, NeverExit(), max_new_tokens=MAX_NEW)
    assert result.exit_layer is None
    hf_tokens, hf_step_logits = _hf_greedy(loaded.model, prompt)
    assert result.tokens == hf_tokens
    # Every decode step, not only its argmax: a constant answer must not hide a wrong KV cache.
    assert (_reference_step_logits(reference, prompt, result.tokens) - hf_step_logits).abs().max() <= 1e-4
    with torch.no_grad():
        hf_logits = loaded.model(**prompt.inputs).logits
    assert (result.prefill.logits - hf_logits).abs().max() <= 1e-4


def test_never_matches_hf_with_an_empty_question(loaded_models, backbone, prompt_factory):
    loaded = loaded_models[backbone]
    prompt = prompt_factory(loaded, question="")
    reference = DyVTEReference(loaded.adapter)
    result = reference.generate(prompt.input_ids, prompt.pixel_values, NeverExit(), max_new_tokens=MAX_NEW)
    assert result.tokens == _hf_greedy(loaded.model, prompt)[0]


def test_backbones_cover_mha_gqa_and_attention_biases(loaded_models):
    text = {name: lm.model.config.text_config for name, lm in loaded_models.items()}
    assert text["llama-mha"].num_key_value_heads == text["llama-mha"].num_attention_heads
    assert text["llama-gqa"].num_key_value_heads < text["llama-gqa"].num_attention_heads
    qwen_attn = loaded_models["qwen2"].adapter.decoder_layers[0].self_attn
    assert qwen_attn.q_proj.bias is not None
