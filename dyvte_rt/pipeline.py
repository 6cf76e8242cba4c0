"""The runtime loop of DESIGN §5 (batch 1): vision → embed → segments with the exit switch → head,
then decode with per-layer KV caches.

Shapes: N prompt tokens, V visual tokens, D hidden; arrays are numpy, batch 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from dyvte_rt import io_names as names
from dyvte_rt.bundle import Bundle
from dyvte_rt.compute import DecoderDims, PrefillMacs, prefill_macs
from dyvte_rt.errors import InputError, PolicyError
from dyvte_rt.features import router_pool
from dyvte_rt.kv_cache import KVCache
from dyvte_rt.policy import ExitPolicy, check_policy_fits, exit_probability


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
        self.has_routers = any(s.has_router for s in manifest.segments)
        self.decoder_dims = DecoderDims(
            hidden=self.dims.hidden,
            kv_width=self.dims.num_kv_heads * self.dims.head_dim,
            mlp=self.dims.mlp,
            num_layers=self.dims.num_layers,
        )
        self._dtype = bundle.float_dtype

    def check_policy(self, policy: ExitPolicy) -> None:
        check_policy_fits(policy, self.dims.num_layers, self.candidates)
        if policy.needs_routers and not self.has_routers:
            raise PolicyError(
                "this bundle has no routers, so policy 'router' is not available",
                hint="use 'never' or 'layer:K', or export with --routers from python -m calibrate.routers",
            )

    def image_features(self, pixel_values: np.ndarray) -> np.ndarray:
        """[1, 3, H, W] -> [1, V, D]."""
        out = self.bundle.sessions["vision"].run({names.PIXEL_VALUES: pixel_values.astype(self._dtype)})
        return out[names.IMAGE_FEATURES]

    def embed(self, input_ids: np.ndarray, image_features: np.ndarray | None) -> np.ndarray:
        """[1, N] ids (+ [1, V, D] features) -> [1, N, D]."""
        if image_features is None:
            image_features = np.zeros((input_ids.shape[0], 0, self.dims.hidden), dtype=self._dtype)
        out = self.bundle.sessions["embed"].run(
            {names.INPUT_IDS: input_ids.astype(np.int64), names.IMAGE_FEATURES: image_features}
        )
        return out[names.INPUT_EMBEDS]

    def prefill(
        self, input_ids: np.ndarray, pixel_values: np.ndarray | None, policy: ExitPolicy
    ) -> PrefillResult:
        self.check_policy(policy)
        input_ids = np.asarray(input_ids, dtype=np.int64).reshape(1, -1)  # [1, N]
        is_visual = input_ids[0] == self.image_token_id  # [N]
        n_tokens, n_visual = input_ids.shape[1], int(is_visual.sum())
        if n_visual and pixel_values is None:
            raise InputError(f"the prompt has {n_visual} image tokens but no image was given")
        started = time.perf_counter()
        features = self.image_features(pixel_values) if n_visual else None
        vision_ms = 1e3 * (time.perf_counter() - started)
        if features is not None and features.shape[1] != n_visual:
            raise InputError(
                f"the prompt has {n_visual} image tokens but the image gives {features.shape[1]}"
            )

        started = time.perf_counter()
        hidden = self.embed(input_ids, features)  # [1, N, D]
        positions = np.arange(n_tokens, dtype=np.int64)[None]  # [1, N]
        pool = router_pool(input_ids[0], self.image_token_id, self._dtype)  # [1, N]
        cache = KVCache(self.dims, batch=1, dtype=self._dtype)
        exit_layer: int | None = None
        exit_probs: dict[int, float] = {}
        switch_ms = 0.0  # reading router outputs, deciding and dropping the visual tokens
        for segment in self.bundle.segments:
            layers = range(segment.first_layer, segment.last_layer + 1)
            feeds = {names.HIDDEN_IN: hidden, names.POSITION_IDS: positions, **cache.past_feeds(layers)}
            if segment.has_router:
                feeds[names.ROUTER_POOL] = pool
            out = self.bundle.sessions[segment.graph].run(feeds)
            hidden = out[names.HIDDEN_OUT]
            cache.update(layers, out)
            if exit_layer is not None or not n_visual or segment.last_layer not in self.candidates:
                continue
            deciding = time.perf_counter()
            prob = exit_probability(out[names.ROUTER_LOGITS]) if segment.has_router else None
            if prob is not None:
                exit_probs[segment.last_layer] = prob
            if policy.decide(segment.last_layer, prob):
                exit_layer = segment.last_layer
                keep = np.flatnonzero(~is_visual)  # the N-V text positions
                hidden, positions, pool = hidden.take(keep, 1), positions.take(keep, 1), pool.take(keep, 1)
            switch_ms += 1e3 * (time.perf_counter() - deciding)
        logits = self.head(hidden)
        prefill_ms = 1e3 * (time.perf_counter() - started)
        return PrefillResult(
            logits=logits,
            cache=cache,
            exit_layer=exit_layer,
            exit_probs=exit_probs,
            n_tokens=n_tokens,
            n_visual=n_visual,
            macs=prefill_macs(self.decoder_dims, n_tokens, n_visual, exit_layer),
            timings_ms={"vision": vision_ms, "prefill": prefill_ms, "switch": switch_ms},
        )

    def decode_one_token(self, token: int, position: int, cache: KVCache) -> np.ndarray:
        """One token at original position `position` through every segment -> logits [1, vocab]."""
        hidden = self.embed(np.array([[token]], dtype=np.int64), None)  # [1, 1, D]
        positions = np.array([[position]], dtype=np.int64)
        idle_pool = np.zeros((1, 1), dtype=self._dtype)  # routers are not evaluated during decode
        for segment in self.bundle.segments:
            layers = range(segment.first_layer, segment.last_layer + 1)
            feeds = {names.HIDDEN_IN: hidden, names.POSITION_IDS: positions, **cache.past_feeds(layers)}
            if segment.has_router:
                feeds[names.ROUTER_POOL] = idle_pool
            out = self.bundle.sessions[segment.graph].run(feeds)
            hidden = out[names.HIDDEN_OUT]
            cache.update(layers, out)
        return self.head(hidden)

    def head(self, hidden: np.ndarray) -> np.ndarray:
        return self.bundle.sessions["head"].run({names.HIDDEN_OUT: hidden[:, -1:]})[names.LOGITS]
