"""Delivery guarantees under failure: crashes, graceful shutdown, backpressure, and a bad-input matrix.

Every test uses real worker processes or in-process workers against the real broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import Counter
from dataclasses import replace

import aiohttp
import numpy as np
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from worker_support import all_output, read_topic, running_worker, slow_repository, stored_batches, worker_process

from infra.bootstrap import ensure_topics
from infra.stack import free_port
from models.cache import ModelCache
from models.examples import MNIST_MLP
from models.repository import ModelRepository
from pipeline.client import ResultCollector, example_requests, publish_requests
from pipeline.codec import encode_error, encode_request
from pipeline.engine import InferenceEngine
from pipeline.errors import ErrorCode, InferenceError
from pipeline.kafka_worker import KafkaWorker
from pipeline.protocol import InferenceRequest
from pipeline.responder import Outcome, Responder
from pipeline.services import answer_producer, aws_client, bootstrap, claim_check_store
from pipeline.settings import Topics
from pipeline.sinks import Envelope, KafkaSink


@pytest.fixture
async def four_partitions(settings):
    """Fresh topics with four partitions, so three workers each own at least one."""
    four = replace(settings, topic_partitions=4,
                   topics=Topics(*(f"{name}.p4" for name in settings.topics.all())))
    await bootstrap(four)
    return four


@pytest.mark.slow
async def test_sigkilled_worker_in_a_group_of_three_loses_no_request(four_partitions, tmp_path):
    settings = four_partitions
    workers = [worker_process(settings, worker_id=f"crash-{i}") for i in range(3)]
    try:
        for _, assigned, _ in workers:
            assert await asyncio.to_thread(assigned.wait, 60), "a worker never got partitions"
        requests, truth = example_requests(5000, prefix="crash")
        payloads = [orjson.dumps(r, option=orjson.OPT_SERIALIZE_NUMPY) for r in requests]
        async with ResultCollector(settings) as collector:
            sender = asyncio.create_task(publish_requests(settings, payloads, keys=list(truth)))
            while len(collector.answers) < 500:  # kill mid-stream
                await asyncio.sleep(0.05)
            victim = workers[0][0]
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
            await sender
            restarted = worker_process(settings, worker_id="crash-0-restarted")
            workers.append(restarted)
            answers = await collector.wait_for(truth, timeout=180)
        missing = set(truth) - set(answers)
        assert not missing, f"{len(missing)} requests never answered"
        assert len(answers) == len(truth)  # deduplicated by request id
        assert all(a.kind == "result" for a in answers.values())
        accuracy = np.mean([int(answers[i].output("class")[0]) == label for i, label in truth.items()])
        assert accuracy > 0.95
    finally:
        for proc, _, _ in workers:
            proc.kill()


@pytest.mark.slow
async def test_sigterm_finishes_in_flight_batches_then_commits(live, tmp_path):
    # A long batching delay keeps requests queued when SIGTERM arrives: a graceful stop must still
    # answer them (flush the batcher), commit, and exit 0; a new worker then finds nothing to redo.
    slow_repo = slow_repository(tmp_path / "slow", max_queue_delay_ms=4_000)
    port = free_port()
    proc, assigned, lines = worker_process(live, repository_root=slow_repo.root, worker_id="graceful",
                                           args=("--health-port", str(port), "--health-host", "127.0.0.1"))
    try:
        assert await asyncio.to_thread(assigned.wait, 60)
        requests, truth = example_requests(20, prefix="graceful")
        async with ResultCollector(live) as collector:
            await publish_requests(live, requests)
            # Consumed, waiting in the batcher: seen on the worker's /metrics, not guessed from a fixed wait, which a
            # loaded machine could end before the worker read them (it then stopped with nothing to answer).
            await _process_in_flight(port, 20)
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 30) == 0, "".join(lines)
            answers = await collector.wait_for(truth, timeout=10)
        await all_output(proc)  # its last lines may be in the pipe still
        assert set(answers) == set(truth)
        assert any("worker stopped after answering 20 requests" in line for line in lines), "".join(lines)
        consumer = AIOKafkaConsumer(**live.kafka_client_kwargs(), group_id=live.consumer_group,
                                    enable_auto_commit=False)
        await consumer.start()
        try:
            tps = [TopicPartition(live.topics.requests, p) for p in range(live.topic_partitions)]
            committed = [await consumer.committed(tp) or 0 for tp in tps]
            assert sum(committed) == 20, "graceful stop must commit everything it answered"
        finally:
            await consumer.stop()
    finally:
        proc.kill()


async def _process_in_flight(port: int, count: int, timeout: float = 30.0) -> None:
    """Wait until a worker process's /metrics (its health server on `port`) shows `count` requests in flight."""
    sample = f"maas_in_flight_requests {float(count)}"
    async with aiohttp.ClientSession() as http, asyncio.timeout(timeout):
        while True:
            with contextlib.suppress(aiohttp.ClientError):  # the health server starts after the worker
                async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                    if sample in (await response.text()).splitlines():
                        return
            await asyncio.sleep(0.05)


