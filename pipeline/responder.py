"""Answer one request exactly once: a result, an error result the caller can act on, or a dead letter.

Every source (Kafka worker, SQS worker, cloud functions) hands each arriving message to a `Responder`;
the decision tree lives here once: decode, resolve claim-checked inputs, infer with retries for transient
faults, store large results in S3, then deliver through the source's `ResultSink`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence
from enum import StrEnum

from pipeline.claim_check import ClaimCheckStore, outputs_reference
from pipeline.codec import Framed, decode_request, encode_error, encode_response
from pipeline.engine import InferenceEngine
from pipeline.errors import ErrorCode, InferenceError
from pipeline.metrics import ERRORS, REQUESTS
from pipeline.protocol import InferenceRequest, InferenceResponse
from pipeline.settings import Settings
from pipeline.sinks import Answer, Envelope, ResultSink, Undelivered
from pipeline.tasks import gather_or_cancel

log = logging.getLogger(__name__)


def model_label(engine: InferenceEngine, request: InferenceRequest | None) -> str:
    """A metrics label: the model's name once it named a model that exists (`InferenceEngine.serves`), else "-".
    Judged by the name, not by the error: a request may fail before its model is looked up (claim-checked inputs
    that cannot be read), and callers' made-up names would each become a time series of their own."""
    return request.model_name if request is not None and engine.serves(request.model_name) else "-"


def _addressee(error: InferenceError) -> InferenceRequest:
    """Whom the error answer to a request that named itself, then failed while it was read, is for: a stand-in
    request, without model or inputs, of its id and its `reply_to`. The sink keys the answer by the id and sends it to
    that topic, as it does the answers to requests that were read; given none, it kept the record's key (perhaps a
    caller's partition key) and sent it to the results topic, which a caller that reads its own topic never sees."""
    assert error.request_id is not None
    parameters = {} if error.reply_to is None else {"reply_to": error.reply_to}
    return InferenceRequest(error.request_id, "", None, {}, {}, parameters=parameters)


class Outcome(StrEnum):
    RESULT = "result"
    ERROR = "error"  # an error result was delivered: the caller's request was at fault
    DEAD_LETTER = "dead_letter"
    RETRY = "retry"  # transient failure, no dead-letter destination, or undelivered: the source must redeliver


