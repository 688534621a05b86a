"""SQS trigger: each message body is a V2 request (binary ones base64, framing in message attributes).

Messages go through the same `Responder` as every other source. Answers go to the results topic (or
`reply_to`), or to an SQS results queue when MAAS_SQS_RESULTS_QUEUE_URL is set (undecodable messages then
to MAAS_SQS_DLQ_URL; without it they are reported failed and the queue's redrive policy moves them to its
DLQ). The handler returns a partial batch response listing exactly the messages that failed transiently,
`{"batchItemFailures": [{"itemIdentifier": "<messageId>"}]}`, so SQS redelivers only those
(FunctionResponseTypes: [ReportBatchItemFailures]); after maxReceiveCount they move to the queue's DLQ.
"""

from __future__ import annotations

from typing import Any

from aiokafka.errors import KafkaError
from botocore.exceptions import BotoCoreError, ClientError

from functions.runtime import Runtime, invoke
from pipeline.codec import from_sqs_message
from pipeline.errors import InferenceError
from pipeline.responder import Outcome, Responder
from pipeline.sinks import Envelope, KafkaSink, RedeliverTransient, ResultSink, SqsSink


async def _sink(runtime: Runtime) -> ResultSink:
    settings = runtime.settings
    if settings.sqs_results_queue_url:
        return SqsSink(runtime.aws("sqs"), settings.sqs_results_queue_url, settings.sqs_dlq_url)
    return KafkaSink.for_settings(await runtime.producer(), settings, runtime.claim_checks())


async def handle(runtime: Runtime, event: dict[str, Any]) -> dict[str, Any]:
    sink = RedeliverTransient(await _sink(runtime))
    responder = Responder(runtime.settings, runtime.engine, sink, store=runtime.claim_checks(), max_attempts=2)
    records = event.get("Records") or []
    delivered: dict[int, bool] = {}
    decoded: list[tuple[int, Envelope]] = []
    for index, record in enumerate(records):
        source = f"sqs:{record.get('eventSourceARN', '')}/{record.get('messageId', '')}"
        body = record.get("body") or ""
        try:
            payload, headers = from_sqs_message(body, record.get("messageAttributes"))
        except InferenceError as exc:  # e.g. invalid base64: nothing to decode, dead-letter as is
            delivered[index] = await _dead_letter(sink, Envelope(body.encode(), {}, source), exc)
        else:
            decoded.append((index, Envelope(payload, headers, source)))
    size = runtime.settings.max_fetch_records
    for start in range(0, len(decoded), size):
        part = decoded[start:start + size]
        try:
            outcomes = await responder.handle_many([envelope for _, envelope in part])
        except (KafkaError, ClientError, BotoCoreError):
            outcomes = [Outcome.RETRY] * len(part)  # the answers could not be delivered: let SQS redeliver
        delivered.update((index, outcome is not Outcome.RETRY) for (index, _), outcome in zip(part, outcomes,
                                                                                              strict=True))
    return {"batchItemFailures": [{"itemIdentifier": r["messageId"]}
                                  for index, r in enumerate(records) if not delivered[index]]}


async def _dead_letter(sink: ResultSink, envelope: Envelope, error: InferenceError) -> bool:
    try:
        return await sink.dead_letter(envelope, error, 1)
    except (KafkaError, ClientError, BotoCoreError):
        return False


def handler(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    return invoke("sqs", lambda runtime: handle(runtime, event), records=len(event.get("Records") or []))
