"""Publish the engine's per-batch records (`BatchRecord`) to the metrics topic, beside the answers.

A source with a Kafka producer (the Kafka worker, the SQS worker answering over Kafka, the Kafka and SQS
functions, `maas batch worker`) attaches a `BatchMetricsPublisher` to its engine: each executed batch becomes one
JSON record on the metrics topic, keyed by model. Metrics never hold an answer up nor fail one: each record is
sent by a task of its own, at most `max_pending` of them at a time (a record beyond that is dropped), and a record
that cannot be published (the broker refuses it, the producer is closed, it was still unsent when the source
stopped) is counted in maas_batch_metrics_unpublished_total and logged at most once a minute.
"""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
from aiokafka import AIOKafkaProducer

from pipeline.engine import InferenceEngine
from pipeline.metrics import METRICS_UNPUBLISHED, BatchRecord
from pipeline.settings import Settings

log = logging.getLogger(__name__)

#: At most one log line this often says that metrics records are lost, lest a metrics topic that refuses every
#: record flood the log (maas_batch_metrics_unpublished_total counts every one).
FAILURE_LOG_INTERVAL_S = 60.0
#: Sends in flight beyond which a batch's record is dropped (and counted): a broker that is slow to answer, or a
#: topic whose metadata never comes, must not pile up tasks and memory.
MAX_PENDING = 1000
#: The most `close()` waits for the records being sent: a source's stop has answers to deliver and offsets to commit
#: within its own deadline, and metrics are worth less.
MAX_CLOSE_S = 5.0


class BatchMetricsPublisher:
    """The engine's batch listener that sends each `BatchRecord` to `topic` with `producer`.

    `attach(engine)` starts publishing that engine's batches; `close(timeout_s)` detaches it and waits up to
    `timeout_s` for the sends in flight, then cancels the rest (counted as unpublished). Call it before the
    producer is stopped. `settle(timeout_s)` only waits (a cloud function, between invocations).
    """

    def __init__(self, producer: AIOKafkaProducer, topic: str, *, max_pending: int = MAX_PENDING) -> None:
        self.producer = producer
        self.topic = topic
        self.max_pending = max_pending
        self._pending: set[asyncio.Task] = set()
        self._engines: list[InferenceEngine] = []
        self._unpublished_since_log = 0
        self._unpublished_logged_at = -FAILURE_LOG_INTERVAL_S
        self.published = 0

    @classmethod
    def for_settings(cls, producer: AIOKafkaProducer, settings: Settings) -> BatchMetricsPublisher:
        return cls(producer, settings.topics.metrics)

    @property
    def pending(self) -> int:
        """Records being sent now."""
        return len(self._pending)

    def attach(self, engine: InferenceEngine) -> BatchMetricsPublisher:
        if engine not in self._engines:
            engine.add_batch_listener(self.publish)
            self._engines.append(engine)
        return self

    def detach(self) -> None:
        """Stop publishing: the engines may outlive this publisher (and serve the source's next start)."""
        for engine in self._engines:
            engine.remove_batch_listener(self.publish)
        self._engines.clear()

    def publish(self, record: BatchRecord) -> None:
        """The batch listener: send `record` beside the answers, never waiting for it."""
        if len(self._pending) >= self.max_pending:
            self._lost(f"{len(self._pending)} metrics records are being sent already")
            return
        task = asyncio.get_running_loop().create_task(self._send(record), name="maas-batch-metrics")
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def settle(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for the records being sent (they go on being sent after that)."""
        if self._pending and timeout_s > 0:
            await asyncio.wait(list(self._pending), timeout=timeout_s)

    async def close(self, timeout_s: float) -> None:
        """Detach, wait up to `timeout_s` (at most MAX_CLOSE_S) for the records being sent, cancel the rest (counted
        as unpublished)."""
        self.detach()
        await self.settle(min(timeout_s, MAX_CLOSE_S))
        pending = list(self._pending)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _send(self, record: BatchRecord) -> None:
        try:
            delivered = await self.producer.send(self.topic, orjson.dumps(record.to_json()), key=record.model.encode())
            await delivered
        except asyncio.CancelledError:
            self._lost("the source stopped before the broker acknowledged it")
            raise
        except Exception as exc:  # KafkaError mostly; whatever it is, it must not reach the answers
            self._lost(repr(exc))
        else:
            self.published += 1

    def _lost(self, why: str) -> None:
        METRICS_UNPUBLISHED.inc()
        self._unpublished_since_log += 1
        now = time.monotonic()
        if now - self._unpublished_logged_at >= FAILURE_LOG_INTERVAL_S:
            log.warning("cannot publish batch metrics to %s: %s (%d record(s) lost since the last such message; "
                        "maas_batch_metrics_unpublished_total counts them)", self.topic, why,
                        self._unpublished_since_log)
            self._unpublished_logged_at, self._unpublished_since_log = now, 0
