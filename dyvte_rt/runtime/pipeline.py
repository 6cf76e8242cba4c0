"""The runtime loop (docs/runtime.md): vision → embed → segments with the exit switch → head, then
decoding through the same segments, with every tensor staying on the backend.

    feats = vision(pixels); h = embed(ids, feats); pos = positions(ids)
    for seg in segments:
        h = seg(h, pos, kv)                               # kv: written by the graph (in place) or replaced
        if candidate and not exited and policy says so:   # the router's 2 logits come to the host
            h = exit_gather(h, keep); pos = pos[keep]     # the switch runs on the backend
    logits = head(h, last)                                # the only large host transfer: [B, vocab]
    decode: the same segments, one token at a time, no routers

One loop serves a single request and a batch: B samples padded on the right to a common length,
each with its own number of valid tokens, its own KV lengths and its own exit layer (a batch is
never forced to one sample's decision). Shapes: B batch, S padded tokens, V visual tokens, D hidden.
Host transfers are the token ids, position ids, per-segment KV lengths, the router logits (prefill,
2 floats per sample each) and the logits of the last positions.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass, field, replace

import numpy as np

from dyvte_rt.bundle import io_names as names
from dyvte_rt.bundle.loaded import Bundle, as_runtime_error
from dyvte_rt.bundle.manifest import SegmentInfo
from dyvte_rt.errors import InputError, PolicyError
from dyvte_rt.inputs.preprocess import PreparedImage
from dyvte_rt.runtime.compute import DecoderDims, PrefillMacs, layer_macs, prefill_macs
from dyvte_rt.runtime.deepstack import DeepStackAdder
from dyvte_rt.runtime.exit_switch import ExitGraphs, ExitSwitch
from dyvte_rt.runtime.kv_cache import ConcatKVCache, InplaceKVCache, KVCache
from dyvte_rt.runtime.policy import ExitPolicy, check_policy_fits
from dyvte_rt.runtime.prune import NO_PRUNE, PrunePolicy, check_prune_fits
from engines import BackendError, Value


@dataclass
class PrefillRequest:
    input_ids: np.ndarray  # [N] prompt token ids
    image: PreparedImage | None  # None for a text-only prompt
    policy: ExitPolicy
    prune: PrunePolicy = NO_PRUNE


@dataclass
class PrefillResult:
    logits: np.ndarray  # [1, vocab] at the last prompt position
    cache: KVCache  # holds this request in row `row`
    exit_layer: int | None
    exit_probs: dict[int, float]
    n_tokens: int
    n_visual: int
    macs: PrefillMacs
    timings_ms: dict[str, float] = field(default_factory=dict)  # vision, prefill, switch (within prefill)
    row: int = 0
    pruned_after_layer: int | None = None  # a prune removed visual tokens after this layer (-1: embeddings)
    kept_visual: list[int] | None = None  # then: the visual tokens that stayed, sorted (0..V-1)

    @property
    def visual_tokens_kept(self) -> int:
        """Visual tokens present after the prune (all of them without one)."""
        return len(self.kept_visual) if self.kept_visual is not None else self.n_visual


@dataclass
class BatchPrefill:
    results: list[PrefillResult]
    padded_macs: int  # what the batch computed, padding included (Σ over layers of B · C(padded length))


class Pipeline:
    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        manifest = bundle.manifest
        self.dims = manifest.dims
        self.image_token_id = manifest.tokens.image
        self.pad_token_id = manifest.tokens.pad if manifest.tokens.pad is not None else 0
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
        self.inplace = manifest.kv_flavour == "inplace"
        self.family = bundle.family
        self._exit_graphs = ExitGraphs(
            self.sessions, self.backend, self.candidates, self.image_token_id, bundle.float_dtype
        )

    def check_prune(self, prune: PrunePolicy) -> None:
        layers = self.bundle.manifest.prune.layers if self.bundle.manifest.prune is not None else None
        check_prune_fits(prune, layers, self.dims.num_layers)

    def check_policy(self, policy: ExitPolicy) -> None:
        check_policy_fits(policy, self.dims.num_layers, self.candidates)
        if policy.needs_routers and not self.has_routers:
            raise PolicyError(
                "this bundle has no routers, so policy 'router' is not available",
                hint="use 'never' or 'layer:K', or export with --routers from python -m calibrate.routers",
            )

    def new_cache(self, capacity: int, batch: int = 1) -> KVCache:
        """A new KV cache for `batch` rows of up to `capacity` positions each (prompt and generated
        tokens). Batches of more than one row need the in-place flavour: each row keeps its own
        lengths, which the concat flavour's graphs cannot express."""
        if capacity > self.dims.max_positions:
            raise InputError(f"{capacity} positions exceed the model's context of {self.dims.max_positions}")
        if not self.inplace:
            if batch > 1:
                raise InputError(
                    "batches need a bundle with the in-place KV flavour",
                    hint="re-export with --kv inplace (the default)",
                )
            return ConcatKVCache(self.backend, self.dims, batch, self._dtype)
        return InplaceKVCache(self.backend, self.dims, batch, self._dtype, capacity)

    # -- prefill ----------------------------------------------------------------------------------

    def prefill(
        self,
        input_ids: np.ndarray,
        image: PreparedImage | np.ndarray | None,
        policy: ExitPolicy,
        capacity: int | None = None,
        prune: PrunePolicy = NO_PRUNE,
    ) -> PrefillResult:
        """One prompt through every graph, exiting where `policy` decides and pruning as `prune`
        says; `capacity`: KV positions to reserve (default: the prompt and 64 more). `image` may be
        the pixel values [1, 3, H, W] of a single-view model."""
        ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
        if isinstance(image, np.ndarray):
            image = PreparedImage.single_view(image, int((ids == self.image_token_id).sum()))
        cache = self.new_cache(capacity or min(ids.shape[0] + 64, self.dims.max_positions))
        return self.prefill_batch([PrefillRequest(ids, image, policy, prune)], cache).results[0]

    def prefill_batch(self, requests: list[PrefillRequest], cache: KVCache) -> BatchPrefill:
        """Several prompts at once, padded on the right, each exiting at its own layer; row b of
        `cache` receives request b."""
        return run_to_end(self.prefill_steps(requests, cache))

    def prefill_steps(
        self, requests: list[PrefillRequest], cache: KVCache, chunk: int | None = None
    ) -> PrefillSteps:
        """`prefill_batch` a step at a time: the generator yields after the vision graph, the
        embeddings and each segment (each `chunk` prompt tokens of a segment, for a single prompt
        longer than that, unless FastV prunes after the segment: its scores need the whole pass),
        and returns the BatchPrefill. A server decodes its running requests
        between the steps; the work and every result are those of `prefill_batch` (a chunk attends
        to the chunks before it through the KV cache, as a conversation's later turn does)."""
        for request in requests:
            self.check_policy(request.policy)
            self.check_prune(request.prune)
        batch = len(requests)
        if cache.batch != batch:
            raise ValueError(f"a cache for {cache.batch} rows cannot hold {batch} requests")
        ids = [np.asarray(r.input_ids, dtype=np.int64).reshape(-1) for r in requests]
        valid = np.array([len(i) for i in ids], dtype=np.int64)  # [B]
        padded = np.full((batch, int(valid.max())), self.pad_token_id, dtype=np.int64)  # [B, S]
        for row, sample in enumerate(ids):
            padded[row, : len(sample)] = sample
        n_visual = [int((sample == self.image_token_id).sum()) for sample in ids]
        for request, visual in zip(requests, n_visual, strict=True):
            if visual and request.image is None:
                raise InputError(f"the prompt has {visual} image tokens but no image was given")
            if visual and visual != request.image.visual_tokens:
                raise InputError(
                    f"the prompt has {visual} image tokens but the image gives {request.image.visual_tokens}"
                )
        busy = _BusyClock()
        try:
            features, deepstack_levels = self._vision_batch(requests, n_visual)
            vision_ms = busy.lap_ms() + sum(r.image.encoded_ms for r in requests if r.image is not None)
            yield from busy.paused()
            feeds = {names.INPUT_IDS: padded, names.IMAGE_FEATURES: features}
            hidden = self._run("embed", feeds)[names.INPUT_EMBEDS]
            positions = self._prompt_positions(requests, ids, padded.shape[1], cache)  # [B, S] or [3, B, S]
            policies, prunes = [r.policy for r in requests], [r.prune for r in requests]
            switch = ExitSwitch(self._exit_graphs, policies, ids, valid, prunes) if any(n_visual) else None
            deepstack = None
            if deepstack_levels is not None:
                deepstack = DeepStackAdder(
                    self.sessions["deepstack_add"], self.family.deepstack_layers, deepstack_levels, n_visual
                )
            if switch is not None:  # DART on the input embeddings
                hidden, positions, valid = switch(None, hidden, positions, valid)
            yield from busy.paused()
            chunk = chunk if batch == 1 and chunk and chunk < padded.shape[1] else None
            hidden, positions, valid, padded_macs = yield from self._segment_steps(
                hidden, positions, valid, cache, switch, deepstack, chunk, busy
            )
            logits = self._head(hidden, valid)  # [B, vocab]
            del hidden, features, feeds, deepstack_levels  # freed before the heap is trimmed
        except BackendError as err:
            raise as_runtime_error(err) from None
        self.bundle.release_freed_memory(cache.nbytes())  # the prefill's activations
        prefill_ms = busy.lap_ms()
        results = []
        for row in range(batch):
            exit_layer = switch.exit_layers[row] if switch is not None else None
            pruned_after = switch.pruned_after[row] if switch is not None else None
            kept = switch.kept_visual[row] if switch is not None else None
            macs = prefill_macs(
                self.decoder_dims,
                len(ids[row]),
                n_visual[row],
                exit_layer,
                pruned_after,
                len(kept) if kept is not None else None,
            )
            results.append(
                PrefillResult(
                    logits=logits[row : row + 1],
                    cache=cache,
                    exit_layer=exit_layer,
                    exit_probs=switch.exit_probs[row] if switch is not None else {},
                    n_tokens=len(ids[row]),
                    n_visual=n_visual[row],
                    macs=macs,
                    timings_ms={
                        "vision": vision_ms,
                        "prefill": prefill_ms,
                        "switch": switch.ms if switch else 0.0,
                    },
                    row=row,
                    pruned_after_layer=pruned_after,
                    kept_visual=kept,
                )
            )
        return BatchPrefill(results, padded_macs)

    def _prompt_positions(
        self, requests: list[PrefillRequest], ids: list[np.ndarray], length: int, cache: KVCache
    ) -> np.ndarray:
        """Original position ids of the padded prompts as the family gives them: [B, S], or [3, B, S]
        for multimodal rotary positions, whose offset to the token index each cache row keeps.
        Padding positions count up from the prompt's length."""
        sections = self.dims.position_sections
        positions = np.tile(np.arange(length), (sections, len(ids), 1))  # [sections, B, S]
        for row, (request, sample) in enumerate(zip(requests, ids, strict=True)):
            rope, offset = self.family.prompt_positions(sample, request.image)  # [sections or 1, N]
            positions[:, row, : len(sample)] = rope
            cache.position_offsets[row] = offset
        return positions if sections > 1 else positions[0]

    # -- decoding ---------------------------------------------------------------------------------

    def forward_tokens(
        self, token_ids: np.ndarray, positions: np.ndarray | int, cache: KVCache
    ) -> np.ndarray:
        """Tokens [B, S] at original positions [B, S] (or starting at one position) through every
        segment, attending to all that `cache` holds (no routers) -> logits [B, vocab] of the last
        ones. A decode step is S = 1."""
        token_ids = np.asarray(token_ids, dtype=np.int64)
        token_ids = token_ids.reshape(1, -1) if token_ids.ndim == 1 else token_ids
        batch, steps = token_ids.shape
        if np.isscalar(positions):
            positions = np.tile(np.arange(positions, positions + steps), (batch, 1))
        positions = np.asarray(positions, dtype=np.int64) + cache.position_offsets[:, None]
        if self.dims.position_sections > 1:  # after the prompt, all sections count up together
            positions = np.repeat(positions[None], self.dims.position_sections, axis=0)
        try:
            feeds = {names.INPUT_IDS: token_ids, names.IMAGE_FEATURES: self._empty_features(batch)}
            hidden = self._run("embed", feeds)[names.INPUT_EMBEDS]
            valid = np.full(batch, steps, dtype=np.int64)
            hidden, _, valid, _ = self._segments(hidden, positions, valid, cache, None)
            return self._head(hidden, valid)
        except BackendError as err:
            raise as_runtime_error(err) from None

    def decode_one_token(self, token: int, position: int, cache: KVCache) -> np.ndarray:
        """One token at original position `position` -> logits [1, vocab]."""
        return self.forward_tokens(np.array([[token]]), position, cache)

    # -- the loop ---------------------------------------------------------------------------------

    def _segments(
        self,
        hidden: Value,
        positions: np.ndarray,
        valid: np.ndarray,
        cache: KVCache,
        switch: ExitSwitch | None,
    ) -> tuple[Value, np.ndarray, np.ndarray, int]:
        """Every segment at once (a decode step, a later turn's tokens)."""
        return run_to_end(self._segment_steps(hidden, positions, valid, cache, switch))

    def _segment_steps(
        self,
        hidden: Value,
        positions: np.ndarray,
        valid: np.ndarray,
        cache: KVCache,
        switch: ExitSwitch | None,
        deepstack: DeepStackAdder | None = None,
        chunk: int | None = None,
        busy: _BusyClock | None = None,
    ) -> Generator[None, None, tuple[Value, np.ndarray, np.ndarray, int]]:
        """The one segment loop, for prefill and decode alike, yielding after each segment (with
        `chunk`, a single sample's tokens go through a segment `chunk` at a time, yielding after each);
        `switch` may drop tokens after a segment, `deepstack` add a DeepStack level before it does.
        `valid` [B]: each row's real tokens (the rest is padding). Returns the hidden state,
        positions and valid counts after the last segment, and the multiply-adds computed."""
        busy = busy if busy is not None else _BusyClock()
        position_value = self.backend.upload(positions)
        computed = 0
        for segment in self.segments:
            scores_needed = switch is not None and switch.needs_scores(segment.last_layer)
            if chunk is not None and not scores_needed and int(valid[0]) > chunk:
                hidden, macs = yield from self._segment_in_chunks(
                    segment, hidden, positions, int(valid[0]), cache, chunk, busy
                )
                scores = None
            else:
                out, macs = self._segment_call(segment, hidden, position_value, positions, valid, cache)
                hidden, scores = out[names.HIDDEN_OUT], out.get(names.PRUNE_SCORES)
            computed += macs
            if deepstack is not None:
                hidden = deepstack(segment.last_layer, hidden, positions.shape[-1], switch)
            if switch is not None:
                before = positions
                hidden, positions, valid = switch(segment, hidden, positions, valid, scores)
                if positions is not before:  # a sample exited: its rows moved, whatever the padded length
                    position_value = self.backend.upload(positions)
            yield from busy.paused()
        return hidden, positions, valid, computed

    def _segment_call(
        self,
        segment: SegmentInfo,
        hidden: Value,
        position_value: Value,
        positions: np.ndarray,
        valid: np.ndarray,
        cache: KVCache,
    ) -> tuple[dict[str, Value], int]:
        """Every row's `valid` tokens through `segment` in one graph call (a whole segment, or one
        chunk of it) -> its outputs and the multiply-adds."""
        layers = range(segment.first_layer, segment.last_layer + 1)
        held = cache.lengths[:, layers.start].copy()  # [B] rows each sample held before this step
        feeds = {names.HIDDEN_IN: hidden, names.POSITION_IDS: position_value, **cache.feeds(layers, valid)}
        if segment.prune_scores:
            feeds[names.LAST_INDEX] = valid - 1
        out = self.sessions[segment.graph].run(feeds, into=cache.outputs(layers))
        cache.update(layers, valid, out)
        rows, length = positions.shape[-2:]
        return out, len(layers) * rows * layer_macs(length, self.decoder_dims, int(held.max()) + length)

    def _segment_in_chunks(
        self,
        segment: SegmentInfo,
        hidden: Value,
        positions: np.ndarray,
        length: int,
        cache: KVCache,
        chunk: int,
        busy: _BusyClock,
    ) -> Generator[None, None, tuple[Value, int]]:
        """One sample's `length` tokens through `segment`, `chunk` at a time: each chunk attends to the
        keys and values the chunks before it wrote, so the outputs are the whole pass's. The hidden
        state is cut and joined on the host (the cost of chunking)."""
        states = self.backend.download(hidden)  # [1, S, D]
        outputs, computed = [], 0
        for start in range(0, length, chunk):
            stop = min(start + chunk, length)
            piece = np.ascontiguousarray(positions[..., start:stop])
            out, macs = self._segment_call(
                segment,
                self.backend.upload(np.ascontiguousarray(states[:, start:stop])),
                self.backend.upload(piece),
                piece,
                np.array([stop - start]),
                cache,
            )  # its prune scores (if the graph has them) are not needed: FastV never prunes here
            computed += macs
            outputs.append(self.backend.download(out[names.HIDDEN_OUT]))
            if stop < length:
                yield from busy.paused()
        return self.backend.upload(np.concatenate(outputs, axis=1)), computed

    def _vision_batch(
        self, requests: list[PrefillRequest], n_visual: list[int]
    ) -> tuple[Value, Value | None]:
        """Image features [B, V, D] on the backend (zeros for rows without an image: their prompts
        hold no image token, so the embed graph never reads them), and DeepStack levels [B, n, V, D]
        for families that have them (else None)."""
        if not any(n_visual):
            return self._empty_features(len(requests)), None
        images = [r.image if visual else None for r, visual in zip(requests, n_visual, strict=True)]
        if self.family.vision_per_image or any(i is not None and i.encoded is not None for i in images):
            return self._per_image_features(images)
        shapes = {image.pixel_values.shape for image in images if image is not None}
        if len(shapes) != 1 or len({v for v in n_visual if v}) != 1:
            raise InputError("a batch's images must have the same size and number of visual tokens")
        shape = shapes.pop()
        pixels = np.concatenate(
            [image.pixel_values if image is not None else np.zeros(shape) for image in images]
        ).astype(self._dtype)
        return self._run("vision", {names.PIXEL_VALUES: pixels})[names.IMAGE_FEATURES], None

    def _per_image_features(self, images: list[PreparedImage | None]) -> tuple[Value, Value | None]:
        """Images whose graph inputs depend on their size (the family says so): the vision graph
        runs on each; a batch's rows (and DeepStack levels) are zero-padded to the longest."""
        deep = self.family.deepstack_layers > 0
        outputs = [self._vision_outputs(image) if image is not None else None for image in images]
        if len(images) == 1:
            return outputs[0][names.IMAGE_FEATURES], outputs[0][names.DEEPSTACK_FEATURES] if deep else None

        def each(name: str) -> list[Value | None]:
            return [out[name] if out is not None else None for out in outputs]

        features = self._padded(each(names.IMAGE_FEATURES), axis=1)
        levels = self._padded(each(names.DEEPSTACK_FEATURES), axis=2) if deep else None
        return features, levels

    def encode_image(self, image: PreparedImage) -> PreparedImage:
        """`image` with its vision graph run now: a server does this on its preparing thread, so
        decode steps go on while an image is encoded, and the prefill then skips the vision graph."""
        if image.encoded is not None:
            return image
        started = time.perf_counter()
        try:
            outputs = self._vision_outputs(image)
        except BackendError as err:
            raise as_runtime_error(err) from None
        return replace(image, encoded=outputs, encoded_ms=1e3 * (time.perf_counter() - started))

    def _vision_outputs(self, image: PreparedImage) -> dict[str, Value]:
        """One image's vision graph outputs: computed before if they were, else now."""
        if image.encoded is not None:
            return image.encoded
        return self._run(
            "vision", {names.PIXEL_VALUES: image.pixel_values.astype(self._dtype), **image.feeds}
        )

    def _padded(self, values: list[Value | None], axis: int) -> Value:
        """Per-image outputs [1, ..., V_b, D] -> one [B, ..., max V_b, D], zeros where absent."""
        arrays = [self.backend.download(v)[0] if v is not None else None for v in values]
        shape = next(a.shape for a in arrays if a is not None)
        longest = max(a.shape[axis - 1] for a in arrays if a is not None)
        padded = np.zeros((len(arrays), *shape[: axis - 1], longest, *shape[axis:]), self._dtype)
        for b, array in enumerate(arrays):
            if array is not None:
                padded[(b, *(slice(None),) * (axis - 1), slice(0, array.shape[axis - 1]))] = array
        return self.backend.upload(padded)

    def _empty_features(self, batch: int) -> Value:
        """[B, 0, D]: no image features (a text-only prompt, a decode step); 0 bytes to upload."""
        return self.backend.upload(np.zeros((batch, 0, self.dims.hidden), dtype=self._dtype))

    def _head(self, hidden: Value, valid: np.ndarray) -> np.ndarray:
        feeds = {names.HIDDEN_OUT: hidden, names.LAST_INDEX: np.asarray(valid, dtype=np.int64) - 1}
        return self.backend.download(self._run("head", feeds)[names.LOGITS])

    def _run(self, graph: str, feeds: dict) -> dict[str, Value]:
        return self.sessions[graph].run(feeds)


PrefillSteps = Generator[None, None, BatchPrefill]


def run_to_end(steps: Generator):
    """Run a generator of steps through and return what it returns."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


class _BusyClock:
    """Time a prefill spends computing, not the time it waits between its steps."""

    def __init__(self) -> None:
        self._since = time.perf_counter()
        self._ms = 0.0

    def lap_ms(self) -> float:
        """Busy time since the last lap (resets)."""
        now = time.perf_counter()
        ms, self._ms, self._since = self._ms + 1e3 * (now - self._since), 0.0, now
        return ms

    def paused(self) -> Generator[None, None, None]:
        """Yield once, not counting the time until resumed."""
        self._ms += 1e3 * (time.perf_counter() - self._since)
        yield
        self._since = time.perf_counter()
