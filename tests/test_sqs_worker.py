"""The SQS worker against the real moto server: answers, deletes, visibility extension, redrive to the DLQ."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import urllib.request
from dataclasses import replace

import orjson
import pytest
from prometheus_client import REGISTRY
from worker_support import assert_stopped_in_time, read_all, sigterm_and_wait, slow_repository, worker_process

from infra.bootstrap import ensure_queue
from infra.stack import LocalStack, free_port
from models.cache import ModelCache
from models.examples import MNIST_MLP, mnist_mlp_config, synthetic_digits, train_mnist_mlp
from models.repository import ModelRepository
from pipeline.batch_metrics import BatchMetricsPublisher
from pipeline.client import ResultCollector, example_requests
from pipeline.codec import Framed, decode_request, decode_response, encode_request, from_sqs_message, to_sqs_message
from pipeline.engine import InferenceEngine
from pipeline.errors import ErrorCode, InferenceError
from pipeline.metrics import BatchRecord
from pipeline.responder import Responder
from pipeline.services import answer_producer, aws_client, bootstrap, claim_check_store, stop_producer
from pipeline.settings import Settings
from pipeline.sinks import MAX_PASSTHROUGH_BYTES, Envelope, KafkaSink, SqsSink
from pipeline.sqs_worker import SqsWorker, _InFlight


def _drain(sqs, url: str, want: int, timeout: float = 30.0) -> list[dict]:
    messages, deadline = [], time.monotonic() + timeout
    while len(messages) < want and time.monotonic() < deadline:
        got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1,
                                  MessageAttributeNames=["All"]).get("Messages", [])
        for m in got:
            sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
        messages += got
    return messages


async def test_sqs_worker_answers_extends_visibility_and_leaves_failures_to_redrive(live, tmp_path):
    sqs = aws_client(live, "sqs")
    suffix = live.batch_bucket
    requests_url = ensure_queue(sqs, f"{suffix}-requests", dlq_name=f"{suffix}-requests-dlq", max_receive_count=2)
    dlq_url = sqs.get_queue_url(QueueName=f"{suffix}-requests-dlq")["QueueUrl"]
    results_url = ensure_queue(sqs, f"{suffix}-results")
    # The example model batches for 10 s while the visibility timeout is 4 s: without extension, every
    # message would be received (and answered) two or three times. The timeout is not shorter: the worker
    # extends a third of it ahead of expiry, and a loaded machine's moto call can take most of a second.
    # The two failures are sent once the answerable messages are in flight: received with them, they would
    # wait out the 10 s batch before their first failure, and their redrive (two more timeouts) after it.
    repository = ModelRepository(tmp_path / "repo")
    repository.publish(MNIST_MLP, mnist_mlp_config(max_queue_delay_ms=10_000), train_mnist_mlp())
    fragile = repository.publish("fragile", mnist_mlp_config(), train_mnist_mlp(steps=1))
    (repository.root / "fragile" / str(fragile) / "model.safetensors").write_bytes(b"corrupted")
    images, labels = synthetic_digits(12, seed=3)
    for i, image in enumerate(images):
        framed = encode_request(f"sqs-{i}", MNIST_MLP, {"input": image[None]}, binary=i % 2 == 1,
                                outputs=["class"], binary_outputs=i % 3 == 0)
        sqs.send_message(QueueUrl=requests_url, **to_sqs_message(framed))
    failures = [to_sqs_message(encode_request("doomed", "fragile", {"input": images[:1]})),
                {"MessageBody": "!!! not base64 !!!", "MessageAttributes": {
                    "content-transfer-encoding": {"DataType": "String", "StringValue": "base64"}}}]

    settings = replace(live, max_in_flight=64)
    async with InferenceEngine(ModelCache(repository)) as engine:
        worker = SqsWorker(settings, engine, sqs, requests_url, SqsSink(sqs, results_url), wait_time_s=1,
                           visibility_timeout_s=4, max_attempts=1)
        async with worker:
            deadline = time.monotonic() + 10
            while worker.in_flight < 12:
                assert time.monotonic() < deadline, f"{worker.in_flight} of 12 messages received"
                await asyncio.sleep(0.05)
            for message in failures:
                sqs.send_message(QueueUrl=requests_url, **message)
            answers = await asyncio.to_thread(_drain, sqs, results_url, 12)
            dead = await asyncio.to_thread(_drain, sqs, dlq_url, 2, 40)
            await asyncio.sleep(1.5)  # anything received twice would be answered by now
            answers += await asyncio.to_thread(_drain, sqs, results_url, 1, 2)

    bodies = {}
    for message in answers:
        payload, headers = from_sqs_message(message["Body"], message.get("MessageAttributes"))
        body = decode_response(payload, headers)
        assert body["id"] not in bodies, f"{body['id']} answered twice: visibility was not extended"
        bodies[body["id"]] = body
    assert set(bodies) == {f"sqs-{i}" for i in range(12)}
    for i, label in enumerate(labels):
        output = bodies[f"sqs-{i}"]["outputs"][0]
        assert output["name"] == "class" and int(output["data"][0]) == label
        assert ("binary_data_size" in (output.get("parameters") or {})) == (i % 3 == 0)
    dead_bodies = sorted(m["Body"] for m in dead)
    assert len(dead) == 2, "the transient failure and the undecodable message end in the queue's DLQ"
    assert "!!! not base64 !!!" in dead_bodies
    assert any(orjson.loads(b).get("id") == "doomed" for b in dead_bodies if b.startswith("{"))
    assert worker.answered == 12 and worker.left_for_redelivery >= 2


class _SlowExtensions:
    """The real SQS client, but each visibility extension reaches the server `latency_s` after it is made (a slow
    network, a throttled endpoint)."""

    def __init__(self, sqs, latency_s: float) -> None:
        self._sqs, self.latency_s = sqs, latency_s

    def __getattr__(self, name: str):
        return getattr(self._sqs, name)

    def change_message_visibility_batch(self, **kwargs) -> dict:
        time.sleep(self.latency_s)
        return self._sqs.change_message_visibility_batch(**kwargs)


@contextlib.asynccontextmanager
async def _extending(worker: SqsWorker):
    """`worker`'s visibility-extension loop, running for the block."""
    task = asyncio.create_task(worker._extend_loop())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _visible_again(sqs, url: str, until: float) -> list[str]:
    """The bodies of the messages another consumer of `url` receives until `until`: those whose visibility ran out."""
    seen = []
    while time.monotonic() < until:
        seen += (await asyncio.to_thread(sqs.receive_message, QueueUrl=url, WaitTimeSeconds=1)).get("Messages", [])
    return [message["Body"] for message in seen]


