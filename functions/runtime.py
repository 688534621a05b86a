"""What a function process keeps warm between invocations: one event loop, the engine and its model cache,
a Kafka producer (and, once it is started, the per-batch records it publishes to the metrics topic), S3/SQS
clients. Cold-start costs (import, init, model load + kernel warm-up) are reported apart from the invocation's own
time, as a CloudWatch Embedded Metric Format (EMF) log line.

Handlers are synchronous (`handler(event, context)`, AWS Lambda conventions); each one runs its coroutine on
the process's one long-lived loop, so async clients (aiokafka) and batcher tasks survive between invocations.
"""

from __future__ import annotations

import time

IMPORT_STARTED = time.perf_counter()

import asyncio  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from collections.abc import Awaitable, Callable  # noqa: E402
from typing import Any, TypeVar  # noqa: E402

from aiokafka import AIOKafkaProducer  # noqa: E402

from pipeline.batch_jobs import BatchConfig, BatchJobRunner  # noqa: E402
from pipeline.batch_metrics import BatchMetricsPublisher  # noqa: E402
from pipeline.claim_check import ClaimCheckStore  # noqa: E402
from pipeline.engine import InferenceEngine  # noqa: E402
from pipeline.observability import mask_credentials_in_logs  # noqa: E402
from pipeline.ratelimit import ApiKeys, RateLimiter  # noqa: E402
from pipeline.runtime import configure_process  # noqa: E402
from pipeline.services import (  # noqa: E402
    answer_producer,
    aws_client,
    claim_check_store,
    model_cache,
    record_limits,
    stop_producer,
)
from pipeline.settings import ConfigError, Settings  # noqa: E402
from pipeline.sinks import SqsSink  # noqa: E402
from pipeline.v2_api import V2Api  # noqa: E402

IMPORT_SECONDS = time.perf_counter() - IMPORT_STARTED
NAMESPACE = "maas/functions"
#: How long an invocation, its answers delivered, waits for its batches' metrics records before it returns: the
#: function's environment is frozen between invocations, and with it the sends not done yet (they go on at the next
#: invocation). A broker that is slow to take metrics costs an invocation at most this much, never an answer.
METRICS_SETTLE_S = 1.0
T = TypeVar("T")
log = logging.getLogger(__name__)


class Runtime:
    """The warm state of one function process for one configuration."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = InferenceEngine.for_settings(model_cache(settings), settings)
        self.api = V2Api(self.engine, max_request_bytes=settings.max_request_bytes,
                         api_keys=ApiKeys.from_settings(settings), rate_limiter=RateLimiter.from_settings(settings),
                         admin_tenants=settings.admin_tenants, repository_control=False)
        self._producer: AIOKafkaProducer | None = None
        self.metrics: BatchMetricsPublisher | None = None
        self.record_limits: dict[str, int] = {}  # the answer topics' largest records, read once the producer starts
        self._clients: dict[str, Any] = {}
        self._batch: BatchJobRunner | None = None
        self.invocations = 0

    async def start(self) -> Runtime:
        await self.engine.start()
        return self

    async def stop(self) -> None:
        if self.metrics is not None:
            await self.metrics.close(self.settings.shutdown_timeout_s / 2)
            self.metrics = None
        if self._producer is not None:
            await stop_producer(self._producer, self.settings.shutdown_timeout_s)
            self._producer = None
        await self.engine.stop()

    async def producer(self) -> AIOKafkaProducer:
        """Started on first use, so HTTP- and S3-only functions never connect to Kafka. From then on the engine's
        per-batch records go to the metrics topic too, as the workers' do."""
        if self._producer is None:
            if self.settings.kafka_bootstrap_servers is None:
                raise ConfigError("KAFKA_BOOTSTRAP_SERVERS is not set: results go to Kafka topics")
            producer = answer_producer(self.settings)
            await producer.start()
            self.record_limits = await record_limits(producer, self.settings)
            self._producer = producer
            self.metrics = BatchMetricsPublisher.for_settings(producer, self.settings).attach(self.engine)
        return self._producer

    async def settle_metrics(self) -> None:
        """Give the metrics records being sent up to METRICS_SETTLE_S, before the environment is frozen."""
        if self.metrics is not None:
            await self.metrics.settle(METRICS_SETTLE_S)

    def aws(self, service: str) -> Any:
        if service not in self._clients:
            self._clients[service] = aws_client(self.settings, service)
        return self._clients[service]

    def claim_checks(self) -> ClaimCheckStore:
        """Large inputs by reference and large outputs to S3, as the workers do."""
        if "claim_checks" not in self._clients:
            self._clients["claim_checks"] = claim_check_store(self.settings, self.aws("s3"))
        return self._clients["claim_checks"]

    async def sqs_results(self) -> SqsSink:
        """The sink to MAAS_SQS_RESULTS_QUEUE_URL, made once: it reads the queues' MaximumMessageSize."""
        if "sqs_results" not in self._clients:
            assert self.settings.sqs_results_queue_url is not None
            self._clients["sqs_results"] = await SqsSink.for_queues(
                self.aws("sqs"), self.settings.sqs_results_queue_url, self.settings.sqs_dlq_url,
                store=self.claim_checks())
        return self._clients["sqs_results"]

    def batch_runner(self) -> BatchJobRunner:
        if self._batch is None:
            self._batch = BatchJobRunner(self.engine, self.aws("s3"), BatchConfig.from_settings(self.settings),
                                         max_request_bytes=self.settings.max_request_bytes,
                                         worker_id=self.settings.worker_id)
        return self._batch


