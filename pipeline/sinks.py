"""Where answers go: a `ResultSink` delivers results, error results and dead letters for one source.

Sources differ in how requests arrive; sinks differ in where answers go. Kafka topics are the default for
every source; an SQS results queue serves SQS-only deployments.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from aiokafka.admin.config_resource import ConfigResourceType
from aiokafka.errors import KafkaError
from aiokafka.protocol.admin import DescribeConfigsRequest
from aiokafka.protocol.metadata import MetadataRequest
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from botocore.exceptions import BotoCoreError, ClientError

from pipeline.claim_check import ClaimCheckStore
from pipeline.codec import (
    BINARY,
    CONTENT_TYPE,
    HEADER_LENGTH,
    JSON,
    REQUEST_ID,
    TRANSFER_ENCODING,
    Framed,
    encode_error,
    sqs_text,
    to_sqs_message,
)
from pipeline.errors import ErrorCode, InferenceError
from pipeline.metrics import DEAD_LETTERS
from pipeline.partitioning import partitions_for_keys
from pipeline.protocol import InferenceRequest
from pipeline.settings import RECORD_OVERHEAD_BYTES, Settings

log = logging.getLogger(__name__)

PASSTHROUGH_HEADERS = ("traceparent", "tracestate")
MAX_PASSTHROUGH_BYTES = 16 * 1024
_SQS_FIRST = (*PASSTHROUGH_HEADERS, HEADER_LENGTH)  # attributes kept first when SQS's 10 run short
PAYLOAD_URI = "maas-payload-uri"  # a dead letter too large for its destination: where its payload is stored
# A Kafka dead letter keeps the record's headers and key within these bounds; past them it drops them, saying
# how many headers, or how many key bytes, it dropped.
DEAD_LETTER_HEADER_BYTES = 32 * 1024
DEAD_LETTER_KEY_BYTES = 8 * 1024
HEADERS_DROPPED = "maas-headers-dropped"
KEY_DROPPED = "maas-key-dropped-bytes"
#: What a failed delivery raises: the broker's or the AWS client's errors (anything else is a bug).
DELIVERY_ERRORS: tuple[type[Exception], ...] = (KafkaError, ClientError, BotoCoreError)


@dataclass(slots=True)
class Envelope:
    """One request as it arrived: payload, headers (lower-case, for decoding) and where it came from."""

    payload: bytes | None  # None: a Kafka record with a null value, which its dead letter keeps null
    headers: dict[str, str]
    source: str
    key: bytes | None = None
    raw_headers: Sequence[tuple[str, bytes]] = ()  # Kafka's, kept verbatim for dead letters

    def passthrough(self) -> dict[str, str]:
        """Tracing and CloudEvents headers that travel from a request to its answer, up to
        MAX_PASSTHROUGH_BYTES: a request that is mostly headers must not make an answer the broker refuses."""
        wanted = {k: v for k, v in self.headers.items() if k in PASSTHROUGH_HEADERS or k.startswith("ce_")}
        if sum(len(k) + len(v) for k, v in wanted.items()) <= MAX_PASSTHROUGH_BYTES:
            return wanted
        kept, size = {}, 0
        for k in sorted(wanted, key=lambda k: k not in PASSTHROUGH_HEADERS):  # tracing first
            if size + len(k) + len(wanted[k]) <= MAX_PASSTHROUGH_BYTES:
                kept[k] = wanted[k]
                size += len(k) + len(wanted[k])
        return kept


def dead_letter_headers(error: InferenceError, attempts: int, source: str) -> dict[str, str]:
    """The headers a dead letter adds to the original ones. The request id, when known, has one of its own: the
    record keeps its original key, which may be a caller's partition key rather than the id."""
    headers = {
        "maas-error-code": str(error.code),
        "maas-error-message": error.message[:4096],
        "maas-attempts": str(attempts),
        "maas-source": source,
    }
    if error.request_id is not None:
        headers[REQUEST_ID] = error.request_id
    return headers


Answer = tuple[Envelope, InferenceRequest | None, Framed]


class Undelivered(Exception):
    """Some answers of an `answer_many` were not delivered and the others were: only the messages of `failed`
    (positions in the answers given -> why) must be redelivered, so that a message the destination refuses
    neither fails the messages beside it nor makes their answers go out again."""

    def __init__(self, failed: dict[int, BaseException]) -> None:
        super().__init__(f"{len(failed)} answer(s) not delivered, e.g. {next(iter(failed.values()))!r:.300}")
        self.failed = failed


