"""The one place that names graph inputs and outputs; exporter and runtime both use it."""

from __future__ import annotations

HIDDEN_IN = "hidden_states"  # [B, S, D]
POSITION_IDS = "position_ids"  # [B, S] int64 ([3, B, S]: multimodal rotary), original positions
TOTAL_LENGTHS = "total_lengths"  # [B] int32, in-place KV: cache rows valid after this step
ROUTER_POOL = "router_pool"  # [B, S] float: mean weights over text_after_image[:-1]
LAST_INDEX = "last_index"  # [B] int64: index of each sample's last real position
KEEP_INDEX = "keep_index"  # [B, K] int64: positions that stay at an exit (the text tokens)
HIDDEN_OUT = "hidden_states_out"  # [B, S, D]
ROUTER_LOGITS = "router_logits"  # [B, 2]; class 1 = exit
PIXEL_VALUES = "pixel_values"  # [B, 3, H, W]; any-res: [views, 3, H, W]; patch grid: [patches, C*T*p*p]
PACK_INDEX = "pack_index"  # any-res: [V] int64 rows of the flattened view features (+ newline row)
VISION_POSITIONS = "vision_positions"  # patch grid: [patches, 2] int64 (row, column) of each patch
WINDOW_INDEX = "window_index"  # Qwen2.5-VL: [V] int64 merged patches in window order
WINDOW_IDS = "window_ids"  # Qwen2.5-VL: [patches] int64 each (window-ordered) patch's window (older bundles)
WINDOW_GATHER = "window_gather"  # Qwen2.5-VL: [windows, slots] int64 the patch in each slot, -1: empty
WINDOW_SLOTS = "window_slots"  # Qwen2.5-VL: [patches] int64 each (window-ordered) patch's flat slot
IMAGE_FEATURES = "image_features"  # [B, V, D]; any-res: [1, V, D]
INTERP_INDEX = "interp_index"  # Qwen3-VL: [patches, 4] int64 taps into the learned position grid
INTERP_WEIGHTS = "interp_weights"  # Qwen3-VL: [patches, 4] float their bilinear weights
DEEPSTACK_FEATURES = "deepstack_features"  # DeepStack: [B, n, V, D], level i joins layer i's output
DEEPSTACK_LEVEL = "deepstack_level"  # [1] int64: which level (= decoder layer) to add
VISUAL_SLOTS = "visual_slots"  # [B, S] int64: a row's visual token j, or V for every other row
PRUNE_SCORES = "prune_scores"  # [B, S] fp32: FastV's attention of the last token, a segment's last layer
SAMPLE_INDEX = "sample_index"  # [1] int64: the batch row a ranking graph ranks
VISUAL_ROWS = "visual_rows"  # [1, V] int64: the rows holding that sample's visual tokens
PRUNE_PIVOTS = "prune_pivots"  # [1] int64: DART's pivot count, min(P, keep)
PRUNE_RANKING = "prune_ranking"  # [1, V] int64: visual tokens (0..V-1) best first
INPUT_IDS = "input_ids"  # [B, N] int64
INPUT_EMBEDS = "inputs_embeds"  # [B, N, D]
LOGITS = "logits"  # [B, vocab], last position only


def past_name(layer: int, kind: str) -> str:
    """`past.{layer}.key` / `past.{layer}.value`: [B, H_kv, P, head_dim] (concat KV flavour) or
    the layer's whole buffer [B, H_kv, capacity, head_dim] (in-place flavour)."""
    _check_kind(kind)
    return f"past.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    """`present.{layer}.key` / `present.{layer}.value`: [B, H_kv, P + S, head_dim] (concat), or
    the same buffer as the past, written in place (in-place)."""
    _check_kind(kind)
    return f"present.{layer}.{kind}"


def kv_names(layers: range, prefix: str) -> list[str]:
    """[past|present].{l}.key, .value for each layer, in the order graphs take them."""
    name = past_name if prefix == "past" else present_name
    return [name(layer, kind) for layer in layers for kind in ("key", "value")]


def _check_kind(kind: str) -> None:
    if kind not in ("key", "value"):
        raise ValueError(f"kind must be 'key' or 'value', got {kind!r}")
