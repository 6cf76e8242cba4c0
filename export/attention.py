"""Attention as the exported graphs compute it, swapped into Hugging Face's layers by name.

Two attention functions are registered with transformers' attention registry and used while
exporting (the reference keeps transformers' own):

- `dyvte_gqa`, the in-place KV flavour: ONNX Runtime's `GroupQueryAttention` (below);
- `dyvte_fp32`, for fp16 graphs: scores, mask and softmax in fp32, so that an fp16 bundle holds no
  fp16 softmax and no mask constant that overflows in fp16.

The in-place KV flavour: decoder attention exported as ONNX Runtime's `GroupQueryAttention`.

`com.microsoft::GroupQueryAttention` writes this step's keys and values into a preallocated cache
buffer (past and present bound to the same memory) and attends causally over the first
`seqlens_k + 1` rows of it, so a decode step never copies the cache. Hugging Face's decoder layers
are used as they ship: only the attention function is swapped (transformers' attention registry)
for one that calls the custom torch op below, whose eager implementation mirrors the ONNX operator
so every exported graph can still be verified against its torch module.

Shapes: B batch, S new tokens, H query heads, Hkv key/value heads, hd head size, M cache capacity.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import onnx
import torch
from onnx.defs import OpSchema
from onnxscript.values import Opset

ATTENTION_NAME = "dyvte_gqa"  # the names registered with transformers' AttentionInterface
FP32_ATTENTION_NAME = "dyvte_fp32"
OP_DOMAIN = "com.microsoft"


@torch.library.custom_op("dyvte::group_query_attention", mutates_args=())
def group_query_attention(
    query: torch.Tensor,  # [B, S, H*hd]
    key: torch.Tensor,  # [B, S, Hkv*hd]
    value: torch.Tensor,  # [B, S, Hkv*hd]
    past_key: torch.Tensor,  # [B, Hkv, M, hd]
    past_value: torch.Tensor,  # [B, Hkv, M, hd]
    seqlens_k: torch.Tensor,  # [B] int32: rows valid after this step, minus one
    total_sequence_length: torch.Tensor,  # [] int32: max over the batch of seqlens_k + 1
    num_heads: int,
    kv_num_heads: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (output [B, S, H*hd], present_key, present_value [B, Hkv, M, hd]); the reference of the ONNX op."""
    batch, steps, _ = query.shape
    head_dim = past_key.shape[-1]
    present_key, present_value = past_key.clone(), past_value.clone()
    output = torch.empty_like(query)
    q = query.view(batch, steps, num_heads, head_dim).transpose(1, 2)  # [B, H, S, hd]
    k = key.view(batch, steps, kv_num_heads, head_dim).transpose(1, 2)  # [B, Hkv, S, hd]
    v = value.view(batch, steps, kv_num_heads, head_dim).transpose(1, 2)
    groups = num_heads // kv_num_heads
    for b in range(batch):
        total = int(seqlens_k[b]) + 1
        past = total - steps
        present_key[b, :, past:total] = k[b]
        present_value[b, :, past:total] = v[b]
        keys = present_key[b, :, :total].repeat_interleave(groups, dim=0)  # [H, total, hd]
        values = present_value[b, :, :total].repeat_interleave(groups, dim=0)
        scores = (q[b] @ keys.transpose(-1, -2)).float() * scale  # [H, S, total]
        query_at = torch.arange(steps, device=query.device)[:, None] + past  # causal by row index
        scores = scores.masked_fill(torch.arange(total, device=query.device)[None] > query_at, float("-inf"))
        attended = scores.softmax(-1).to(values.dtype) @ values  # [H, S, hd]
        output[b] = attended.transpose(0, 1).reshape(steps, num_heads * head_dim)
    return output, present_key, present_value


@group_query_attention.register_fake
def _(
    query, key, value, past_key, past_value, seqlens_k, total_sequence_length, num_heads, kv_num_heads, scale
):
    return torch.empty_like(query), torch.empty_like(past_key), torch.empty_like(past_value)


