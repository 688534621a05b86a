"""SQS trigger: each message body is a V2 request (binary ones base64, framing in message attributes).

Messages go through the same `Responder` as every other source. Answers go to the results topic (or
`reply_to`), or to an SQS results queue when MAAS_SQS_RESULTS_QUEUE_URL is set (undecodable messages then
to MAAS_SQS_DLQ_URL, or to S3 with a `maas-payload-uri` pointing to them when too large for it; without it they
are reported failed and the queue's redrive policy moves them to its DLQ). The handler returns a partial batch
response listing exactly the messages that failed transiently or whose answer or dead letter could not be
delivered, `{"batchItemFailures": [{"itemIdentifier": "<messageId>"}]}`, so SQS redelivers only those
(FunctionResponseTypes: [ReportBatchItemFailures]); after maxReceiveCount they move to the queue's DLQ.
"""

from __future__ import annotations

from typing import Any

from functions.runtime import Runtime, invoke
from pipeline.responder import Outcome, Responder
from pipeline.sinks import DELIVERY_ERRORS, KafkaSink, RedeliverTransient, ResultSink
from pipeline.sqs_worker import SqsMessage, answer_sqs_messages


async def _sink(runtime: Runtime) -> ResultSink:
    settings = runtime.settings
    if settings.sqs_results_queue_url:
        return await runtime.sqs_results()
    producer = await runtime.producer()
    return KafkaSink.for_settings(producer, settings, runtime.claim_checks(), runtime.record_limits)


async def handle(runtime: Runtime, event: dict[str, Any]) -> dict[str, Any]:
    sink = RedeliverTransient(await _sink(runtime))
    responder = Responder(runtime.settings, runtime.engine, sink, store=runtime.claim_checks(), max_attempts=2)
    records = event.get("Records") or []
    messages = [SqsMessage(f"sqs:{r.get('eventSourceARN', '')}/{r.get('messageId', '')}", r.get("body") or "",
                           r.get("messageAttributes")) for r in records]
    failed: list[dict[str, str]] = []
    size = runtime.settings.max_fetch_records  # a batching window can hand over up to 10,000 messages
    try:
        for start in range(0, len(messages), size):
            part = messages[start:start + size]
            try:
                outcomes = await answer_sqs_messages(responder, part)
            except DELIVERY_ERRORS:
                outcomes = [Outcome.RETRY] * len(part)  # the answers could not be delivered: let SQS redeliver
            failed += [{"itemIdentifier": record["messageId"]} for record, outcome
                       in zip(records[start:start + size], outcomes, strict=True) if outcome is Outcome.RETRY]
    finally:  # a KafkaSink's lookups would run on into the next invocation; the shared SqsSink's stop() ends nothing
        await sink.stop()
    return {"batchItemFailures": failed}


def handler(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    return invoke("sqs", lambda runtime: handle(runtime, event), records=len(event.get("Records") or []))
