"""Prometheus metrics of one service (its own registry, so two apps in one process never mix):
requests and errors by endpoint, latency histograms, the scheduler's batches, queue depth,
admissions, rejections, drops, cancellations and the model thread's busy seconds."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics", "CONTENT_TYPE"]

CONTENT_TYPE = CONTENT_TYPE_LATEST  # text/plain; version=...; charset=utf-8
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("icl_requests", "Requests answered, by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.errors = Counter("icl_request_errors", "Requests answered with a 4xx or 5xx status, by endpoint "
                              "and status code.", ["endpoint", "status"], registry=r)
        self.latency = Histogram("icl_request_duration_seconds", "Time from a request's arrival to its response "
                                 "(headers, for a stream), by endpoint.", ["endpoint"], buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.batch_texts = Histogram("icl_batch_texts", "Texts per engine call made by the scheduler.",
                                     buckets=BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram("icl_batch_requests", "Requests merged into one engine call.",
                                        buckets=BATCH_BUCKETS, registry=r)
        self.queue_texts = Gauge("icl_queue_texts", "Classify texts waiting for the model.", registry=r)
        self.queue_jobs = Gauge("icl_queue_requests", "Requests (all kinds) waiting for the model.", registry=r)
        self.admitted = Counter("icl_jobs_admitted", "Model work admitted to the queue, by kind.", ["kind"], registry=r)
        self.rejected = Counter("icl_jobs_rejected", "Model work refused at admission (503: the queue could not "
                                "take it in time), by kind.", ["kind"], registry=r)
        self.dropped = Counter("icl_jobs_dropped", "Admitted work dropped before it reached the model (its deadline "
                               "passed or its client left), by kind.", ["kind"], registry=r)
        self.cancelled = Counter("icl_jobs_cancelled", "Work stopped while the model ran it (every request in it "
                                 "was past its deadline or gone), by kind.", ["kind"], registry=r)
        self.busy = Counter("icl_model_busy_seconds", "Seconds the model thread spent running admitted work, by "
                            "kind (over wall time: its utilisation).", ["kind"], registry=r)
        self.ready = Gauge("icl_ready", "1 once the LM and the indexes named at start are loaded.", registry=r)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if status >= 400:
            self.errors.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
