"""Prometheus metrics, one registry per app. Speculation and request metrics use vLLM's names so
dashboards built for vLLM work unchanged (counters are exposed with the `_total` suffix)."""

from __future__ import annotations

from collections.abc import Callable

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from api.backend import Final

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class Metrics:
    def __init__(self, model_name: str):
        prometheus_client.disable_created_metrics()
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels + list(extra), registry=self.registry)

        self.num_drafts = counter("vllm:spec_decode_num_drafts", "Speculative proposal rounds.")
        self.num_draft_tokens = counter("vllm:spec_decode_num_draft_tokens", "Draft tokens proposed.")
        self.num_accepted_tokens = counter("vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self.accepted_per_pos = counter("vllm:spec_decode_num_accepted_tokens_per_pos",
                                        "Draft tokens accepted at each draft position.", ("position",))
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Tokens generated.")
        self.request_success = counter("vllm:request_success", "Finished generation requests.",
                                       ("finished_reason",))
        self.requests_cancelled = counter("rapid:requests_cancelled",
                                          "Generations cancelled by a disconnect or timeout.")
        self.ingests = counter("rapid:ingest_jobs", "Finished ingest jobs by outcome.", ("outcome",))
        self.e2e_latency = Histogram("vllm:e2e_request_latency_seconds", "Generation request latency.",
                                     labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to the first generated token.",
                              labels, buckets=TTFT_BUCKETS, registry=self.registry)
        self.queue_time = Histogram("vllm:request_queue_time_seconds",
                                    "Time waiting for the generation worker.", labels, buckets=TTFT_BUCKETS,
                                    registry=self.registry)
        self.ingest_latency = Histogram("rapid:ingest_seconds", "Ingest job duration.", labels,
                                        buckets=LATENCY_BUCKETS, registry=self.registry)
        self.waiting = Gauge("vllm:num_requests_waiting", "Generation requests in the queue.", labels,
                             registry=self.registry)
        self.running = Gauge("vllm:num_requests_running", "Generation requests running.", labels,
                             registry=self.registry)

    def track_queue(self, waiting: Callable[[], int], running: Callable[[], int]) -> None:
        self.waiting.labels(self.model_name).set_function(waiting)
        self.running.labels(self.model_name).set_function(running)

    def generation_finished(self, final: Final) -> None:
        m = self.model_name
        spec = final.speculation
        self.num_drafts.labels(m).inc(spec.num_drafts)
        self.num_draft_tokens.labels(m).inc(spec.num_draft_tokens)
        self.num_accepted_tokens.labels(m).inc(spec.num_accepted_tokens)
        for position, accepted in enumerate(spec.accepted_per_position):
            self.accepted_per_pos.labels(m, str(position)).inc(accepted)
        self.prompt_tokens.labels(m).inc(final.usage.prompt_tokens)
        self.generation_tokens.labels(m).inc(final.usage.completion_tokens)
        self.request_success.labels(m, final.finish_reason).inc()
        timings = final.timings
        if timings is not None:
            self.queue_time.labels(m).observe(timings.queued_s)
            if timings.ttft_s is not None:
                self.ttft.labels(m).observe(timings.ttft_s)
            self.e2e_latency.labels(m).observe(timings.total_s)

    def generation_cancelled(self) -> None:
        self.requests_cancelled.labels(self.model_name).inc()

    def ingest_finished(self, outcome: str, seconds: float) -> None:
        self.ingests.labels(self.model_name, outcome).inc()
        self.ingest_latency.labels(self.model_name).observe(seconds)

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)
