"""What fewer decoder graph calls would give the exit: each way of cutting the decoder into graphs
timed side by side on the same bundle, against the theoretical speed-up.

    python benchmarks/fewer_calls.py --bundle ~/.cache/dyvte-rt/demo-bundle --tokens 75 --visual 64 \
        --exit-layer 1 --threads 1

A bundle's decoder is cut into segments at the candidate exit layers, each a graph call, and a router
graph follows each candidate segment in prefill. On a small model each call's fixed work (ONNX
Runtime's per-node and per-run cost, the runtime's Python) does not shrink with the tokens, so an
exit saves less than its multiply-adds. This builds, from the bundle's own graphs (ONNX composition:
the same nodes and weights, names prefixed), the graphs fewer calls would need, checks each against
the calls it replaces, and times them through the runtime's sessions, Python included, interleaved
(medians of --rounds rounds of --calls calls; a new KV cache per call, made outside the timing):

- `segments`: today — every segment a call; with the exit, the segments up to the exit on N tokens,
  the exit segment's router (which also gathers the N − V rows an exit keeps), the rest on N − V;
- `router in segment`: the exit segment returns its router's logits and gathered rows itself (one
  call fewer), at the price of running the router on every call of that graph: a decode step, a
  prefill that asks no router;
- `one call per phase`: the layers up to the exit in one graph with its router, the layers after it
  in one more — the fewest calls an exit can take; without an exit, every layer in one graph. That is
  what an exit decided inside the engine would run. It holds every weight twice here (one session per
  graph), which is why the runtime has no such graphs (docs/runtime.md, *Why decoding runs the
  segments*).

- `one call per phase, no prune scores`: the same without the FastV scores every segment but the
  last computes (the attention of the last token to the others, about 20 nodes a segment), which
  only a FastV prune after that layer reads.

A decode step (1 token, no router) is timed for each. Every composed graph is a second copy of its
weights in memory: meant for small models (the demo).
Embedding and head calls are the same in every setting and left out, as in `exit_ceiling.py`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dyvte_rt.api.model import DyvteModel
from dyvte_rt.bundle import io_names as names
from dyvte_rt.bundle.manifest import SegmentInfo
from dyvte_rt.runtime.compute import prefill_macs
from engines import Session

EXIT_HIDDEN = "exit_hidden_states"  # a fused router's gathered rows (the segment's input is HIDDEN_IN)
ROUTER_INPUTS = (names.ROUTER_POOL, names.KEEP_INDEX)
LARGEST_BUNDLE = 1 << 30  # bytes: the composed graphs are saved whole (protobuf's 2 GiB) and loaded again


def chain_segments(models: list) -> object:
    """One ONNX model running `models` (segment graphs of consecutive layers) one after another:
    each reads the previous one's hidden state; position ids, total lengths and last index are
    shared inputs (every layer of a chain holds the same rows); the last one's hidden state is the
    output, with every layer's present keys/values and each segment's prune scores."""
    from onnx import compose

    shared = {names.POSITION_IDS, names.TOTAL_LENGTHS, names.LAST_INDEX}
    parts = []
    for index, model in enumerate(models):
        prefix = f"segment{index}/"
        renamed = {f"{prefix}{name}": name for name in shared}
        kv = [
            v.name
            for v in [*model.graph.input, *model.graph.output]
            if v.name.startswith(("past.", "present."))
        ]
        renamed |= {f"{prefix}{name}": name for name in kv}  # each layer's own: unique across the chain
        if index == 0:
            renamed[f"{prefix}{names.HIDDEN_IN}"] = names.HIDDEN_IN
        else:
            renamed[f"{prefix}{names.HIDDEN_IN}"] = f"segment{index - 1}/{names.HIDDEN_OUT}"
        if index == len(models) - 1:
            renamed[f"{prefix}{names.HIDDEN_OUT}"] = names.HIDDEN_OUT
        parts.append(_renamed(compose.add_prefix(model, prefix), renamed))
    internal = {f"segment{index}/{names.HIDDEN_OUT}" for index in range(len(models) - 1)}
    return _joined(parts, hidden_outputs=internal)


def fuse_router(segment, router) -> object:
    """`segment` followed by `router`, which reads the segment's hidden state and last index: the
    segment's inputs and `router_pool`, `keep_index`; its outputs and `router_logits`,
    `exit_hidden_states`."""
    from onnx import compose

    shared = {names.HIDDEN_OUT, names.LAST_INDEX, names.ROUTER_LOGITS, *ROUTER_INPUTS}
    renamed = {f"router/{name}": name for name in shared} | {f"router/{names.HIDDEN_IN}": EXIT_HIDDEN}
    return _joined([segment, _renamed(compose.add_prefix(router, "router/"), renamed)], hidden_outputs=set())


def without_prune_scores(model) -> object:
    """`model` without its prune-score outputs and the nodes and inputs only they needed."""
    import onnx

    lean = onnx.ModelProto()
    lean.CopyFrom(model)
    graph = lean.graph
    outputs = [value for value in graph.output if not value.name.endswith(names.PRUNE_SCORES)]
    needed, nodes = {value.name for value in outputs}, []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            nodes.append(node)
            needed.update(node.input)
    inputs = [value for value in graph.input if value.name in needed]
    initializers = [tensor for tensor in graph.initializer if tensor.name in needed]
    for field, kept in ((graph.output, outputs), (graph.node, nodes[::-1]), (graph.input, inputs)):
        del field[:]
        field.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    return lean


def _renamed(model, renamed: dict[str, str]):
    graph = model.graph
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
        node.output[:] = [renamed.get(name, name) for name in node.output]
    for value in [*graph.input, *graph.output]:
        value.name = renamed.get(value.name, value.name)
    return model


def _joined(models: list, hidden_outputs: set[str]):
    """The models' graphs as one: an input another graph computes is no input; `hidden_outputs`
    are no outputs."""
    import onnx

    joined = onnx.ModelProto()
    joined.CopyFrom(models[0])
    graph = joined.graph
    for model in models[1:]:
        graph.node.extend(model.graph.node)
        graph.initializer.extend(model.graph.initializer)
        graph.value_info.extend(model.graph.value_info)
        graph.input.extend(model.graph.input)
        graph.output.extend(model.graph.output)
        domains = {opset.domain for opset in joined.opset_import}
        joined.opset_import.extend(opset for opset in model.opset_import if opset.domain not in domains)
    produced = {name for node in graph.node for name in node.output}
    inputs, seen = [], set()
    for value in graph.input:
        if value.name not in produced and value.name not in seen:
            inputs.append(value)
            seen.add(value.name)
    outputs = [value for value in graph.output if value.name not in hidden_outputs]
    del graph.input[:], graph.output[:]
    graph.input.extend(inputs)
    graph.output.extend(outputs)
    return joined


class _Graphs:
    """The bundle's sessions and the composed ones, called as the runtime calls its segments."""

    def __init__(self, model: DyvteModel, folder: Path, exit_layer: int) -> None:
        import onnx

        self.pipeline = pipeline = model.pipeline
        segments = pipeline.segments
        self.before = [s for s in segments if s.last_layer <= exit_layer]
        self.after = [s for s in segments if s.last_layer > exit_layer]
        self.exit_segment = self.before[-1]
        if self.exit_segment.last_layer != exit_layer or self.exit_segment.router is None:
            raise SystemExit(f"layer {exit_layer} ends no segment with a router in this bundle")

        def load(segment: SegmentInfo | str):
            graph = segment if isinstance(segment, str) else segment.graph
            return onnx.load(model.bundle.path / model.manifest.graphs[graph].file)

        def session(name: str, proto) -> Session:
            path = folder / f"{name}.onnx"
            onnx.save(proto, path)
            inputs = tuple(value.name for value in proto.graph.input)
            outputs = tuple(value.name for value in proto.graph.output)
            return pipeline.backend.open(path, inputs, outputs)

        router = load(self.exit_segment.router)
        head = (
            chain_segments([load(s) for s in self.before]) if len(self.before) > 1 else load(self.before[0])
        )
        self.fused_exit = session("exit_segment_with_router", fuse_router(load(self.exit_segment), router))
        up_to_exit = fuse_router(head, router)
        after_exit = chain_segments([load(s) for s in self.after])
        all_layers = chain_segments([load(s) for s in segments])
        self.up_to_exit = session("up_to_exit_with_router", up_to_exit)
        self.after_exit = session("after_exit", after_exit)
        self.all_layers = session("all_layers", all_layers)
        self.lean_up_to_exit = session("lean_up_to_exit_with_router", without_prune_scores(up_to_exit))
        self.lean_after_exit = session("lean_after_exit", without_prune_scores(after_exit))
        self.lean_all_layers = session("lean_all_layers", without_prune_scores(all_layers))

    def composed(self) -> list[Session]:
        return [
            self.fused_exit,
            self.up_to_exit,
            self.after_exit,
            self.all_layers,
            self.lean_up_to_exit,
            self.lean_after_exit,
            self.lean_all_layers,
        ]

    def feeds(self, layers: range, n: int, kept: int) -> tuple[dict, dict, object]:
        """Inputs of `n` tokens for `layers`, the router's (an exit keeps `kept` rows), a new cache."""
        backend, dims = self.pipeline.backend, self.pipeline.dims
        rng = np.random.default_rng(n)
        positions = np.arange(n, dtype=np.int64)[None]
        if dims.position_sections > 1:
            positions = np.repeat(positions[None], dims.position_sections, axis=0)
        cache = self.pipeline.new_cache(n + 8)
        valid = np.array([n], dtype=np.int64)
        feeds = {
            names.HIDDEN_IN: backend.upload(rng.standard_normal((1, n, dims.hidden), dtype=np.float32)),
            names.POSITION_IDS: backend.upload(positions),
            names.LAST_INDEX: valid - 1,
            **cache.feeds(layers, valid),
        }
        router = {
            names.ROUTER_POOL: np.full((1, n), 1.0 / n, dtype=np.float32),
            names.KEEP_INDEX: np.arange(n - kept, n, dtype=np.int64)[None],
        }
        return feeds, router, cache

    def run(self, session: Session, feeds: dict, cache, layers: range) -> dict:
        wanted = {name: value for name, value in feeds.items() if name in session.inputs}
        return session.run(wanted, into=cache.outputs(layers))

    def segment_calls(
        self, segments: list[SegmentInfo], n: int, kept: int = 1, router: bool = False
    ) -> Callable[[], dict]:
        """One call per segment on n tokens (and the exit segment's router after it) -> the last
        segment's outputs (and the router's)."""
        layers = range(segments[0].first_layer, segments[-1].last_layer + 1)
        feeds, router_feeds, cache = self.feeds(layers, n, kept)

        def call() -> dict:
            hidden = feeds[names.HIDDEN_IN]
            for segment in segments:
                own = range(segment.first_layer, segment.last_layer + 1)
                session = self.pipeline.sessions[segment.graph]
                out = self.run(session, {**feeds, names.HIDDEN_IN: hidden}, cache, own)
                hidden = out[names.HIDDEN_OUT]
            if not router:
                return out
            router_session = self.pipeline.sessions[self.exit_segment.router]
            last = feeds[names.LAST_INDEX]
            routed = router_session.run({names.HIDDEN_OUT: hidden, names.LAST_INDEX: last, **router_feeds})
            return out | {
                names.ROUTER_LOGITS: routed[names.ROUTER_LOGITS],
                EXIT_HIDDEN: routed[names.HIDDEN_IN],
            }

        return call

    def one_call(self, session: Session, layers: range, n: int, kept: int = 1) -> Callable[[], dict]:
        feeds, router_feeds, cache = self.feeds(layers, n, kept)
        return lambda: self.run(session, {**feeds, **router_feeds}, cache, layers)

    def check(self, n: int, kept: int, every: range, up_to: range, after: range) -> float:
        """The largest difference between each composed graph's outputs and those of the calls it
        replaces, on the same inputs (the hidden state, and the router's logits and rows)."""
        exit_layers = range(self.exit_segment.first_layer, self.exit_segment.last_layer + 1)
        calls, one = self.segment_calls, self.one_call
        segments = self.pipeline.segments
        pairs = [
            (calls([self.exit_segment], n, kept, True), one(self.fused_exit, exit_layers, n, kept)),
            (calls(self.before, n, kept, True), one(self.up_to_exit, up_to, n, kept)),
            (calls(self.before, n, kept, True), one(self.lean_up_to_exit, up_to, n, kept)),
            (calls(self.after, kept), one(self.after_exit, after, kept)),
            (calls(self.after, kept), one(self.lean_after_exit, after, kept)),
            (calls(segments, n), one(self.all_layers, every, n)),
            (calls(segments, n), one(self.lean_all_layers, every, n)),
        ]
        download, worst = self.pipeline.backend.download, 0.0
        for calls, composed in pairs:
            expected, got = calls(), composed()
            for name in (names.HIDDEN_OUT, names.ROUTER_LOGITS, EXIT_HIDDEN):
                if name in expected:
                    worst = max(worst, float(np.abs(download(expected[name]) - download(got[name])).max()))
        return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--tokens", type=int, required=True, help="prompt tokens N")
    parser.add_argument("--visual", type=int, required=True, help="visual tokens V among them")
    parser.add_argument("--exit-layer", type=int, required=True, help="a candidate layer with a router")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=100, help="calls per setting in a round")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not 0 < args.visual < args.tokens:
        parser.error("need 0 < --visual < --tokens")

    n, kept = args.tokens, args.tokens - args.visual
    with DyvteModel.load(args.bundle, threads=args.threads) as model, tempfile.TemporaryDirectory() as tmp:
        pipeline = model.pipeline
        if sum(info.bytes for info in model.manifest.files.values()) > LARGEST_BUNDLE:
            parser.error(
                "this benchmark composes graphs in memory, each a second copy of its weights: "
                "small models only (bundles under 1 GiB)"
            )
        graphs = _Graphs(model, Path(tmp), args.exit_layer)
        last = pipeline.dims.num_layers - 1
        every, up_to = range(0, last + 1), range(0, args.exit_layer + 1)
        after = range(args.exit_layer + 1, last + 1)
        exit_layers = range(graphs.exit_segment.first_layer, args.exit_layer + 1)
        settings: dict[str, Callable[[], Callable[[], None]]] = {
            "segments/no exit": lambda: graphs.segment_calls(pipeline.segments, n),
            "segments/up to the exit + router": lambda: graphs.segment_calls(graphs.before, n, kept, True),
            "segments/after the exit": lambda: graphs.segment_calls(graphs.after, kept),
            "router in segment/exit segment": lambda: graphs.one_call(
                graphs.fused_exit, exit_layers, n, kept
            ),
            "router in segment/exit segment + router": lambda: graphs.segment_calls(
                [graphs.exit_segment], n, kept, True
            ),
            "one call per phase/no exit": lambda: graphs.one_call(graphs.all_layers, every, n),
            "one call per phase/up to the exit": lambda: graphs.one_call(graphs.up_to_exit, up_to, n, kept),
            "one call per phase/after the exit": lambda: graphs.one_call(graphs.after_exit, after, kept),
            "no prune scores/no exit": lambda: graphs.one_call(graphs.lean_all_layers, every, n),
            "no prune scores/up to the exit": lambda: graphs.one_call(graphs.lean_up_to_exit, up_to, n, kept),
            "no prune scores/after the exit": lambda: graphs.one_call(graphs.lean_after_exit, after, kept),
            "decode/segments": lambda: graphs.segment_calls(pipeline.segments, 1),
            "decode/one call": lambda: graphs.one_call(graphs.all_layers, every, 1),
            "decode/one call, no prune scores": lambda: graphs.one_call(graphs.lean_all_layers, every, 1),
            "decode/exit segment": lambda: graphs.segment_calls([graphs.exit_segment], 1),
            "decode/exit segment with its router": lambda: graphs.one_call(graphs.fused_exit, exit_layers, 1),
        }
        difference = graphs.check(n, kept, every, up_to, after)
        if difference > 1e-4:
            raise SystemExit(f"a composed graph differs from the calls it replaces by {difference:.1e}")
        times: dict[str, list[float]] = {key: [] for key in settings}
        for round_ in range(args.rounds):
            for key in list(settings) if round_ % 2 == 0 else list(settings)[::-1]:
                times[key].append(_mean_ms(settings[key], args.calls))
        for session in graphs.composed():
            session.close()
    ms = {key: float(np.median(values)) for key, values in times.items()}
    macs = prefill_macs(pipeline.decoder_dims, n, args.visual, args.exit_layer)
    theory = macs.full / macs.actual
    segments_exit = ms["segments/up to the exit + router"] + ms["segments/after the exit"]
    fused_exit = (
        segments_exit - ms["router in segment/exit segment + router"] + ms["router in segment/exit segment"]
    )
    phases_exit = ms["one call per phase/up to the exit"] + ms["one call per phase/after the exit"]
    layouts = {
        "segments": (ms["segments/no exit"], segments_exit, ms["decode/segments"]),
        "router in segment": (
            ms["segments/no exit"] + ms["decode/exit segment with its router"] - ms["decode/exit segment"],
            fused_exit,
            ms["decode/segments"] + ms["decode/exit segment with its router"] - ms["decode/exit segment"],
        ),
        "one call per phase": (ms["one call per phase/no exit"], phases_exit, ms["decode/one call"]),
        "one call per phase, no prune scores": (
            ms["no prune scores/no exit"],
            ms["no prune scores/up to the exit"] + ms["no prune scores/after the exit"],
            ms["decode/one call, no prune scores"],
        ),
    }
    report = {
        "tokens": n,
        "visual": args.visual,
        "exit_layer": args.exit_layer,
        "threads": args.threads,
        "theoretical_speedup": theory,
        "max_abs_difference": difference,
        "ms": ms,
        "layouts": {
            name: {
                "no_exit_ms": full,
                "exit_ms": exited,
                "speedup": full / exited,
                "of_theory": full / exited / theory,
                "decode_step_ms": decode,
            }
            for name, (full, exited, decode) in layouts.items()
        },
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"decoder calls alone, {n} tokens ({args.visual} visual), exit after layer {args.exit_layer} "
            f"(composed graphs within {difference:.1e} of the calls they replace):"
        )
        for name, row in report["layouts"].items():
            print(
                f"  {name:<36} no exit {row['no_exit_ms']:.3f} ms, exit {row['exit_ms']:.3f} ms: "
                f"{row['speedup']:.2f}x ({row['of_theory']:.2f} of {theory:.2f}x); "
                f"decode step {row['decode_step_ms']:.3f} ms"
            )
    return 0


def _mean_ms(make: Callable[[], Callable[[], None]], calls: int) -> float:
    """Mean time of `calls` calls, each made ready (inputs, a new cache) outside the timing, ms."""
    total = 0.0
    for _ in range(calls):
        call = make()
        start = time.perf_counter()
        call()
        total += time.perf_counter() - start
    return total / calls * 1e3


if __name__ == "__main__":
    raise SystemExit(main())
