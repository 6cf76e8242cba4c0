"""One system of the peers harness, measured in a process of its own.

    python benchmarks/peer_systems.py '{"kind": "ort-genai", "path": "...", ...}'

prints one JSON object: per request, the language-model prefill time, the time to the first token,
the decode rate; and the process's peak resident memory. Only the last request is reported; the
ones before it warm up. Every system decodes exactly `max_new_tokens` tokens greedily
(end-of-sequence ignored) from a prompt of the same token count; peers without an image path get
random token ids of that count. Systems are measured one process at a time so that their memory does not mix.
"""

from __future__ import annotations

import ctypes
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np


def _clock() -> float:
    return time.perf_counter()


def measure_dyvte(spec: dict) -> list[dict]:
    from dyvte_rt.api.model import DyvteModel

    rows = []
    with DyvteModel.load(
        spec["path"], threads=spec["threads"], spin=spec["spin"], verify_hashes=False
    ) as model:
        for _ in range(spec["requests"]):
            answer = model.ask(
                spec["image"],
                spec["question"],
                exit=spec["policy"],
                max_new_tokens=spec["max_new_tokens"],
                ignore_eos=True,
            )
            t = answer.timings_ms
            rows.append(
                {
                    "prefill_ms": t["prefill"],
                    "vision_ms": t["vision"],
                    "ttft_ms": t["ttft"],
                    "decode_tokens_per_s": (len(answer.token_ids) - 1) / (t["decode"] / 1e3),
                    "prompt_tokens": answer.prompt_tokens,
                    "exit_layer": answer.exit_layer,
                }
            )
    return rows


def measure_hf(spec: dict) -> list[dict]:
    """The llava-hf model in transformers: vision, then the language model's own prefill and a
    greedy decode loop over its KV cache (what `generate` does, with each phase timed)."""
    import torch
    from transformers import DynamicCache

    from export.loading import load_checkpoint
    from export.prompting import hf_inputs
    from export.reference.model import merge_image_features

    torch.set_num_threads(spec["threads"])
    loaded = load_checkpoint(spec["path"])
    model = loaded.model
    model.set_attn_implementation({"text_config": spec["attention"], "vision_config": spec["attention"]})
    language = model.model.language_model
    rows = []
    for _ in range(spec["requests"]):
        with torch.inference_mode():
            started = _clock()
            inputs = hf_inputs(loaded.processor, spec["image"], spec["question"])
            ids = inputs["input_ids"]
            features = loaded.adapter.image_features(inputs["pixel_values"])  # vision tower + projector
            vision_done = _clock()
            image_id = loaded.adapter.image_token_id
            embeds = merge_image_features(
                language.embed_tokens(ids.masked_fill(ids == image_id, 0)), ids, features, image_id
            )
            prefill_started = _clock()
            cache = DynamicCache(config=model.config.text_config)
            out = language(inputs_embeds=embeds, past_key_values=cache, use_cache=True)
            logits = model.lm_head(out.last_hidden_state[:, -1:])
            token = logits.argmax(-1)
            first = _clock()
            for _ in range(spec["max_new_tokens"] - 1):
                out = language(input_ids=token, past_key_values=cache, use_cache=True)
                token = model.lm_head(out.last_hidden_state).argmax(-1)
            done = _clock()
        rows.append(
            {
                "prefill_ms": 1e3 * (first - prefill_started),
                "vision_ms": 1e3 * (vision_done - started),
                "ttft_ms": 1e3 * (first - started),
                "decode_tokens_per_s": (spec["max_new_tokens"] - 1) / (done - first),
                "prompt_tokens": int(ids.shape[1]),
            }
        )
    return rows