class ResultSink(Protocol):
    #: The largest result body this sink carries inline to its own destination (None: the settings'
    #: MAAS_MAX_INLINE_OUTPUT_BYTES alone); a larger one goes to S3 and the answer points to it.
    max_inline_bytes: int | None

    async def max_inline_bytes_for(self, requests: Sequence[InferenceRequest]) -> list[int | None]:
        """The largest result body carried inline in the answer to each of `requests`, as `max_inline_bytes`: the
        destination is the sink's to choose (a request's `reply_to`), and one may take less than another. Asked
        once the results are there, before each is sent inline or stored; raises nothing."""

    async def answer(self, envelope: Envelope, request: InferenceRequest | None, framed: Framed) -> None:
        """Deliver a result or error result; raise if it could not be delivered."""

    async def answer_many(self, answers: Sequence[Answer]) -> None:
        """Deliver several; returns once every one was delivered. Raises `Undelivered` when it knows which
        ones were not (the others were), anything else when none can be assumed delivered."""

    async def dead_letter(self, envelope: Envelope, error: InferenceError, attempts: int) -> bool:
        """Deliver a dead letter; False when this sink has no dead-letter destination that can take it (the
        source must then leave the message to its own redrive, e.g. an SQS queue's DLQ)."""

    async def stop(self) -> None:
        """End what the sink runs in the background before its producer or client stops, which it would go on asking."""


class RedeliverTransient:
    """A sink wrapper for sources that redeliver on their own (SQS visibility timeout, Lambda event source
    mappings): a request that failed transiently on every attempt is left to the source's retry and redrive
    policy instead of being dead-lettered here. Undecodable requests are still dead-lettered.

    Since such a source can redeliver one message alone, a failed delivery is that message's alone too: a
    dead letter that cannot be delivered leaves its message to redelivery, and answers that cannot be are
    reported `Undelivered`, so the source acknowledges every other message of the receive or invocation.
    """

    def __init__(self, sink: ResultSink, enabled: bool = True) -> None:
        self.sink = sink
        self.enabled = enabled
        self.max_inline_bytes = sink.max_inline_bytes

    async def max_inline_bytes_for(self, requests: Sequence[InferenceRequest]) -> list[int | None]:
        return await self.sink.max_inline_bytes_for(requests)

    async def answer(self, envelope: Envelope, request: InferenceRequest | None, framed: Framed) -> None:
        await self.sink.answer(envelope, request, framed)

    async def answer_many(self, answers: Sequence[Answer]) -> None:
        try:
            await self.sink.answer_many(answers)
        except DELIVERY_ERRORS as exc:
            if not self.enabled:
                raise
            raise Undelivered(dict.fromkeys(range(len(answers)), exc)) from exc

    async def dead_letter(self, envelope: Envelope, error: InferenceError, attempts: int) -> bool:
        if self.enabled and error.code.transient:
            return False  # the Responder then reports Outcome.RETRY
        try:
            return await self.sink.dead_letter(envelope, error, attempts)
        except DELIVERY_ERRORS as exc:
            if not self.enabled:
                raise
            log.error("cannot dead-letter %s (%r); it is left to redelivery", envelope.source, exc)
            return False

    async def stop(self) -> None:
        await self.sink.stop()