async def test_a_slow_extension_does_not_delay_the_next_ones(live):
    """The worker checks every third of the visibility timeout (3 s of 9 here) and extends what expires within
    two thirds. It used to sleep a third after its calls returned: a slow extension of one message (2.1 s here)
    postponed the next check, and another message, not yet due at the previous one, was extended too late and
    became visible to other consumers meanwhile."""
    sqs = aws_client(live, "sqs")
    url = ensure_queue(sqs, f"{live.batch_bucket}-slow-extensions")
    for body in ("first", "second"):
        sqs.send_message(QueueUrl=url, MessageBody=body)
    worker = SqsWorker(live, None, _SlowExtensions(sqs, 2.1), url, SqsSink(None, "results"), visibility_timeout_s=9)

    def receive() -> float:
        stamped = time.monotonic()  # before the call: the server's expiry is no earlier than this one's
        (message,) = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=1, VisibilityTimeout=9)["Messages"]
        worker._in_flight[message["MessageId"]] = _InFlight(message["ReceiptHandle"], stamped + 9)
        return stamped

    # The loop's first check comes 3.5 s after the first receive: the first message is due (5.5 s left), the
    # second, received 1 s later, is not (6.5 s); it is due at the next check, a period later, and its extension
    # reaches SQS 1.4 s before it expires. Checked a period after the first's slow extension returned instead, it
    # reached SQS 0.7 s after it expired.
    received = receive()
    await asyncio.sleep(received + 0.5 - time.monotonic())
    async with _extending(worker):
        await asyncio.sleep(received + 1.0 - time.monotonic())
        receive()
        seen = await _visible_again(sqs, url, until=received + 12)
    assert seen == [], "a message's visibility ran out before its extension reached SQS"
    assert all(flight.extended_until > received + 12 for flight in worker._in_flight.values())