def _register_onnx_schema() -> None:
    """onnxscript builds nodes from schemas; ONNX itself does not know ONNX Runtime's contrib ops."""
    if onnx.defs.has("GroupQueryAttention", OP_DOMAIN):
        return
    param = OpSchema.FormalParameter
    names = ("query", "key", "value", "past_key", "past_value")
    onnx.defs.register_schema(
        OpSchema(
            "GroupQueryAttention",
            OP_DOMAIN,
            1,
            inputs=[
                *(param(n, "T") for n in names),
                param("seqlens_k", "M"),
                param("total_sequence_length", "M"),
            ],
            outputs=[param("output", "T"), param("present_key", "T"), param("present_value", "T")],
            type_constraints=[
                ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations"),
                ("M", ["tensor(int32)"], "lengths"),
            ],
            attributes=[
                OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "query heads"),
                OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT, "key/value heads"),
                OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "score scale"),
            ],
        )
    )


_register_onnx_schema()
_MSFT = Opset(OP_DOMAIN, 1)


def _group_query_attention_onnx(
    query,
    key,
    value,
    past_key,
    past_value,
    seqlens_k,
    total_sequence_length,
    num_heads: int,
    kv_num_heads: int,
    scale: float,
):
    return _MSFT.GroupQueryAttention(
        query,
        key,
        value,
        past_key,
        past_value,
        seqlens_k,
        total_sequence_length,
        num_heads=num_heads,
        kv_num_heads=kv_num_heads,
        scale=scale,
    )


TRANSLATIONS = {torch.ops.dyvte.group_query_attention.default: _group_query_attention_onnx}


class GqaCache:
    """What the swapped attention needs per layer: the cache buffers in, the updated ones out.

    Duck-typed to the cache Hugging Face attention modules call (`update` returns this step's keys
    and values untouched: the operator appends them to the buffer itself).
    """

    def __init__(
        self, buffers: dict[int, tuple[torch.Tensor, torch.Tensor]], total_lengths: torch.Tensor
    ) -> None:
        self.buffers = buffers  # layer -> (keys, values) [B, Hkv, M, hd]
        self.seqlens_k = (total_lengths - 1).to(torch.int32)  # [B]
        self.total_sequence_length = total_lengths.max().to(torch.int32)  # []
        self.presents: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: object, **kwargs: object):
        return key, value


def gqa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A transformers attention function: query [B, H, S, hd], key/value [B, Hkv, S, hd] (rotated)."""
    cache: GqaCache = kwargs["gqa_cache"]
    batch, heads, steps, head_dim = query.shape
    kv_heads = key.shape[1]
    past_key, past_value = cache.buffers[module.layer_idx]
    dtype = past_key.dtype  # queries and keys arrive in fp32 when the rotary embedding ran in fp32
    output, present_key, present_value = torch.ops.dyvte.group_query_attention(
        query.transpose(1, 2).reshape(batch, steps, heads * head_dim).to(dtype),
        key.transpose(1, 2).reshape(batch, steps, kv_heads * head_dim).to(dtype),
        value.transpose(1, 2).reshape(batch, steps, kv_heads * head_dim).to(dtype),
        past_key,
        past_value,
        cache.seqlens_k,
        cache.total_sequence_length,
        heads,
        kv_heads,
        float(scaling if scaling is not None else head_dim**-0.5),
    )
    cache.presents[module.layer_idx] = (present_key, present_value)
    return output.view(batch, steps, heads, head_dim), None  # the layout HF's attention functions return


def fp32_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention computed in fp32 whatever the inputs' dtype: query [B, H, S, hd], key/value
    [B, Hkv, T, hd], attention_mask additive [B, 1, S, T] (built in fp32) or None."""
    out_dtype = value.dtype
    groups = query.shape[1] // key.shape[1]
    key = key.float().repeat_interleave(groups, dim=1)
    value = value.float().repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = (query.float() @ key.transpose(-1, -2)) * scale  # [B, H, S, T] fp32
    if attention_mask is not None:
        scores = scores + attention_mask.float()[..., : key.shape[-2]]
    output = scores.softmax(dim=-1) @ value  # [B, H, S, hd]
    return output.transpose(1, 2).to(out_dtype), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, gqa_attention)
    AttentionInterface.register(FP32_ATTENTION_NAME, fp32_attention)


_register_attention()


@contextlib.contextmanager
def attention_function(config, name: str | None) -> Iterator[None]:
    """Run the modules built from `config` with attention function `name` (None: leave it)."""
    if name is None:
        yield
        return
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous
