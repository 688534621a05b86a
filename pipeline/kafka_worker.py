"""The Kafka worker: a consumer-group member that answers every request record exactly once or more.

Records are handled a fetch at a time: each partition's share of a fetch goes through the `Responder` and
the engine together (one task, one engine call, one record batch of answers per partition), several
fetches overlap (bounded by `max_in_flight` records), and the engine batches them per model. An offset is
committed only after the answer of every record up to it (a result, an error result or a dead-letter
record) was acknowledged by the broker; a worker that dies loses nothing, its partitions' uncommitted
records are redelivered to the group.
"""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError

from pipeline.backpressure import Slots
from pipeline.codec import header_map
from pipeline.engine import InferenceEngine
from pipeline.errors import ErrorCode, InferenceError
from pipeline.metrics import CONSUMER_LAG, IN_FLIGHT, BatchRecord
from pipeline.offsets import OffsetTracker
from pipeline.responder import Responder
from pipeline.services import answer_producer, claim_check_store
from pipeline.settings import Settings
from pipeline.sinks import Envelope, KafkaSink

log = logging.getLogger(__name__)

#: How long stop() tries to commit: aiokafka's commit waits for a group coordinator as long as none answers.
FINAL_COMMIT_TIMEOUT_S = 10.0


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: KafkaWorker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.worker._drain_and_commit(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        if assigned:
            self.worker.assigned.set()
        else:  # more workers than partitions: this one serves nothing now, and its readiness says so
            self.worker.assigned.clear()
        log.info("assigned partitions %s", sorted(f"{tp.topic}-{tp.partition}" for tp in assigned))


async def _stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """`consumer.stop()`, minus the CancelledError it may raise when the broker is unreachable.

    aiokafka's Fetcher.close() cancels its fetch requests in flight and awaits them without suppressing
    their CancelledError. That error is not a cancellation of ours: passed on, it aborted the worker's
    stop() and a SIGTERM ended the process with a traceback. It is passed on only when the calling task is
    being cancelled itself; otherwise what stop() did not reach is done here: closing the consumer's client
    (its connections and its metadata task, which would otherwise retry the broker for as long as the
    process lives).
    """
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        log.warning("closing the consumer: aiokafka raised the CancelledError of a fetch it cancelled; ignored")
        await consumer._client.close()


class KafkaWorker:
    """Consume requests, answer through the engine, commit after the answers are acknowledged.

    Use `async with KafkaWorker(...)` or `start()` / `stop()`; `wait()` returns when the worker stops
    and raises if it stopped because it could not produce.
    """

    def __init__(self, settings: Settings, engine: InferenceEngine, *, max_attempts: int = 3,
                 drain_timeout_s: float = 30.0) -> None:
        self.settings = settings
        self.engine = engine
        self.max_attempts = max_attempts
        self.drain_timeout_s = drain_timeout_s
        self._tracker = OffsetTracker()
        self._slots = Slots(settings.max_in_flight)
        self._handlers: set[asyncio.Task] = set()
        self._side_sends: set[asyncio.Task] = set()
        self._tasks: list[asyncio.Task] = []
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._stopped = asyncio.Event()
        self._stopped.set()  # not running: stop() and wait() before start() (or after a failed one) return
        self._failure: BaseException | None = None
        self._stop_on_failure: asyncio.Task | None = None
        self._stopping = False
        self.assigned = asyncio.Event()
        self.answered = 0

    @property
    def in_flight(self) -> int:
        """Records received and not yet answered (bounded by max_in_flight)."""
        return self._tracker.in_flight()

    async def start(self) -> KafkaWorker:
        """Connect, join the group and consume. A stopped worker may be started again: what the previous run
        knew (its failure, its partitions, its offsets in flight) is dropped, since the group may have moved
        them to other workers meanwhile."""
        self._failure = None
        self.assigned.clear()
        self._tracker = OffsetTracker()
        kafka = self.settings.kafka_client_kwargs()
        self._producer = answer_producer(self.settings)
        options = {
            "group_id": self.settings.consumer_group,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "max_poll_records": self.settings.max_fetch_records,
            "fetch_max_bytes": max(52428800, self.settings.max_request_bytes * 2),
            "max_partition_fetch_bytes": max(1048576, self.settings.max_request_bytes + 1024),
            "client_id": f"maas-{self.settings.worker_id}",
            "session_timeout_ms": self.settings.kafka_session_timeout_ms,
            "heartbeat_interval_ms": self.settings.kafka_heartbeat_interval_ms,
            "fetch_max_wait_ms": self.settings.kafka_fetch_max_wait_ms,
        }
        self._consumer = AIOKafkaConsumer(**kafka, **options)
        store = claim_check_store(self.settings)
        sink = KafkaSink.for_settings(self._producer, self.settings, store)
        self._responder = Responder(self.settings, self.engine, sink, store=store,
                                    max_attempts=self.max_attempts)
        try:
            await self._producer.start()
            await self._consumer.start()
        except BaseException:
            await self._close_clients()
            raise
        self._consumer.subscribe([self.settings.topics.requests], listener=_Rebalance(self))
        self.engine.add_batch_listener(self._publish_batch_record)
        self._stopped.clear()
        self._stopping = False
        self._tasks = [
            asyncio.create_task(self._consume_loop(), name="maas-consume"),
            asyncio.create_task(self._commit_loop(), name="maas-commit"),
        ]
        for task in self._tasks:  # a loop that dies of an error stops the worker: never ready yet idle
            task.add_done_callback(self._loop_ended)
        log.info("worker %s consuming %s as group %s", self.settings.worker_id, self.settings.topics.requests,
                 self.settings.consumer_group)
        return self

    async def stop(self) -> None:
        """Graceful: stop consuming, finish and publish what is in flight, commit, close.

        Returns at once when the worker is not running (never started, its start failed, stopped already);
        a stop() called while another one runs returns when that one is done.
        """
        if self._stopping or self._stopped.is_set():
            await self._stopped.wait()
            return
        self._stopping = True
        try:
            consume = self._tasks[0]
            consume.cancel()
            await asyncio.gather(consume, return_exceptions=True)  # it may have ended with the error that stops us
            if self._handlers:
                _, pending = await asyncio.wait(list(self._handlers), timeout=self.drain_timeout_s)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
            # The engine outlives this worker (and may serve its next start): its batches are no longer ours.
            self.engine.remove_batch_listener(self._publish_batch_record)
            if self._side_sends:
                await asyncio.wait(list(self._side_sends), timeout=5)
            await self._final_commit()
            for task in self._tasks[1:]:
                task.cancel()
            await asyncio.gather(*self._tasks[1:], return_exceptions=True)
            await self._close_clients()
        finally:  # whatever failed on the way, wait() and every later stop() return
            self._stopped.set()

    async def _final_commit(self) -> None:
        """Commit what was answered, within `FINAL_COMMIT_TIMEOUT_S`: with the broker gone, commit() waits for a
        coordinator forever and stop() never closed anything. What is left uncommitted is redelivered."""
        try:
            async with asyncio.timeout(FINAL_COMMIT_TIMEOUT_S):
                await self._commit()
        except (KafkaError, CommitFailedError, TimeoutError) as exc:
            log.warning("final commit failed (the uncommitted records will be redelivered): %r", exc)

    async def _close_clients(self) -> None:
        """Close the consumer, then the producer, whatever closing the consumer did: an open producer holds
        connections and a sender task, and the process would exit warning of it."""
        consumer, producer = self._consumer, self._producer
        self._consumer = self._producer = None
        try:
            if consumer is not None:
                await _stop_consumer(consumer)
        finally:
            if producer is not None:
                await producer.stop()

    async def __aenter__(self) -> KafkaWorker:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait(self) -> None:
        await self._stopped.wait()
        if self._failure is not None:
            raise self._failure

    # -- consuming ------------------------------------------------------------------------------------

    async def _consume_loop(self) -> None:
        """One handler task per partition per fetch (or per part of one, when in-flight slots run short)."""
        assert self._consumer is not None
        while True:
            fetched = await self._consumer.getmany(timeout_ms=200, max_records=self.settings.max_fetch_records)
            for tp, records in fetched.items():
                while records:
                    taken = await self._slots.take(len(records))  # backpressure: max_in_flight unanswered
                    chunk, records = records[:taken], records[taken:]
                    self._tracker.begin(tp, [record.offset for record in chunk])
                    IN_FLIGHT.inc(taken)
                    task = asyncio.create_task(self._handle(tp, chunk))
                    self._handlers.add(task)
                    task.add_done_callback(self._handlers.discard)
            # Let this fetch's handlers decode and reach the batcher before fetching more: otherwise the
            # loop reads up to max_in_flight records before the first batch can close.
            await asyncio.sleep(0)

    async def _handle(self, tp: TopicPartition, records: list[ConsumerRecord]) -> None:
        envelopes = [
            Envelope(payload=record.value, headers=header_map(record.headers), key=record.key,
                     source=f"{record.topic}-{record.partition}@{record.offset}",
                     raw_headers=record.headers)
            for record in records
        ]
        try:
            await self._responder.handle_many(envelopes)
        except KafkaError as exc:
            # Some answers or dead letters could not be written: leave these offsets uncommitted and stop,
            # so the records are redelivered (to this worker after a restart, or to another).
            log.error("cannot produce the answers of %s..%s: %r; stopping", envelopes[0].source,
                      envelopes[-1].source, exc)
            self._fail(exc)
            return
        except Exception as exc:  # a bug: dead-letter the records, so that neither they nor the partition stall
            log.exception("unexpected failure answering %s..%s; dead-lettering them", envelopes[0].source,
                          envelopes[-1].source)
            error = InferenceError(ErrorCode.INTERNAL, f"unexpected failure: {exc!r:.200}")
            try:
                for envelope in envelopes:
                    await self._responder.sink.dead_letter(envelope, error, 1)
            except Exception as undeliverable:
                self._fail(undeliverable)
                return
            self._tracker.done(tp, [record.offset for record in records])
        else:
            self._tracker.done(tp, [record.offset for record in records])
            self.answered += len(records)
        finally:
            IN_FLIGHT.dec(len(records))
            self._slots.give(len(records))

    def _loop_ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s ended: %r; stopping", task.get_name(), task.exception())
            self._fail(task.exception())

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
            # Held: the loop keeps only a weak reference to a task, and a stop collected half way never sets
            # `_stopped`, so wait() would hang.
            self._stop_on_failure = asyncio.get_running_loop().create_task(self.stop(), name="stop-on-failure")

    def _publish_batch_record(self, record: BatchRecord) -> None:
        if self._producer is None:
            return
        task = asyncio.get_running_loop().create_task(
            self._producer.send(self.settings.topics.metrics, orjson.dumps(record.to_json()),
                                key=record.model.encode())
        )
        self._side_sends.add(task)
        task.add_done_callback(self._side_sends.discard)

    # -- committing -----------------------------------------------------------------------------------

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.commit_interval_ms / 1000)
            try:
                await self._commit()
                await self._record_lag()
            except CommitFailedError as exc:  # a rebalance is under way; the listener commits instead
                log.info("commit skipped: %s", exc)
            except KafkaError as exc:
                log.warning("commit failed, retrying next round: %r", exc)

    async def _commit(self, partitions: set[TopicPartition] | None = None) -> None:
        if self._consumer is None:
            return
        owned = self._consumer.assignment()
        offsets = self._tracker.committable(owned if partitions is None else partitions & owned)
        if offsets:
            await self._consumer.commit(offsets)
            self._tracker.mark_committed(offsets)

    async def _record_lag(self) -> None:
        if self._consumer is None:
            return
        for tp in self._consumer.assignment():
            highwater = self._consumer.highwater(tp)
            if highwater is not None:
                position = await self._consumer.position(tp)
                CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(0, highwater - position))

    @property
    def ready(self) -> bool:
        """Serving: started, owns partitions, and has not failed."""
        return self._consumer is not None and self.assigned.is_set() and self._failure is None

    async def _drain_and_commit(self, revoked: set[TopicPartition]) -> None:
        """Before partitions move to another worker: finish what is in flight on them, then commit."""
        deadline = time.monotonic() + self.drain_timeout_s
        while any(self._tracker.in_flight(tp) for tp in revoked) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        try:
            await self._commit(revoked)
        except (CommitFailedError, KafkaError) as exc:
            log.warning("commit on revoke failed (records will be redelivered): %r", exc)
        self._tracker.forget(revoked)