async def test_a_checks_extensions_go_out_together(live):
    """A check extends its due messages 10 to a call, SQS's most. The calls went out one after another: with 40
    messages due and 2.1 s a call, the last reached SQS 8.4 s after the check, after the messages' visibility had
    run out (9 s from their receive, the check coming 3 s after it). Together, they all reach it in 2.1 s."""
    sqs = aws_client(live, "sqs")
    url = ensure_queue(sqs, f"{live.batch_bucket}-many-extensions")
    for start in range(0, 40, 10):
        sqs.send_message_batch(QueueUrl=url, Entries=[{"Id": str(i), "MessageBody": f"m-{start + i}"}
                                                      for i in range(10)])
    worker = SqsWorker(live, None, _SlowExtensions(sqs, 2.1), url, SqsSink(None, "results"), visibility_timeout_s=9)
    received = time.monotonic()  # before the calls: the server's expiries are no earlier than this one's
    while len(worker._in_flight) < 40:
        for message in sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=9)["Messages"]:
            worker._in_flight[message["MessageId"]] = _InFlight(message["ReceiptHandle"], received + 9)
    async with _extending(worker):
        seen = await _visible_again(sqs, url, until=received + 12)
    assert seen == [], "a message's visibility ran out before its extension reached SQS"
    assert all(flight.extended_until > received + 9 for flight in worker._in_flight.values())


async def test_an_extension_sqs_refuses_is_tried_again_at_the_next_check(live, caplog):
    """SQS answers a batch of extensions entry by entry: one it refused was counted as extended all the same, and
    the message was not tried again until a timeout later, long after it had become visible to other consumers."""
    sqs = aws_client(live, "sqs")
    url = ensure_queue(sqs, f"{live.batch_bucket}-refused-extensions")
    sqs.send_message(QueueUrl=url, MessageBody="kept")
    (message,) = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=1, VisibilityTimeout=3)["Messages"]
    worker = SqsWorker(live, None, sqs, url, SqsSink(None, "results"), visibility_timeout_s=3)
    due = time.monotonic() + 1  # both due at the first check, a second from now
    worker._in_flight.update(kept=_InFlight(message["ReceiptHandle"], due), refused=_InFlight("not-a-receipt", due))
    async with _extending(worker), asyncio.timeout(10):
        while worker._in_flight["kept"].extended_until == due:
            await asyncio.sleep(0.05)
    assert worker._in_flight["refused"].extended_until == due, "a refused extension counted as made"
    assert "could not extend the visibility of a message" in caplog.text


