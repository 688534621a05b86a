"""Prometheus metrics of this process, and the per-batch record published to the metrics topic."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("maas_requests_total", "Requests answered, by model and outcome", ["model", "outcome"])
ERRORS = Counter("maas_errors_total", "Requests that ended in an error, by error code", ["code"])
DEAD_LETTERS = Counter("maas_dead_letters_total", "Records sent to the dead-letter topic", ["code"])
METRICS_UNPUBLISHED = Counter("maas_batch_metrics_unpublished_total",
                              "Per-batch metrics records that could not be published to the metrics topic")
BATCH_SIZE = Histogram(
    "maas_batch_size", "Rows per executed batch", ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
)
QUEUE_WAIT = Histogram(
    "maas_queue_wait_seconds",
    "Time requests waited in the batcher; one observation per submission (requests that arrived in one fetch "
    "are submitted together)", ["model"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
)
COMPUTE = Histogram(
    "maas_compute_seconds", "Model execution time per batch", ["model"],
    buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2),
)
IN_FLIGHT = Gauge("maas_in_flight_requests", "Requests received and not yet answered")
CONSUMER_LAG = Gauge("maas_consumer_lag", "Records behind the partition's end, per owned partition",
                     ["topic", "partition"])
MODEL_CACHE = Counter("maas_model_cache_total", "Model cache lookups by result", ["result"])
MODEL_LOAD = Histogram(
    "maas_model_load_seconds", "Seconds a model version took to load and warm up (kernels compiled and tuned, "
    "graphs captured) before it served", ["model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300),
)
MODEL_EVICTIONS = Counter("maas_model_cache_evictions_total",
                          "Loaded model versions dropped from the warm cache to stay within its memory budget")
MODEL_CACHE_BYTES = Gauge("maas_model_cache_bytes", "Bytes of weights held by the warm model cache")
KERNEL_BINARIES = Counter(
    "maas_kernel_binaries_total",
    "GPU kernel binaries model warm-ups needed, by where they came from: compiled, or loaded from the Triton cache "
    "(a persistent TRITON_CACHE_DIR, or binaries precompiled into the image by `maas models precompile`)",
    ["model", "source"],
)
BORROWED_TUNINGS = Counter(
    "maas_borrowed_tunings_total",
    "GPU kernel tunings a warm model's batches borrowed from the nearest tuned shape instead of tuning while they "
    "waited (shapes its warm-up missed: the config's warmup_inputs can cover them)", ["model"],
)


@dataclass
class BatchRecord:
    """One executed batch, as published on the metrics topic."""

    model: str
    version: int
    batch_size: int
    requests: int
    queue_wait_ms_max: float
    queue_wait_ms_mean: float
    compute_ms: float
    worker: str
    ts: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    def observe(self) -> None:
        label = f"{self.model}:{self.version}"
        BATCH_SIZE.labels(label).observe(self.batch_size)
        COMPUTE.labels(label).observe(self.compute_ms / 1000.0)
