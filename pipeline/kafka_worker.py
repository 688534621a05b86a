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
import functools
import logging
import time
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import (
    CommitFailedError,
    CorruptRecordException,
    IllegalStateError,
    KafkaError,
    KafkaTimeoutError,
    UnknownTopicOrPartitionError,
)

from pipeline.backpressure import Slots
from pipeline.batch_metrics import BatchMetricsPublisher
from pipeline.codec import header_map
from pipeline.engine import InferenceEngine
from pipeline.errors import ErrorCode, InferenceError
from pipeline.metrics import CONSUMER_LAG, ERRORS, IN_FLIGHT
from pipeline.offsets import OffsetTracker
from pipeline.responder import Responder
from pipeline.services import ABANDON_GUARD_S, answer_producer, claim_check_store, record_limits, stop_producer
from pipeline.settings import Settings
from pipeline.sinks import Envelope, KafkaSink

log = logging.getLogger(__name__)

#: How long stop() tries to commit: aiokafka's commit waits for a group coordinator as long as none answers.
FINAL_COMMIT_TIMEOUT_S = 10.0
#: Where stop()'s steps end, as shares of MAAS_SHUTDOWN_TIMEOUT_S from its start: finishing the requests in flight
#: (and publishing their metrics), the final commit, closing the clients. Each step may take what an earlier one left.
DRAIN_SHARE, COMMIT_SHARE, CLOSE_SHARE = 0.5, 0.75, 1.0
#: What getmany() raises for a record it cannot parse. Its C parser lets the UnicodeDecodeError of a header key that
#: is not UTF-8 through; its pure-Python one (AIOKAFKA_NO_EXTENSIONS) wraps that, and other malformed records, in
#: CorruptRecordException, as both do for a record batch whose CRC does not match.
UNREADABLE_RECORD_ERRORS = (CorruptRecordException, UnicodeDecodeError)
#: How long reading past an unreadable record waits, beyond fetch_max_wait_ms, for a partition's records to be
#: fetched again; a partition whose records take longer is read by the next fetch.
REFETCH_TIMEOUT_MS = 2000


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


async def _stop_consumer(consumer: AIOKafkaConsumer, timeout_s: float, servers: str = "the broker") -> None:
    """`consumer.stop()` within `timeout_s`, minus the CancelledError it may raise when the broker is unreachable.

    aiokafka's Fetcher.close() cancels its fetch requests in flight and awaits them without suppressing
    their CancelledError. That error is not a cancellation of ours: passed on, it aborted the worker's
    stop() and a SIGTERM ended the process with a traceback. It is passed on only when the calling task is
    being cancelled itself; otherwise what stop() did not reach is done here: closing the consumer's client
    (its connections and its metadata task, which would otherwise retry the broker for as long as the
    process lives).

    With a broker that does not answer (hung, or cut off by the network: no connection is refused), stop() waits for
    its group coordination, which looks for a coordinator for as long as none answers (79 s in a test), and then for
    its LeaveGroup: past `timeout_s` it is cut short, and what it left running is cancelled (`_abandon_consumer`).
    """
    guard = min(ABANDON_GUARD_S, timeout_s / 2)
    try:
        async with asyncio.timeout(timeout_s - guard):
            await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        # Said in the user's terms (shown without -v): aiokafka's CancelledError read as a crash to whoever stopped it.
        log.warning("closing the consumer: Kafka at %s cannot be reached; its connections are closed", servers)
        await consumer._client.close()
    except TimeoutError:
        log.warning("closing the consumer took longer than %.1f s (the broker does not answer): its connections are "
                    "closed without leaving the group, which sees this worker go once its session times out",
                    timeout_s)
        await _abandon_consumer(consumer, guard)


async def _abandon_consumer(consumer: AIOKafkaConsumer, timeout_s: float) -> None:
    """Cancel what a consumer.stop() cut short left running, then close the consumer's connections.

    Cut short while it waits for its group coordination task, stop() leaves that task, the heartbeat and offset
    refresh tasks and the fetch tasks running (aiokafka 0.14 keeps them in these attributes): each would retry the
    broker for as long as the process lives.
    """
    coordinator, fetcher = consumer._coordinator, consumer._fetcher
    owned = [(coordinator, ("_coordination_task", "_heartbeat_task", "_commit_refresh_task", "_reset_committed_task")),
             (fetcher, ("_fetch_task",))]
    tasks = [getattr(owner, name, None) for owner, names in owned for name in names]
    tasks += getattr(fetcher, "_pending_tasks", ())
    tasks = [task for task in tasks if task is not None and not task.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=timeout_s)
    await consumer._client.close()


#: Seconds between two tries at answering records whose answers the broker did not take (`_broker_away`).
DELIVERY_RETRY_S = 1.0


def _broker_away(exc: KafkaError) -> bool:
    """An error of a broker that did not answer in time (down, restarting, partitioned away, its partitions
    without a leader): retriable, and the producer's expired batches (KafkaTimeoutError, not marked retriable).
    Answers it met are tried again until the broker is back, rather than stopping the worker: a worker that
    stopped on an outage of more than the producer's request timeout was restarted into a broker still away,
    stopped at once, and under Kubernetes waited out the growing restart back-off after the broker came back.
    A refusal (authorization, a record too large) stops the worker, as retrying it cannot help; so does a topic the
    cluster does not know (the results topic deleted, say), which the restarted worker's bootstrap creates again."""
    if isinstance(exc, UnknownTopicOrPartitionError):
        return False
    return exc.retriable or isinstance(exc, KafkaTimeoutError)


class _PollDue(Exception):
    """getmany() must be called now, or aiokafka leaves the group (see `KafkaWorker._take_slots`)."""


class KafkaWorker:
    """Consume requests, answer through the engine, commit after the answers are acknowledged.

    Use `async with KafkaWorker(...)` or `start()` / `stop()`; `wait()` returns when the worker stops
    and raises if it stopped on a failure (it could not produce, or reading or committing failed), which
    `failure` describes.
    """

    REVOKE_COMMIT_S = 5.0  # a revoke's commit, after its drain; past it the records are left to redelivery
    #: aiokafka leaves the group when getmany() is not called for this long (its default, set here to be known). The
    #: worker stops fetching while its in-flight slots are full: it polls again before half of it has passed.
    max_poll_interval_ms = 300_000

    def __init__(self, settings: Settings, engine: InferenceEngine, *, max_attempts: int = 3,
                 drain_timeout_s: float | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.max_attempts = max_attempts
        # How long a revoke waits for the records in flight on its partitions (MAAS_REBALANCE_DRAIN_S).
        self.drain_timeout_s = settings.rebalance_drain_s if drain_timeout_s is None else drain_timeout_s
        self._tracker = OffsetTracker()
        # Rebalances so far. aiokafka revokes every partition at each one and moves every position back to the
        # committed offset, so records fetched before the latest are stale (see `_dispatch`).
        self._revocations = 0
        self._slots = Slots(settings.max_in_flight)
        self._poll_due = 0.0  # the loop time by which getmany() is called again (see _take_slots)
        self._handlers: set[asyncio.Task] = set()
        self._metrics: BatchMetricsPublisher | None = None  # its batches' records to the metrics topic, once started
        self._tasks: list[asyncio.Task] = []
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._sink: KafkaSink | None = None  # the responder's: stop() ends its reply_to lookups
        self._stopped = asyncio.Event()
        self._stopped.set()  # not running: stop() and wait() before start() (or after a failed one) return
        self._failure: BaseException | None = None
        self._failed_at = ""  # what failed, with `_failure`
        self._stop_on_failure: asyncio.Task | None = None
        self._stopping = False
        self.assigned = asyncio.Event()
        self.answered = 0
        # Records whose answers wait for the broker (`_answer_until_delivered`), since when, and its latest error.
        self._undelivered = 0
        self._undelivered_since: datetime | None = None
        self._undelivered_error: KafkaError | None = None
        self._lag_reported: set[TopicPartition] = set()  # the partitions whose maas_consumer_lag this worker set

    @property
    def failure(self) -> str | None:
        """What stopped the worker, for its exit message; None while it has not failed."""
        if self._failure is None:
            return None
        return f"{self._failed_at} ({self._failure!r})"

    @property
    def rebalance_timeout_ms(self) -> int:
        """How long the coordinator waits for this worker to rejoin a rebalance: its revoke's drain and commit.

        aiokafka's default is the session timeout (10 s): a drain longer than that left the worker out of the
        group, the records it was still answering were given to another member from the last commit and answered
        twice, and the drain's commit was refused. The price is that every member waits for the slowest drain.
        """
        return int((self.drain_timeout_s + self.REVOKE_COMMIT_S) * 1000)

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
            "rebalance_timeout_ms": self.rebalance_timeout_ms,
            "max_poll_interval_ms": self.max_poll_interval_ms,
            # The coordinator holds a JoinGroup for up to the longest member's rebalance timeout; aiokafka sends it
            # with the client's request timeout (40 s unless raised here), which must outlast that.
            "request_timeout_ms": max(40_000, self.rebalance_timeout_ms + 5_000),
            "heartbeat_interval_ms": self.settings.kafka_heartbeat_interval_ms,
            "fetch_max_wait_ms": self.settings.kafka_fetch_max_wait_ms,
        }
        self._consumer = AIOKafkaConsumer(**kafka, **options)
        try:
            await self._producer.start()
            await self._consumer.start()
            limits = await record_limits(self._producer, self.settings)
        except BaseException:
            await self._close_clients(self.settings.shutdown_timeout_s)
            raise
        store = claim_check_store(self.settings)
        self._sink = KafkaSink.for_settings(self._producer, self.settings, store, limits)
        self._responder = Responder(self.settings, self.engine, self._sink, store=store,
                                    max_attempts=self.max_attempts)
        self._consumer.subscribe([self.settings.topics.requests], listener=_Rebalance(self))
        self._metrics = BatchMetricsPublisher.for_settings(self._producer, self.settings).attach(self.engine)
        self._stopped.clear()
        self._stopping = False
        self._tasks = [
            asyncio.create_task(self._consume_loop(), name="maas-consume"),
            asyncio.create_task(self._commit_loop(), name="maas-commit"),
        ]
        # A loop that dies of an error stops the worker: never ready yet idle.
        for task, failed_at in zip(self._tasks, ("reading requests from Kafka failed",
                                                 "committing offsets to Kafka failed"), strict=True):
            task.add_done_callback(functools.partial(self._loop_ended, failed_at))
        log.info("worker %s consuming %s as group %s", self.settings.worker_id, self.settings.topics.requests,
                 self.settings.consumer_group)
        return self

    async def stop(self) -> None:
        """Graceful: stop consuming, finish and publish what is in flight, commit, close; within the settings'
        `shutdown_timeout_s`, however unresponsive the broker.

        Without that deadline a worker whose broker was gone took 45 s to stop (or, with a broker that does not
        answer, minutes): past a pod's termination grace period, so its SIGKILL came halfway through. Each step
        ends at its share of the deadline (`DRAIN_SHARE`, ...): what is still unanswered then is abandoned, and the
        log says how much. An abandoned request's offset is not committed (an offset is committed only once every
        record before it was answered and its answer acknowledged), so it is redelivered: nothing is lost.

        Returns at once when the worker is not running (never started, its start failed, stopped already);
        a stop() called while another one runs returns when that one is done.
        """
        if self._stopping or self._stopped.is_set():
            await self._stopped.wait()
            return
        self._stopping = True
        loop = asyncio.get_running_loop()
        timeout_s = self.settings.shutdown_timeout_s
        started = loop.time()

        def left(share: float) -> float:
            return max(0.0, started + share * timeout_s - loop.time())

        try:
            consume = self._tasks[0]
            consume.cancel()
            await asyncio.gather(consume, return_exceptions=True)  # it may have ended with the error that stops us
            if self._handlers:
                _, pending = await asyncio.wait(list(self._handlers), timeout=min(self.drain_timeout_s,
                                                                                    left(DRAIN_SHARE)))
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                if pending:
                    log.warning("stopping: %d request(s) not answered within %.1f s are abandoned; their offsets are "
                                "not committed, so they are redelivered", self._tracker.in_flight(),
                                loop.time() - started)
            # The engine outlives this worker (and may serve its next start): its batches are no longer ours.
            if self._metrics is not None:
                await self._metrics.close(left(DRAIN_SHARE))
            await self._final_commit(min(FINAL_COMMIT_TIMEOUT_S, left(COMMIT_SHARE)))
            for task in self._tasks[1:]:
                task.cancel()
            await asyncio.gather(*self._tasks[1:], return_exceptions=True)
            self._forget_lag()
            if self._sink is not None:  # its lookups outlive the handlers cancelled above and ask the producer's client
                await self._sink.stop()
            await self._close_clients(left(CLOSE_SHARE))
        finally:  # whatever failed on the way, wait() and every later stop() return
            self._stopped.set()

    async def _final_commit(self, timeout_s: float) -> None:
        """Commit what was answered, within `timeout_s`: with the broker gone, commit() waits for a coordinator
        forever and stop() never closed anything. What is left uncommitted is redelivered."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._commit()
        except (KafkaError, CommitFailedError, TimeoutError) as exc:
            log.warning("final commit failed (the uncommitted records will be redelivered): %r", exc)

    async def _close_clients(self, timeout_s: float) -> None:
        """Close the consumer and the producer, together, within `timeout_s`, whatever closing the other did: an open
        producer holds connections and a sender task, and the process would exit warning of it. What the producer
        still holds are answers of requests that stop() abandoned, whose offsets stay uncommitted, and metrics."""
        consumer, producer = self._consumer, self._producer
        self._consumer = self._producer = None
        closing = []
        if consumer is not None:
            closing.append(_stop_consumer(consumer, timeout_s, self.settings.kafka_bootstrap_servers))
        if producer is not None:
            closing.append(stop_producer(producer, timeout_s))
        for outcome in await asyncio.gather(*closing, return_exceptions=True):
            if isinstance(outcome, BaseException):
                raise outcome

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
            try:
                try:
                    fetched = await self._getmany(timeout_ms=200, max_records=self.settings.max_fetch_records)
                except UNREADABLE_RECORD_ERRORS as exc:
                    await self._read_past_unreadable(exc)
                    continue
                revocations = self._revocations
                for tp, records in fetched.items():
                    await self._dispatch(tp, records, revocations)
            except _PollDue:  # the records not begun were rewound: read again by the next fetch
                continue
            # Let this fetch's handlers decode and reach the batcher before fetching more: otherwise the
            # loop reads up to max_in_flight records before the first batch can close.
            await asyncio.sleep(0)

    async def _getmany(self, *partitions: TopicPartition, **kwargs: Any) -> dict[TopicPartition, list[ConsumerRecord]]:
        assert self._consumer is not None
        fetched = await self._consumer.getmany(*partitions, **kwargs)
        self._poll_due = asyncio.get_running_loop().time() + self.max_poll_interval_ms / 2000
        return fetched

    async def _dispatch(self, tp: TopicPartition, records: list[ConsumerRecord], revocations: int) -> bool:
        """Hand `records` to handlers as in-flight slots allow; False, and the records not handed over yet dropped,
        once a revocation came after their fetch (`revocations`: the count of revocations when they were fetched).

        A fetch that waits for slots may outlive the revocation of its partition. The revoke committed what was
        answered and forgot the partition, the batches that outlived its drain included: records begun after it
        would be all that is tracked there, and, the partition assigned to this worker again, its offset would be
        committed past those batches' records, unanswered (lost if the worker then dies). Left alone, the records are
        read again from the committed offset by the partition's owner, this worker or another.
        """
        while records and revocations == self._revocations:
            taken = await self._take_slots(len(records))  # backpressure: max_in_flight unanswered
            if revocations != self._revocations:
                self._slots.give(taken)
                break
            chunk, records = records[:taken], records[taken:]
            self._start_handler(tp, [record.offset for record in chunk], self._handle(tp, chunk))
        return revocations == self._revocations

    async def _take_slots(self, wanted: int) -> int:
        """`Slots.take`, until getmany() is due: a wait for slots (a slow model, a backlog) that outlasted
        max_poll_interval_ms made aiokafka leave the group, which moved this worker's partitions to others while it
        went on beginning its fetch's records; they were answered twice. Once due, every partition goes back to its
        first record not begun and `_PollDue` takes the consume loop back to getmany(), which fetches them again."""
        try:
            async with asyncio.timeout_at(self._poll_due):
                return await self._slots.take(wanted)
        except TimeoutError:
            assert self._consumer is not None
            log.info("in-flight slots still full (MAAS_MAX_IN_FLIGHT %d) %.0f s after the last poll: polling again, "
                     "and reading the records not begun again", self.settings.max_in_flight,
                     self.max_poll_interval_ms / 2000)
            try:
                for tp in sorted(self._consumer.assignment()):
                    await self._rewind(tp)
            except IllegalStateError:  # a rebalance took partitions meanwhile: it moved their positions back
                pass
            raise _PollDue from None

    def _start_handler(self, tp: TopicPartition, offsets: list[int], work: Coroutine[Any, Any, None]) -> None:
        """Run `work`, which answers the records at `offsets` (their in-flight slots taken), as a task of its own."""
        self._tracker.begin(tp, offsets)
        IN_FLIGHT.inc(len(offsets))
        task = asyncio.create_task(work)
        self._handlers.add(task)
        task.add_done_callback(functools.partial(self._handler_done, len(offsets)))

    def _handler_done(self, count: int, task: asyncio.Task) -> None:
        """Its slots back, however the handler ended (cancelled by stop() before it ran, too)."""
        self._handlers.discard(task)
        IN_FLIGHT.dec(count)
        self._slots.give(count)

    async def _handle(self, tp: TopicPartition, records: list[ConsumerRecord]) -> None:
        envelopes = [
            Envelope(payload=record.value, headers=header_map(record.headers), key=record.key,
                     source=f"{record.topic}-{record.partition}@{record.offset}",
                     raw_headers=record.headers)
            for record in records
        ]
        offsets = [record.offset for record in records]
        try:
            await self._answer_until_delivered(envelopes)
        except KafkaError as exc:
            # The cluster refuses them: leave these offsets uncommitted and stop, so the records are
            # redelivered (to this worker after a restart, or to another).
            log.error("cannot produce the answers of %s..%s: %r; stopping", envelopes[0].source,
                      envelopes[-1].source, exc)
            self._fail(exc, "cannot produce answers to Kafka")
        except Exception as exc:  # a bug: dead-letter the records, so that neither they nor the partition stall
            log.exception("unexpected failure answering %s..%s; dead-lettering them", envelopes[0].source,
                          envelopes[-1].source)
            await self._dead_letter(tp, offsets, envelopes,
                                    InferenceError(ErrorCode.INTERNAL, f"unexpected failure: {exc!r:.200}"))
        else:
            self._tracker.done(tp, offsets)
            self.answered += len(records)

    async def _answer_until_delivered(self, envelopes: list[Envelope]) -> None:
        """Answer `envelopes`, again every DELIVERY_RETRY_S while the broker does not take the answers
        (`_broker_away`), their offsets uncommitted meanwhile. While any record waits so, the worker is not ready
        (`not_ready` says since when): it answered nothing, its consumer lag grew, and its readiness said all was
        well to the probes and operators watching it."""
        waiting = False
        try:
            while True:
                try:
                    await self._responder.handle_many(envelopes)
                    return
                except KafkaError as exc:
                    if not _broker_away(exc):
                        raise
                    if not waiting:
                        waiting = True
                        self._undelivered += len(envelopes)
                        self._undelivered_since = self._undelivered_since or datetime.now(UTC)
                    self._undelivered_error = exc
                    log.warning("cannot produce the answers of %s..%s: %r; answering them again in %.0f s",
                                envelopes[0].source, envelopes[-1].source, exc, DELIVERY_RETRY_S)
                    await asyncio.sleep(DELIVERY_RETRY_S)
        finally:  # delivered, refused, or cancelled by stop()
            if waiting:
                self._undelivered -= len(envelopes)
                if not self._undelivered:
                    self._undelivered_since = self._undelivered_error = None

    async def _dead_letter(self, tp: TopicPartition, offsets: list[int], envelopes: list[Envelope],
                           error: InferenceError) -> None:
        """Dead-letter records that get no other answer; one that cannot be delivered stops the worker, leaving
        these offsets uncommitted (redelivered)."""
        try:
            for envelope in envelopes:
                await self._responder.sink.dead_letter(envelope, error, 1)
                ERRORS.labels(str(error.code)).inc()  # as every request that ends in an error, answered or not
        except Exception as undeliverable:
            log.error("cannot dead-letter %s..%s: %r; stopping", envelopes[0].source, envelopes[-1].source,
                      undeliverable)
            self._fail(undeliverable, "cannot produce dead letters to Kafka")
            return
        self._tracker.done(tp, offsets)

    async def _read_past_unreadable(self, exc: Exception) -> None:
        """Find the record that getmany() could not parse, dead-letter it, and go on past it.

        getmany() raises without saying on which partition or at which offset, having taken and dropped the
        records it had read of other partitions (their positions moved past them). So every partition goes back to
        its first record not yet handed to a handler, and each one with records to read is read one record at a
        time, up to a fetch's worth: the record at a partition's position when its read raises is the one. It is
        dead-lettered (with its source, but no value or key: aiokafka gives nothing of a record it cannot parse)
        and the partition moves on by one. aiokafka parses a record batch from its start and cannot step over a
        record in it, so each later record of that batch raises in turn and is dead-lettered the same way.
        """
        assert self._consumer is not None
        log.warning("a fetched record cannot be read (%r): reading partition by partition to find it", exc)
        revocations = self._revocations
        try:
            partitions = sorted(self._consumer.assignment())
            for tp in partitions:
                await self._rewind(tp)
            for tp in partitions:
                if not await self._read_singly(tp, revocations):
                    log.info("stopped looking for the unreadable record: partitions were revoked meanwhile")
                    return
        except IllegalStateError as moved:  # a rebalance took partitions meanwhile: the next fetch reads the others
            log.info("stopped looking for the unreadable record: %s", moved)

    async def _rewind(self, tp: TopicPartition) -> None:
        """Back to the first record of `tp` not handed to a handler: after the last one that was, or, when none
        was since the partition was assigned, where it started (the committed offset, else the earliest)."""
        assert self._consumer is not None
        offset = self._tracker.next_offset(tp)
        if offset is None:
            offset = await self._consumer.committed(tp)
        if offset is None:
            await self._consumer.seek_to_beginning(tp)  # as auto_offset_reset="earliest" did
        else:
            self._consumer.seek(tp, offset)

    async def _read_singly(self, tp: TopicPartition, revocations: int) -> bool:
        """Read `tp` a record at a time, up to max_fetch_records records or dead letters, or until the records
        fetched again after the rewind are all read; dead-letter each record that cannot be read. False when
        partitions were revoked since `revocations` (see `_dispatch`): what was read before is left to be read again
        (the rebalance moved the position back), what was read after it too (moved back here)."""
        consumer = self._consumer
        assert consumer is not None
        highwater = consumer.highwater(tp)
        if highwater is not None and await consumer.position(tp) >= highwater:
            return True  # nothing to read there
        records: list[ConsumerRecord] = []
        refetch_ms = self.settings.kafka_fetch_max_wait_ms + REFETCH_TIMEOUT_MS
        timeout_ms = refetch_ms  # the rewind dropped what was fetched
        for _ in range(self.settings.max_fetch_records):
            try:
                fetched = await self._getmany(tp, timeout_ms=timeout_ms, max_records=1)
            except UNREADABLE_RECORD_ERRORS as exc:
                offset = await consumer.position(tp)
                if not (await self._dispatch(tp, records, revocations)
                        and await self._dead_letter_unreadable(tp, offset, exc, revocations)):
                    return False
                records = []
                consumer.seek(tp, offset + 1)  # and fetch again, from the next record
                timeout_ms = refetch_ms
                continue
            if revocations != self._revocations:
                if fetched:
                    consumer.seek(tp, fetched[tp][0].offset)
                return False
            if not fetched:
                break
            records += fetched[tp]
            timeout_ms = 0  # the rest of this fetch, already here
        return await self._dispatch(tp, records, revocations)

    async def _dead_letter_unreadable(self, tp: TopicPartition, offset: int, exc: Exception, revocations: int
                                      ) -> bool:
        source = f"{tp.topic}-{tp.partition}@{offset}"
        log.error("%s cannot be read (%r); dead-lettering it", source, exc)
        error = InferenceError(ErrorCode.INVALID_REQUEST,
                               f"the Kafka record cannot be read ({exc!r:.300}): it, or an earlier record of its "
                               "record batch, is malformed (e.g. a header key that is not UTF-8)")
        envelope = Envelope(payload=None, headers={}, source=source)
        await self._slots.take(1)
        if revocations != self._revocations:  # see _dispatch
            self._slots.give(1)
            return False
        self._start_handler(tp, [offset], self._dead_letter(tp, [offset], [envelope], error))
        return True

    def _loop_ended(self, failed_at: str, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: %r; stopping", failed_at, task.exception())
            self._fail(task.exception(), failed_at)

    def _fail(self, exc: BaseException, failed_at: str) -> None:
        """Stop the worker on `exc`; `failed_at` says what failed, for `failure`."""
        if self._failure is None:
            self._failure = exc
            self._failed_at = failed_at
            # Held: the loop keeps only a weak reference to a task, and a stop collected half way never sets
            # `_stopped`, so wait() would hang.
            self._stop_on_failure = asyncio.get_running_loop().create_task(self.stop(), name="stop-on-failure")

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
        owned = self._consumer.assignment()
        self._forget_lag(self._lag_reported - owned)
        self._lag_reported = set(owned)
        for tp in owned:
            highwater = self._consumer.highwater(tp)
            if highwater is not None:
                position = await self._consumer.position(tp)
                CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(0, highwater - position))

    def _forget_lag(self, partitions: set[TopicPartition] | None = None) -> None:
        """Drop the maas_consumer_lag series of `partitions` (all this worker reported, by default): a partition
        that moved to another member is reported there, and a last value left here would be counted twice and
        never change again; so would a stopped worker's, in a process that serves /metrics on."""
        for tp in self._lag_reported if partitions is None else partitions:
            CONSUMER_LAG.remove(tp.topic, str(tp.partition))
        if partitions is None:
            self._lag_reported = set()

    @property
    def ready(self) -> bool:
        return self.not_ready is None

    @property
    def not_ready(self) -> str | None:
        """Why the worker is not serving, for /health/ready; None when it is: started, owning partitions, not
        failed, and delivering its answers."""
        if self._failure is not None:
            return f"stopped: {self.failure}"
        if self._consumer is None:
            return "not running"
        if not self.assigned.is_set():
            return f"owns no partition of {self.settings.topics.requests}"
        if self._undelivered_since is not None:
            return (f"cannot deliver the answers of {self._undelivered} request(s) to Kafka since "
                    f"{self._undelivered_since.isoformat(timespec='seconds')}: {self._undelivered_error!r}")
        return None

    async def _drain_and_commit(self, revoked: set[TopicPartition]) -> None:
        """Before partitions move to another worker: finish what is in flight on them, then commit."""
        self._revocations += 1  # records fetched before now are no longer to be begun (see _dispatch)
        deadline = time.monotonic() + self.drain_timeout_s
        while any(self._tracker.in_flight(tp) for tp in revoked) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        try:
            async with asyncio.timeout(self.REVOKE_COMMIT_S):
                await self._commit(revoked)
        except (CommitFailedError, KafkaError, TimeoutError) as exc:
            log.warning("commit on revoke failed (records will be redelivered): %r", exc)
        self._tracker.forget(revoked)
