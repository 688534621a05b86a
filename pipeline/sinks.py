"""Where answers go: a `ResultSink` delivers results, error results and dead letters for one source.

Sources differ in how requests arrive; sinks differ in where answers go. Kafka topics are the default for
every source; an SQS results queue serves SQS-only deployments.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from aiokafka.errors import KafkaError

from pipeline.claim_check import ClaimCheckStore
from pipeline.codec import HEADER_LENGTH, Framed, encode_error, to_sqs_message
from pipeline.errors import ErrorCode, InferenceError
from pipeline.metrics import DEAD_LETTERS
from pipeline.partitioning import partitions_for_keys
from pipeline.protocol import InferenceRequest
from pipeline.settings import Settings

log = logging.getLogger(__name__)

PASSTHROUGH_HEADERS = ("traceparent", "tracestate")
MAX_PASSTHROUGH_BYTES = 16 * 1024
_SQS_FIRST = (*PASSTHROUGH_HEADERS, HEADER_LENGTH)  # attributes kept first when SQS's 10 run short


@dataclass(slots=True)
class Envelope:
    """One request as it arrived: payload, headers (lower-case, for decoding) and where it came from."""

    payload: bytes
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
    return {
        "maas-error-code": str(error.code),
        "maas-error-message": error.message[:4096],
        "maas-attempts": str(attempts),
        "maas-source": source,
    }


Answer = tuple[Envelope, InferenceRequest | None, Framed]


class ResultSink(Protocol):
    #: The largest result body this sink carries inline (None: the settings' MAAS_MAX_INLINE_OUTPUT_BYTES alone);
    #: a larger one goes to S3 and the answer points to it.
    max_inline_bytes: int | None

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
        self.max_inline_bytes = sink.max_inline_bytes

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
    A `reply_to` topic that is one of the platform's own (requests, metrics, dead letters), that the cluster
    does not serve, or that refuses the answers gets them as `INVALID_REQUEST` errors on the results topic
    instead: a caller's topic must never stop a worker, which would stop on the same record again after its
    restart.
    """

    max_inline_bytes = None

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

    @classmethod
    def for_settings(cls, producer: Any, settings: Settings, store: ClaimCheckStore | None) -> KafkaSink:
        """The configured results and dead-letter topics; dead letters over the request limit go to `store`."""
        return cls(producer, settings.topics.results, settings.topics.dlq, store=store,
                   max_value_bytes=settings.max_request_bytes,
                   reserved_topics=(settings.topics.requests, settings.topics.metrics))

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
            request = answer[1]
            topic = (request.parameters.get("reply_to") if request else None) or self.results_topic
            by_topic.setdefault(topic, []).append(answer)
        refused: list[tuple[Answer, str]] = []
        sends = []
        for topic, group in by_topic.items():
            if topic == self.results_topic:
                sends.append((topic, group, await self._send(topic, group, await self._partitions(topic))))
                continue
            try:
                if topic in self.reserved_topics:
                    raise ValueError("it is one of the platform's own topics")
                partitions = await asyncio.wait_for(self._partitions(topic), self.reply_to_timeout_s)
                sends.append((topic, group, await self._send(topic, group, partitions)))
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

    async def _send(self, topic: str, answers: Sequence[Answer], partitions: list[int]) -> list[Any]:
        """Hand the answers to the producer, one batch per partition; the acknowledgements to wait for."""
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
        value = envelope.payload
        if len(value) > self.max_value_bytes:
            value = await self._offload(envelope, extra)
        headers = original + [(k, v.encode("utf-8", "replace")) for k, v in extra.items()]
        await self.producer.send_and_wait(self.dlq_topic, value, key=envelope.key, headers=headers)
        DEAD_LETTERS.labels(str(error.code)).inc()
        return True

    async def _offload(self, envelope: Envelope, extra: dict[str, str]) -> bytes:
        if self.store is not None:
            try:
                extra["maas-payload-uri"] = await self.store.put_new(
                    Framed(envelope.payload, {"content-type": "application/octet-stream"}), "dead-letters",
                    envelope.source, field="dead letter")
                return b""
            except InferenceError as exc:
                log.error("cannot store an oversized dead letter in S3 (%s)", exc.message)
        extra["maas-payload-truncated-from"] = str(len(envelope.payload))
        return envelope.payload[: self.max_value_bytes]


class SqsSink:
    """Answers to an SQS results queue; dead letters to an SQS queue when one is configured.

    SQS takes at most 10 message attributes and, on a queue's default settings, 256 KiB per message: the
    framing and dead-letter attributes come first, the request's tracing and CloudEvents ones fill what is
    left, and results over `max_inline_bytes` (binary ones grow by a third in base64) go to S3.
    """

    max_inline_bytes = 160 * 1024
    MAX_ATTRIBUTES = 10

    def __init__(self, sqs: Any, results_url: str, dlq_url: str | None = None) -> None:
        self.sqs = sqs
        self.results_url = results_url
        self.dlq_url = dlq_url

    async def answer(self, envelope: Envelope, request: InferenceRequest | None, framed: Framed) -> None:
        message = self._with_attributes(to_sqs_message(framed), envelope.passthrough())
        await _to_thread(self.sqs.send_message, QueueUrl=self.results_url, **message)

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
        for envelope, request, framed in answers:
            await self.answer(envelope, request, framed)

    async def dead_letter(self, envelope: Envelope, error: InferenceError, attempts: int) -> bool:
        if self.dlq_url is None:
            return False
        framing = {"content-type": "application/octet-stream", **dead_letter_headers(error, attempts, envelope.source)}
        message = self._with_attributes(to_sqs_message(Framed(envelope.payload, framing)), envelope.headers)
        await _to_thread(self.sqs.send_message, QueueUrl=self.dlq_url, **message)
        DEAD_LETTERS.labels(str(error.code)).inc()
        return True


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "the cluster does not serve it"
    return str(exc) or type(exc).__name__


async def _to_thread(fn: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(fn, **kwargs)
