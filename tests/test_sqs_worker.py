"""The SQS worker against the real moto server: answers, deletes, visibility extension, redrive to the DLQ."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import orjson

from infra.bootstrap import ensure_queue
from models.cache import ModelCache
from models.examples import MNIST_MLP, mnist_mlp_config, synthetic_digits, train_mnist_mlp
from models.repository import ModelRepository
from pipeline.codec import decode_response, encode_request, from_sqs_message, to_sqs_message
from pipeline.engine import InferenceEngine
from pipeline.services import aws_client
from pipeline.sinks import SqsSink
from pipeline.sqs_worker import SqsWorker


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
    # The example model batches for 2.5 s while the visibility timeout is 1 s: without extension, every
    # message would be received (and answered) twice.
    repository = ModelRepository(tmp_path / "repo")
    repository.publish(MNIST_MLP, mnist_mlp_config(max_queue_delay_ms=2_500), train_mnist_mlp())
    fragile = repository.publish("fragile", mnist_mlp_config(), train_mnist_mlp(steps=1))
    (repository.root / "fragile" / str(fragile) / "model.safetensors").write_bytes(b"corrupted")
    images, labels = synthetic_digits(12, seed=3)
    messages = []
    for i, image in enumerate(images):
        framed = encode_request(f"sqs-{i}", MNIST_MLP, {"input": image[None]}, binary=i % 2 == 1,
                                outputs=["class"], binary_outputs=i % 3 == 0)
        messages.append(to_sqs_message(framed))
    messages.append(to_sqs_message(encode_request("doomed", "fragile", {"input": images[:1]})))
    messages.append({"MessageBody": "!!! not base64 !!!", "MessageAttributes": {
        "content-transfer-encoding": {"DataType": "String", "StringValue": "base64"}}})
    for message in messages:
        sqs.send_message(QueueUrl=requests_url, **message)

    settings = replace(live, max_in_flight=64)
    async with InferenceEngine(ModelCache(repository)) as engine:
        worker = SqsWorker(settings, engine, sqs, requests_url, SqsSink(sqs, results_url), wait_time_s=1,
                           visibility_timeout_s=1, max_attempts=1)
        async with worker:
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
