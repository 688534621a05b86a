"""The SQS worker: long-polls a queue of V2 requests and answers each receive's messages through the engine.

A message is deleted only after its answer (result, error result or dead letter) was delivered. A request
that keeps failing transiently is not deleted: the queue's visibility timeout redelivers it, and after the
queue's maxReceiveCount its redrive policy moves it to the queue's DLQ. While a message is being worked on
(a long batch, a slow model), its visibility timeout is extended so that no other consumer gets it too.
With a Kafka producer (answers over Kafka), the engine's per-batch records also go to the metrics topic
(`metrics=`); with SQS only, metrics are Prometheus's alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from pipeline.backpressure import Slots
from pipeline.batch_metrics import BatchMetricsPublisher
from pipeline.claim_check import ClaimCheckStore
from pipeline.codec import from_sqs_message
from pipeline.engine import InferenceEngine
from pipeline.errors import InferenceError
from pipeline.metrics import ERRORS, IN_FLIGHT
from pipeline.responder import Outcome, Responder
from pipeline.settings import Settings
from pipeline.sinks import DELIVERY_ERRORS, Envelope, RedeliverTransient, ResultSink

log = logging.getLogger(__name__)

#: How long past its WaitTimeSeconds a stopping consumer waits for the long poll under way (and for the release of
#: what it received): SQS has answered it by then. An endpoint that does not answer (a network partition, a hung
#: server) held stop() for the call's read timeout, three times over: two minutes past MAAS_SHUTDOWN_TIMEOUT_S.
POLL_GRACE_S = 2.0


@dataclass(frozen=True)
class SqsMessage:
    """An SQS message as the API (`Body`, `MessageAttributes`) or a Lambda event (`body`, ...) gives it."""

    source: str
    body: str
    attributes: dict[str, Any] | None


async def answer_sqs_messages(responder: Responder, messages: Sequence[SqsMessage]) -> list[Outcome]:
    """Unwrap SQS messages and answer them together; outcomes in order.

    A message that cannot even be unwrapped (bad base64) is dead-lettered as it came; if that delivery fails,
    only that message is left for redelivery, as is any other message whose answer or dead letter the
    responder's sink (`RedeliverTransient`) could not deliver. Raises only when a sink cannot say which
    answers went out.
    """
    outcomes: dict[int, Outcome] = {}
    decoded: list[tuple[int, Envelope]] = []
    for index, message in enumerate(messages):
        try:
            payload, headers = from_sqs_message(message.body, message.attributes)
        except InferenceError as exc:
            envelope = Envelope(message.body.encode(), {}, message.source)
            try:
                delivered = await responder.sink.dead_letter(envelope, exc, 1)
            except DELIVERY_ERRORS as failure:
                log.error("cannot dead-letter %s (%r); it will be redelivered", message.source, failure)
                delivered = False
            if delivered:  # as every request that ends in an error, answered or not
                ERRORS.labels(str(exc.code)).inc()
            outcomes[index] = Outcome.DEAD_LETTER if delivered else Outcome.RETRY
        else:
            decoded.append((index, Envelope(payload, headers, message.source)))
    handled = await responder.handle_many([envelope for _, envelope in decoded])
    outcomes.update((index, outcome) for (index, _), outcome in zip(decoded, handled, strict=True))
    return [outcomes[index] for index in range(len(messages))]


async def release_messages(sqs: Any, queue_url: str, messages: Sequence[dict[str, Any]]) -> None:
    """Make received messages (at most 10: one receive) visible again now, for another consumer, rather than
    when their visibility timeout runs out: what a consumer received while stopping, or could not finish."""
    if not messages:
        return
    entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": 0}
               for i, m in enumerate(messages)]
    await asyncio.to_thread(sqs.change_message_visibility_batch, QueueUrl=queue_url, Entries=entries)
    log.info("released %d messages of %s", len(messages), queue_url)


async def receive_or_release(sqs: Any, queue_url: str, **receive: Any) -> list[dict[str, Any]]:
    """The messages of one `receive_message(**receive)` call. Cancelled, it still waits for the call under way (a
    boto3 call cannot be interrupted) and makes what it received visible again at once: no one would answer those
    messages, which would stay invisible for their visibility timeout and come back one receive closer to the DLQ."""
    poll = asyncio.ensure_future(asyncio.to_thread(sqs.receive_message, QueueUrl=queue_url, **receive))
    try:
        return (await asyncio.shield(poll)).get("Messages", [])
    except asyncio.CancelledError:
        with contextlib.suppress(ClientError, BotoCoreError):
            await release_messages(sqs, queue_url, (await poll).get("Messages", []))
        raise


async def end_cancelled(task: asyncio.Task, timeout_s: float, what: str) -> None:
    """Wait up to `timeout_s` for a cancelled `task` that is still finishing (a receive waiting for its poll, then
    releasing what it received, or a job releasing its message), then cancel it again: the SQS or S3 call it waits
    for is abandoned in its thread (`runtime.DaemonThreadPool`), and the messages it concerns come back when their
    visibility timeout runs out, as those of a stopped process would."""
    if not (await asyncio.wait([task], timeout=timeout_s))[0]:
        log.warning("stopping: %s did not end within %.1f s of being cancelled (its endpoint does not answer); "
                    "abandoned: the messages it concerns come back when their visibility timeout runs out",
                    what, timeout_s)
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@dataclass
class _InFlight:
    receipt: str
    extended_until: float


class SqsWorker:
    """Use `async with SqsWorker(...)` or `start()` / `stop()`; `stop()` drains what is in flight.

    Each receive long-polls for `wait_time_s`, and `stop()` waits for the one under way: a boto3 call cannot
    be interrupted, and one left running in its thread would receive messages no one answers (they stay
    invisible for the visibility timeout, one receive closer to the DLQ) and hold the process's exit until
    it returns. Hence a short poll: stop() waits at most that long for it.
    """

    def __init__(self, settings: Settings, engine: InferenceEngine, sqs: Any, queue_url: str, sink: ResultSink, *,
                 store: ClaimCheckStore | None = None, wait_time_s: int = 2, visibility_timeout_s: int = 30,
                 max_attempts: int = 3, drain_timeout_s: float = 30.0,
                 metrics: BatchMetricsPublisher | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self.sqs = sqs
        self.queue_url = queue_url
        self.wait_time_s = wait_time_s
        self.visibility_timeout_s = visibility_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self._responder = Responder(settings, engine, RedeliverTransient(sink), store=store,
                                    max_attempts=max_attempts)
        self._slots = Slots(settings.max_in_flight)
        self._in_flight: dict[str, _InFlight] = {}  # by receipt handle: a message SQS delivers again is in twice
        self._handlers: set[asyncio.Task] = set()
        self._tasks: list[asyncio.Task] = []
        self._stopped: asyncio.Event | None = None  # set by the stop() under way, when it is done
        self.answered = 0
        self.left_for_redelivery = 0

    async def start(self) -> SqsWorker:
        if self.metrics is not None:
            self.metrics.attach(self.engine)
        self._tasks = [asyncio.create_task(self._receive_loop(), name="maas-sqs-receive"),
                       asyncio.create_task(self._extend_loop(), name="maas-sqs-visibility")]
        log.info("SQS worker receiving from %s", self.queue_url)
        return self

    async def stop(self) -> None:
        """Stop receiving (after the poll under way, whose messages are made visible again; waited for up to
        `wait_time_s` + `POLL_GRACE_S`, then abandoned), let the handlers finish until `drain_timeout_s` after the
        stop began, then cancel the rest: their messages, undeleted, are redelivered
        once their visibility timeout passes. The batches' metrics records still being sent get what is left of
        `drain_timeout_s` (at most `batch_metrics.MAX_CLOSE_S`); those unsent then are counted as unpublished. A
        stop() called while another runs returns when that one is done."""
        if self._stopped is not None:
            await self._stopped.wait()
            return
        if not self._tasks:
            return
        self._stopped = asyncio.Event()
        deadline = time.monotonic() + self.drain_timeout_s
        try:
            receive = self._tasks[0]
            receive.cancel()
            await end_cancelled(receive, self.wait_time_s + POLL_GRACE_S, f"the receive from {self.queue_url}")
            if self._handlers:
                _, pending = await asyncio.wait(list(self._handlers), timeout=max(0.0, deadline - time.monotonic()))
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                if pending:
                    log.warning("stopped %d handlers still running after %.0f s; their messages will be redelivered",
                                len(pending), self.drain_timeout_s)
            if self.metrics is not None:
                await self.metrics.close(max(0.0, deadline - time.monotonic()))
            for task in self._tasks[1:]:
                task.cancel()
            await asyncio.gather(*self._tasks[1:], return_exceptions=True)
        finally:
            self._tasks = []
            self._stopped.set()
            self._stopped = None

    async def __aenter__(self) -> SqsWorker:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def _receive_loop(self) -> None:
        """One handler task per received batch: its messages go through the engine together."""
        while True:
            room = await self._slots.take(10)  # room before asking for more (backpressure)
            handed = 0
            try:  # the slots not handed to a handler come back, however the receive ends (stop() included)
                asked = time.monotonic()  # the server starts a message's timeout after this: a safe estimate
                messages = await self._receive(room)
                if not messages:
                    continue
                until = asked + self.visibility_timeout_s
                for message in messages:
                    self._in_flight[message["ReceiptHandle"]] = _InFlight(message["ReceiptHandle"], until)
                IN_FLIGHT.inc(len(messages))
                task = asyncio.create_task(self._handle(messages))
                handed = len(messages)  # the handler gives them back
                self._handlers.add(task)
                task.add_done_callback(self._handlers.discard)
            finally:
                self._slots.give(room - handed)

    async def _receive(self, room: int) -> list[dict[str, Any]]:
        """One receive of up to `room` messages ([] after a failed one). Cancelled (by stop()), it still waits for
        the poll under way, at most `wait_time_s`, and releases what it received (`receive_or_release`)."""
        try:
            return await receive_or_release(
                self.sqs, self.queue_url, MaxNumberOfMessages=room, WaitTimeSeconds=self.wait_time_s,
                VisibilityTimeout=self.visibility_timeout_s, MessageAttributeNames=["All"],
                AttributeNames=["ApproximateReceiveCount"])
        except (ClientError, BotoCoreError) as exc:
            log.warning("SQS receive failed, retrying: %s", exc)
            await asyncio.sleep(1.0)
            return []

    async def _handle(self, messages: list[dict[str, Any]]) -> None:
        try:
            outcomes = await self._answer(messages)
            done = [m for m, outcome in zip(messages, outcomes, strict=True) if outcome is not Outcome.RETRY]
            self.left_for_redelivery += len(messages) - len(done)  # visibility timeout, then the redrive policy
            if done:
                self.answered += await self._delete(done)
        except DELIVERY_ERRORS as exc:
            log.error("cannot deliver the answers of %d messages (%r); they will be redelivered", len(messages), exc)
        except Exception:  # a bug: left to the visibility timeout and the queue's redrive policy, and said so
            log.exception("unexpected failure answering %d messages; they will be redelivered", len(messages))
        finally:
            for message in messages:
                self._in_flight.pop(message["ReceiptHandle"], None)
            IN_FLIGHT.dec(len(messages))
            self._slots.give(len(messages))

    async def _answer(self, messages: list[dict[str, Any]]) -> list[Outcome]:
        queue = self.queue_url.rsplit("/", 1)[-1]
        return await answer_sqs_messages(self._responder, [
            SqsMessage(f"sqs:{queue}/{m['MessageId']}", m.get("Body", ""), m.get("MessageAttributes"))
            for m in messages
        ])

    async def _delete(self, messages: list[dict[str, Any]]) -> int:
        """Delete answered messages (at most 10, one receive's worth); returns how many were deleted."""
        entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)]
        try:
            response = await asyncio.to_thread(self.sqs.delete_message_batch, QueueUrl=self.queue_url,
                                               Entries=entries)
        except (ClientError, BotoCoreError) as exc:  # the answers went out: not "cannot deliver" them
            log.warning("could not delete %d answered messages (%r); they will be answered again", len(messages), exc)
            return 0
        for failure in response.get("Failed", []):
            log.warning("could not delete an answered message (it will be answered again): %s",
                        failure.get("Message", failure.get("Code")))
        return len(messages) - len(response.get("Failed", []))

    async def _extend_loop(self) -> None:
        """Keep messages invisible while they are worked on, a third of the timeout ahead of expiry.

        Checks come every `period` from the loop's start, not `period` after the last check's calls returned:
        a message not due at one check (expiring in 2 periods or more) is extended at the next, a period later,
        leaving it a period for the call; sleeping after slow calls would eat into that period. A check's calls
        (10 messages each, SQS's most) go out together, so that the last of many does not wait for the others."""
        period = max(0.5, self.visibility_timeout_s / 3)
        tick = time.monotonic()
        while True:
            tick = max(tick + period, time.monotonic())  # at once if the last calls took more than a period
            await asyncio.sleep(tick - time.monotonic())
            now = time.monotonic()
            due = [flight for flight in self._in_flight.values() if flight.extended_until - now < 2 * period]
            await asyncio.gather(*(self._extend(due[start:start + 10], now) for start in range(0, len(due), 10)))

    async def _extend(self, flights: list[_InFlight], now: float) -> None:
        """One call extending up to 10 messages' visibility from `now`; those it could not are due at the next check."""
        entries = [{"Id": str(i), "ReceiptHandle": f.receipt, "VisibilityTimeout": self.visibility_timeout_s}
                   for i, f in enumerate(flights)]
        try:
            response = await asyncio.to_thread(self.sqs.change_message_visibility_batch, QueueUrl=self.queue_url,
                                               Entries=entries)
        except (ClientError, BotoCoreError) as exc:
            log.warning("could not extend visibility: %s", exc)
            return
        failed = {entry["Id"]: entry for entry in response.get("Failed", [])}
        for i, flight in enumerate(flights):
            if str(i) in failed:
                log.warning("could not extend the visibility of a message: %s",
                            failed[str(i)].get("Message", failed[str(i)].get("Code")))
            else:
                flight.extended_until = now + self.visibility_timeout_s
