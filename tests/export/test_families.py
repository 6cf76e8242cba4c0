"""Guards on the family registry."""

from export.families import FAMILIES
from export.tiny_models import TINY_BACKBONES, TINY_MODELS_BY_FAMILY, TINY_QWEN_VL


def test_every_registered_family_has_a_tiny_test_model():
    families = {adapter.family for adapter in FAMILIES.values()}
    missing = sorted(f for f in families if not TINY_MODELS_BY_FAMILY.get(f))
    assert not missing, f"registered families without a tiny test model: {missing}"
    for backbones in TINY_MODELS_BY_FAMILY.values():
        assert set(backbones) <= {*TINY_BACKBONES, *TINY_QWEN_VL}


def test_adapters_report_decoder_dims(loaded_models):
    for name, loaded in loaded_models.items():
        text = loaded.model.config.text_config
        dims = loaded.adapter.dims
        assert dims.num_layers == text.num_hidden_layers == len(loaded.adapter.decoder_layers), name
        assert dims.kv_width == text.num_key_value_heads * (text.hidden_size // text.num_attention_heads), (
            name
        )
