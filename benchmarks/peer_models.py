"""Build each peer's model from one llava-hf checkpoint's language model, cached by checkpoint.

- `language_model_dir`: the decoder as a standalone Hugging Face causal LM (config + safetensors +
  tokenizer), the input ONNX Runtime GenAI's model builder takes;
- `ort_genai_model`: ONNX Runtime GenAI's own model builder on it (fp32, int8 or int4);
- `gguf_model`: the same weights written as GGUF with the `gguf` package (F32/F16) and quantised by
  llama.cpp itself (Q8_0, Q4_0) through llama-cpp-python;
- `mmproj_model`: the checkpoint's CLIP tower and projector as llama.cpp's image encoder (mmproj
  GGUF, F16 or F32), written by the converter llama.cpp ships for LLaVA-1.5
  (`tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py`), taken from the sources inside the
  installed llama-cpp-python's sdist; for Qwen2-VL / Qwen2.5-VL by llama.cpp's main converter
  (`convert_hf_to_gguf.py --mmproj`), unchanged, on the checkpoint itself;
- `qwen2vl_gguf_model`: a Qwen2(.5)-VL checkpoint's decoder as llama.cpp's `qwen2vl` architecture
  (attention biases, multimodal rotary sections), written with `gguf` like the Llama one.

Nothing here is hand-tuned per peer: each gets its own tool's defaults except where equal conditions
require a setting (thread count, block size), and every choice is recorded in the harness output.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from importlib.metadata import version
from pathlib import Path

CAUSAL_LM = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


# llava-hf checkpoints name the decoder's tensors one of two ways (saved by transformers 4 or 5)
_LANGUAGE_PREFIXES = {
    "language_model.model.": "model.",
    "model.language_model.": "model.",
    "language_model.lm_head.": "lm_head.",
    "lm_head.": "lm_head.",
    # Qwen2(.5)-VL as the hub stores it: the decoder at the top level beside `visual.`
    "model.layers.": "model.layers.",
    "model.embed_tokens.": "model.embed_tokens.",
    "model.norm.": "model.norm.",
}


def language_model_name(name: str) -> str | None:
    """A llava-hf tensor name as the standalone causal LM names it; None for vision/projector tensors."""
    for prefix, replacement in _LANGUAGE_PREFIXES.items():
        if name.startswith(prefix):
            return replacement + name.removeprefix(prefix)
    return None


def checkpoint_key(checkpoint: Path) -> str:
    """A short key that changes when the checkpoint's weights or config change."""
    digest = hashlib.sha256()
    for path in [*sorted(checkpoint.glob("*.safetensors")), checkpoint / "config.json"]:
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]


def language_model_dir(checkpoint: Path, cache: Path) -> Path:
    """The llava-hf checkpoint's decoder and LM head as a plain causal LM directory."""
    out = cache / f"lm-{checkpoint_key(checkpoint)}"
    if (out / "model.safetensors").is_file():
        return out
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((checkpoint / "config.json").read_text())
    text = dict(config["text_config"])
    text["architectures"] = [CAUSAL_LM[text["model_type"]]]
    text.setdefault("torch_dtype", config.get("torch_dtype") or config.get("dtype") or "float32")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                target = language_model_name(name)
                if target is not None:
                    tensors[target] = handle.get_tensor(name)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
    (staging / "config.json").write_text(json.dumps(text, indent=2))
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (checkpoint / name).is_file():
            shutil.copy(checkpoint / name, staging / name)
    staging.rename(out)
    return out