class KafkaSink:
    """Answers to the results topic (or the request's `reply_to`), dead letters to the DLQ topic.

    A dead letter too large to re-produce is stored in S3 and the record points to it (`maas-payload-uri`).
    A `reply_to` topic that is one of the platform's own (requests, metrics, dead letters), that the cluster
    does not serve, or that refuses the answers gets them as `INVALID_REQUEST` errors on the results topic
    instead: a caller's topic must never stop a worker, which would stop on the same record again after its
    restart. Nor may a caller create topics: a `reply_to` topic is looked up without auto-creation first (a
    broker that creates topics on first mention, Kafka's default, would otherwise create any topic a request
    names), once per topic this sink knows of (`MAX_KNOWN_REPLY_TOPICS`), and its `max.message.bytes` read then:
    results larger than a caller's topic takes go to S3 as those larger than the results topic takes do
    (`max_inline_bytes_for`; without a store, an error saying so answers them there), rather than being refused
    by the broker and answered with an error on the results topic. A lookup that fails is remembered for
    `failed_lookup_s`, so that the answers it concerns are not looked up again moments later.

    Kafka checks a whole record batch against the topic's max.message.bytes: batches end before the limit of their
    topic where it is known (the results topic's from `for_settings`, a caller's from its lookup), so that answers
    that each fit are not refused together. Each dead letter goes in a batch of its own: the producer's batches put
    concurrent ones together, past the dead-letter topic's limit though each fits it, and one refused stops the worker.

    The lookups run in tasks of their own, which outlive a fetch that stops waiting for one: `stop()` ends them.
    """

    max_inline_bytes = None
    MAX_KNOWN_REPLY_TOPICS = 10_000
    #: How long a failed lookup of a reply_to topic stands (seconds): a fetch's answers ask for the topic twice, for
    #: their inline limit and to be sent, and one missing topic then cost two metadata requests, one cluster that
    #: does not answer two `reply_to_timeout_s` waits. Short, so that a topic created meanwhile is soon found.
    failed_lookup_s = 5.0

    def __init__(self, producer: Any, results_topic: str, dlq_topic: str, *, store: ClaimCheckStore | None = None,
                 max_value_bytes: int = 1024 * 1024, reserved_topics: Collection[str] = (),
                 reply_to_timeout_s: float = 10.0) -> None:
        self.producer = producer
        self.results_topic = results_topic
        self.dlq_topic = dlq_topic
        self.store = store
        self.max_value_bytes = max_value_bytes
        self.reserved_topics = frozenset(reserved_topics) | {dlq_topic}
        self.reply_to_timeout_s = reply_to_timeout_s
        #: Callers' topics the cluster said it has -> their max.message.bytes (None: it did not say).
        self._reply_topics: dict[str, int | None] = {}
        #: Callers' topics whose lookup failed -> until when (time.monotonic()) that stands, and why.
        self._failed_lookups: dict[str, tuple[float, BaseException]] = {}
        #: The results topic's max.message.bytes, when known: its batches stay within it.
        self.results_max_bytes: int | None = None
        self._lookups: dict[str, asyncio.Future[int | None]] = {}  # those being looked up, one lookup each

    @classmethod
    def for_settings(cls, producer: Any, settings: Settings, store: ClaimCheckStore | None,
                     limits: Mapping[str, int] | None = None) -> KafkaSink:
        """The configured results and dead-letter topics; dead letters over the request limit go to `store`.

        `limits` (`services.record_limits`), each topic's largest record, lower those bounds where a topic takes
        less: results over the results topic's go to `store` too (as `max_inline_bytes`), so do dead letters over
        the dead-letter topic's; batches of answers to the results topic stay within its limit.
        """
        sink = cls(producer, settings.topics.results, settings.topics.dlq, store=store,
                   max_value_bytes=settings.max_request_bytes,
                   reserved_topics=(settings.topics.requests, settings.topics.metrics))
        limits = limits or {}
        if (results := limits.get(settings.topics.results)) is not None:
            sink.max_inline_bytes = _inline_bytes(results)
            sink.results_max_bytes = results
        if (dlq := limits.get(settings.topics.dlq)) is not None:
            sink.max_value_bytes = min(sink.max_value_bytes, max(0, dlq - RECORD_OVERHEAD_BYTES))
        return sink

    async def stop(self) -> None:
        """Cancel the reply_to lookups under way and wait for them to end; called before the producer they ask stops.

        A lookup is shielded from the fetches waiting for it, so cancelling them (a worker's stop()) left it running,
        owned by no one: asking the cluster for up to `reply_to_timeout_s`, through the producer's client as it closed.
        A fetch still waiting for one ends with its CancelledError: its requests go unanswered, to be delivered again,
        rather than answered as if the topic were missing.
        """
        lookups = list(self._lookups.values())
        for lookup in lookups:
            lookup.cancel()
        if lookups:
            await asyncio.wait(lookups)  # raises only if this task is cancelled: the lookups' errors are their fetches'

    async def max_inline_bytes_for(self, requests: Sequence[InferenceRequest]) -> list[int | None]:
        """`max_inline_bytes`, or less for an answer to a caller's topic that takes less: the broker would refuse a
        result over its max.message.bytes, and the caller would get an error on the results topic instead of the
        result, which a reference to S3 can carry (without a store, the responder's error saying the result is too
        large, on the caller's own topic). Where the topic's limit or the topic itself cannot be looked up,
        `max_inline_bytes` (the answer goes as it would have: `answer_many` says why it cannot). Each topic not
        known yet is looked up once, all of them at once."""
        topics = [self._reply_to(request) for request in requests]
        unique = list(dict.fromkeys(topic for topic in topics if topic is not None))
        if not unique:
            return [self.max_inline_bytes] * len(requests)
        limits: dict[str | None, int] = {}
        for topic, found in zip(unique, await asyncio.gather(*(self._reply_topic(t) for t in unique),
                                                                return_exceptions=True), strict=True):
            if isinstance(found, int):
                limits[topic] = self._inline_under(found)
            elif isinstance(found, asyncio.CancelledError):
                raise found  # `stop()` cancelled the lookup: the fetch ends with it, not with a lookup of its own
            elif isinstance(found, BaseException) and not isinstance(found, (KafkaError, TimeoutError, ValueError)):
                log.error("looking up reply_to topic %s failed (%r); its results go inline", topic, found)
        return [limits.get(topic, self.max_inline_bytes) for topic in topics]

    def _reply_to(self, request: InferenceRequest | None) -> str | None:
        """The caller's topic that the answer to `request` goes to; None: the results topic."""
        topic = request.parameters.get("reply_to") if request is not None else None
        return topic if topic and topic != self.results_topic else None

    def _inline_under(self, topic_limit: int) -> int:
        """`max_inline_bytes`, within what a topic of max.message.bytes `topic_limit` takes."""
        inline = _inline_bytes(topic_limit)
        return inline if self.max_inline_bytes is None else min(inline, self.max_inline_bytes)

    async def answer(self, envelope: Envelope, request: InferenceRequest | None, framed: Framed) -> None:
        await self.answer_many([(envelope, request, framed)])

    async def answer_many(self, answers: Sequence[Answer]) -> None:
        """One record batch per partition, then wait for every acknowledgement.

        aiokafka's per-record `send()` costs more on the event loop than encoding the answer; filling a
        batch directly costs a fraction of it, and the broker gets the same produce requests. Partitions
        are chosen as the producer would (murmur2 of the key), so keyed consumers see no difference.
        Raises (a KafkaError) only when the results topic itself cannot take the answers.
        """
        by_topic: dict[str, list[Answer]] = {}
        for answer in answers:
            by_topic.setdefault(self._reply_to(answer[1]) or self.results_topic, []).append(answer)
        refused: list[tuple[Answer, str]] = []
        sends = []
        for topic, group in by_topic.items():
            if topic == self.results_topic:
                partitions = await self._partitions(topic)
                sends.append((topic, group, await self._send(topic, group, partitions, self.results_max_bytes)))
                continue
            try:
                partitions, max_bytes = await self._reply_partitions(topic)
                sends.append((topic, group, await self._send(topic, group, partitions, max_bytes)))
            except (KafkaError, TimeoutError, ValueError) as exc:
                refused.extend((answer, _reason(exc)) for answer in group)
        for topic, group, acks in sends:
            results = await asyncio.gather(*acks, return_exceptions=True)
            failed = next((r for r in results if isinstance(r, BaseException)), None)
            if failed is None:
                continue
            if topic == self.results_topic:
                raise failed
            refused.extend((answer, _reason(failed)) for answer in group)  # some may have gone out: at-least-once
        if refused:
            await self._refuse_reply_to(refused)

    async def _partitions(self, topic: str) -> list[int]:
        return sorted(await self.producer.partitions_for(topic))

    async def _reply_partitions(self, topic: str) -> tuple[list[int], int | None]:
        """A caller's topic's partitions and max.message.bytes (`_reply_topic`), once the cluster said it has the
        topic without creating it; raises ValueError, KafkaError or TimeoutError (a step not done within
        `reply_to_timeout_s`) where it cannot say."""
        max_bytes = await self._reply_topic(topic)
        async with asyncio.timeout(self.reply_to_timeout_s):
            return await self._partitions(topic), max_bytes

    async def _reply_topic(self, topic: str) -> int | None:
        """A caller's topic's max.message.bytes (None: unknown), once the cluster said it has the topic without
        creating it; both are asked when the topic is first looked up, then known (`MAX_KNOWN_REPLY_TOPICS`).
        Raises ValueError, KafkaError or TimeoutError where answers cannot go to the topic: a failed lookup's error
        again, without asking, for `failed_lookup_s`.

        Fetches are answered concurrently: those that name a topic being looked up wait for that lookup (one request
        and one log line per topic), shielded, so that one of them cancelled does not cancel it for the others.
        """
        if topic in self.reserved_topics:
            raise ValueError("it is one of the platform's own topics")
        if topic in self._reply_topics:
            return self._reply_topics[topic]
        failed = self._failed_lookups.get(topic)
        if failed is not None:
            until, error = failed
            if time.monotonic() < until:
                raise error.with_traceback(None)
            del self._failed_lookups[topic]
        lookup = self._lookups.get(topic)
        if lookup is None:
            lookup = self._lookups[topic] = asyncio.ensure_future(self._look_up(topic))
            lookup.add_done_callback(lambda _: self._lookups.pop(topic, None))
        return await asyncio.shield(lookup)

    async def _look_up(self, topic: str) -> int | None:
        """`_reply_topic`'s question to the cluster: the topic's metadata (without creating it), then its limit. A
        failure is logged and remembered (`failed_lookup_s`)."""
        client = self.producer.client
        try:
            async with asyncio.timeout(self.reply_to_timeout_s):
                response = await client.send(client.get_random_node(),
                                             MetadataRequest([topic], allow_auto_topic_creation=False))
            if response.topics[0][0] != 0:  # each topic's entry starts with its error code
                raise ValueError("the cluster has no such topic")
        except (KafkaError, TimeoutError, ValueError) as exc:
            self._remember_failure(topic, exc)
            raise
        limit = await self._read_reply_limit(topic)
        if len(self._reply_topics) >= self.MAX_KNOWN_REPLY_TOPICS:
            self._reply_topics.clear()
        self._reply_topics[topic] = limit
        return limit

    def _remember_failure(self, topic: str, exc: BaseException) -> None:
        """Let a failed lookup stand for `failed_lookup_s`, among at most `MAX_KNOWN_REPLY_TOPICS` (those expired
        go first)."""
        log.warning("cannot look up reply_to topic %s (%s): its answers go to %s as errors, and it is not asked about "
                    "again for %g s", topic, _reason(exc), self.results_topic, self.failed_lookup_s)
        now = time.monotonic()
        if len(self._failed_lookups) >= self.MAX_KNOWN_REPLY_TOPICS:
            self._failed_lookups = {t: failed for t, failed in self._failed_lookups.items() if failed[0] > now}
            if len(self._failed_lookups) >= self.MAX_KNOWN_REPLY_TOPICS:
                self._failed_lookups.clear()
        self._failed_lookups[topic] = (now + self.failed_lookup_s, exc)

    async def _read_reply_limit(self, topic: str) -> int | None:
        """A caller's topic's max.message.bytes, or None where the cluster does not say within
        `reply_to_timeout_s` (a topic that exists is not refused for that: its answers go as they did before the
        limit was read). What it means for the topic's answers is logged here, once per lookup."""
        try:
            async with asyncio.timeout(self.reply_to_timeout_s):
                limit = (await topic_max_bytes(self.producer.client, [topic])).get(topic)
            why = "the cluster gives none"
        except (KafkaError, TimeoutError) as exc:
            limit, why = None, repr(exc)
        if limit is None:
            log.warning("cannot read the max.message.bytes of reply_to topic %s (%s): results are sent to it inline, "
                        "and one its broker refuses is answered with an error on %s", topic, why, self.results_topic)
        elif self._inline_under(limit) != self.max_inline_bytes:  # it takes less than the results topic
            if self.store is None:
                log.warning("reply_to topic %s takes records of at most %d bytes (its max.message.bytes) and there is "
                            "no object store for larger results: they are answered on it with an error saying so",
                            topic, limit)
            else:
                log.info("reply_to topic %s takes records of at most %d bytes (its max.message.bytes): larger results "
                         "to it go to S3", topic, limit)
        return limit

    async def _send(self, topic: str, answers: Sequence[Answer], partitions: list[int],
                    max_bytes: int | None = None) -> list[Any]:
        """Hand the answers to the producer, in order, one batch per partition; the acknowledgements to wait for.

        A batch ends when the producer's builder is full (its `max_batch_size`) or, where the topic's max.message.bytes
        is known (`max_bytes`), before an answer could take it past that: Kafka refuses a batch over the topic's limit
        whole, though each of its answers fits. The bound is the batch so far (`size()`) plus the answer as a batch of
        its own (`estimate_size_in_bytes`, an upper bound, with a batch header more than it adds: some 60 bytes of
        margin). An answer over the limit by itself still goes, alone: the inline limits keep results under it.
        """
        records = []
        for envelope, request, framed in answers:
            headers = framed.kafka_headers()
            passthrough = envelope.passthrough()
            if passthrough:
                headers = [(k, v.encode()) for k, v in passthrough.items()] + headers
            key = request.id.encode() if request is not None else envelope.key
            records.append((key, framed.body, headers))
        acks = []
        builders: dict[int, Any] = {}
        for partition, (key, value, headers) in zip(
                partitions_for_keys([key for key, _, _ in records], partitions), records, strict=True):
            builder = builders.get(partition)
            if (builder is not None and max_bytes is not None and builder.record_count()
                    and builder.size() + DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)
                    > max_bytes):
                acks.append(await self.producer.send_batch(builder, topic, partition=partition))
                builder = None
            if builder is None:
                builder = builders[partition] = self.producer.create_batch()
            if builder.append(key=key, value=value, timestamp=None, headers=headers) is None:
                acks.append(await self.producer.send_batch(builder, topic, partition=partition))
                builder = builders[partition] = self.producer.create_batch()
                builder.append(key=key, value=value, timestamp=None, headers=headers)  # always fits an empty one
        for partition, builder in builders.items():
            acks.append(await self.producer.send_batch(builder, topic, partition=partition))
        return acks

    async def _refuse_reply_to(self, refused: list[tuple[Answer, str]]) -> None:
        """Each answer that could not go to its `reply_to`, as an error on the results topic."""
        errors = []
        for (envelope, request, _), reason in refused:
            assert request is not None  # only a decoded request names a reply_to
            topic = request.parameters["reply_to"]
            log.warning("request %s: cannot answer to reply_to %r (%s); answering on %s", request.id, topic, reason,
                        self.results_topic)
            error = InferenceError(ErrorCode.INVALID_REQUEST, f"parameters.reply_to: cannot answer to topic "
                                   f"{topic!r}: {reason}", request.id)
            to_results = replace(request, parameters={k: v for k, v in request.parameters.items() if k != "reply_to"})
            errors.append((envelope, to_results, encode_error(error, request.model_name)))
        await self.answer_many(errors)

    async def dead_letter(self, envelope: Envelope, error: InferenceError, attempts: int) -> bool:
        log.warning("dead-lettering %s: %s %s", envelope.source, error.code, error.message,
                    extra={"request_id": error.request_id, "traceparent": envelope.headers.get("traceparent")})
        original = list(envelope.raw_headers) or [(k, v.encode()) for k, v in envelope.headers.items()]
        extra = dead_letter_headers(error, attempts, envelope.source)
        value, key = envelope.payload, envelope.key
        if value is not None and len(value) > self.max_value_bytes:
            value = await self._offload(envelope, extra)
        # The dead-letter topic takes `max_value_bytes` plus RECORD_OVERHEAD_BYTES (`for_settings`): a record with a
        # value just under the limit and large headers or key would make a dead letter it refuses, and a dead letter
        # that cannot be written stops the worker, on every restart.
        if sum(len(k) + len(v or b"") for k, v in original) > DEAD_LETTER_HEADER_BYTES:
            extra[HEADERS_DROPPED] = str(len(original))
            original = []
        if key is not None and len(key) > DEAD_LETTER_KEY_BYTES:
            extra[KEY_DROPPED] = str(len(key))
            key = None
        if value is None and key is None:
            value = b""  # aiokafka produces no record with neither a key nor a value
        headers = original + [(k, v.encode("utf-8", "replace")) for k, v in extra.items()]
        (partition,) = partitions_for_keys([key], await self._partitions(self.dlq_topic))
        builder = self.producer.create_batch()
        builder.append(key=key, value=value, timestamp=None, headers=headers)  # an empty batch takes any record
        await (await self.producer.send_batch(builder, self.dlq_topic, partition=partition))
        DEAD_LETTERS.labels(str(error.code)).inc()
        return True

    async def _offload(self, envelope: Envelope, extra: dict[str, str]) -> bytes:
        if self.store is not None:
            try:
                extra[PAYLOAD_URI] = await self.store.put_new(
                    Framed(envelope.payload, {"content-type": "application/octet-stream"}), "dead-letters",
                    envelope.source, field="dead letter")
                return b""
            except InferenceError as exc:
                log.error("cannot store an oversized dead letter in S3 (%s)", exc.message)
        extra["maas-payload-truncated-from"] = str(len(envelope.payload))
        return envelope.payload[: self.max_value_bytes]