async def test_a_message_whose_answer_or_dead_letter_sqs_refuses_fails_alone(live, repository):
    """One message SQS will not take the answer of is left to redelivery alone: the others of its receive are
    answered once and deleted, not redelivered with it into the queue's DLQ. Dead letters keep text as text
    (base64 would make it a third larger), binary as base64, and one too large for the dead-letter queue is
    stored in S3 with `maas-payload-uri` pointing to it."""
    sqs, s3 = aws_client(live, "sqs"), aws_client(live, "s3")
    suffix = live.batch_bucket
    requests_url = ensure_queue(sqs, f"{suffix}-requests", dlq_name=f"{suffix}-requests-dlq", max_receive_count=2)
    redrive_url = sqs.get_queue_url(QueueName=f"{suffix}-requests-dlq")["QueueUrl"]
    small = {"MaximumMessageSize": "1024"}
    results_url = sqs.create_queue(QueueName=f"{suffix}-results", Attributes=small)["QueueUrl"]
    dead_url = sqs.create_queue(QueueName=f"{suffix}-dead", Attributes=small)["QueueUrl"]
    images, _ = synthetic_digits(4, seed=5)
    messages = [to_sqs_message(encode_request(f"ok-{i}", MNIST_MLP, {"input": images[i][None]}, outputs=["class"]))
                for i in range(3)]
    messages.append(to_sqs_message(encode_request("too-big", MNIST_MLP, {"input": images})))  # answer: ~1.5 KB
    text, long_text, garbage = "{not json: ünï " + "x" * 300, "{not json " + "y" * 4000, b"\xff\xfe\x00 not text"
    messages += [{"MessageBody": text, "MessageAttributes": {}},
                 {"MessageBody": long_text, "MessageAttributes": {"traceparent": {
                     "DataType": "String", "StringValue": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}}},
                 to_sqs_message(Framed(garbage, {"content-type": "application/octet-stream"}))]
    sqs.send_message_batch(QueueUrl=requests_url, Entries=[{"Id": str(i), **m} for i, m in enumerate(messages)])

    async with InferenceEngine(ModelCache(repository)) as engine:
        sink = SqsSink(sqs, results_url, dead_url, store=claim_check_store(live, s3))
        # Not a shorter timeout: its messages' answers and dead letters (S3 included) go out within it, or
        # within the extensions the worker makes a third of it ahead of expiry, even on a loaded machine.
        worker = SqsWorker(live, engine, sqs, requests_url, sink, wait_time_s=1, visibility_timeout_s=4,
                           max_attempts=1)
        async with worker:
            answers = await asyncio.to_thread(_drain, sqs, results_url, 3)
            dead = await asyncio.to_thread(_drain, sqs, dead_url, 3)
            redriven = await asyncio.to_thread(_drain, sqs, redrive_url, 1, 40)
            await asyncio.sleep(1.5)  # anything received again would be answered by now
            answers += await asyncio.to_thread(_drain, sqs, results_url, 1, 2)
            dead += await asyncio.to_thread(_drain, sqs, dead_url, 1, 2)

    ids = sorted(orjson.loads(m["Body"])["id"] for m in answers)
    assert ids == ["ok-0", "ok-1", "ok-2"], "each answered once, none redelivered with the refused one"
    assert [orjson.loads(m["Body"])["id"] for m in redriven] == ["too-big"]
    assert worker.answered == 6
    kinds = {}
    for message in dead:
        attributes = {k: v["StringValue"] for k, v in message["MessageAttributes"].items()}
        assert attributes["maas-error-code"] == "INVALID_JSON"
        kind = "stored" if "maas-payload-uri" in attributes else attributes.get("content-transfer-encoding", "text")
        assert kind not in kinds, f"two {kind} dead letters: one was sent twice"
        kinds[kind] = message["Body"], attributes
    assert set(kinds) == {"text", "base64", "stored"}
    assert kinds["text"][0] == text
    assert from_sqs_message(*kinds["base64"])[0] == garbage
    body, attributes = kinds["stored"]
    assert body == attributes["maas-payload-uri"] and "traceparent" in attributes
    bucket, key = body.removeprefix("s3://").split("/", 1)
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == long_text.encode()


async def test_sqs_answers_and_dead_letters_fit_ten_attributes_and_large_results_go_to_s3(live):
    """SQS refuses a message of more than 10 attributes (moto does not): framing and dead-letter attributes
    come first, then tracing ones, then as many CloudEvents ones as fit. A result too large for a queue's
    default 256 KiB goes to S3 from an SQS sink, while a Kafka one still carries it inline."""
    sqs = aws_client(live, "sqs")
    results_url = ensure_queue(sqs, f"{live.batch_bucket}-attrs")
    headers = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
               **{f"ce_x{i:02d}": f"v{i}" for i in range(12)}}
    envelope = Envelope(payload=b"\x00" * 10, headers={**headers, "inference-header-content-length": "3"},
                        source="sqs:q/1")
    sink = SqsSink(sqs, results_url, dlq_url=results_url)
    framed = encode_request("attrs", MNIST_MLP, {"input": synthetic_digits(1, seed=1)[0]}, binary=True)
    await sink.answer(envelope, None, framed)
    assert await sink.dead_letter(envelope, InferenceError(ErrorCode.INVALID_REQUEST, "bad"), 1)
    answer, dead = await asyncio.to_thread(_drain, sqs, results_url, 2)
    for message in (answer, dead):
        names = set(message["MessageAttributes"])
        assert len(names) == 10 and {"traceparent", "content-type", "content-transfer-encoding"} <= names
    assert "inference-header-content-length" in answer["MessageAttributes"]
    assert {"maas-error-code", "maas-error-message", "maas-attempts", "maas-source",
            "inference-header-content-length"} <= set(dead["MessageAttributes"])

    big = Framed(b"x" * (200 * 1024), {"content-type": "application/json"})
    request = decode_request(orjson.dumps({"id": "big", "model_name": MNIST_MLP, "inputs": [
        {"name": "input", "shape": [1, 1], "datatype": "FP32", "data": [0]}]}), max_bytes=1 << 20)
    kafka = KafkaSink.for_settings(None, live, None)
    assert not Responder(live, None, sink)._inline(request, big, *await sink.max_inline_bytes_for([request]))
    assert Responder(live, None, kafka)._inline(request, big, *await kafka.max_inline_bytes_for([request]))