def measure_ort_genai(spec: dict) -> list[dict]:
    import onnxruntime_genai as og

    config = og.Config(spec["path"])
    session = {
        "intra_op_num_threads": spec["threads"],
        "session.intra_op.allow_spinning": "1" if spec["spin"] else "0",
    }
    config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
    model = og.Model(config)
    n, new = spec["prompt_tokens"], spec["max_new_tokens"]
    ids = np.random.default_rng(0).integers(5, spec["vocab_size"], n, dtype=np.int32)
    rows = []
    for _ in range(spec["requests"]):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=n + new, min_length=n + new, do_sample=False)
        generator = og.Generator(model, params)
        started = _clock()
        generator.append_tokens(ids)  # the prompt's forward pass
        prefill_done = _clock()
        generator.generate_next_token()  # picks the first token from the prompt's logits
        first = _clock()
        for _ in range(new - 1):
            generator.generate_next_token()  # one forward pass, then the next token
        done = _clock()
        rows.append(
            {
                "prefill_ms": 1e3 * (prefill_done - started),
                "vision_ms": None,
                "ttft_ms": 1e3 * (first - started),
                "decode_tokens_per_s": (new - 1) / (done - first),
                "prompt_tokens": n,
            }
        )
        del generator
    return rows


def measure_llama_cpp(spec: dict) -> list[dict]:
    """llama.cpp on token ids; with `mmproj`, its image path (libmtmd) encodes the image and the
    prompt is the text before it, the image's embeddings, the text after it, as LLaVA lays it out."""
    import llama_cpp

    n, new = spec["prompt_tokens"], spec["max_new_tokens"]
    llm = llama_cpp.Llama(
        model_path=spec["path"],
        n_ctx=n + new + 8,
        n_batch=n,  # the whole prompt in one batch, as the other systems prefill it
        n_ubatch=n,
        n_threads=spec["threads"],
        n_threads_batch=spec["threads"],
        logits_all=False,
        verbose=False,
    )
    image = LlamaCppImage(llm, spec) if spec.get("mmproj") else None
    text = n - (spec["visual_tokens"] if image else 0)
    ids = np.random.default_rng(0).integers(5, spec["vocab_size"], text).tolist()
    before, after = (
        (ids[: spec["text_before_image"]], ids[spec["text_before_image"] :]) if image else ([], ids)
    )
    rows = []
    for _ in range(spec["requests"]):
        llm.reset()
        llm._ctx.kv_cache_clear()
        started = _clock()
        vision_ms = None
        if image is not None:
            image.encode()
            vision_ms = 1e3 * (_clock() - started)
            if before:
                llm.eval(before)
            llm.n_tokens = image.decode(llm.n_tokens)
        llm.eval(after)
        token = int(np.argmax(last_logits(llm)))
        first = _clock()
        for _ in range(new - 1):
            llm.eval([token])
            token = int(np.argmax(last_logits(llm)))
        done = _clock()
        rows.append(
            {
                "prefill_ms": 1e3 * (first - started) - (vision_ms or 0.0),
                "vision_ms": vision_ms,
                "ttft_ms": 1e3 * (first - started),
                "decode_tokens_per_s": (new - 1) / (done - first),
                "prompt_tokens": len(before) + (image.tokens if image else 0) + len(after),
            }
        )
        if image is not None:
            if spec.get("features_out"):  # the mmproj's output, to compare with dyvte-rt's vision graph
                np.save(spec["features_out"], image.features())
            image.release()
    return rows