def fifo_fields(queue_url: str, kind: str, source: str) -> dict[str, str]:
    """The ids a FIFO queue (its name ends in `.fifo`) takes a message only with; none for a standard queue.

    Without them SQS refused every answer sent to a FIFO queue, and each request ran again until its queue's
    redrive took it away. An answer is a message group of its own: answers to different requests keep no order
    between them (a retried request is answered after the ones received beside it), and one group would let a
    consumer hold one answer at a time. It is deduplicated by the message it answers (`source`) and its `kind`:
    a request SQS delivers again within five minutes, answered again, is on the queue once."""
    if not queue_url.endswith(".fifo"):
        return {}
    digest = hashlib.sha256(f"{kind}\n{source}".encode()).hexdigest()
    return {"MessageGroupId": digest, "MessageDeduplicationId": digest}


class SqsSink:
    """Answers to an SQS results queue; dead letters to an SQS queue when one is configured.

    SQS takes at most 10 message attributes and a queue's MaximumMessageSize per message (256 KiB by default
    before 2025, up to 1 MiB): the framing and dead-letter attributes come first, the request's tracing and
    CloudEvents ones fill what is left, and results over `max_inline_bytes` go to S3: three quarters (binary
    results grow by a third in base64) of what the results queue's size leaves after ATTRIBUTE_RESERVE_BYTES
    (`for_queues` reads it; 162 KiB on a 256 KiB queue). Each message is sent on its own, so one that SQS refuses
    fails only itself (`Undelivered`). Either queue may be a FIFO queue (`fifo_fields`).

    A dead letter keeps the original body and attributes: text as it came (base64 only for bytes SQS does not
    take as text), and a body too large for the dead-letter queue's MaximumMessageSize is stored in S3 while
    the message carries its URI (`maas-payload-uri`), as KafkaSink does for the dead-letter topic.
    """

    MAX_ATTRIBUTES = 10
    FALLBACK_MAX_MESSAGE_BYTES = 256 * 1024  # SQS's default before 2025: when a queue's own cannot be read
    ATTRIBUTE_RESERVE_BYTES = 40 * 1024  # framing attributes and up to MAX_PASSTHROUGH_BYTES of passed-through ones

    def __init__(self, sqs: Any, results_url: str, dlq_url: str | None = None, *,
                 store: ClaimCheckStore | None = None, results_max_bytes: int = FALLBACK_MAX_MESSAGE_BYTES) -> None:
        self.sqs = sqs
        self.results_url = results_url
        self.dlq_url = dlq_url
        self.store = store
        self.max_inline_bytes = max(0, (results_max_bytes - self.ATTRIBUTE_RESERVE_BYTES) * 3 // 4)
        self._dlq_max_bytes: int | None = None

    @classmethod
    async def for_queues(cls, sqs: Any, results_url: str, dlq_url: str | None = None, *,
                         store: ClaimCheckStore | None = None) -> SqsSink:
        """A sink whose inline results fit the results queue's MaximumMessageSize, read once here: a result
        over it was refused, its request received and run again until the queue's redrive took it away."""
        return cls(sqs, results_url, dlq_url, store=store,
                   results_max_bytes=await queue_max_bytes(sqs, results_url, cls.FALLBACK_MAX_MESSAGE_BYTES))

    async def stop(self) -> None:
        """Nothing to end: this sink runs nothing in the background (each send is awaited by its caller), so one made
        once and shared (a warm function's) goes on serving after it."""

    async def max_inline_bytes_for(self, requests: Sequence[InferenceRequest]) -> list[int | None]:
        return [self.max_inline_bytes] * len(requests)  # every answer goes to the results queue

    async def answer(self, envelope: Envelope, request: InferenceRequest | None, framed: Framed) -> None:
        message = self._with_attributes(to_sqs_message(framed), envelope.passthrough())
        await _to_thread(self.sqs.send_message, QueueUrl=self.results_url, **message,
                         **fifo_fields(self.results_url, "answer", envelope.source))

    def _with_attributes(self, message: dict[str, Any], extra: dict[str, str]) -> dict[str, Any]:
        """`extra` added to the message's own attributes while there is room for them (tracing ones first)."""
        attributes = message["MessageAttributes"]
        ordered = sorted(extra.items(), key=lambda kv: (kv[0] not in _SQS_FIRST, kv[0]))
        dropped = []
        for name, value in ordered:
            if name in attributes or not value:
                continue
            if len(attributes) >= self.MAX_ATTRIBUTES:
                dropped.append(name)
                continue
            attributes[name] = {"DataType": "String", "StringValue": value}
        if dropped:
            log.debug("SQS takes %d message attributes: %s not copied", self.MAX_ATTRIBUTES, dropped)
        return message

    async def answer_many(self, answers: Sequence[Answer]) -> None:
        failed: dict[int, BaseException] = {}
        for position, (envelope, request, framed) in enumerate(answers):
            try:
                await self.answer(envelope, request, framed)
            except (ClientError, BotoCoreError) as exc:
                log.error("cannot answer %s on SQS (%r); it is left to redelivery", envelope.source, exc)
                failed[position] = exc
        if failed:
            raise Undelivered(failed)

    async def dead_letter(self, envelope: Envelope, error: InferenceError, attempts: int) -> bool:
        if self.dlq_url is None:
            return False
        framing = {CONTENT_TYPE: envelope.headers.get(CONTENT_TYPE, JSON),
                   **dead_letter_headers(error, attempts, envelope.source)}
        message = self._dead_letter_message(envelope, framing)
        if _sqs_bytes(message) > await self._dlq_limit():
            uri = await self._offload(envelope)
            if uri is None:
                return False  # left whole to the source queue's redrive policy rather than cut short
            message = self._dead_letter_message(envelope, {**framing, PAYLOAD_URI: uri}, stored_at=uri)
        await _to_thread(self.sqs.send_message, QueueUrl=self.dlq_url, **message,
                         **fifo_fields(self.dlq_url, "dead letter", envelope.source))
        DEAD_LETTERS.labels(str(error.code)).inc()
        return True

    def _dead_letter_message(self, envelope: Envelope, framing: dict[str, str],
                             stored_at: str | None = None) -> dict[str, Any]:
        """The body as it came (or, once stored, the object's URI: SQS takes no empty body), then the
        original attributes; whether the body is base64 is this message's own attribute, never the original's."""
        body = stored_at or sqs_text(envelope.payload)
        attributes = {name: {"DataType": "String", "StringValue": value} for name, value in framing.items() if value}
        if body is None:
            body = base64.b64encode(envelope.payload).decode()
            attributes[TRANSFER_ENCODING] = {"DataType": "String", "StringValue": "base64"}
        original = {name: value for name, value in envelope.headers.items() if name != TRANSFER_ENCODING}
        return self._with_attributes({"MessageBody": body, "MessageAttributes": attributes}, original)

    async def _dlq_limit(self) -> int:
        """The dead-letter queue's MaximumMessageSize, read once."""
        if self._dlq_max_bytes is None:
            assert self.dlq_url is not None
            self._dlq_max_bytes = await queue_max_bytes(self.sqs, self.dlq_url, self.FALLBACK_MAX_MESSAGE_BYTES)
        return self._dlq_max_bytes

    async def _offload(self, envelope: Envelope) -> str | None:
        """The payload stored in S3, or None when there is no store or it fails (said in the log)."""
        if self.store is None:
            log.error("dead letter of %s is too large for %s and there is no object store for it; it is left to "
                      "redelivery", envelope.source, self.dlq_url)
            return None
        try:
            return await self.store.put_new(Framed(envelope.payload, {CONTENT_TYPE: BINARY}), "dead-letters",
                                            envelope.source, field="dead letter")
        except InferenceError as exc:
            log.error("cannot store the dead letter of %s in S3 (%s); it is left to redelivery", envelope.source,
                      exc.message)
            return None


async def topic_max_bytes(client: Any, topics: Sequence[str]) -> dict[str, int]:
    """The `max.message.bytes` of each of `topics` that the cluster gives one for, in one DescribeConfigs request on
    a started aiokafka `client` (no timeout of its own); raises KafkaError where the cluster does not answer.

    A topic the cluster says nothing of is left out: one that does not exist (DescribeConfigs creates none), one
    without the config (Tansu gives none for a topic created without it) or one an ACL hides.
    """
    # Every config of each topic (a few dozen): Tansu closes the connection on a request that names the configs.
    request = DescribeConfigsRequest([(ConfigResourceType.TOPIC, topic, None) for topic in topics])
    response = await client.send(client.get_random_node(), request)
    limits = {}
    for error_code, _, _, topic, entries in response.resources:
        values = [entry[1] for entry in entries if entry[0] == "max.message.bytes" and entry[1]]
        if error_code == 0 and values and values[0].isdigit():
            limits[topic] = int(values[0])
    return limits


async def queue_max_bytes(sqs: Any, url: str, fallback: int) -> int:
    """A queue's MaximumMessageSize; `fallback` (logged) when it cannot be read."""
    try:
        response = await _to_thread(sqs.get_queue_attributes, QueueUrl=url, AttributeNames=["MaximumMessageSize"])
        return int(response["Attributes"]["MaximumMessageSize"])
    except (ClientError, BotoCoreError, KeyError, ValueError) as exc:
        log.warning("cannot read the MaximumMessageSize of %s (%r); assuming %d bytes", url, exc, fallback)
        return fallback


def _sqs_bytes(message: dict[str, Any]) -> int:
    """A message's size as SQS counts it against MaximumMessageSize: the body and each attribute's name, data
    type and value, in UTF-8 bytes."""
    size = len(message["MessageBody"].encode())
    for name, value in message["MessageAttributes"].items():
        size += len(name.encode()) + len(value["DataType"].encode()) + len(value["StringValue"].encode())
    return size


def _inline_bytes(topic_limit: int) -> int:
    """The largest result body inline in an answer to a topic of max.message.bytes `topic_limit`: the rest is
    left for the record's key and headers."""
    return max(0, topic_limit - RECORD_OVERHEAD_BYTES)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "the cluster does not serve it"
    return str(exc) or type(exc).__name__


async def _to_thread(fn: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(fn, **kwargs)