async def test_a_slow_model_keeps_in_flight_bounded(live, tmp_path):
    # Backpressure: with max_in_flight 32 and a model held back by a long batching delay, the worker stops
    # taking records at 32 instead of buffering the whole topic, then catches up when batches run.
    slow_repo = slow_repository(tmp_path / "slow", max_queue_delay_ms=3_000)
    settings = replace(live, max_in_flight=32, model_repository=str(slow_repo.root))
    requests, truth = example_requests(150, prefix="pressure")
    async with running_worker(settings) as worker, ResultCollector(settings) as collector:
        await publish_requests(settings, requests)
        # Sampled until it reaches 32 and for a second after (the first batch closes 3 s after its first record),
        # not read once after a fixed wait, which a loaded machine could end before the worker had read 32 records.
        peak, reached = 0, None
        async with asyncio.timeout(30):
            while reached is None or time.monotonic() < reached + 1.0:
                peak = max(peak, worker.in_flight)
                if reached is None and peak >= 32:
                    reached = time.monotonic()
                await asyncio.sleep(0.01)
        assert peak == 32, "the worker must hold exactly max_in_flight records, no more"
        answers = await collector.wait_for(truth, timeout=60)
        # An answer can be read from the topic before the broker's acknowledgement reaches the handler that
        # produced it, and a record stays in flight until then: wait for the acknowledgements, not just the reads.
        async with asyncio.timeout(10):
            while worker.in_flight:
                await asyncio.sleep(0.02)
    assert set(answers) == set(truth)


BAD_INPUT_MATRIX = [
    # (case id, payload or request-dict override, headers, expected kind, expected code)
    ("invalid-json", b"{nope", None, "dead_letter", "INVALID_JSON"),
    ("non-utf8", b"\xc3\x28\xa0\xa1", None, "dead_letter", "INVALID_JSON"),
    ("empty-record", b"", None, "dead_letter", "INVALID_JSON"),
    ("null-header", b"{nope", [("x-null", None)], "dead_letter", "INVALID_JSON"),  # Kafka allows a null value
    ("json-array", b"[]", None, "dead_letter", "INVALID_REQUEST"),
    ("missing-id", {"id": None}, None, "dead_letter", "INVALID_REQUEST"),
    ("missing-model", {"model_name": None}, None, "error", "INVALID_REQUEST"),
    ("path-in-model-name", {"model_name": "../../etc/passwd"}, None, "error", "INVALID_REQUEST"),
    ("unknown-model", {"model_name": "nope"}, None, "error", "MODEL_NOT_FOUND"),
    ("unknown-version", {"model_version": "42"}, None, "error", "MODEL_NOT_FOUND"),
    ("bad-version", {"model_version": "v1"}, None, "error", "INVALID_REQUEST"),
    ("superscript-version", {"model_version": "\u00b2"}, None, "error", "INVALID_REQUEST"),  # "²".isdigit()
    ("missing-inputs", {"inputs": None}, None, "error", "INVALID_REQUEST"),
    ("empty-inputs", {"inputs": []}, None, "error", "INVALID_REQUEST"),
    ("wrong-input-name", {"inputs": [{"name": "x", "shape": [1, 784], "datatype": "FP32", "data": [0.0] * 784}]},
     None, "error", "INVALID_INPUT"),
    ("wrong-datatype", {"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP64", "data": [0.0] * 784}]},
     None, "error", "INVALID_INPUT"),
    ("unknown-datatype", {"inputs": [{"name": "input", "shape": [1, 784], "datatype": "F32", "data": [0] * 784}]},
     None, "error", "INVALID_REQUEST"),
    ("wrong-shape", {"inputs": [{"name": "input", "shape": [1, 783], "datatype": "FP32", "data": [0.0] * 783}]},
     None, "error", "INVALID_INPUT"),
    ("count-mismatch", {"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": [0.0] * 10}]},
     None, "error", "INVALID_INPUT"),
    ("empty-batch", {"inputs": [{"name": "input", "shape": [0, 784], "datatype": "FP32", "data": []}]},
     None, "error", "INVALID_INPUT"),
    ("too-many-rows", {"inputs": [{"name": "input", "shape": [65, 784], "datatype": "FP32",
                                   "data": [0.0] * (65 * 784)}]}, None, "error", "INVALID_INPUT"),
    ("strings-as-floats", {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": ["a", "b"]}]},
     None, "error", "INVALID_INPUT"),
    ("inf-literal", b'{"id": "inf-literal", "model_name": "mnist_mlp", "inputs": [{"name": "input", '
                    b'"shape": [1, 1], "datatype": "FP32", "data": [Infinity]}]}', None, "dead_letter", "INVALID_JSON"),
    ("overflow-to-inf", {"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32",
                                     "data": [1e39] * 784}]}, None, "error", "INVALID_INPUT"),
    ("absurd-shape", {"inputs": [{"name": "input", "shape": [1000000, 1000000], "datatype": "FP32", "data": [0.0]}]},
     None, "error", "PAYLOAD_TOO_LARGE"),
    ("oversized-record", "OVERSIZED", None, "dead_letter", "PAYLOAD_TOO_LARGE"),
    # Just under the limit, with 100 KB of headers: the dead letter drops the headers to fit the producer.
    ("big-headers", "JUST_UNDER", [("x-pad", b"x" * 100_000)], "dead_letter", "INVALID_JSON"),
    ("deadline-passed", {"parameters": {"deadline_ms": 1000}}, None, "error", "DEADLINE_EXCEEDED"),
    ("bad-deadline", {"parameters": {"deadline_ms": "tomorrow"}}, None, "error", "INVALID_REQUEST"),
    ("bad-reply-to", {"parameters": {"reply_to": "no spaces allowed"}}, None, "error", "INVALID_REQUEST"),
    ("reply-to-own-topic", "REPLY_TO_REQUESTS", None, "error", "INVALID_REQUEST"),
    ("rank-65", {"inputs": [{"name": "input", "shape": [1] * 65, "datatype": "FP32", "data": [0.0]}]},
     None, "error", "INVALID_REQUEST"),
    ("zero-size-2-63", {"inputs": [{"name": "input", "shape": [0, 2**63], "datatype": "FP32", "data": []}]},
     None, "error", "INVALID_REQUEST"),
    ("unknown-output", {"outputs": [{"name": "logits"}]}, None, "error", "INVALID_REQUEST"),
    ("unsupported-content-type", {}, [("content-type", b"text/csv")], "dead_letter", "INVALID_REQUEST"),
    ("binary-truncated", "BINARY_TRUNCATED", None, "error", "INVALID_REQUEST"),
    ("binary-size-mismatch", "BINARY_MISMATCH", None, "error", "INVALID_INPUT"),
    ("binary-bad-header-length", "BINARY_BAD_LENGTH", None, "dead_letter", "INVALID_REQUEST"),
    ("binary-nan", "BINARY_NAN", None, "error", "INVALID_INPUT"),
    ("inputs-uri-missing-object", {"inputs": None, "inputs_uri": "s3://BUCKET/claims/missing/object.json"}, None,
     "error", "INVALID_REQUEST"),
    ("inputs-uri-other-bucket", {"inputs": None, "inputs_uri": "s3://someone-elses-bucket/x.json"}, None,
     "error", "INVALID_REQUEST"),
    ("inputs-uri-traversal", {"inputs": None, "inputs_uri": "s3://BUCKET/a/../../etc/passwd"}, None,
     "error", "INVALID_REQUEST"),
]


