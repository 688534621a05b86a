"""Where answers go: a `ResultSink` delivers results, error results and dead letters for one source.

Sources differ in how requests arrive; sinks differ in where answers go. Kafka topics are the default for
every source; an SQS results queue serves SQS-only deployments.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pipeline.claim_check import ClaimCheckStore
from pipeline.codec import Framed, to_sqs_message
from pipeline.errors import InferenceError
from pipeline.metrics import DEAD_LETTERS
from pipeline.partitioning import partitions_for_keys
from pipeline.protocol import InferenceRequest
from pipeline.settings import Settings

log = logging.getLogger(__name__)

PASSTHROUGH_HEADERS = ("traceparent", "tracestate")


@dataclass(slots=True)
class Envelope:
    """One request as it arrived: payload, headers (lower-case, for decoding) and where it came from."""

    payload: bytes
    headers: dict[str, str]
    source: str
    key: bytes | None = None
    raw_headers: Sequence[tuple[str, bytes]] = ()  # Kafka's, kept verbatim for dead letters

    def passthrough(self) -> dict[str, str]:
        """Tracing and CloudEvents headers that travel from a request to its answer."""
        return {k: v for k, v in self.headers.items() if k in PASSTHROUGH_HEADERS or k.startswith("ce_")}


def dead_letter_headers(error: InferenceError, attempts: int, source: str) -> dict[str, str]:
    return {
        "maas-error-code": str(error.code),
        "maas-error-message": error.message[:4096],
        "maas-attempts": str(attempts),
        "maas-source": source,
    }


Answer = tuple[Envelope, InferenceRequest | None, Framed]


class ResultSink(Protocol):
    async def answer(self, envelope: Envelope, request: InferenceRequest | None, framed: Framed) -> None:
        """Deliver a result or error result; raise if it could not be delivered."""

    async def answer_many(self, answers: Sequence[Answer]) -> None:
        """Deliver several; returns once every one was delivered, raises if any could not be."""

    async def dead_letter(self, envelope: Envelope, error: InferenceError, attempts: int) -> bool:
        """Deliver a dead letter; False when this sink has no dead-letter destination (the source must then
        leave the message to its own redrive, e.g. an SQS queue's DLQ)."""


class RedeliverTransient:
    """A sink wrapper for sources that redeliver on their own (SQS visibility timeout, Lambda event source
    mappings): a request that failed transiently on every attempt is left to the source's retry and redrive
    policy instead of being dead-lettered here. Undecodable requests are still dead-lettered."""

    def __init__(self, sink: ResultSink, enabled: bool = True) -> None:
        self.sink = sink
        self.enabled = enabled

    async def answer(self, envelope: Envelope, request: InferenceRequest | None, framed: Framed) -> None:
        await self.sink.answer(envelope, request, framed)

    async def answer_many(self, answers: Sequence[Answer]) -> None:
        await self.sink.answer_many(answers)

    async def dead_letter(self, envelope: Envelope, error: InferenceError, attempts: int) -> bool:
        if self.enabled and error.code.transient:
            return False  # the Responder then reports Outcome.RETRY
        return await self.sink.dead_letter(envelope, error, attempts)


class KafkaSink:
    """Answers to the results topic (or the request's `reply_to`), dead letters to the DLQ topic.

    A dead letter too large to re-produce is stored in S3 and the record points to it (`maas-payload-uri`).
    """

    def __init__(self, producer: Any, results_topic: str, dlq_topic: str, *, store: ClaimCheckStore | None = None,
                 max_value_bytes: int = 1024 * 1024) -> None:
        self.producer = producer
        self.results_topic = results_topic
        self.dlq_topic = dlq_topic
        self.store = store
        self.max_value_bytes = max_value_bytes

    @classmethod
    def for_settings(cls, producer: Any, settings: Settings, store: ClaimCheckStore | None) -> KafkaSink:
        """The configured results and dead-letter topics; dead letters over the request limit go to `store`."""
        return cls(producer, settings.topics.results, settings.topics.dlq, store=store,
                   max_value_bytes=settings.max_request_bytes)

    async def answer(self, envelope: Envelope, request: InferenceRequest | None, framed: Framed) -> None:
        await self.answer_many([(envelope, request, framed)])

    async def answer_many(self, answers: Sequence[Answer]) -> None:
        """One record batch per partition, then wait for every acknowledgement.

        aiokafka's per-record `send()` costs more on the event loop than encoding the answer; filling a
        batch directly costs a fraction of it, and the broker gets the same produce requests. Partitions
        are chosen as the producer would (murmur2 of the key), so keyed consumers see no difference.
        """
        by_topic: dict[str, list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]]] = {}
        for envelope, request, framed in answers:
            topic = (request.parameters.get("reply_to") if request else None) or self.results_topic
            headers = framed.kafka_headers()
            passthrough = envelope.passthrough()
            if passthrough:
                headers = [(k, v.encode()) for k, v in passthrough.items()] + headers
            key = request.id.encode() if request is not None else envelope.key
            records = by_topic.get(topic)
            if records is None:
                records = by_topic[topic] = []
            records.append((key, framed.body, headers))
        acks = []
        for topic, records in by_topic.items():
            partitions = sorted(await self.producer.partitions_for(topic))
            builders: dict[int, Any] = {}
            for partition, (key, value, headers) in zip(
                    partitions_for_keys([key for key, _, _ in records], partitions), records, strict=True):
                builder = builders.get(partition)
                if builder is None:
                    builder = builders[partition] = self.producer.create_batch()
                if builder.append(key=key, value=value, timestamp=None, headers=headers) is None:
                    acks.append(await self.producer.send_batch(builder, topic, partition=partition))
                    builder = builders[partition] = self.producer.create_batch()
                    builder.append(key=key, value=value, timestamp=None, headers=headers)  # always fits an empty one
            for partition, builder in builders.items():
                acks.append(await self.producer.send_batch(builder, topic, partition=partition))
        if acks:
            await asyncio.gather(*acks)

    async def dead_letter(self, envelope: Envelope, error: InferenceError, attempts: int) -> bool:
        log.warning("dead-lettering %s: %s %s", envelope.source, error.code, error.message,
                    extra={"request_id": error.request_id, "traceparent": envelope.headers.get("traceparent")})
        original = list(envelope.raw_headers) or [(k, v.encode()) for k, v in envelope.headers.items()]
        extra = dead_letter_headers(error, attempts, envelope.source)
        value = envelope.payload
        if len(value) > self.max_value_bytes:
            value = await self._offload(envelope, extra)
        headers = original + [(k, v.encode("utf-8", "replace")) for k, v in extra.items()]
        await self.producer.send_and_wait(self.dlq_topic, value, key=envelope.key, headers=headers)
        DEAD_LETTERS.labels(str(error.code)).inc()
        return True

    async def _offload(self, envelope: Envelope, extra: dict[str, str]) -> bytes:
        if self.store is not None:
            uri = self.store.default_uri("dead-letters", envelope.source)
            try:
                await self.store.put(uri, Framed(envelope.payload, {"content-type": "application/octet-stream"}),
                                     field="dead letter")
                extra["maas-payload-uri"] = uri
                return b""
            except InferenceError as exc:
                log.error("cannot store an oversized dead letter in S3 (%s)", exc.message)
        extra["maas-payload-truncated-from"] = str(len(envelope.payload))
        return envelope.payload[: self.max_value_bytes]