def ort_genai_model(lm_dir: Path, precision: str, cache: Path, block_size: int = 32) -> Path:
    """ONNX Runtime GenAI's model builder on the language model (CPU execution provider)."""
    out = cache / f"ort-genai-{precision}-b{block_size}-{lm_dir.name}"
    if (out / "genai_config.json").is_file():
        return out
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    command = [
        sys.executable, "-m", "onnxruntime_genai.models.builder",
        "-i", str(lm_dir), "-o", str(staging), "-p", precision, "-e", "cpu",
        "-c", str(cache / "ort-genai-cache"),
    ]  # fmt: skip
    if precision in ("int4", "int8"):
        command += ["--extra_options", f"block_size={block_size}"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ONNX Runtime GenAI's builder failed: {done.stderr.strip().splitlines()[-1:]}")
    staging.rename(out)
    return out


GGUF_TYPES = ("F32", "F16", "Q8_0", "Q4_0")


def gguf_model(lm_dir: Path, kind: str, cache: Path) -> Path:
    """The language model as GGUF: F32/F16 written with `gguf`, Q8_0/Q4_0 by llama.cpp's quantiser."""
    if kind not in GGUF_TYPES:
        raise ValueError(f"GGUF type must be one of {GGUF_TYPES}")
    out = cache / f"{lm_dir.name}-{kind}.gguf"
    if out.is_file():
        return out
    if kind in ("F32", "F16"):
        _write_gguf(lm_dir, out, kind)
    else:
        source = gguf_model(lm_dir, "F32", cache)
        _quantize_gguf(source, out, kind)
    return out


def _write_gguf(lm_dir: Path, out: Path, kind: str) -> None:
    """A llama-architecture GGUF of the decoder (Llama/Qwen2-style layouts, no attention biases)."""
    config = json.loads((lm_dir / "config.json").read_text())
    if config.get("attention_bias") or config["model_type"] == "qwen2":
        raise ValueError("the GGUF writer here covers Llama-layout decoders without attention biases")
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = _decoder_gguf(out, "llama", config, kind, float(config.get("rope_theta", 10000.0)))
    _add_placeholder_vocab(writer, config)
    # HF stores q/k rotary halves split; llama.cpp's llama architecture expects them interleaved
    permute = {"self_attn.q_proj.weight": heads, "self_attn.k_proj.weight": kv_heads}
    _add_decoder_tensors(writer, lm_dir, kind, permute)
    _finish_gguf(writer, out)


QWEN_VL_TYPES = ("qwen2_vl", "qwen2_5_vl")


def is_qwen_vl(checkpoint: Path) -> bool:
    return json.loads((checkpoint / "config.json").read_text()).get("model_type") in QWEN_VL_TYPES


def qwen2vl_gguf_model(checkpoint: Path, kind: str, cache: Path) -> Path:
    """A Qwen2(.5)-VL checkpoint's decoder as GGUF (`qwen2vl`): F32/F16 written here, Q8_0/Q4_0 by
    llama.cpp's quantiser."""
    if kind not in GGUF_TYPES:
        raise ValueError(f"GGUF type must be one of {GGUF_TYPES}")
    out = cache / f"qwen2vl-{checkpoint_key(checkpoint)}-{kind}.gguf"
    if out.is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    if kind in ("F32", "F16"):
        _write_qwen2vl_gguf(checkpoint, out, kind)
    else:
        _quantize_gguf(qwen2vl_gguf_model(checkpoint, "F32", cache), out, kind)
    return out


def _write_qwen2vl_gguf(checkpoint: Path, out: Path, kind: str) -> None:
    """llama.cpp's `qwen2vl` layout, as its converter writes it: q/k/v with their biases, rotary
    halves as stored (NeoX order, no permutation), the three rotary sections padded to four. The
    vocabulary's placeholders keep the checkpoint's special tokens (vision start and end, the image
    pad) by name: libmtmd writes them around an image."""
    config = json.loads((checkpoint / "config.json").read_text())
    text = config.get("text_config", config)
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    sections = list(rope.get("mrope_section", []))
    if len(sections) != 3:
        raise ValueError(f"{checkpoint} has no three multimodal rotary sections (mrope_section)")
    theta = float(rope.get("rope_theta", text.get("rope_theta", 1000000.0)))
    writer = _decoder_gguf(out, "qwen2vl", text, kind, theta, rope_sections=[*sections, 0])
    tokenizer = json.loads((checkpoint / "tokenizer.json").read_text())
    special = {t["id"]: t["content"] for t in tokenizer.get("added_tokens", []) if t.get("special")}
    _add_placeholder_vocab(writer, text, special)
    _add_decoder_tensors(writer, checkpoint, kind)
    _finish_gguf(writer, out)


_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _decoder_gguf(
    out: Path, arch: str, config: dict, kind: str, rope_theta: float, rope_sections: list[int] | None = None
):
    """A GGUF writer (to `out`.partial) with a decoder's hyperparameters from its HF config
    (`rope_sections`: multimodal rotary sections, for `qwen2vl`)."""
    import gguf

    writer = gguf.GGUFWriter(str(out) + ".partial", arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(rope_theta)
    if rope_sections is not None:
        writer.add_rope_dimension_sections(rope_sections)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if kind == "F32" else gguf.LlamaFileType.MOSTLY_F16)
    return writer


def _add_placeholder_vocab(writer, config: dict, named: dict[int, str] | None = None) -> None:
    """The harness feeds token ids; llama.cpp still wants a vocabulary, so each id gets a
    placeholder, except `named` ones (id -> text), written as control tokens."""
    import gguf

    vocab = config["vocab_size"]
    tokens = [f"<t{i}>".encode() for i in range(vocab)]
    types = [gguf.TokenType.NORMAL] * vocab
    for index, text in (named or {}).items():
        if index < vocab:
            tokens[index], types[index] = text.encode(), gguf.TokenType.CONTROL
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types(types)
    writer.add_bos_token_id(config.get("bos_token_id") or 1)
    writer.add_eos_token_id(config.get("eos_token_id") or 2)


def _add_decoder_tensors(writer, directory: Path, kind: str, permute: dict[str, int] | None = None) -> None:
    """Every decoder tensor of the safetensors files in `directory` under llama.cpp's names; the
    layer tensors named in `permute` get their rotary halves interleaved for that many heads."""
    import numpy as np
    from safetensors import safe_open

    dtype = np.float32 if kind == "F32" else np.float16
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(str(shard), framework="numpy") as handle:
            for name in handle.keys():  # noqa: SIM118
                source = language_model_name(name)
                if source is None:
                    continue
                tensor = handle.get_tensor(name)
                if source.startswith("model.layers."):
                    index, rest = source.removeprefix("model.layers.").split(".", 1)
                    target = f"blk.{index}.{_GGUF_LAYER_NAMES[rest]}"
                    if permute and rest in permute:
                        tensor = _permute_rope(tensor, permute[rest])
                else:
                    target = _GGUF_NAMES[source]
                # norms stay F32, as llama.cpp's own converter keeps 1-D tensors
                writer.add_tensor(target, tensor.astype(np.float32 if tensor.ndim == 1 else dtype))


def _finish_gguf(writer, out: Path) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    Path(str(out) + ".partial").rename(out)


def _permute_rope(weight, heads: int):
    """HF stores q/k rotary halves split; llama.cpp expects them interleaved (as its converter does)."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _quantize_gguf(source: Path, out: Path, kind: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[
        kind
    ]
    params.nthread = 2
    partial = Path(str(out) + ".partial")
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params)
    if status != 0:
        raise RuntimeError(f"llama.cpp could not quantise {source.name} to {kind} (status {status})")
    partial.rename(out)


# what llama.cpp's converters write for an image encoder: its LLaVA-1.5 converter F16 or F32, its
# main converter (Qwen2-VL, Qwen2.5-VL) Q8_0 too
MMPROJ_TYPES = ("F16", "F32", "Q8_0")
_CONVERTER = "tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py"
_MAIN_CONVERTER = "convert_hf_to_gguf.py"  # with its `conversion` package (Qwen2-VL's mmproj among them)


def llama_cpp_sources(cache: Path) -> Path:
    """llama.cpp's source tree as vendored by the installed llama-cpp-python (its converters and its
    own gguf-py), from that version's sdist: the converter then matches the library that loads its
    output."""
    release = version("llama-cpp-python")
    out = cache / f"llama.cpp-{release}"
    if (out / _CONVERTER).is_file() and (out / _MAIN_CONVERTER).is_file():
        return out
    sdist = cache / f"llama_cpp_python-{release}.tar.gz"
    if not sdist.is_file():
        command = [
            sys.executable, "-m", "pip", "download", f"llama-cpp-python=={release}",
            "--no-deps", "--no-binary", ":all:", "-d", str(cache), "-q",
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not sdist.is_file():
            raise RuntimeError(
                f"could not download llama-cpp-python {release}'s sources: {done.stderr[-500:]}"
            )
    prefix = f"llama_cpp_python-{release}/vendor/llama.cpp/"
    wanted = (
        prefix + "tools/mtmd/legacy-models/",
        prefix + "gguf-py/",
        prefix + "conversion/",
        prefix + _MAIN_CONVERTER,
    )
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            if member.isfile() and member.name.startswith(wanted):
                member.name = member.name.removeprefix(prefix)
                archive.extract(member, staging, filter="data")
    staging.rename(out)
    return out


def clip_vision_name(name: str) -> str | None:
    """A llava-hf vision-tower tensor name as a standalone CLIPVisionModel names it (None otherwise)."""
    _, found, rest = name.partition("vision_tower.")
    if not found:
        return None
    return "vision_model." + rest.removeprefix("vision_model.")


def mmproj_model(checkpoint: Path, kind: str, cache: Path) -> Path:
    """The checkpoint's CLIP tower and MLP projector as llama.cpp's image encoder (an mmproj GGUF),
    converted by llama.cpp's own LLaVA-1.5 converter (run through `mmproj_convert.py`)."""
    if kind not in MMPROJ_TYPES:
        raise ValueError(f"mmproj type must be one of {MMPROJ_TYPES}")
    key = checkpoint_key(checkpoint)
    out = cache / f"mmproj-{key}-{kind}.gguf"
    if out.is_file():
        return out
    if is_qwen_vl(checkpoint):
        cache.mkdir(parents=True, exist_ok=True)
        return _qwen_vl_mmproj(checkpoint, kind, cache, out)
    if kind == "Q8_0":
        raise ValueError("llama.cpp's LLaVA-1.5 image-encoder converter writes F16 or F32 only")
    work = cache / f"mmproj-{key}-inputs"
    vit, projector = converter_inputs(checkpoint, work)
    sources = llama_cpp_sources(cache)
    command = [
        sys.executable, str(Path(__file__).with_name("mmproj_convert.py")), str(sources / _CONVERTER),
        "-m", str(vit), "--clip-model-is-vision", "--llava-projector", str(projector),
        "--output-dir", str(work / "out"),
    ]  # fmt: skip
    if kind == "F32":
        command.append("--use-f32")
    preprocessor = _image_processor_config(checkpoint)
    for key in ("image_mean", "image_std"):
        if key in preprocessor:
            command += [f"--{key.replace('_', '-')}", *map(str, preprocessor[key])]
    env = {**os.environ, "PYTHONPATH": str(sources / "gguf-py")}  # the converter's own gguf version
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp's image-encoder converter failed: {done.stderr.strip()[-1000:]}")
    (work / "out" / f"mmproj-model-{kind.lower()}.gguf").rename(out)
    shutil.rmtree(work)
    return out


