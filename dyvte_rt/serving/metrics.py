"""The server's Prometheus metrics (prometheus-client), one registry per server."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from dyvte_rt.api.answer import Answer
from dyvte_rt.serving.engine import ServeRequest

# seconds; fine enough around a decode step (5 ms on the demo to 50 ms on a 7B int4 CPU batch)
GAP_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10)


class ServerMetrics:
    def __init__(self, num_layers: int) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "dyvte_requests", "Chat completion requests, by outcome", ["outcome"], registry=self.registry
        )
        self.tokens = Counter("dyvte_generated_tokens", "Tokens generated", registry=self.registry)
        self.prompt_tokens = Counter("dyvte_prompt_tokens", "Prompt tokens prefilled", registry=self.registry)
        # the last layer that saw the visual tokens; L-1 (the last layer) when they never left
        self.exit_layer = Histogram(
            "dyvte_exit_layer",
            "Exit layer per request (num_layers - 1: no exit)",
            buckets=[*range(num_layers - 1), num_layers - 1],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "dyvte_time_to_first_token_seconds",
            "Time to first token, queueing included",
            registry=self.registry,
        )
        self.token_gap = Histogram(  # vLLM's inter-token latency: the pace a stream sees
            "dyvte_inter_token_seconds",
            "Time from each generated token to the next of the same request",
            buckets=GAP_BUCKETS,
            registry=self.registry,
        )
        self.latency = Histogram(
            "dyvte_request_seconds", "Request latency, queueing included", registry=self.registry
        )
        self.queue_depth = Gauge(
            "dyvte_queue_depth", "Requests waiting for a batch slot", registry=self.registry
        )
        self.active = Gauge("dyvte_active_requests", "Requests being decoded", registry=self.registry)
        self.step_rows = Histogram(
            "dyvte_decode_step_requests",
            "Requests decoded together in one decode step",
            buckets=[1, 2, 4, 8, 16, 32, 64],
            registry=self.registry,
        )
        self._last_layer = num_layers - 1

    def finished(self, request: ServeRequest, done: Answer) -> None:
        self.requests.labels(outcome="ok").inc()
        self.tokens.inc(len(done.token_ids))
        self.prompt_tokens.inc(done.prompt_tokens)
        self.exit_layer.observe(self._last_layer if done.exit_layer is None else done.exit_layer)
        self.ttft.observe(done.timings_ms["ttft"] / 1e3)
        self.latency.observe(done.timings_ms["latency"] / 1e3)
        for gap in done.token_gaps_ms:
            self.token_gap.observe(gap / 1e3)

    def stepped(self, requests: int) -> None:
        self.step_rows.observe(requests)

    def cancelled(self, request: ServeRequest) -> None:
        self.requests.labels(outcome="cancelled").inc()

    def rejected(self, status: int) -> None:
        self.requests.labels(outcome=str(status)).inc()

    def render(self, queued: int, active: int) -> tuple[bytes, str]:
        self.queue_depth.set(queued)
        self.active.set(active)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
