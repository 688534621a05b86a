"""The per-batch metrics publisher shared by the sources without a Kafka consumer, against the real broker."""

from __future__ import annotations

import asyncio
import gc
from dataclasses import replace

import orjson
from prometheus_client import REGISTRY
from worker_support import read_topic

from models.examples import MNIST_MLP
from pipeline.batch_metrics import BatchMetricsPublisher
from pipeline.metrics import BatchRecord
from pipeline.services import answer_producer, stop_producer


def unpublished() -> float:
    return REGISTRY.get_sample_value("maas_batch_metrics_unpublished_total") or 0.0


def record(worker: str) -> BatchRecord:
    return BatchRecord(MNIST_MLP, 1, 4, 2, 1.0, 0.5, 3.0, worker)


async def test_records_reach_the_metrics_topic_as_the_kafka_worker_publishes_them(live):
    producer = answer_producer(live)
    await producer.start()
    try:
        publisher = BatchMetricsPublisher.for_settings(producer, live)
        for _ in range(3):
            publisher.publish(record(live.worker_id))
        await publisher.close(10)
    finally:
        await stop_producer(producer, 10)
    records = await read_topic(live, live.topics.metrics, 3, timeout=10)
    assert [orjson.loads(r.value) | {"ts": 0} for r in records] == [record(live.worker_id).to_json() | {"ts": 0}] * 3
    assert {r.key for r in records} == {MNIST_MLP.encode()} and publisher.published == 3


async def test_sends_that_fail_are_counted_and_logged_once(live, caplog):
    producer = answer_producer(live)
    await producer.start()
    await producer.stop()  # each send fails at once (ProducerClosed)
    before = unpublished()
    publisher = BatchMetricsPublisher.for_settings(producer, live)
    for _ in range(3):
        publisher.publish(record(live.worker_id))
    await publisher.settle(10)
    assert publisher.pending == 0
    gc.collect()  # asyncio reports an exception never retrieved when its task or future is collected
    assert unpublished() == before + 3
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot publish batch metrics" in m for m in messages) == 1, "logged once, not once per record"
    assert not [m for m in messages if "never retrieved" in m]


async def test_sends_in_flight_are_bounded_and_cancelled_on_close(live):
    """A topic whose metadata never comes (a name the broker refuses) holds each send: at most max_pending of
    them, the records beyond are dropped, and close() gives the rest up; every one counted."""
    refused = replace(live, topics=replace(live.topics, metrics="no such topic: spaces are not allowed"))
    producer = answer_producer(refused)
    await producer.start()
    try:
        before = unpublished()
        publisher = BatchMetricsPublisher.for_settings(producer, refused)
        publisher.max_pending = 2
        for _ in range(5):
            publisher.publish(record(live.worker_id))
        await asyncio.sleep(0.5)
        assert publisher.pending == 2 and unpublished() == before + 3
        await asyncio.wait_for(publisher.close(0.5), 5)
        assert publisher.pending == 0 and unpublished() == before + 5 and publisher.published == 0
    finally:
        await stop_producer(producer, 10)