_loop: asyncio.AbstractEventLoop | None = None
_runtime: Runtime | None = None
_runtime_env: dict[str, str] | None = None
#: The metrics of the latest invocation (also printed as EMF): tests and local runs read them here.
last_metrics: dict[str, Any] = {}


def _event_loop() -> asyncio.AbstractEventLoop:
    global _loop
    if _loop is None or _loop.is_closed():
        _loop = asyncio.new_event_loop()
    return _loop


def _current(loop: asyncio.AbstractEventLoop) -> Runtime:
    """The warm runtime; rebuilt only when the configuration changed (never in a deployed function)."""
    global _runtime, _runtime_env
    settings = Settings.from_env()
    env = {**settings.to_env(), **{k: v for k, v in os.environ.items() if k.startswith("MAAS_")}}
    env.pop("MAAS_WORKER_ID", None)
    if _runtime is None or env != _runtime_env:
        if _runtime is not None:
            loop.run_until_complete(_runtime.stop())
        configure_process(settings)
        mask_credentials_in_logs()
        _runtime = loop.run_until_complete(Runtime(settings).start())
        _runtime_env = env
    return _runtime


def invoke(function: str, work: Callable[[Runtime], Awaitable[T]], records: int | None = None) -> T:
    """Run one invocation on the warm runtime and report its metrics."""
    loop = _event_loop()
    began = time.perf_counter()
    runtime = _current(loop)  # on a cold start: settings, process set-up, the engine
    started = time.perf_counter()
    cold = runtime.invocations == 0
    runtime.invocations += 1
    load_before = runtime.engine.cache.stats.load_seconds
    try:
        return loop.run_until_complete(work(runtime))
    finally:
        loop.run_until_complete(runtime.settle_metrics())  # after the answers: it delays none of them
        metrics: dict[str, Any] = {
            "function": function,
            "ColdStart": int(cold),
            "DurationMs": round((time.perf_counter() - started) * 1000, 3),
            "ModelLoadMs": round((runtime.engine.cache.stats.load_seconds - load_before) * 1000, 3),
        }
        if cold:
            metrics["ImportMs"] = round(IMPORT_SECONDS * 1000, 3)
            metrics["InitMs"] = round((started - began) * 1000, 3)
        if records is not None:
            metrics["Records"] = records
        emit(metrics)


def emit(metrics: dict[str, Any]) -> None:
    """One EMF line on stdout: CloudWatch turns it into metrics, with no API call in the hot path."""
    last_metrics.clear()
    last_metrics.update(metrics)
    units = {"Records": "Count", "ColdStart": "Count"}
    names = [k for k in metrics if k != "function"]
    document = {
        "_aws": {"Timestamp": int(time.time() * 1000), "CloudWatchMetrics": [{
            "Namespace": NAMESPACE, "Dimensions": [["function"]],
            "Metrics": [{"Name": n, "Unit": units.get(n, "Milliseconds")} for n in names],
        }]},
        **metrics,
    }
    print(json.dumps(document), file=sys.stdout, flush=True)


def shutdown() -> None:
    """Stop the warm runtime and close the loop (tests; a real function process just ends)."""
    global _runtime, _runtime_env, _loop
    if _loop is None or _loop.is_closed():
        return
    if _runtime is not None:
        with contextlib.suppress(Exception):
            _loop.run_until_complete(_runtime.stop())
    _runtime = _runtime_env = None
    _loop.run_until_complete(_loop.shutdown_asyncgens())
    _loop.close()
    _loop = None