async def test_answers_and_dead_letters_reach_fifo_queues_once_per_request_message(live):
    """SQS takes a message to a FIFO queue only with a group id and a deduplication id: every answer to a FIFO
    results queue was refused, and its request ran again until the requests queue's redrive took it away. Each
    answer now has its own group, deduplicated by the message it answers: answered twice (a request delivered
    again), it is on the queue once."""
    sqs = aws_client(live, "sqs")
    results_url, dlq_url = (sqs.create_queue(QueueName=f"{live.batch_bucket}-{name}.fifo",
                                             Attributes={"FifoQueue": "true"})["QueueUrl"]
                            for name in ("results", "dead"))
    sink = SqsSink(sqs, results_url, dlq_url)
    framed = encode_request("fifo", MNIST_MLP, {"input": synthetic_digits(1, seed=2)[0]})
    first, second = (Envelope(payload=b"{}", headers={}, source=f"sqs:requests/{n}") for n in range(2))
    for envelope in (first, first, second):  # `first` delivered again, and answered again
        await sink.answer(envelope, None, framed)
    error = InferenceError(ErrorCode.INVALID_JSON, "not JSON")
    assert await sink.dead_letter(first, error, 1) and await sink.dead_letter(first, error, 1)
    answers = await asyncio.to_thread(_drain, sqs, results_url, 3, 3)
    assert len(answers) == 2 and {m["Body"] for m in answers} == {framed.body.decode()}
    (dead,) = await asyncio.to_thread(_drain, sqs, dlq_url, 2, 3)
    assert dead["MessageAttributes"]["maas-source"]["StringValue"] == first.source


@pytest.mark.parametrize(("queue_bytes", "inline", "by_reference"), [
    (46 * 1024, 4 * 1024, 5 * 1024),  # three quarters of the 6 KiB the attributes leave: 4.5 KiB
    (1024 * 1024, 600 * 1024, 800 * 1024),  # SQS's largest: 738 KiB, where a fixed 160 KiB sent 600 KiB to S3
])
async def test_inline_results_fit_the_results_queue(live, queue_bytes, inline, by_reference):
    """The inline limit was a fixed 160 KiB, sized for SQS's former default of 256 KiB: a queue configured smaller
    refused every result between its size and 160 KiB (its request run again until the queue's redrive took it
    away), and one configured larger (up to 1 MiB since 2025) had results it would take stored in S3."""
    sqs = aws_client(live, "sqs")
    url = sqs.create_queue(QueueName=f"{live.batch_bucket}-{queue_bytes}",
                           Attributes={"MaximumMessageSize": str(queue_bytes)})["QueueUrl"]
    sink = await SqsSink.for_queues(sqs, url)
    request = decode_request(orjson.dumps({"id": "sized", "model_name": MNIST_MLP, "inputs": [
        {"name": "input", "shape": [1, 1], "datatype": "FP32", "data": [0]}]}), max_bytes=1 << 20)
    responder = Responder(replace(live, max_inline_output_bytes=1 << 20), None, sink)
    (limit,) = await sink.max_inline_bytes_for([request])
    assert responder._inline(request, Framed(b"x" * inline, {"content-type": "application/octet-stream"}), limit)
    assert not responder._inline(request, Framed(b"x" * by_reference, {"content-type": "application/octet-stream"}),
                                 limit)
    framed = Framed(b"x" * inline, {"content-type": "application/octet-stream"})  # base64: a third larger
    await sink.answer(Envelope(payload=b"", headers={"traceparent": "00-" + "a" * 50}, source="sqs:q/1"), None,
                      framed)
    (answer,) = await asyncio.to_thread(_drain, sqs, url, 1)
    assert from_sqs_message(answer["Body"], answer["MessageAttributes"])[0] == framed.body


