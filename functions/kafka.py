"""Kafka trigger (Amazon MSK and self-managed Kafka event source mappings).

The event groups records by "topic-partition"; keys and values are base64, headers a list of
{name: [byte, ...]} objects. Every record goes through the same `Responder` as `maas worker`: a result or
error result on the results topic (or `reply_to`), undecodable records to the dead-letter topic. The records
of an invocation go to the engine together (`Responder.handle_many`, up to MAAS_MAX_FETCH_RECORDS at a time),
so they are batched.

Records that failed transiently (the model, or delivery of the answer) are returned as a partial batch
response, `{"batchItemFailures": [{"itemIdentifier": {"topic-partition": "t-0", "offset": 7}}]}`, for the
event source mapping to retry (FunctionResponseTypes: [ReportBatchItemFailures]). With
MAAS_PARTIAL_BATCH_RESPONSE=0 they are dead-lettered instead, as the worker does.

A record the event itself gets wrong (a value that is not base64, a header that is not a list of bytes) is
dead-lettered as it came, JSON, and does not fail the records beside it.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka.errors import KafkaError

from functions.runtime import Runtime, invoke
from pipeline.codec import header_map
from pipeline.errors import ErrorCode, InferenceError
from pipeline.metrics import ERRORS
from pipeline.responder import Outcome, Responder
from pipeline.sinks import Envelope, KafkaSink, RedeliverTransient
from pipeline.tasks import gather_or_cancel


@dataclass(frozen=True, slots=True)
class KafkaRecord:
    """One record of the event: where it came from, and its envelope, or why it has none."""

    partition: str | None  # "topic-partition"; None when the record does not say, so it cannot be retried alone
    offset: int | None
    envelope: Envelope
    defect: InferenceError | None = None

    @property
    def identifier(self) -> dict[str, Any] | None:
        if self.partition is None or self.offset is None:
            return None
        return {"topic-partition": self.partition, "offset": self.offset}


def _java_bytes(values: Any) -> bytes:
    """Header values come as Java bytes, signed: -61 is 0xC3."""
    if not isinstance(values, list) or not all(isinstance(b, int) and -128 <= b <= 255 for b in values):
        raise ValueError("a header value is not a list of bytes")
    return bytes(b & 0xFF for b in values)


def _record(record: Any) -> KafkaRecord:
    try:
        partition = f"{record['topic']}-{int(record['partition'])}"
        offset = int(record["offset"])
    except (TypeError, KeyError, ValueError):
        partition = offset = None
    source = f"{partition}@{offset}" if partition is not None else "kafka-event"
    try:
        key = base64.b64decode(record["key"], validate=True) if record.get("key") else None
        value = base64.b64decode(record["value"], validate=True) if record.get("value") is not None else None
        raw = [(str(name), _java_bytes(data)) for header in record.get("headers") or []
               for name, data in header.items()]
        if partition is None:
            raise ValueError("the record names no topic, partition and offset")
    except (AttributeError, TypeError, ValueError, binascii.Error) as exc:
        defect = InferenceError(ErrorCode.INVALID_REQUEST, f"the event's record could not be read: {exc}")
        payload = orjson.dumps(record, default=repr)  # the record as it came, for whoever reads the dead letters
        return KafkaRecord(partition, offset, Envelope(payload=payload, headers={}, source=source), defect)
    envelope = Envelope(payload=value, headers=header_map(raw), key=key, raw_headers=raw, source=source)
    return KafkaRecord(partition, offset, envelope)


def records(event: dict[str, Any]) -> list[KafkaRecord]:
    """The records of an MSK / self-managed Kafka event, in the event's order."""
    return [_record(r) for batch in (event.get("records") or {}).values() for r in batch]


async def handle(runtime: Runtime, event: dict[str, Any]) -> dict[str, Any]:
    report = runtime.settings.partial_batch_response
    settings, store = runtime.settings, runtime.claim_checks()
    sink = KafkaSink.for_settings(await runtime.producer(), settings, store, runtime.record_limits)
    responder = Responder(settings, runtime.engine, RedeliverTransient(sink, report), store=store, max_attempts=2)
    items = records(event)
    size = settings.max_fetch_records

    async def dead_letter(item: KafkaRecord) -> Outcome:
        assert item.defect is not None
        try:
            await sink.dead_letter(item.envelope, item.defect, 1)
        except KafkaError:
            if not report or item.identifier is None:
                raise  # the whole batch fails and is retried
            return Outcome.RETRY
        ERRORS.labels(str(item.defect.code)).inc()  # as every request that ends in an error, answered or not
        return Outcome.DEAD_LETTER

    async def chunk(part: list[KafkaRecord]) -> list[Outcome]:
        try:
            return await responder.handle_many([item.envelope for item in part])
        except KafkaError:
            if not report:
                raise  # the whole batch fails and is retried
            return [Outcome.RETRY] * len(part)  # the answers could not be delivered: retry these records

    readable = [index for index, item in enumerate(items) if item.defect is None]
    unreadable = [index for index, item in enumerate(items) if item.defect is not None]
    parts = [readable[start:start + size] for start in range(0, len(readable), size)]
    try:
        done = await gather_or_cancel(*(chunk([items[index] for index in part]) for part in parts),
                                      *(dead_letter(items[index]) for index in unreadable))
    finally:  # a reply_to lookup left by a chunk cancelled here would run on this loop into the next invocation
        await sink.stop()
    outcomes: dict[int, Outcome] = {}
    for part, part_outcomes in zip(parts, done[:len(parts)], strict=True):
        outcomes.update(zip(part, part_outcomes, strict=True))
    outcomes.update(zip(unreadable, done[len(parts):], strict=True))
    failures = [{"itemIdentifier": items[index].identifier} for index, outcome in sorted(outcomes.items())
                if outcome is Outcome.RETRY]
    failures.sort(key=lambda f: (f["itemIdentifier"]["topic-partition"], f["itemIdentifier"]["offset"]))
    return {"batchItemFailures": failures}


def handler(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    count = sum(len(v) for v in (event.get("records") or {}).values())
    return invoke("kafka", lambda runtime: handle(runtime, event), records=count)