class Responder:
    def __init__(self, settings: Settings, engine: InferenceEngine, sink: ResultSink, *,
                 store: ClaimCheckStore | None = None, max_attempts: int = 3, retry_delay_s: float = 0.1) -> None:
        self.settings = settings
        self.engine = engine
        self.sink = sink
        self.store = store
        self.max_attempts = max_attempts
        self.retry_delay_s = retry_delay_s

    async def handle(self, envelope: Envelope, *, failed: InferenceError | None = None) -> Outcome:
        """Raises only when the sink cannot deliver and cannot say so for this message alone (the source must
        then not acknowledge the message); a sink that can makes it Outcome.RETRY. `failed`: the transient error
        of an attempt already made (`handle_many`'s), which counts among max_attempts."""
        request: InferenceRequest | None = None
        error: InferenceError | None = failed
        attempts = 0 if failed is None else 1
        try:
            request = self._decode(envelope)
        except InferenceError as exc:
            error = exc
        while request is not None and attempts < self.max_attempts:
            if attempts:
                await asyncio.sleep(min(2.0, self.retry_delay_s * 2**attempts))
            attempts += 1
            try:
                framed = await self._infer(request)
            except InferenceError as exc:
                error = exc
                error.request_id = error.request_id or request.id
                if not exc.code.transient:
                    break
            except Exception as exc:  # a bug must not take the source down: dead-letter the message
                log.exception("unexpected failure on request %s", request.id)
                error = InferenceError(ErrorCode.INTERNAL, f"unexpected failure: {exc!r}", request.id)
                break
            else:
                if await self._undelivered([(envelope, request, framed)]):
                    return Outcome.RETRY
                REQUESTS.labels(request.model_name, "ok").inc()
                return Outcome.RESULT
        assert error is not None
        # Counted once the message has ended in it (answered, dead-lettered): a message left to redelivery (a
        # function's transient failure, an answer the sink could not deliver) is counted when it ends, once.
        if error.request_id is not None and not error.code.transient:
            answer = encode_error(error, request.model_name if request else None)
            if await self._undelivered([(envelope, request or _addressee(error), answer)]):
                return Outcome.RETRY
            ERRORS.labels(str(error.code)).inc()
            REQUESTS.labels(model_label(self.engine, request), "error").inc()
            return Outcome.ERROR
        if await self.sink.dead_letter(envelope, error, max(attempts, 1)):
            ERRORS.labels(str(error.code)).inc()
            return Outcome.DEAD_LETTER
        return Outcome.RETRY

    async def handle_many(self, envelopes: Sequence[Envelope]) -> list[Outcome]:
        """Answer messages that arrived together (a Kafka fetch, an SQS receive); outcomes in order.

        The common case (the message decodes, runs and is answered) takes a few microseconds per message
        here: one engine call and one delivery for all of them, instead of a task and a chain of awaits
        each. Everything else (undecodable messages, claim-checked inputs, transient failures that are
        retried) goes through `handle`, so the decision tree stays in one place. An answer the sink reports
        `Undelivered` makes its message Outcome.RETRY alone; raises only when the sink cannot deliver and cannot
        say which answers went out (the source must then not acknowledge any of these messages).
        """
        outcomes: list[Outcome | None] = [None] * len(envelopes)
        direct: list[tuple[int, InferenceRequest]] = []
        one_by_one: list[int] = []
        failed: dict[int, InferenceError] = {}  # per message retried alone: its transient failure here, attempt 1
        for index, envelope in enumerate(envelopes):
            try:
                request = self._decode(envelope)
            except InferenceError:
                one_by_one.append(index)
                continue
            if request.inputs_uri is None and request.parameters.get("output_uri") is None:
                direct.append((index, request))
            else:  # object-store URIs are checked before the model runs, in handle()
                one_by_one.append(index)
        answers: list[Answer] = []
        answered: list[tuple[int, Outcome, str, str | None]] = []  # per answer: message, outcome, label, error code
        try:
            results = await self.engine.infer_many([request for _, request in direct])
        except Exception:  # a bug must not fail the messages beside the one that hit it: each goes alone
            log.exception("unexpected failure on a group of %d requests; answering them one by one", len(direct))
            one_by_one.extend(index for index, _ in direct)
            direct = results = []
        limits = await self.sink.max_inline_bytes_for([request for _, request in direct])
        for (index, request), result, limit in zip(direct, results, limits, strict=True):
            if isinstance(result, InferenceResponse):
                try:
                    framed = encode_response(result, request)
                    if not self._inline(request, framed, limit):
                        framed = await self._store_outputs(request, result, framed)
                except InferenceError as exc:
                    result = exc.addressed_to(request.id)
                except Exception:
                    log.exception("unexpected failure encoding the answer to request %s", request.id)
                    one_by_one.append(index)
                    continue
                else:
                    answers.append((envelopes[index], request, framed))
                    answered.append((index, Outcome.RESULT, request.model_name, None))
                    continue
            if result.code.transient:
                one_by_one.append(index)  # retried there, then dead-lettered
                failed[index] = result
                continue
            answers.append((envelopes[index], request, encode_error(result, request.model_name)))
            answered.append((index, Outcome.ERROR, model_label(self.engine, request), str(result.code)))
        undelivered = await self._undelivered(answers)
        counts: Counter[tuple[str, str]] = Counter()
        for position, (index, outcome, label, code) in enumerate(answered):
            outcomes[index] = Outcome.RETRY if position in undelivered else outcome
            if position not in undelivered:
                counts[label, "ok" if outcome is Outcome.RESULT else "error"] += 1
                if code is not None:
                    ERRORS.labels(code).inc()
        for (model, kind), count in counts.items():
            REQUESTS.labels(model, kind).inc(count)
        if one_by_one:
            handled = await gather_or_cancel(*(self.handle(envelopes[index], failed=failed.get(index))
                                               for index in one_by_one))
            for index, outcome in zip(one_by_one, handled, strict=True):
                outcomes[index] = outcome
        return outcomes  # type: ignore[return-value]  # every slot was filled above

    async def _undelivered(self, answers: Sequence[Answer]) -> set[int]:
        """Deliver `answers`; the positions of those the sink reports `Undelivered` (the others went out)."""
        if not answers:
            return set()
        try:
            await self.sink.answer_many(answers)
        except Undelivered as exc:
            return set(exc.failed)
        return set()

    def _decode(self, envelope: Envelope) -> InferenceRequest:
        """The request, or an InferenceError: a decoder bug on one message is that message's dead letter."""
        if envelope.payload is None:
            raise InferenceError(ErrorCode.INVALID_JSON, "the record has no value (null)")
        try:
            return decode_request(envelope.payload, envelope.headers, max_bytes=self.settings.max_request_bytes)
        except InferenceError:
            raise
        except Exception as exc:
            log.exception("unexpected failure decoding %s", envelope.source)
            # Its type only, as a model's failure: the exception's text may quote the payload or the server's code
            raise InferenceError(ErrorCode.INVALID_REQUEST, f"the request could not be decoded ({type(exc).__name__}; "
                                 "the server's log has the details)") from None

    async def _infer(self, request: InferenceRequest) -> Framed:
        output_uri = request.parameters.get("output_uri")
        if output_uri is not None:  # a URI it could not write to would waste the model's run
            if self.store is None:
                raise InferenceError(ErrorCode.INVALID_REQUEST, "parameters.output_uri: this deployment has no "
                                     "object store")
            self.store.check_uri(output_uri, "parameters.output_uri")
        if request.inputs_uri is None:
            response = await self.engine.infer(request)
        elif self.store is None:
            raise InferenceError(ErrorCode.INVALID_REQUEST, "inputs_uri: this deployment has no object store")
        else:  # the inputs count against the store's byte budget until the model has run on them
            async with self.store.resolved_inputs(request, self.settings.max_claim_check_bytes):
                response = await self.engine.infer(request)
        return await self._externalize(request, response)

    async def _externalize(self, request: InferenceRequest, response: InferenceResponse) -> Framed:
        framed = encode_response(response, request)
        (limit,) = await self.sink.max_inline_bytes_for([request])
        return framed if self._inline(request, framed, limit) else await self._store_outputs(request, response, framed)

    def _inline(self, request: InferenceRequest, framed: Framed, sink_limit: int | None) -> bool:
        """Whether a result travels in the answer itself (else it goes to S3 and the answer points to it), given the
        largest body the sink carries inline to where this answer goes (`ResultSink.max_inline_bytes_for`)."""
        limit = self.settings.max_inline_output_bytes
        if sink_limit is not None:
            limit = min(limit, sink_limit)
        return len(framed.body) <= limit and request.parameters.get("output_uri") is None

    async def _store_outputs(self, request: InferenceRequest, response: InferenceResponse, framed: Framed) -> Framed:
        """Claim check for outputs: a result too large for a message (or with an output_uri) goes to S3."""
        if self.store is None:
            raise InferenceError(ErrorCode.INVALID_REQUEST, "the result is too large to send inline and this "
                                 "deployment has no object store for it")
        uri = request.parameters.get("output_uri")
        if uri is None:
            uri = await self.store.put_new(framed, request.model_name, request.id, suffix=".result")
        else:
            await self.store.put(uri, framed)
        return outputs_reference(response, uri)