def test_passthrough_headers_are_bounded_tracing_first():
    headers = {**{f"ce_big{i}": "v" * 6000 for i in range(5)}, "traceparent": "00-abc-01", "x-other": "no"}
    kept = Envelope(payload=b"", headers=headers, source="s").passthrough()
    assert kept["traceparent"] == "00-abc-01" and "x-other" not in kept
    assert sum(len(k) + len(v) for k, v in kept.items()) <= MAX_PASSTHROUGH_BYTES and len(kept) == 3


def _queue_counts(sqs, url: str) -> tuple[int, int]:
    """(visible, invisible) messages of a queue."""
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"]), int(attributes["ApproximateNumberOfMessagesNotVisible"])


def _request_body(request_id: str, model: str = MNIST_MLP) -> str:
    return orjson.dumps({**example_requests(1, prefix=request_id)[0][0], "model_name": model},
                        option=orjson.OPT_SERIALIZE_NUMPY).decode()


async def test_a_message_delivered_again_while_a_handler_holds_it_leaves_its_receive_mates_deleted(live, tmp_path,
                                                                                                 caplog):
    """SQS may deliver a message again while a handler still works on it (a standard queue's at-least-once delivery,
    or a visibility that ran out). The worker kept its messages in flight by MessageId: the first copy's handler to
    finish dropped the entry of the other copy too, whose handler then failed (KeyError, logged as a bug) before
    deleting anything, and left the messages received with it, answered, to be received and answered again."""
    sqs = aws_client(live, "sqs")
    url = ensure_queue(sqs, f"{live.batch_bucket}-again")
    results_url = ensure_queue(sqs, f"{live.batch_bucket}-again-results")
    repository = ModelRepository(tmp_path / "repo")
    weights = train_mnist_mlp(steps=1)
    for name, delay_ms in (("slow", 2000), ("slower", 4000)):  # the copy received first is answered first
        repository.publish(name, mnist_mlp_config(max_queue_delay_ms=delay_ms), weights)
    async with InferenceEngine(ModelCache(repository)) as engine:
        worker = SqsWorker(live, engine, sqs, url, SqsSink(sqs, results_url), wait_time_s=1)
        await asyncio.to_thread(sqs.send_message, QueueUrl=url, MessageBody=_request_body("again", "slow"))
        receiving = asyncio.create_task(worker._receive_loop())
        while worker.in_flight < 1:
            await asyncio.sleep(0.05)
        receiving.cancel()  # the receives stop (the handler goes on) while SQS makes the message visible again
        await asyncio.gather(receiving, return_exceptions=True)
        (flight,) = worker._in_flight.values()
        await asyncio.to_thread(sqs.change_message_visibility, QueueUrl=url, ReceiptHandle=flight.receipt,
                                VisibilityTimeout=0)
        await asyncio.to_thread(sqs.send_message, QueueUrl=url, MessageBody=_request_body("mate", "slower"))
        receiving = asyncio.create_task(worker._receive_loop())  # one receive: the message again, and its mate
        try:
            async with asyncio.timeout(30):  # hang guard
                while len(worker._handlers) < 2:
                    await asyncio.sleep(0.05)
                while worker._handlers:
                    await asyncio.sleep(0.05)
        finally:
            receiving.cancel()
            await asyncio.gather(receiving, return_exceptions=True)
    assert "unexpected failure" not in caplog.text
    assert await asyncio.to_thread(_queue_counts, sqs, url) == (0, 0), "an answered message was left undeleted"
    assert worker.answered == 3 and worker.in_flight == 0