def _bad_payload(case: str, spec, base: dict, max_bytes: int, bucket: str,
                 requests_topic: str) -> tuple[bytes, list[tuple[str, bytes]]]:
    image = np.asarray(base["inputs"][0]["data"], dtype=np.float32).reshape(1, 784)
    if spec == "OVERSIZED":
        return b" " * (max_bytes + 1), []
    if spec == "JUST_UNDER":
        return b"{" * (max_bytes - 16), []
    if spec == "REPLY_TO_REQUESTS":  # answering there would feed the answer back as a request
        spec = {"parameters": {"reply_to": requests_topic}}
    if spec == "BINARY_NAN":
        poisoned = image.copy()
        poisoned[0, 100] = np.nan
        framed = encode_request(case, MNIST_MLP, {"input": poisoned}, binary=True)
        return framed.body, framed.kafka_headers()
    if isinstance(spec, str) and spec.startswith("BINARY"):
        framed = encode_request(case, MNIST_MLP, {"input": image}, binary=True)
        headers = framed.kafka_headers()
        if spec == "BINARY_TRUNCATED":
            return framed.body[:-100], headers
        if spec == "BINARY_MISMATCH":
            length = int(framed.headers["inference-header-content-length"])
            header = orjson.loads(framed.body[:length])
            header["inputs"][0]["shape"] = [1, 783]
            header["inputs"][0]["parameters"]["binary_data_size"] = 783 * 4
            head = orjson.dumps(header)
            return head + framed.body[length:length + 783 * 4], [("content-type", b"application/octet-stream"),
                                                                 ("inference-header-content-length",
                                                                  str(len(head)).encode())]
        return framed.body, [("content-type", b"application/octet-stream"),
                             ("inference-header-content-length", b"99999999")]
    if isinstance(spec, bytes):
        return spec, []
    body = {**base, "id": case, **spec}
    body = {k: v.replace("BUCKET", bucket) if isinstance(v, str) else v for k, v in body.items() if v is not None}
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), []


