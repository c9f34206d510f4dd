"""Prometheus metrics of one server, in a registry of its own (two servers in one process never share counts)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("finetune_serve_requests", "inference requests answered, by protocol and status",
                                ["protocol", "code"], registry=r)
        self.errors = Counter("finetune_serve_errors", "inference requests refused or failed, by reason",
                              ["reason"], registry=r)
        self.latency = Histogram("finetune_serve_request_seconds", "inference request latency (seconds)",
                                 ["protocol"], buckets=LATENCY_BUCKETS, registry=r)
        self.texts = Counter("finetune_serve_texts", "texts labelled", registry=r)
        self.batch_size = Histogram("finetune_serve_batch_size", "texts per model call", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.labels = Counter("finetune_serve_predicted_label", "predicted labels", ["label"], registry=r)
        self.model = Gauge("finetune_serve_model_info", "the model version served (1 once ready)",
                           ["model", "version", "variant"], registry=r)

    def served(self, name: str, version: str, variant: str) -> None:
        self.model.labels(model=name, version=version, variant=variant).set(1)

    def predicted(self, labels: list[str]) -> None:
        self.texts.inc(len(labels))
        for label in labels:
            self.labels.labels(label=label).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