async def test_stop_waits_for_the_poll_under_way_and_a_restarted_worker_receives_again(live):
    """stop() abandoned the poll in its thread: what that poll received after stop began stayed invisible for the
    visibility timeout (one receive closer to the DLQ), and the slots it had taken were never given back, so a
    restarted worker of max_in_flight 10 never received again."""
    sqs = aws_client(live, "sqs")
    url = ensure_queue(sqs, f"{live.batch_bucket}-stop")
    results_url = ensure_queue(sqs, f"{live.batch_bucket}-stop-results")
    async with InferenceEngine(ModelCache(ModelRepository(live.model_repository))) as engine:
        worker = SqsWorker(replace(live, max_in_flight=10), engine, sqs, url, SqsSink(sqs, results_url))
        await worker.start()
        await asyncio.to_thread(sqs.send_message, QueueUrl=url, MessageBody=_request_body("first"))
        while worker.answered < 1:  # answered: the receive loop is polling again, and stays so while idle
            await asyncio.sleep(0.05)
        stopping = asyncio.create_task(worker.stop())
        await asyncio.sleep(0)  # stop() has begun: the poll under way may yet receive what is sent now
        await asyncio.to_thread(sqs.send_message, QueueUrl=url, MessageBody=_request_body("late"))
        await asyncio.wait_for(stopping, 30)  # hang guard
        assert await asyncio.to_thread(_queue_counts, sqs, url) == (1, 0), "the late message was left invisible"
        assert worker._slots.free == worker._slots.capacity
        async with worker:  # a restart answers it
            assert len(await asyncio.to_thread(_drain, sqs, results_url, 2, 30)) == 2
            while worker.answered < 2:  # deleted after its answer was delivered
                await asyncio.sleep(0.05)


async def test_stop_cancels_the_handlers_still_running_after_the_drain_timeout(live, tmp_path):
    """They kept running (and answering, deleting) after stop() returned, on an engine about to stop."""
    sqs = aws_client(live, "sqs")
    url = ensure_queue(sqs, f"{live.batch_bucket}-drain")
    slow = slow_repository(tmp_path / "slow", max_queue_delay_ms=60_000)  # every request waits a minute
    async with InferenceEngine(ModelCache(slow)) as engine:
        sink = SqsSink(sqs, ensure_queue(sqs, f"{live.batch_bucket}-drain-results"))
        worker = SqsWorker(live, engine, sqs, url, sink, wait_time_s=1, drain_timeout_s=0.2)
        for request_id in ("held-0", "held-1", "held-2"):
            await asyncio.to_thread(sqs.send_message, QueueUrl=url, MessageBody=_request_body(request_id))
        await worker.start()
        while worker.in_flight < 3:
            await asyncio.sleep(0.05)
        await asyncio.wait_for(worker.stop(), 30)  # hang guard
        assert worker.in_flight == 0 and not worker._handlers, "handlers outlived stop()"
        assert worker._slots.free == worker._slots.capacity
    assert worker.answered == 0
    assert await asyncio.to_thread(_queue_counts, sqs, url) == (0, 3), "left to the visibility timeout"


@pytest.mark.slow
def test_an_idle_sqs_worker_process_exits_promptly_on_sigterm(live):
    """It waited for its 20 s long poll to return before exiting. Its health port says it is ready meanwhile."""
    settings = replace(live, sqs_requests_queue=f"{live.batch_bucket}-idle")
    port = free_port()
    proc, _, lines = worker_process(settings, worker_id="sqs-idle",
                                    args=("--source", "sqs", "--health-port", str(port), "--health-host", "127.0.0.1"))
    try:
        deadline = time.monotonic() + 60
        while not any("health and metrics on" in line for line in lines) and time.monotonic() < deadline:
            assert proc.poll() is None, "".join(lines)
            time.sleep(0.1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=5) as response:
            assert response.status == 200 and orjson.loads(response.read()) == {"status": "ready"}
        time.sleep(0.5)  # into its first poll
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, "".join(lines)  # hang guard: the poll is 2 s
    finally:
        proc.kill()