class SqsSink:
    """Answers to an SQS results queue; dead letters to an SQS queue when one is configured."""

    def __init__(self, sqs: Any, results_url: str, dlq_url: str | None = None) -> None:
        self.sqs = sqs
        self.results_url = results_url
        self.dlq_url = dlq_url

    async def answer(self, envelope: Envelope, request: InferenceRequest | None, framed: Framed) -> None:
        message = to_sqs_message(Framed(framed.body, {**envelope.passthrough(), **framed.headers}))
        await _to_thread(self.sqs.send_message, QueueUrl=self.results_url, **message)

    async def answer_many(self, answers: Sequence[Answer]) -> None:
        for envelope, request, framed in answers:
            await self.answer(envelope, request, framed)

    async def dead_letter(self, envelope: Envelope, error: InferenceError, attempts: int) -> bool:
        if self.dlq_url is None:
            return False
        headers = {**envelope.headers, **dead_letter_headers(error, attempts, envelope.source)}
        message = to_sqs_message(Framed(envelope.payload, {"content-type": "application/octet-stream"}))
        attributes = {k: {"DataType": "String", "StringValue": v} for k, v in headers.items() if v}
        message["MessageAttributes"] = {**attributes, **message["MessageAttributes"]}
        await _to_thread(self.sqs.send_message, QueueUrl=self.dlq_url, **message)
        DEAD_LETTERS.labels(str(error.code)).inc()
        return True


async def _to_thread(fn: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(fn, **kwargs)
