"""The runtime loop (docs/runtime.md): vision → embed → segments with the exit switch → head, then
decoding through the same segments, with every tensor staying on the backend.

    feats = vision(pixels); h = embed(ids, feats); pos = positions(ids)
    for seg in segments:
        h = seg(h, pos, kv)                               # kv: written by the graph (in place) or replaced
        if candidate and not exited and policy says so:   # the router's 2 logits come to the host
            h = exit_gather(h, keep); pos = pos[keep]     # the switch runs on the backend
    logits = head(h, last)                                # the only large host transfer: [1, vocab]
    decode: the same segments, one token at a time, no routers

Shapes: B batch (1 here), N prompt tokens, V visual tokens, D hidden. Host transfers are the token
ids, position ids, per-segment KV lengths, the router logits (prefill, 2 floats each) and the
logits of the last position.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from dyvte_rt import io_names as names
from dyvte_rt.bundle import Bundle, as_runtime_error
from dyvte_rt.compute import DecoderDims, PrefillMacs, prefill_macs
from dyvte_rt.errors import InputError, PolicyError
from dyvte_rt.features import router_pool
from dyvte_rt.kv_cache import ConcatKVCache, InplaceKVCache, KVCache
from dyvte_rt.manifest import SegmentInfo
from dyvte_rt.policy import ExitPolicy, check_policy_fits, exit_probability
from engines import BackendError, Value

# (segment just run, its output hidden state, host positions [B, S]) -> (hidden, positions) to go on with
Switch = Callable[[SegmentInfo, Value, np.ndarray], tuple[Value, np.ndarray]]


@dataclass
class PrefillResult:
    logits: np.ndarray  # [1, vocab] at the last prompt position
    cache: KVCache
    exit_layer: int | None
    exit_probs: dict[int, float]
    n_tokens: int
    n_visual: int
    macs: PrefillMacs
    timings_ms: dict[str, float] = field(default_factory=dict)  # vision, prefill, switch (within prefill)


class Pipeline:
    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        manifest = bundle.manifest
        self.dims = manifest.dims
        self.image_token_id = manifest.tokens.image
        self.candidates = manifest.exit.candidate_layers
        self.segments = manifest.segments
        self.has_routers = any(s.has_router for s in self.segments)
        self.decoder_dims = DecoderDims(
            hidden=self.dims.hidden,
            kv_width=self.dims.num_kv_heads * self.dims.head_dim,
            mlp=self.dims.mlp,
            num_layers=self.dims.num_layers,
        )
        self.backend = bundle.backend
        self.sessions = bundle.sessions
        self._dtype = bundle.float_dtype
        self._inplace = manifest.kv_flavour == "inplace"
        self._no_image = self.backend.upload(np.zeros((1, 0, self.dims.hidden), dtype=self._dtype))
        self._spare: InplaceKVCache | None = None  # buffers of a finished request, reused by the next

    def check_policy(self, policy: ExitPolicy) -> None:
        check_policy_fits(policy, self.dims.num_layers, self.candidates)
        if policy.needs_routers and not self.has_routers:
            raise PolicyError(
                "this bundle has no routers, so policy 'router' is not available",
                hint="use 'never' or 'layer:K', or export with --routers from python -m calibrate.routers",
            )

    def new_cache(self, capacity: int, batch: int = 1) -> KVCache:
        """A KV cache for requests of up to `capacity` positions (prompt and generated tokens);
        in-place buffers released by an earlier request are reused when they are large enough."""
        if capacity > self.dims.max_positions:
            raise InputError(f"{capacity} positions exceed the model's context of {self.dims.max_positions}")
        if not self._inplace:
            return ConcatKVCache(self.backend, self.dims, batch, self._dtype)
        spare, self._spare = self._spare, None
        if spare is not None and spare.capacity >= capacity and spare.batch == batch:
            spare.lengths[:] = 0
            return spare
        return InplaceKVCache(self.backend, self.dims, batch, self._dtype, capacity)

    def release(self, cache: KVCache) -> None:
        """`cache` is no longer used: keep its buffers for the next request (the largest one seen)."""
        if isinstance(cache, InplaceKVCache) and (
            self._spare is None or cache.capacity > self._spare.capacity
        ):
            self._spare = cache

    def prefill(
        self,
        input_ids: np.ndarray,
        pixel_values: np.ndarray | None,
        policy: ExitPolicy,
        capacity: int | None = None,
    ) -> PrefillResult:
        """The prompt through every graph, exiting where `policy` decides; `capacity`: KV positions
        to reserve (default: the prompt and 64 more)."""
        self.check_policy(policy)
        input_ids = np.asarray(input_ids, dtype=np.int64).reshape(1, -1)  # [1, N]
        is_visual = input_ids[0] == self.image_token_id  # [N]
        n_tokens, n_visual = input_ids.shape[1], int(is_visual.sum())
        if n_visual and pixel_values is None:
            raise InputError(f"the prompt has {n_visual} image tokens but no image was given")
        cache = self.new_cache(capacity or min(n_tokens + 64, self.dims.max_positions))
        try:
            started = time.perf_counter()
            features = self._vision(pixel_values) if n_visual else self._no_image
            vision_ms = 1e3 * (time.perf_counter() - started)
            started = time.perf_counter()
            hidden = self._run("embed", {names.INPUT_IDS: input_ids, names.IMAGE_FEATURES: features})[
                names.INPUT_EMBEDS
            ]
            switch = ExitSwitch(self, policy, input_ids[0], is_visual)
            hidden, positions = self._segments(
                hidden, np.arange(n_tokens)[None], cache, switch if n_visual else None
            )
            logits = self._head(hidden, positions.shape[1])
        except BackendError as err:
            raise as_runtime_error(err) from None
        return PrefillResult(
            logits=logits,
            cache=cache,
            exit_layer=switch.exit_layer,
            exit_probs=switch.exit_probs,
            n_tokens=n_tokens,
            n_visual=n_visual,
            macs=prefill_macs(self.decoder_dims, n_tokens, n_visual, switch.exit_layer),
            timings_ms={
                "vision": vision_ms,
                "prefill": 1e3 * (time.perf_counter() - started),
                "switch": switch.ms,
            },
        )

    def forward_tokens(self, token_ids: np.ndarray, first_position: int, cache: KVCache) -> np.ndarray:
        """Tokens [1, S] at original positions first_position.. through every segment, attending to
        all that `cache` holds (no routers) -> logits [1, vocab] of the last one. A decode step is S = 1."""
        token_ids = np.asarray(token_ids, dtype=np.int64).reshape(1, -1)
        steps = token_ids.shape[1]
        try:
            hidden = self._run("embed", {names.INPUT_IDS: token_ids, names.IMAGE_FEATURES: self._no_image})
            positions = np.arange(first_position, first_position + steps)[None]
            hidden, _ = self._segments(hidden[names.INPUT_EMBEDS], positions, cache, None)
            return self._head(hidden, steps)
        except BackendError as err:
            raise as_runtime_error(err) from None

    def decode_one_token(self, token: int, position: int, cache: KVCache) -> np.ndarray:
        """One token at original position `position` -> logits [1, vocab]."""
        return self.forward_tokens(np.array([[token]]), position, cache)

    # -- the loop -------------------------------------------------------------------------------

    def _segments(
        self, hidden: Value, positions: np.ndarray, cache: KVCache, switch: Switch | None
    ) -> tuple[Value, np.ndarray]:
        """The one segment loop, for prefill and decode alike; `switch` may drop tokens after a segment."""
        position_value = self.backend.upload(positions)
        for segment in self.segments:
            layers = range(segment.first_layer, segment.last_layer + 1)
            steps = positions.shape[1]
            feeds = {
                names.HIDDEN_IN: hidden,
                names.POSITION_IDS: position_value,
                **cache.feeds(layers, steps),
            }
            out = self.sessions[segment.graph].run(feeds, into=cache.outputs(layers))
            cache.update(layers, steps, out)
            hidden = out[names.HIDDEN_OUT]
            if switch is not None:
                kept = positions.shape[1]
                hidden, positions = switch(segment, hidden, positions)
                if positions.shape[1] != kept:
                    position_value = self.backend.upload(positions)
        return hidden, positions

    def _vision(self, pixel_values: np.ndarray) -> Value:
        """[1, 3, H, W] pixels -> image features [1, V, D] on the backend."""
        return self._run("vision", {names.PIXEL_VALUES: pixel_values.astype(self._dtype)})[
            names.IMAGE_FEATURES
        ]

    def _head(self, hidden: Value, steps: int) -> np.ndarray:
        out = self._run(
            "head", {names.HIDDEN_OUT: hidden, names.LAST_INDEX: np.array([steps - 1], dtype=np.int64)}
        )
        return self.backend.download(out[names.LOGITS])

    def _run(self, graph: str, feeds: dict) -> dict[str, Value]:
        return self.sessions[graph].run(feeds)


class ExitSwitch:
    """Asks the policy at each candidate layer, once, and drops the visual tokens on the backend."""

    def __init__(
        self, pipeline: Pipeline, policy: ExitPolicy, input_ids: np.ndarray, is_visual: np.ndarray
    ) -> None:
        self.pipeline = pipeline
        self.policy = policy
        self.exit_layer: int | None = None
        self.exit_probs: dict[int, float] = {}
        self.ms = 0.0  # reading router outputs, deciding and dropping the visual tokens
        n = input_ids.shape[0]
        self._keep = np.flatnonzero(~is_visual)[None]  # [1, N-V] the text positions
        self._last = np.array([n - 1], dtype=np.int64)
        self._pool = (
            router_pool(input_ids, pipeline.image_token_id, pipeline.bundle.float_dtype)
            if policy.needs_routers
            else None
        )

    def __call__(
        self, segment: SegmentInfo, hidden: Value, positions: np.ndarray
    ) -> tuple[Value, np.ndarray]:
        if self.exit_layer is not None or segment.last_layer not in self.pipeline.candidates:
            return hidden, positions
        started = time.perf_counter()
        prob, gathered = None, None
        if self.policy.needs_routers and segment.router is not None:
            feeds = {
                names.HIDDEN_OUT: hidden,
                names.ROUTER_POOL: self._pool,
                names.LAST_INDEX: self._last,
                names.KEEP_INDEX: self._keep,
            }
            out = self.pipeline.sessions[segment.router].run(feeds)
            prob = exit_probability(self.pipeline.backend.download(out[names.ROUTER_LOGITS]))
            self.exit_probs[segment.last_layer] = prob
            gathered = out[names.HIDDEN_IN]  # the router graph also gathers the text rows
        if self.policy.decide(segment.last_layer, prob):
            self.exit_layer = segment.last_layer
            if gathered is None:
                feeds = {names.HIDDEN_OUT: hidden, names.KEEP_INDEX: self._keep}
                gathered = self.pipeline.sessions["exit_gather"].run(feeds)[names.HIDDEN_IN]
            hidden, positions = gathered, positions[:, self._keep[0]]
        self.ms += 1e3 * (time.perf_counter() - started)
        return hidden, positions
