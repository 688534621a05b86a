"""Every datatype of the protocol, in both encodings, end to end over Kafka, SQS, S3 and HTTP.

An `identity` model echoes its inputs, so what comes back shows exactly what each path preserves.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import aiohttp
import numpy as np
import pytest
from worker_support import running_worker

from infra.bootstrap import ensure_queue
from models.artifact import BatchingPolicy, ModelConfig, TensorSpec
from models.cache import ModelCache
from models.datatypes import DATATYPES, NUMPY_DTYPES
from models.repository import ModelRepository
from pipeline.client import ResultCollector, publish_requests
from pipeline.codec import decode_request, decode_response, encode_request, from_sqs_message, to_sqs_message
from pipeline.engine import InferenceEngine
from pipeline.http_server import HttpServer
from pipeline.services import aws_client
from pipeline.sinks import SqsSink
from pipeline.sqs_worker import SqsWorker
from pipeline.v2_api import V2Api

ECHO = "echo"
TYPES = sorted(DATATYPES)


def tensors(binary: bool) -> dict[str, np.ndarray]:
    """One row of three values per datatype, with edge values (extremes, non-ASCII, raw bytes)."""
    values = {
        "BOOL": np.array([[True, False, True]]),
        "UINT8": np.array([[0, 200, 255]], np.uint8),
        "UINT16": np.array([[0, 60000, 7]], np.uint16),
        "UINT32": np.array([[0, 4_000_000_000, 1]], np.uint32),
        "UINT64": np.array([[0, 2**63 + 5, 2]], np.uint64),
        "INT8": np.array([[-128, 0, 127]], np.int8),
        "INT16": np.array([[-32768, 1, 32767]], np.int16),
        "INT32": np.array([[-(2**31), 5, 2**31 - 1]], np.int32),
        "INT64": np.array([[-(2**62), 0, 2**62]], np.int64),
        "FP16": np.array([[0.5, -2.25, 65504.0]], np.float16),
        "FP32": np.array([[1.5, -1e30, 3.25]], np.float32),
        "FP64": np.array([[1 / 3, -1e300, 2.0]], np.float64),
        "BF16": np.array([[1.5, -2.0, 256.0]], np.float32),  # values exact in bfloat16
        "BYTES": np.array([[b"plain", "h\u00e9llo \u4e16\u754c".encode(), b"\x00\xff raw" if binary else b""]],
                          dtype=object),
    }
    return {f"in_{t}": values[t] for t in TYPES}


def publish_echo(root) -> ModelRepository:
    repository = ModelRepository(root)
    config = ModelConfig(
        architecture="identity",
        params={"outputs": {f"out_{t}": f"in_{t}" for t in TYPES}},
        inputs=tuple(TensorSpec(f"in_{t}", t, (-1, 3)) for t in TYPES),
        outputs=tuple(TensorSpec(f"out_{t}", t, (-1, 3)) for t in TYPES),
        batching=BatchingPolicy(max_batch_size=8, max_queue_delay_ms=1),
    )
    repository.publish(ECHO, config, {})
    return repository


def request(request_id: str, binary: bool):
    return encode_request(request_id, ECHO, tensors(binary), binary=binary, binary_outputs=binary,
                          datatypes={f"in_{t}": t for t in TYPES})


def assert_echoed(body: dict, binary: bool) -> None:
    sent = tensors(binary)
    outputs = {o["name"]: o for o in body["outputs"]}
    assert set(outputs) == {f"out_{t}" for t in TYPES}, body
    for t in TYPES:
        out = outputs[f"out_{t}"]
        assert out["datatype"] == t and out["shape"] == [1, 3]
        assert ("binary_data_size" in (out.get("parameters") or {})) == binary, t
        got = np.asarray(out["data"], dtype=NUMPY_DTYPES[t]).reshape(1, 3)
        want = sent[f"in_{t}"]
        if t == "BYTES" and not binary:  # JSON carries BYTES as UTF-8 strings
            want = np.array([[v.decode() for v in want[0]]], dtype=object)
        assert got.tolist() == want.tolist(), f"{t}: sent {want.tolist()}, got {got.tolist()}"


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_decoding_keeps_every_datatype(binary):
    framed = request("local", binary)
    decoded = decode_request(framed.body, framed.headers, max_bytes=1 << 20)
    for name, array in tensors(binary).items():
        assert decoded.inputs[name].tolist() == array.tolist(), name


async def test_http(tmp_path):
    repository = publish_echo(tmp_path / "repo")
    async with (
        InferenceEngine(ModelCache(repository)) as engine,
        HttpServer(V2Api(engine, max_request_bytes=1 << 20), "127.0.0.1", 0) as server,
        aiohttp.ClientSession() as http,
    ):
        for binary in (False, True):
            framed = request(f"http-{binary}", binary)
            async with http.post(f"http://127.0.0.1:{server.port}/v2/models/{ECHO}/infer", data=framed.body,
                                 headers=framed.headers) as response:
                assert response.status == 200, await response.text()
                body = decode_response(await response.read(), {k.lower(): v for k, v in response.headers.items()})
            assert_echoed(body, binary)


async def test_kafka(live, tmp_path):
    repository = publish_echo(tmp_path / "repo")
    settings = replace(live, model_repository=str(repository.root))
    frames = {f"kafka-{b}": request(f"kafka-{b}", b) for b in (False, True)}
    async with running_worker(settings), ResultCollector(settings) as collector:
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(**settings.kafka_client_kwargs())
        await producer.start()
        try:
            for key, framed in frames.items():
                await producer.send_and_wait(settings.topics.requests, framed.body, key=key.encode(),
                                             headers=framed.kafka_headers())
        finally:
            await producer.stop()
        answers = await collector.wait_for(frames, timeout=30)
    for key in frames:
        assert answers[key].kind == "result", answers[key].body
        assert_echoed(answers[key].body, binary=key.endswith("True"))


async def test_sqs(live, tmp_path):
    repository = publish_echo(tmp_path / "repo")
    sqs = aws_client(live, "sqs")
    requests_url = ensure_queue(sqs, f"{live.batch_bucket}-rt-requests")
    results_url = ensure_queue(sqs, f"{live.batch_bucket}-rt-results")
    for binary in (False, True):
        sqs.send_message(QueueUrl=requests_url, **to_sqs_message(request(f"sqs-{binary}", binary)))
    async with InferenceEngine(ModelCache(repository)) as engine, \
            SqsWorker(live, engine, sqs, requests_url, SqsSink(sqs, results_url), wait_time_s=1):
        received: dict[str, dict] = {}
        for _ in range(30):
            messages = await asyncio.to_thread(sqs.receive_message, QueueUrl=results_url, MaxNumberOfMessages=10,
                                               WaitTimeSeconds=1, MessageAttributeNames=["All"])
            for m in messages.get("Messages", []):
                payload, headers = from_sqs_message(m["Body"], m.get("MessageAttributes"))
                body = decode_response(payload, headers)
                received[body["id"]] = body
            if len(received) == 2:
                break
    assert set(received) == {"sqs-False", "sqs-True"}
    for request_id, body in received.items():
        assert_echoed(body, binary=request_id.endswith("True"))


async def test_s3_claim_check(live, tmp_path):
    repository = publish_echo(tmp_path / "repo")
    settings = replace(live, model_repository=str(repository.root))
    s3 = aws_client(settings, "s3")
    requests = []
    for binary in (False, True):
        framed = request("ignored", binary)
        metadata = {"inference-header-content-length": framed.headers["inference-header-content-length"]} \
            if binary else {}
        s3.put_object(Bucket=settings.batch_bucket, Key=f"claims/rt/in-{binary}", Body=framed.body,
                      ContentType=framed.headers["content-type"], Metadata=metadata)
        requests.append({"id": f"s3-{binary}", "model_name": ECHO,
                         "inputs_uri": f"s3://{settings.batch_bucket}/claims/rt/in-{binary}",
                         "parameters": {"output_uri": f"s3://{settings.batch_bucket}/claims/rt/out-{binary}",
                                        "binary_data_output": binary}})
    async with running_worker(settings), ResultCollector(settings) as collector:
        await publish_requests(settings, requests)
        answers = await collector.wait_for([r["id"] for r in requests], timeout=30)
    for binary in (False, True):
        assert answers[f"s3-{binary}"].body["outputs_uri"] == f"s3://{settings.batch_bucket}/claims/rt/out-{binary}"
        stored = s3.get_object(Bucket=settings.batch_bucket, Key=f"claims/rt/out-{binary}")
        headers = {"content-type": stored["ContentType"], **stored.get("Metadata", {})}
        assert_echoed(decode_response(stored["Body"].read(), headers), binary)
