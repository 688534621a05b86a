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
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from aiokafka.errors import KafkaError

from functions.runtime import Runtime, invoke
from pipeline.codec import header_map
from pipeline.responder import Outcome, Responder
from pipeline.sinks import Envelope, KafkaSink, RedeliverTransient


def envelopes(event: dict[str, Any]) -> list[tuple[str, int, Envelope]]:
    """(topic-partition, offset, envelope) for each record of an MSK / self-managed Kafka event."""
    out = []
    for records in (event.get("records") or {}).values():
        for r in records:
            key = base64.b64decode(r["key"]) if r.get("key") else None
            value = base64.b64decode(r["value"]) if r.get("value") is not None else b""
            # Header values come as Java bytes, signed: -61 is 0xC3.
            raw = [(name, bytes(b & 0xFF for b in data)) for header in r.get("headers") or []
                   for name, data in header.items()]
            partition = f"{r['topic']}-{int(r['partition'])}"
            envelope = Envelope(payload=value, headers=header_map(raw), key=key, raw_headers=raw,
                                source=f"{partition}@{int(r['offset'])}")
            out.append((partition, int(r["offset"]), envelope))
    return out


async def handle(runtime: Runtime, event: dict[str, Any]) -> dict[str, Any]:
    report = runtime.settings.partial_batch_response
    settings, store = runtime.settings, runtime.claim_checks()
    sink = KafkaSink.for_settings(await runtime.producer(), settings, store)
    responder = Responder(settings, runtime.engine, RedeliverTransient(sink, report), store=store, max_attempts=2)
    items = envelopes(event)
    size = settings.max_fetch_records

    async def chunk(part: list[tuple[str, int, Envelope]]) -> list[Outcome]:
        try:
            return await responder.handle_many([envelope for _, _, envelope in part])
        except KafkaError:
            if not report:
                raise  # the whole batch fails and is retried
            return [Outcome.RETRY] * len(part)  # the answers could not be delivered: retry these records

    parts = [items[start:start + size] for start in range(0, len(items), size)]
    outcomes = [o for part in await asyncio.gather(*(chunk(p) for p in parts)) for o in part]
    failures = [{"itemIdentifier": {"topic-partition": partition, "offset": offset}}
                for (partition, offset, _), outcome in zip(items, outcomes, strict=True) if outcome is Outcome.RETRY]
    failures.sort(key=lambda f: (f["itemIdentifier"]["topic-partition"], f["itemIdentifier"]["offset"]))
    return {"batchItemFailures": failures}


def handler(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    count = sum(len(v) for v in (event.get("records") or {}).values())
    return invoke("kafka", lambda runtime: handle(runtime, event), records=count)
