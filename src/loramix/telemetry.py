"""What `loramix serve` counts, in Prometheus' text format at GET /metrics (one registry per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets from 5 ms (a token on a GPU) to 60 s (a long queue on a CPU).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("loramix_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("loramix_prompt_tokens", "Prompt tokens received", registry=r)
        self.generated_tokens = Counter("loramix_generated_tokens", "Tokens generated", registry=r)
        self.cancelled = Counter("loramix_cancelled_sequences", "Sequences cancelled by their client", registry=r)
        self.failed = Counter("loramix_failed_sequences", "Sequences ended alone by a failure of their own", registry=r)
        self.queue_depth = Gauge("loramix_queue_depth", "Sequences waiting to join the batch", registry=r)
        self.running = Gauge("loramix_running_sequences", "Sequences in the running batch", registry=r)
        self.time_to_first_token = Histogram(
            "loramix_time_to_first_token_seconds", "From arrival to the first token", buckets=LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.inter_token_latency = Histogram(
            "loramix_inter_token_latency_seconds", "Between two tokens of one sequence", buckets=LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.routing_seconds = Counter("loramix_routing_seconds", "Time spent routing (embedding texts)", registry=r)
        self.reroutes = Counter("loramix_reroutes", "Routing steps (one per sequence re-routed)", registry=r)
        self.steps = Counter("loramix_engine_steps", "Decoding steps of the engine", registry=r)

    def render(self) -> str:
        return generate_latest(self.registry).decode()