def _qwen_vl_mmproj(checkpoint: Path, kind: str, cache: Path, out: Path) -> Path:
    """llama.cpp's main converter, unchanged, on the Qwen2(.5)-VL checkpoint: `--mmproj` writes its
    vision tower and merger (the projector type and window pattern from the checkpoint's config)."""
    sources = llama_cpp_sources(cache).resolve()  # the converter runs from its own folder
    partial = out.with_name(out.name + ".partial")
    command = [
        sys.executable, str(sources / _MAIN_CONVERTER), str(checkpoint.resolve()), "--mmproj",
        "--outtype", kind.lower(), "--outfile", str(partial.resolve()),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(sources / "gguf-py")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=sources)
    if done.returncode != 0 or not partial.is_file():
        raise RuntimeError(f"llama.cpp's converter failed on the mmproj: {done.stderr.strip()[-1000:]}")
    partial.rename(out)
    return out


def converter_inputs(checkpoint: Path, work: Path) -> tuple[Path, Path]:
    """What llama.cpp's LLaVA-1.5 converter takes: the tower as a CLIPVisionModel directory (every
    config field written out, the feature layer where the converter looks for it) and the
    projector as a `llava.projector` file (a plain dict of tensors, loadable with weights_only)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig

    config = json.loads((checkpoint / "config.json").read_text())
    if (
        config.get("model_type") != "llava"
        or config["vision_config"].get("model_type") != "clip_vision_model"
    ):
        raise ValueError("llama.cpp's LLaVA-1.5 converter takes a llava checkpoint with a CLIP tower")
    vision, projector = {}, {}
    for shard in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118
                if (target := clip_vision_name(name)) is not None:
                    vision[target] = handle.get_tensor(name)
                elif "multi_modal_projector." in name:
                    projector[name[name.index("multi_modal_projector.") :]] = handle.get_tensor(name)
    shutil.rmtree(work, ignore_errors=True)
    vit = work / "vit"
    vit.mkdir(parents=True)
    vit_config = CLIPVisionConfig(**config["vision_config"]).to_dict()
    vit_config["architectures"] = ["CLIPVisionModel"]
    vit_config["vision_feature_layer"] = config["vision_feature_layer"]
    (vit / "config.json").write_text(json.dumps(vit_config, indent=2))
    save_file(vision, str(vit / "model.safetensors"), metadata={"format": "pt"})
    torch.save(projector, work / "llava.projector")
    return vit, work / "llava.projector"


def _image_processor_config(checkpoint: Path) -> dict:
    """The image processor's settings, saved by transformers 5 (processor_config.json) or 4."""
    if (checkpoint / "processor_config.json").is_file():
        return json.loads((checkpoint / "processor_config.json").read_text()).get("image_processor", {})
    if (checkpoint / "preprocessor_config.json").is_file():
        return json.loads((checkpoint / "preprocessor_config.json").read_text())
    return {}