async def test_an_sqs_worker_whose_endpoint_stopped_answering_exits_within_its_shutdown_timeout(repository, tmp_path):
    """stop() waited for the receive under way, and an SQS endpoint that does not answer (paused: connections are
    accepted, nothing is read) holds a receive for its read timeout, three times over: `maas worker --source sqs`
    exited two minutes after its SIGTERM (MAAS_SHUTDOWN_TIMEOUT_S 4). The poll is now abandoned `POLL_GRACE_S`
    past its wait, and its thread does not hold the process's exit."""
    with LocalStack(tmp_path / "stack") as private:
        settings = replace(Settings(), kafka_bootstrap_servers=private.bootstrap_servers,
                           aws_endpoint_url=private.endpoint_url, model_repository=str(repository.root),
                           sqs_requests_queue="requests-hung", shutdown_timeout_s=6)
        await bootstrap(settings)
        proc, _, lines = worker_process(settings, worker_id="sqs-hung", args=("--source", "sqs"))
        try:
            async with asyncio.timeout(60):  # hang guard
                while not any("receiving from SQS" in line for line in lines):
                    assert proc.poll() is None, "".join(lines)
                    await asyncio.sleep(0.1)
            private._moto.send_signal(signal.SIGSTOP)
            # It polls without a pause: the receive under way, or the one after it (sent within milliseconds),
            # waits for the server now. The log line asserted below says stop() met it.
            await asyncio.sleep(0.5)
            took = await sigterm_and_wait(proc)
        finally:
            proc.kill()
            private._moto.send_signal(signal.SIGCONT)  # a paused server ends on SIGTERM only once resumed
    assert_stopped_in_time(proc, lines, took, settings.shutdown_timeout_s, said="did not end within")


async def _answer_over_kafka(settings, repository, count: int, prefix: str) -> tuple[dict, BatchMetricsPublisher]:
    """`count` requests through an SQS worker that answers over Kafka and publishes its batches' metrics with the
    answers' producer; returns the answers by id and the publisher, after the worker stopped."""
    sqs = aws_client(settings, "sqs")
    queue_url = ensure_queue(sqs, f"{settings.batch_bucket}-{prefix}")
    requests, truth = example_requests(count, prefix=prefix)
    for request in requests:
        sqs.send_message(QueueUrl=queue_url, MessageBody=orjson.dumps(request, option=orjson.OPT_SERIALIZE_NUMPY)
                         .decode())
    producer = answer_producer(settings)
    await producer.start()
    try:
        metrics = BatchMetricsPublisher.for_settings(producer, settings)
        async with InferenceEngine(ModelCache(repository), worker_id=settings.worker_id) as engine, \
                ResultCollector(settings) as collector:
            async with SqsWorker(settings, engine, sqs, queue_url, KafkaSink.for_settings(producer, settings, None),
                                 wait_time_s=1, metrics=metrics):
                answers = await collector.wait_for(truth, timeout=60)
            assert metrics.pending == 0, "stop() left metrics sends behind"
    finally:
        await stop_producer(producer, 10)
    return answers, metrics


async def test_an_sqs_worker_answering_over_kafka_publishes_its_batches_to_the_metrics_topic(live, repository):
    """The SQS worker published no per-batch record: DESIGN's metrics topic saw only the Kafka worker's batches."""
    answers, _ = await _answer_over_kafka(live, repository, 12, "sqs-metrics")
    assert len(answers) == 12 and {a.kind for a in answers.values()} == {"result"}
    records = [orjson.loads(r.value) for r in await read_all(live, live.topics.metrics)]  # the producer stopped
    assert records, "no batch record on the metrics topic"
    for record in records:
        assert set(BatchRecord.__dataclass_fields__) <= record.keys()
        assert record["model"] == MNIST_MLP and record["version"] >= 1 and record["worker"] == live.worker_id
        assert record["batch_size"] >= record["requests"] >= 1 and record["compute_ms"] >= 0
    assert sum(record["requests"] for record in records) == 12


async def test_an_sqs_worker_answers_everything_when_its_metrics_topic_refuses_every_record(live, repository):
    """A metrics topic that cannot be written (a name the broker refuses) costs metrics, counted, never answers."""
    before = REGISTRY.get_sample_value("maas_batch_metrics_unpublished_total") or 0.0
    refused = replace(live, topics=replace(live.topics, metrics="no such topic: spaces are not allowed"))
    started = time.monotonic()
    answers, metrics = await _answer_over_kafka(refused, repository, 6, "sqs-refused")
    assert len(answers) == 6 and {a.kind for a in answers.values()} == {"result"}
    assert time.monotonic() - started < 30
    assert metrics.published == 0
    assert (REGISTRY.get_sample_value("maas_batch_metrics_unpublished_total") or 0.0) > before