class LlamaCppImage:
    """One image through llama.cpp's libmtmd: read and preprocessed from its file, encoded by the
    mmproj (CLIP tower + projector), its embeddings decoded into the language model's KV cache."""

    def __init__(self, llm, spec: dict) -> None:
        import llama_cpp.mtmd_cpp as mtmd

        self.mtmd, self.llm, self.path = mtmd, llm, spec["image"]
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = False
        params.n_threads = spec["threads"]
        params.print_timings = False
        self.ctx = mtmd.mtmd_init_from_file(spec["mmproj"].encode(), llm.model, params)
        if self.ctx is None:
            raise RuntimeError(f"libmtmd could not load {spec['mmproj']}")
        self.expected = spec["visual_tokens"]
        self.chunks = self.bitmap = self.chunk = None
        self.tokens = 0

    def encode(self) -> None:
        """Image file -> bitmap -> the image chunk (resized, normalised) -> the mmproj's output."""
        mtmd = self.mtmd
        self.bitmap = mtmd.mtmd_helper_bitmap_init_from_file(self.ctx, str(self.path).encode(), False)
        if self.bitmap is None:
            raise RuntimeError(f"libmtmd could not read {self.path}")
        text = mtmd.mtmd_input_text()
        marker = mtmd.mtmd_default_marker()
        text.text, text.text_len, text.add_special, text.parse_special = marker, len(marker), False, True
        self.chunks = mtmd.mtmd_input_chunks_init()
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(self.bitmap)
        if mtmd.mtmd_tokenize(self.ctx, self.chunks, ctypes.byref(text), bitmaps, 1) != 0:
            raise RuntimeError("libmtmd could not tokenise the image")
        images = [
            mtmd.mtmd_input_chunks_get(self.chunks, i)
            for i in range(mtmd.mtmd_input_chunks_size(self.chunks))
        ]
        images = [c for c in images if mtmd.mtmd_input_chunk_get_type(c) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE]
        if len(images) != 1:
            raise RuntimeError(f"libmtmd made {len(images)} image chunks of one image")
        self.chunk = images[0]
        self.tokens = mtmd.mtmd_input_chunk_get_n_tokens(self.chunk)
        if self.tokens != self.expected:
            raise RuntimeError(
                f"llama.cpp's image path gives {self.tokens} visual tokens, the bundle {self.expected}"
            )
        if mtmd.mtmd_encode_chunk(self.ctx, self.chunk) != 0:
            raise RuntimeError("libmtmd could not encode the image")

    def decode(self, n_past: int) -> int:
        """The image's embeddings into the KV cache at n_past; returns the position after them."""
        import llama_cpp

        mtmd = self.mtmd
        new_n_past = llama_cpp.llama_pos(0)
        status = mtmd.mtmd_helper_decode_image_chunk(
            self.ctx,
            self.llm._ctx.ctx,
            self.chunk,
            mtmd.mtmd_get_output_embd(self.ctx),
            llama_cpp.llama_pos(n_past),
            llama_cpp.llama_seq_id(0),
            self.llm.n_batch,
            ctypes.byref(new_n_past),
            mtmd.mtmd_helper_post_decode_callback(),
            None,
        )
        if status != 0:
            raise RuntimeError(f"libmtmd could not decode the image's embeddings (status {status})")
        return new_n_past.value

    def features(self) -> np.ndarray:
        """The last encoded image's embeddings, [visual tokens, hidden]."""
        out = self.mtmd.mtmd_get_output_embd(self.ctx)
        return np.ctypeslib.as_array(out, shape=(self.tokens, self.llm.n_embd())).copy()

    def release(self) -> None:
        self.mtmd.mtmd_input_chunks_free(self.chunks)
        self.mtmd.mtmd_bitmap_free(self.bitmap)


def last_logits(llm) -> np.ndarray:
    """The last evaluated token's logits (llama-cpp-python keeps none itself without logits_all)."""
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


def peak_rss_mb() -> float:
    """This process's resident high-water mark (VmHWM: unlike ru_maxrss it does not carry the
    parent's peak over a fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


MEASURE = {
    "dyvte-rt": measure_dyvte,
    "hf": measure_hf,
    "ort-genai": measure_ort_genai,
    "llama.cpp": measure_llama_cpp,
}


def main() -> int:
    spec = json.loads(sys.argv[1])
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: export/, dyvte_rt/
    rows = MEASURE[spec["kind"]](spec)
    print(json.dumps({"requests": rows[-1:], "peak_rss_mb": peak_rss_mb()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
