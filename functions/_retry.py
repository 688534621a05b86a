"""A sink wrapper for event-source-mapping triggers: transient failures go back to the trigger, not to a DLQ.

`Responder` dead-letters a request that failed transiently on every attempt. Behind a Lambda trigger with a
partial batch response, the better answer is to report it failed, so the event source mapping redelivers it
(and applies its own retry limit and on-failure destination). Undecodable requests are still dead-lettered.
"""

from __future__ import annotations

from pipeline.codec import Framed
from pipeline.errors import InferenceError
from pipeline.protocol import InferenceRequest
from pipeline.sinks import Envelope, ResultSink


class ReportTransient:
    def __init__(self, sink: ResultSink, enabled: bool = True) -> None:
        self.sink = sink
        self.enabled = enabled

    async def answer(self, envelope: Envelope, request: InferenceRequest | None, framed: Framed) -> None:
        await self.sink.answer(envelope, request, framed)

    async def dead_letter(self, envelope: Envelope, error: InferenceError, attempts: int) -> bool:
        if self.enabled and error.code.transient:
            return False  # Responder then says Outcome.RETRY: the handler reports the item failed
        return await self.sink.dead_letter(envelope, error, attempts)