async def test_bad_input_matrix_each_case_gets_its_documented_record(live):
    settings = replace(live, max_request_bytes=1 << 20)
    good, truth = example_requests(4, prefix="matrix-good")
    records = []
    for case, spec, headers, _, _ in BAD_INPUT_MATRIX:
        payload, extra = _bad_payload(case, spec, good[0], settings.max_request_bytes, settings.batch_bucket,
                                      settings.topics.requests)
        records.append((case, payload, (headers or []) + extra))
    from aiokafka import AIOKafkaProducer

    async with running_worker(settings) as worker, ResultCollector(settings) as collector:
        producer = AIOKafkaProducer(**settings.kafka_client_kwargs(), max_request_size=4 << 20)
        await producer.start()
        try:
            for case, payload, headers in records:
                await producer.send_and_wait(settings.topics.requests, payload, key=case.encode(), headers=headers)
        finally:
            await producer.stop()
        await publish_requests(settings, good)
        answers = await collector.wait_for([c[0] for c in BAD_INPUT_MATRIX] + list(truth), timeout=60)
        for _ in range(50):  # the worker counts an answer just after the broker acknowledged it
            if worker.answered == len(BAD_INPUT_MATRIX) + len(truth):
                break
            await asyncio.sleep(0.1)
        assert worker.answered == len(BAD_INPUT_MATRIX) + len(truth), "every record answered, worker still up"
    assert len(BAD_INPUT_MATRIX) >= 25
    for case, _, _, kind, code in BAD_INPUT_MATRIX:
        answer = answers.get(case)
        assert answer is not None, f"{case}: no answer"
        assert (answer.kind, answer.body["error"]["code"]) == (kind, code), f"{case}: {answer.body}"
        assert answer.body["error"]["message"], case
    assert all(answers[i].kind == "result" for i in truth), "good requests beside bad ones still succeed"
    assert answers["binary-nan"].body["error"]["message"] == "input 'input': NaN or infinite values are not allowed"
    oversized = answers["oversized-record"].body["headers"]
    bucket, key = oversized["maas-payload-uri"].removeprefix("s3://").split("/", 1)
    stored = aws_client(settings, "s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    assert stored == b" " * (settings.max_request_bytes + 1), "an oversized dead letter keeps its payload in S3"
    dropped = answers["big-headers"].body["headers"]
    assert dropped["maas-headers-dropped"] == "1" and "x-pad" not in dropped


async def test_error_answers_are_keyed_by_the_request_id_however_the_request_failed(live, repository):
    """A result is keyed by its request id, not by the caller's partition key; so was an error answer found by the
    engine (an unknown model), but one found while decoding (a malformed model_name) kept the record's key: answers
    of one id went out under two keys, to two partitions."""
    good, _ = example_requests(3, prefix="keyed")
    requests = [good[0], {**good[1], "model_name": "no such model"}, {**good[2], "model_name": "nope"}]
    envelopes = [Envelope(payload=orjson.dumps(r, option=orjson.OPT_SERIALIZE_NUMPY), headers={}, source=f"k@{i}",
                          key=b"partition-key") for i, r in enumerate(requests)]
    async with answer_producer(live) as producer, InferenceEngine(ModelCache(repository), worker_id="keyed") as engine:
        outcomes = await Responder(live, engine, KafkaSink.for_settings(producer, live, None)).handle_many(envelopes)
    assert outcomes == [Outcome.RESULT, Outcome.ERROR, Outcome.ERROR]
    answers = {orjson.loads(r.value)["id"]: r for r in await read_topic(live, live.topics.results, 3)}
    assert {i: r.key for i, r in answers.items()} == {r["id"]: r["id"].encode() for r in requests}
    assert orjson.loads(answers[requests[1]["id"]].value)["error"]["code"] == "INVALID_REQUEST"


async def test_every_error_answer_to_a_request_with_a_reply_to_goes_to_its_topic(live, repository):
    """An error the engine found (an unknown model) went to the caller's reply_to topic, but one found while the
    request was read (data that does not fill its shape, a malformed version) went to the results topic, which a
    caller that reads its own topic never sees: its request went unanswered there. A reply_to that cannot be used
    still gets its error on the results topic."""
    team = f"{live.topics.results}.team-b"
    await ensure_topics(live.kafka_client_kwargs(), [team], live.topic_partitions)
    good, _ = example_requests(5, prefix="route")
    tensor = {"name": "input", "shape": [1, 784], "datatype": "FP32", "data": [0.0] * 10}
    requests = [good[0], {**good[1], "model_name": "nope"}, {**good[2], "inputs": [tensor]},
                {**good[3], "model_version": "v1", "parameters": {"reply_to": team, "deadline_ms": "soon"}},
                {**good[4], "model_version": "v1", "parameters": {"reply_to": "no spaces allowed"}}]
    for request in requests[:3]:
        request["parameters"] = {"reply_to": team}
    envelopes = _envelopes(requests, "route", keyed=True)
    async with answer_producer(live) as producer, InferenceEngine(ModelCache(repository), worker_id="route") as engine:
        outcomes = await Responder(live, engine, KafkaSink.for_settings(producer, live, None)).handle_many(envelopes)
    assert outcomes == [Outcome.RESULT] + [Outcome.ERROR] * 4
    on_team = {orjson.loads(r.value)["id"]: orjson.loads(r.value) for r in await read_topic(live, team, 4)}
    assert on_team.keys() == {r["id"] for r in requests[:4]}
    assert [on_team[r["id"]]["error"]["code"] for r in requests[1:4]] == ["MODEL_NOT_FOUND", "INVALID_INPUT",
                                                                          "INVALID_REQUEST"]
    (refused,) = [orjson.loads(r.value) for r in await read_topic(live, live.topics.results, 1)]
    assert refused["id"] == requests[4]["id"] and "reply_to" in refused["error"]["message"]


class _EngineWithABug(InferenceEngine):
    """The real engine, except that a group holding one request id trips an unexpected exception, as a bug would."""

    async def infer_many(self, requests):
        if any(r.id == "trips-a-bug" for r in requests):
            raise RuntimeError("a bug")
        return await super().infer_many(requests)


def _envelopes(requests: list[dict], source: str, keyed: bool = False) -> list[Envelope]:
    """Each request as a source's record would bring it (``source@i``), keyed by its id with ``keyed``."""
    return [Envelope(payload=orjson.dumps(r, option=orjson.OPT_SERIALIZE_NUMPY), headers={}, source=f"{source}@{i}",
                     key=r["id"].encode() if keyed else None) for i, r in enumerate(requests)]


async def test_a_bug_in_a_group_of_requests_answers_the_others_and_dead_letters_its_own(live, repository):
    """`Responder.handle_many` sends a fetch's requests to the engine together; an unexpected exception there
    must not fail the whole fetch: each request goes through alone, and only the one that trips the bug is
    dead-lettered (after its retries), the source going on."""
    requests, _ = example_requests(4, prefix="grp")
    requests[2] = {**requests[2], "id": "trips-a-bug"}
    envelopes = _envelopes(requests, "t", keyed=True)
    async with answer_producer(live) as producer, _EngineWithABug(ModelCache(repository), worker_id="grp") as engine:
        responder = Responder(live, engine, KafkaSink.for_settings(producer, live, None), retry_delay_s=0.01)
        outcomes = await responder.handle_many(envelopes)
    assert outcomes == [Outcome.RESULT, Outcome.RESULT, Outcome.DEAD_LETTER, Outcome.RESULT]
    results = await read_topic(live, live.topics.results, 3)
    assert sorted(r.key.decode() for r in results) == sorted(r["id"] for r in requests if r["id"] != "trips-a-bug")
    (dead,) = await read_topic(live, live.topics.dlq, 1)
    assert dead.key == b"trips-a-bug" and dict(dead.headers)["maas-error-code"] == b"INTERNAL"
    assert b"a bug" in dict(dead.headers)["maas-error-message"]


class _UnavailableEngine(InferenceEngine):
    """The real engine, except that requests whose id starts with "down" meet a transient failure every time; it
    counts the attempts each request got."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.attempts: Counter[str] = Counter()

    async def infer_many(self, requests):
        outcomes = await super().infer_many(requests)
        for index, request in enumerate(requests):
            self.attempts[request.id] += 1
            if request.id.startswith("down"):
                outcomes[index] = InferenceError(ErrorCode.UNAVAILABLE, "the model is unavailable", request.id)
        return outcomes


async def test_a_transient_failure_in_a_group_gets_max_attempts_in_all(live, repository):
    """A fetch's request that fails transiently in the group attempt is retried alone: that first attempt counts
    among its max_attempts (it made one more than the README says, and its dead letter's maas-attempts said one
    fewer than were made)."""
    requests, _ = example_requests(3, prefix="grp-ok")
    requests[1] = {**requests[1], "id": "down-1"}
    async with answer_producer(live) as producer, _UnavailableEngine(ModelCache(repository), worker_id="t") as engine:
        responder = Responder(live, engine, KafkaSink.for_settings(producer, live, None), max_attempts=2,
                              retry_delay_s=0.01)
        outcomes = await responder.handle_many(_envelopes(requests, "t", keyed=True))
    assert outcomes == [Outcome.RESULT, Outcome.DEAD_LETTER, Outcome.RESULT]
    assert engine.attempts["down-1"] == 2
    (dead,) = await read_topic(live, live.topics.dlq, 1)
    assert dead.key == b"down-1" and dict(dead.headers)["maas-attempts"] == b"2"


async def test_reply_to_topics_get_answers_and_refused_ones_become_errors_on_the_results_topic(live, repository):
    """`reply_to` routes an answer; a topic of the platform's own, or one the cluster does not serve in time,
    gets an INVALID_REQUEST error on the results topic instead of stopping the source (which would stop again
    on the same record after a restart)."""
    requests, _ = example_requests(5, prefix="rt")
    team = f"{live.topics.results}.team-a"
    await ensure_topics(live.kafka_client_kwargs(), [team], partitions=live.topic_partitions)
    missing = f"{live.topics.results}.no-such-team"
    routes = [team, live.topics.requests, None, f"{live.topics.results}.team-b", missing]
    for request, reply_to in zip(requests, routes, strict=True):
        if reply_to:
            request["parameters"] = {"reply_to": reply_to}
    envelopes = _envelopes(requests, "t")
    async with answer_producer(live) as producer, InferenceEngine(ModelCache(repository), worker_id="rt") as engine:
        sink = KafkaSink.for_settings(producer, live, None)
        assert await Responder(live, engine, sink).handle_many(envelopes[:3]) == [Outcome.RESULT] * 3
        sink.reply_to_timeout_s = 0  # the cluster "does not answer in time" for team-b
        assert await Responder(live, engine, sink).handle_many(envelopes[3:4]) == [Outcome.RESULT]
        sink.reply_to_timeout_s = 10
        assert await Responder(live, engine, sink).handle_many(envelopes[4:]) == [Outcome.RESULT]
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**live.kafka_client_kwargs())
    await admin.start()
    try:
        assert missing not in await admin.list_topics(), "a request's reply_to must not create a topic"
    finally:
        await admin.close()
    (routed,) = await read_topic(live, team, 1)
    assert routed.key == b"rt-000000" and "outputs" in orjson.loads(routed.value)
    on_results = {r.key.decode(): orjson.loads(r.value) for r in await read_topic(live, live.topics.results, 4)}
    assert set(on_results) == {"rt-000001", "rt-000002", "rt-000003", "rt-000004"}
    assert "outputs" in on_results["rt-000002"]
    for request_id, reason in (("rt-000001", "one of the platform's own topics"),
                               ("rt-000003", "the cluster does not serve it"),
                               ("rt-000004", "the cluster has no such topic")):
        error = on_results[request_id]["error"]
        assert error["code"] == "INVALID_REQUEST" and error["message"].startswith("parameters.reply_to: cannot")
        assert reason in error["message"]


class _CountingSink(KafkaSink):
    """A KafkaSink that counts its questions to the cluster about each reply_to topic (`_look_up`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lookups: Counter[str] = Counter()

    async def _look_up(self, topic: str) -> int | None:
        self.lookups[topic] += 1
        return await super()._look_up(topic)


async def test_a_failed_reply_to_lookup_is_not_repeated_within_an_answer(live, repository, caplog):
    """A reply_to topic is looked up for its results' inline limit, then again when they are sent: a lookup that
    failed was not remembered, so a missing topic cost two metadata requests, and a cluster that does not answer two
    reply_to_timeout_s waits (20 s instead of 10 s) per fetch. A failure is now remembered for a few seconds: the
    answers of a fetch, and of the next ones, get the error without another lookup, and a topic created meanwhile is
    found once that memory expires."""
    caplog.set_level(logging.WARNING, logger="pipeline.sinks")
    later, silent = f"{live.topics.results}.later", f"{live.topics.results}.silent"
    requests, _ = example_requests(5, prefix="fl")
    for request, reply_to in zip(requests, (later, later, later, later, silent), strict=True):
        request["parameters"] = {"reply_to": reply_to}
    envelopes = _envelopes(requests, "fl")
    async with answer_producer(live) as producer, InferenceEngine(ModelCache(repository), worker_id="fl") as engine:
        sink = _CountingSink.for_settings(producer, live, None)
        sink.failed_lookup_s = 2.0
        responder = Responder(live, engine, sink)
        assert await responder.handle_many(envelopes[:2]) == [Outcome.RESULT] * 2
        assert await responder.handle_many(envelopes[2:3]) == [Outcome.RESULT]  # the next fetch, moments later
        assert sink.lookups[later] == 1
        await ensure_topics(live.kafka_client_kwargs(), [later], partitions=live.topic_partitions)
        await asyncio.sleep(sink.failed_lookup_s)
        assert await responder.handle_many(envelopes[3:4]) == [Outcome.RESULT]
        assert sink.lookups[later] == 2
        sink.reply_to_timeout_s = 0  # the cluster "does not answer in time"
        assert await responder.handle_many(envelopes[4:]) == [Outcome.RESULT]
        assert sink.lookups[silent] == 1
    (routed,) = await read_topic(live, later, 1)
    assert routed.key == b"fl-000003" and "outputs" in orjson.loads(routed.value)
    on_results = {r.key.decode(): orjson.loads(r.value) for r in await read_topic(live, live.topics.results, 4)}
    assert set(on_results) == {"fl-000000", "fl-000001", "fl-000002", "fl-000004"}
    missing, silent_reason = "the cluster has no such topic", "the cluster does not serve it"
    for request_id, reason in (("fl-000000", missing), ("fl-000002", missing), ("fl-000004", silent_reason)):
        error = on_results[request_id]["error"]
        assert error["code"] == "INVALID_REQUEST" and reason in error["message"]
    logged = [r.getMessage() for r in caplog.records if r.name == "pipeline.sinks"]
    assert len([m for m in logged if m.startswith(f"cannot look up reply_to topic {later}")]) == 1
    assert len([m for m in logged if m.startswith(f"cannot look up reply_to topic {silent}")]) == 1


async def test_dead_letters_sent_at_once_go_in_record_batches_of_their_own(live):
    """Kafka checks a whole record batch against the topic's max.message.bytes: dead letters sent at once went in one
    of the producer's batches per partition (up to 256 KiB), which a dead-letter topic that takes less refused though
    each fits it, and a dead letter that cannot be written stops the worker. Each now goes alone, to the partition
    the producer would pick for its key. Tansu does not enforce the limit: the test reads the batches it stored."""
    keys = [b"one-partition"] * 6 + [b"another-key", None]
    envelopes = [Envelope(payload=b"{nope %d" % n, headers={"x-n": str(n)}, source=f"dl@{n}", key=key,
                          raw_headers=[("x-n", str(n).encode()), ("x-null", None)]) for n, key in enumerate(keys)]
    error = InferenceError(ErrorCode.INVALID_JSON, "not JSON")
    async with answer_producer(live) as producer:
        sink = KafkaSink.for_settings(producer, live, None)
        assert await asyncio.gather(*(sink.dead_letter(envelope, error, 1) for envelope in envelopes)) == [True] * 8
        partitions = sorted(await producer.partitions_for(live.topics.dlq))
    stored = await stored_batches(live, live.topics.dlq)
    batches = [(partition, records) for partition, batches in stored.items() for _, records in batches]
    assert [len(records) for _, records in batches] == [1] * 8, "each dead letter in a batch of its own"
    by_source = {}
    for partition, (record,) in batches:
        headers = dict(record.headers)
        by_source[headers["maas-source"].decode()] = (partition, record.key, record.value, record.headers)
    for n, (envelope, key) in enumerate(zip(envelopes, keys, strict=True)):
        partition, stored_key, value, headers = by_source[envelope.source]
        assert (stored_key, value) == (key, envelope.payload)
        assert headers[:2] == [("x-n", str(n).encode()), ("x-null", None)]
        assert dict(headers[2:]) == {"maas-error-code": b"INVALID_JSON", "maas-error-message": b"not JSON",
                                     "maas-attempts": b"1", "maas-source": envelope.source.encode()}
        if key is not None:
            assert partition == DefaultPartitioner()(key, partitions, partitions)


async def test_stopping_the_sink_cancels_its_reply_to_lookups(live, stack):
    """A reply_to topic is looked up in a task of its own, shielded from the fetches waiting for it: a worker's stop()
    cancelled its fetches and left the lookup asking a cluster that does not answer for up to reply_to_timeout_s,
    through a producer closed under it, owned by no one. `KafkaSink.stop()` cancels it: nothing is left running, and
    the fetches still waiting for it end cancelled (their requests are redelivered) rather than hanging or answering
    as if the topic were missing."""
    topic = f"{live.topics.results}.team-a"
    request = InferenceRequest(id="lk-0", model_name=MNIST_MLP, model_version=None, inputs={}, datatypes={},
                               parameters={"reply_to": topic})
    answer = (Envelope(payload=b"{}", headers={}, source="lk@0"), request,
              encode_error(InferenceError(ErrorCode.INTERNAL, "unsent", request.id), MNIST_MLP))
    async with answer_producer(live) as producer:
        sink = KafkaSink.for_settings(producer, live, None)
        sink.reply_to_timeout_s = 60.0
        stack._broker.send_signal(signal.SIGSTOP)  # the cluster does not answer: connections stay open, unanswered
        try:
            fetches = [asyncio.create_task(sink.max_inline_bytes_for([request])),
                       asyncio.create_task(sink.answer_many([answer]))]
            await asyncio.sleep(0.5)  # the lookup's metadata request is sent, and waits for an answer
            (lookup,) = sink._lookups.values()
            assert not lookup.done()
            async with asyncio.timeout(5):  # hang guard: the lookup itself would wait 60 s
                await sink.stop()
        finally:
            stack._broker.send_signal(signal.SIGCONT)
        assert lookup.cancelled() and not sink._lookups
        await asyncio.wait(fetches, timeout=5)
        assert [fetch.cancelled() for fetch in fetches] == [True, True]
        assert not sink._lookups, "a fetch looked the topic up again"
        left = [task.get_coro().__qualname__ for task in asyncio.all_tasks()]
        assert "KafkaSink._look_up" not in left, left


class _CountingEngine(InferenceEngine):
    requests_run = 0

    async def infer_many(self, requests):
        self.requests_run += len(requests)
        return await super().infer_many(requests)


async def test_an_output_uri_the_store_would_refuse_is_refused_before_the_model_runs(live, repository):
    requests, _ = example_requests(1, prefix="ou")
    requests[0]["parameters"] = {"output_uri": "s3://some-other-bucket/out/x.result"}
    envelope = Envelope(payload=orjson.dumps(requests[0], option=orjson.OPT_SERIALIZE_NUMPY), headers={},
                        source="t@0")
    async with answer_producer(live) as producer, _CountingEngine(ModelCache(repository), worker_id="ou") as engine:
        store = claim_check_store(live)
        responder = Responder(live, engine, KafkaSink.for_settings(producer, live, store), store=store)
        assert await responder.handle_many([envelope]) == [Outcome.ERROR]
        assert engine.requests_run == 0
    (answer,) = await read_topic(live, live.topics.results, 1)
    error = orjson.loads(answer.value)["error"]
    assert error["code"] == "INVALID_REQUEST"
    assert error["message"].startswith("parameters.output_uri: bucket 'some-other-bucket' is not allowed")


async def test_made_up_model_names_do_not_become_metric_labels(live, repository):
    from prometheus_client import REGISTRY

    def errors(model: str) -> float:
        return REGISTRY.get_sample_value("maas_requests_total", {"model": model, "outcome": "error"}) or 0.0

    requests, _ = example_requests(2, prefix="lbl")
    requests[0]["model_name"], requests[1]["model_name"] = "made-up-1f3a", "made-up-9c2e"
    envelopes = _envelopes(requests, "t")
    before = errors("-")
    async with answer_producer(live) as producer, InferenceEngine(ModelCache(repository), worker_id="lbl") as engine:
        responder = Responder(live, engine, KafkaSink.for_settings(producer, live, None))
        assert await responder.handle_many(envelopes) == [Outcome.ERROR, Outcome.ERROR]
    assert errors("-") == before + 2 and errors("made-up-1f3a") == 0 and errors("made-up-9c2e") == 0


class _GatedEngine(InferenceEngine):
    """The real engine, except that requests whose id starts with a gate's name wait until the test opens it: a batch
    held as long as a test needs (a slow model, a model still loading), while the others run at once."""

    def __init__(self, *args, gates: dict[str, asyncio.Event], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gates = gates

    async def infer_many(self, requests):
        for name, gate in self.gates.items():
            if any(r.id.startswith(name) for r in requests):
                await gate.wait()
        return await super().infer_many(requests)


async def _publish_as_one_batch(settings, requests: list[dict]) -> None:
    """One record batch on partition 0, which one fetch returns whole."""
    producer = AIOKafkaProducer(**settings.kafka_client_kwargs(), max_batch_size=1 << 20)
    await producer.start()
    try:
        batch = producer.create_batch()
        for request in requests:
            value = orjson.dumps(request, option=orjson.OPT_SERIALIZE_NUMPY)
            assert batch.append(key=request["id"].encode(), value=value, timestamp=None) is not None
        await (await producer.send_batch(batch, settings.topics.requests, partition=0))
    finally:
        await producer.stop()


async def test_records_fetched_before_a_rebalance_are_not_begun_after_it(live):
    """A fetch that waited for in-flight slots when its partition was revoked was handed to handlers after the
    revocation had committed and forgotten the partition, while a batch that outlived the revoke's drain was still
    unanswered. Kept by this worker, the partition's offset then moved past that batch's record (one past the late
    fetch, the only records tracked), and a worker stopping or dying then lost it. Records fetched before a
    revocation are left to be fetched again, from the committed offset, by whoever owns the partition then."""
    settings = replace(live, max_in_flight=5, topic_partitions=1, kafka_session_timeout_ms=6000,
                       kafka_heartbeat_interval_ms=300,
                       topics=Topics(*(f"{name}.p1" for name in live.topics.all())))
    await bootstrap(settings)
    tp = TopicPartition(settings.topics.requests, 0)
    requests, _ = example_requests(8, prefix="x")
    for i, request in enumerate(requests):  # offset 0 waits for its model past the revoke, 1-3 until after it
        request["id"] = f"slow-{i}" if i == 0 else f"held-{i}" if i < 4 else f"fast-{i}"
    ids = [r["id"] for r in requests]
    gates = {"slow": asyncio.Event(), "held": asyncio.Event()}
    other = AIOKafkaConsumer(**settings.kafka_client_kwargs(), group_id=settings.consumer_group,
                             session_timeout_ms=6000, heartbeat_interval_ms=300)
    async with ResultCollector(settings) as collector:
        collector.expect(ids)
        engine = _GatedEngine(ModelCache(ModelRepository(settings.model_repository)), gates=gates)
        async with engine:
            worker = KafkaWorker(settings, engine, drain_timeout_s=0.5)
            await worker.start()
            try:
                await asyncio.wait_for(worker.assigned.wait(), 30)
                for batch, in_flight in ((requests[:1], 1), (requests[1:4], 4)):
                    await publish_requests(settings, batch)
                    async with asyncio.timeout(30):
                        while worker.in_flight < in_flight:
                            await asyncio.sleep(0.02)
                await _publish_as_one_batch(settings, requests[4:])  # fetched together, then waits for slots
                async with asyncio.timeout(30):
                    while await worker._consumer.position(tp) < 8:
                        await asyncio.sleep(0.02)
                assert worker.in_flight == 4
                worker.assigned.clear()
                await other.start()  # a new member (of another topic): every partition is revoked and reassigned
                other.subscribe([settings.topics.metrics])
                await asyncio.wait_for(worker.assigned.wait(), 30)
                assert worker._consumer.assignment() == {tp}
                assert await worker._consumer.position(tp) == 0, "the rebalance moves the position back to the commit"
                gates["held"].set()  # slots come back to the fetch that waited for them
                async with asyncio.timeout(30):
                    while worker.in_flight or await worker._consumer.position(tp) < 8:  # read again from offset 0
                        await asyncio.sleep(0.02)
            finally:
                await worker.stop()  # commits what it answered: the slow request never was
                await other.stop()
        async with running_worker(settings):
            answers = await collector.wait_for(ids, timeout=30)
    assert set(answers) == set(ids), f"never answered: {sorted(set(ids) - set(answers))}"


async def test_a_drain_longer_than_the_session_timeout_keeps_the_partition_until_it_commits(live):
    """A revoke waits up to `drain_timeout_s` for in-flight records, then commits, before the partition moves. Kafka
    waits for a member to rejoin a rebalance only its `rebalance_timeout_ms` (aiokafka's default: the session
    timeout), then hands its partitions to the others from the last commit: a drain longer than that had the newcomer
    read the records still being answered, and each was answered twice. Tansu waits for the drain whatever the
    timeout, so the timeout the worker joins with is checked as well as the outcome."""
    settings = replace(live, topic_partitions=1, kafka_session_timeout_ms=3000, kafka_heartbeat_interval_ms=300,
                       topics=Topics(*(f"{name}.drain" for name in live.topics.all())))
    await bootstrap(settings)
    tp = TopicPartition(settings.topics.requests, 0)
    requests, _ = example_requests(4, prefix="slow")
    gates = {"slow": asyncio.Event()}
    newcomer = AIOKafkaConsumer(settings.topics.requests, **settings.kafka_client_kwargs(),
                                group_id=settings.consumer_group, enable_auto_commit=False,
                                auto_offset_reset="earliest", session_timeout_ms=3000, heartbeat_interval_ms=300)
    engine = _GatedEngine(ModelCache(ModelRepository(settings.model_repository)), gates=gates)
    async with engine, ResultCollector(settings) as collector:
        worker = KafkaWorker(replace(settings, rebalance_drain_s=20), engine)
        await worker.start()
        try:
            await asyncio.wait_for(worker.assigned.wait(), 30)
            assert worker._consumer._coordinator._rebalance_timeout_ms >= (20 + worker.REVOKE_COMMIT_S) * 1000
            await publish_requests(settings, requests)
            async with asyncio.timeout(30):
                while worker.in_flight < len(requests):
                    await asyncio.sleep(0.02)
            read_by_newcomer: list[str] = []

            async def join_and_read() -> None:
                await newcomer.start()  # returns once it has joined: after the worker's drain
                async for record in newcomer:
                    read_by_newcomer.append(orjson.loads(record.value)["id"])

            newcomer_task = asyncio.create_task(join_and_read())  # joins the group: the worker's revoke drains
            await asyncio.sleep(8)  # well past the session timeout, well within the drain
            gates["slow"].set()
            answers = await collector.wait_for([r["id"] for r in requests], timeout=30)
            await asyncio.sleep(3)  # the rebalance completes; a newcomer given the partition reads from the commit
            newcomer_task.cancel()
            await asyncio.gather(newcomer_task, return_exceptions=True)
        finally:
            await worker.stop()
            await newcomer.stop()
    assert len(answers) == len(requests)
    assert read_by_newcomer == [], "records read again while the worker that held them was still answering"
    consumer = AIOKafkaConsumer(**settings.kafka_client_kwargs(), group_id=settings.consumer_group,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        assert await consumer.committed(tp) == len(requests), "the drain's commit must be accepted"
    finally:
        await consumer.stop()
