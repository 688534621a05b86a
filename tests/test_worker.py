"""The Kafka worker against the real broker: round trips, bad input, dead letters, commit after produce."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
import signal
import time
from dataclasses import replace
from datetime import UTC, datetime

import aiohttp
import numpy as np
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    ConsumerStoppedError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NodeNotReadyError,
    RequestTimedOutError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy
from prometheus_client import REGISTRY
from s3_support import assert_names_no_location, unreachable_s3
from worker_support import (
    all_output,
    assert_stopped_in_time,
    calls_waiting_on,
    read_all,
    read_topic,
    running_worker,
    sigterm_and_wait,
    slow_repository,
    worker_process,
)

from infra.bootstrap import ensure_topics
from infra.stack import LocalStack, free_port
from models.cache import ModelCache
from models.examples import MNIST_MLP, mnist_mlp_config, train_mnist_mlp
from models.repository import ModelRepository, open_repository
from pipeline.client import ResultCollector, example_requests, publish_requests
from pipeline.engine import InferenceEngine
from pipeline.kafka_worker import KafkaWorker, _broker_away, _Rebalance
from pipeline.metrics import BatchRecord
from pipeline.observability import HealthServer
from pipeline.services import aws_client, bootstrap
from pipeline.settings import Settings


@pytest.fixture
def fast(live):
    return replace(live, kafka_session_timeout_ms=6000, kafka_heartbeat_interval_ms=300)


class _NotUtf8(str):
    """A header key written as bytes that are not UTF-8. Kafka's protocol says header keys are UTF-8, but a producer
    in another language may write any bytes; aiokafka's pure-Python record builder writes what encode() returns."""

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return b"\xff\xfebad"


async def _produce(settings, records, partition: int = 0, topic: str | None = None) -> None:
    """Produce (key, value, headers) records to the requests topic (or `topic`) as they are (a null key and value, a
    header key that is not UTF-8), in one record batch: send() takes no record with neither a key nor a value."""
    producer = AIOKafkaProducer(**settings.kafka_client_kwargs())
    await producer.start()
    try:
        batch = producer.create_batch()
        batch._builder = _DefaultRecordBatchBuilderPy(2, 0, 0, -1, -1, 0, 1 << 20)  # the C one takes str keys only
        for key, value, headers in records:
            assert batch.append(key=key, value=value, timestamp=None, headers=headers) is not None
        await (await producer.send_batch(batch, topic or settings.topics.requests, partition=partition))
    finally:
        await producer.stop()


async def test_round_trip_through_kafka(fast):
    requests, truth = example_requests(200, prefix="rt")
    async with running_worker(fast) as worker, ResultCollector(fast) as collector:
        await publish_requests(fast, requests)
        answers = await collector.wait_for(truth, timeout=60)
    assert len(answers) == 200 and worker.answered == 200
    assert all(a.kind == "result" and a.body["model_version"] == "1" for a in answers.values())
    accuracy = np.mean([int(answers[i].output("class")[0]) == label for i, label in truth.items()])
    assert accuracy > 0.95
    results = await read_topic(fast, fast.topics.results, 200)
    partitions = list(range(fast.topic_partitions))
    assert {r.partition for r in results} == set(partitions)  # spread by key, as a plain producer would
    assert all(r.partition == DefaultPartitioner()(r.key, partitions, partitions) for r in results)
    metrics = [orjson.loads(r.value) for r in await read_topic(fast, fast.topics.metrics, 1)]
    assert metrics
    assert {"model", "version", "batch_size", "queue_wait_ms_max", "compute_ms", "worker"} <= metrics[0].keys()
    assert metrics[0]["worker"] == fast.worker_id


async def test_bad_requests_get_clear_answers_and_batch_mates_still_run(fast):
    good, truth = example_requests(20, prefix="good")
    image = good[0]["inputs"][0]["data"]
    bad = {
        "unknown-model": {**good[0], "id": "unknown-model", "model_name": "no_such_model"},
        "unknown-version": {**good[0], "id": "unknown-version", "model_version": "9"},
        "wrong-shape": {**good[0], "id": "wrong-shape",
                        "inputs": [{"name": "input", "shape": [1, 28, 28], "datatype": "FP32", "data": image}]},
        "wrong-datatype": {**good[0], "id": "wrong-datatype",
                           "inputs": [{"name": "input", "shape": [1, 784], "datatype": "INT32",
                                       "data": [0] * 784}]},
        "wrong-input-name": {**good[0], "id": "wrong-input-name",
                             "inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "FP32", "data": image}]},
        "past-deadline": {**good[0], "id": "past-deadline", "parameters": {"deadline_ms": 1}},
    }
    payloads = [orjson.dumps(r, option=orjson.OPT_SERIALIZE_NUMPY) for r in good[:10]]
    payloads += [orjson.dumps(r, option=orjson.OPT_SERIALIZE_NUMPY) for r in bad.values()]
    payloads += [b'{"id": "truncated", "model_name": "mnist_mlp", "inp', b"\xff\xfe\x00binary"]
    payloads += [orjson.dumps(r, option=orjson.OPT_SERIALIZE_NUMPY) for r in good[10:]]
    keys = [r["id"] for r in good[:10]] + list(bad) + ["truncated", "binary"] + [r["id"] for r in good[10:]]
    async with running_worker(fast), ResultCollector(fast) as collector:
        await publish_requests(fast, payloads, keys=keys)
        await _produce(fast, [(b"null-value", None, []), (None, None, [])])  # no value: kept null in its dead letter
        answers = await collector.wait_for([*keys, "null-value"], timeout=60)
    assert set(answers) == {*keys, "null-value"}, f"missing answers for {set(keys) - set(answers)}"
    for request_id in truth:
        assert answers[request_id].kind == "result"
    expected = {
        "unknown-model": ("MODEL_NOT_FOUND", "model 'no_such_model' is not in the repository"),
        "unknown-version": ("MODEL_NOT_FOUND", "has no version 9; available: [1]"),
        "wrong-shape": ("INVALID_INPUT", "shape [1, 28, 28] given, expected [-1, 784]"),
        "wrong-datatype": ("INVALID_INPUT", "datatype INT32 given, expected FP32"),
        "wrong-input-name": ("INVALID_INPUT", "unknown input(s) ['pixels']"),
        "past-deadline": ("DEADLINE_EXCEEDED", "deadline_ms passed"),
    }
    for request_id, (code, fragment) in expected.items():
        answer = answers[request_id]
        assert answer.kind == "error", request_id
        assert answer.body["error"]["code"] == code
        assert fragment in answer.body["error"]["message"]
    for request_id in ("truncated", "binary"):
        answer = answers[request_id]
        assert answer.kind == "dead_letter"
        assert answer.body["error"]["code"] == "INVALID_JSON"
        assert "not valid UTF-8 JSON" in answer.body["error"]["message"]
    assert answers["null-value"].body["error"] == {"code": "INVALID_JSON", "message": "the record has no value (null)"}
    dead = await read_topic(fast, fast.topics.dlq, 4)
    # Dead letters keep the original value; aiokafka produces no record with neither a key nor a value.
    assert {(r.key, r.value) for r in dead} == {(b"truncated", payloads[16]), (b"binary", payloads[17]),
                                                (b"null-value", None), (None, b"")}
    assert all(dict(r.headers)["maas-attempts"] == b"1" for r in dead)


async def test_a_model_that_cannot_load_is_retried_then_dead_lettered(fast):
    """Its dead letters name the request (maas-request-id): they keep the record's key, here a caller's partition
    key, which the ResultCollector took for the request id. Their message names the file inside the version, not
    the server's folder (it quoted the repository's path)."""
    repository = ModelRepository(fast.model_repository)
    version = repository.publish("fragile", mnist_mlp_config(), train_mnist_mlp(steps=1))
    (repository.root / "fragile" / str(version) / "model.safetensors").write_bytes(b"corrupted")
    requests, _ = example_requests(3, model="fragile", prefix="fragile")
    good, _ = example_requests(3, prefix="fine")
    async with running_worker(fast, max_attempts=2), ResultCollector(fast) as collector:
        await publish_requests(fast, requests, keys=["tenant-7"] * 3)
        await publish_requests(fast, good)
        answers = await collector.wait_for([r["id"] for r in requests + good], timeout=60)
    assert all(answers[r["id"]].kind == "result" for r in good)
    for request in requests:
        answer = answers[request["id"]]
        assert answer.kind == "dead_letter" and answer.body["error"]["code"] == "INTERNAL"
        message = answer.body["error"]["message"]
        assert message.startswith(f"model 'fragile' version {version} failed to load: fragile/{version}/"
                                  "model.safetensors: sha256 "), message
        assert str(repository.root) not in message and answer.body["headers"]["maas-error-message"] == message
        assert answer.body["headers"]["maas-attempts"] == "2"
        assert answer.body["headers"]["maas-request-id"] == answer.body["id"] == request["id"]
    dead = await read_topic(fast, fast.topics.dlq, 3)
    assert {r.key for r in dead} == {b"tenant-7"}, "dead letters keep the original key"


async def test_requests_met_by_an_s3_outage_are_retried_then_dead_lettered_as_unavailable(fast, tmp_path):
    """With S3 down, a lookup's RepositoryError escaped the engine: dead-lettered at once as `unexpected failure:
    RepositoryError('... in s3://bucket/prefix: Could not connect to the endpoint URL: "http://host:port/..."')`,
    and a load failure quoted the same. Both are UNAVAILABLE, transient as the design has it: retried, then
    dead-lettered, saying which model is unavailable and nothing of where the repository is."""
    s3 = aws_client(fast, "s3")
    repo = open_repository(f"s3://{fast.batch_bucket}/kafka/models", lambda: s3, cache_dir=tmp_path / "cache")
    for name in ("looked_up", "not_looked_up"):
        assert repo.publish(name, mnist_mlp_config(), train_mnist_mlp(steps=1)) == 1
    looked_up, _ = example_requests(2, model="looked_up", prefix="looked-up")
    for request in looked_up:
        request["model_version"] = "1"
    not_looked_up, _ = example_requests(2, model="not_looked_up", prefix="not-looked-up")
    engine = InferenceEngine(ModelCache(repo), worker_id=fast.worker_id)
    async with engine, KafkaWorker(fast, engine, max_attempts=2) as worker, ResultCollector(fast) as collector:
        await asyncio.wait_for(worker.assigned.wait(), 30)
        await engine.model_config("looked_up", "1")  # its config is known, its files not loaded
        repo.client = down = unreachable_s3()
        repo.listing_ttl_s = 0.0  # every lookup lists the store: none is answered from an earlier listing
        await publish_requests(fast, looked_up + not_looked_up)
        answers = await collector.wait_for([r["id"] for r in looked_up + not_looked_up], timeout=60)
    unavailable = "the model repository is unavailable; retry later"
    for requests, message in ((looked_up, f"model 'looked_up' version 1: {unavailable}"),
                              (not_looked_up, f"model 'not_looked_up' version latest: {unavailable}")):
        for request in requests:
            answer = answers[request["id"]]
            assert answer.kind == "dead_letter", answer
            assert answer.body["error"] == {"code": "UNAVAILABLE", "message": message}
            assert answer.body["headers"]["maas-error-message"] == message
            assert answer.body["headers"]["maas-attempts"] == "2", "retried, as transient failures are"
            assert_names_no_location(orjson.dumps(answer.body).decode(), repo, down)


@pytest.mark.slow
async def test_killed_worker_loses_nothing_consumed_but_unanswered(fast, tmp_path):
    # Worker A holds requests in its batcher for a minute (max_queue_delay_ms), so it has consumed them
    # but answered none when it is SIGKILLed. Worker B, same group, must answer every one of them.
    slow_repo = slow_repository(tmp_path / "slow", max_queue_delay_ms=60_000)
    proc, assigned, _ = worker_process(fast, repository_root=slow_repo.root, worker_id="holder")
    try:
        assert await asyncio.to_thread(assigned.wait, 60), "worker A never joined the group"
        requests, truth = example_requests(12, prefix="restart")
        async with ResultCollector(fast) as collector:
            await publish_requests(fast, requests)
            await asyncio.sleep(3)  # consumed and queued in A's batcher; commit interval 200 ms passes
            assert collector.answers == {}, "worker A should still be holding the batch"
            proc.kill()
            proc.wait(10)
            async with running_worker(fast):
                answers = await collector.wait_for(truth, timeout=60)
        assert set(answers) == set(truth)
        assert all(a.kind == "result" for a in answers.values())
    finally:
        proc.kill()


async def test_stop_returns_before_start_and_after_a_failed_start(settings):
    engine = InferenceEngine(ModelCache(ModelRepository(settings.model_repository)))
    async with engine:
        never_started = KafkaWorker(settings, engine)
        await asyncio.wait_for(never_started.stop(), 10)  # hang guard: it waited for a stop that never came
        unreachable = KafkaWorker(replace(settings, kafka_bootstrap_servers=f"127.0.0.1:{free_port()}"), engine)
        with pytest.raises(KafkaError):
            await unreachable.start()
        await asyncio.wait_for(unreachable.stop(), 10)
        await asyncio.wait_for(unreachable.wait(), 10)


async def test_a_restarted_worker_starts_afresh(fast):
    """Stale state of a previous run: the batch listener was added again at each start (one metrics record per
    batch per start), and the previous run's partitions and failure made a restarted worker ready at once."""
    engine = InferenceEngine(ModelCache(ModelRepository(fast.model_repository)), worker_id=fast.worker_id)
    async with engine:
        worker = KafkaWorker(fast, engine)
        for _ in range(2):
            await worker.start()
            await asyncio.wait_for(worker.assigned.wait(), 30)
            worker._fail(KafkaError("a produce that failed"), "cannot produce")  # it stops itself, as on an outage
            with pytest.raises(KafkaError):
                await asyncio.wait_for(worker.wait(), 30)
            assert worker.not_ready == "stopped: cannot produce (KafkaError('a produce that failed'))"
        await worker.start()
        try:
            assert worker.not_ready == f"owns no partition of {fast.topics.requests}", \
                "ready before owning any partition, on the previous run's assignment"
            await asyncio.wait_for(worker.assigned.wait(), 30)
            assert worker.ready, "the previous run's failure outlived the restart"
            requests, truth = example_requests(1, prefix="restarted")
            async with ResultCollector(fast) as collector:
                await publish_requests(fast, requests)
                assert len(await collector.wait_for(truth, timeout=30)) == 1
        finally:
            await worker.stop()
        await _Rebalance(worker).on_partitions_assigned(set())  # a rebalance that leaves this worker nothing
        assert not worker.assigned.is_set()
    metrics = await read_all(fast, fast.topics.metrics)  # stop() awaited every send
    assert len(metrics) == 1, f"{len(metrics)} metrics records for one batch"


async def test_stop_closes_both_clients_when_the_broker_is_gone(tmp_path, caplog):
    """With the broker gone, stop() waited forever for its final commit; bounded, it then met the CancelledError
    aiokafka's consumer.stop() raises for a fetch it cancelled, and passed it on (a SIGTERM ended the process
    with a traceback) leaving the producer open. The warning it logs (shown without -v) says what happened in the
    user's terms: it spoke of aiokafka's CancelledError, which reads as a bug to whoever stops a worker."""
    caplog.set_level(logging.WARNING, logger="pipeline.kafka_worker")
    slow = slow_repository(tmp_path / "slow", max_queue_delay_ms=60_000)  # requests stay in flight
    with LocalStack(tmp_path / "stack") as private:
        settings = replace(Settings(), kafka_bootstrap_servers=private.bootstrap_servers,
                           aws_endpoint_url=private.endpoint_url, model_repository=str(slow.root),
                           topic_partitions=2, kafka_session_timeout_ms=6000, kafka_heartbeat_interval_ms=300)
        await bootstrap(settings)
        async with InferenceEngine(ModelCache(slow)) as engine:
            worker = KafkaWorker(settings, engine, drain_timeout_s=0.5)
            await worker.start()
            await asyncio.wait_for(worker.assigned.wait(), 30)
            await publish_requests(settings, example_requests(50, prefix="held")[0])
            while worker.in_flight < 50:
                await asyncio.sleep(0.05)
            producer, consumer = worker._producer, worker._consumer
            private._broker.kill()
            private._broker.wait()
            await asyncio.wait_for(worker.stop(), 60)  # hang guard
            assert producer._closed and consumer._closed
            clients = [t for t in asyncio.all_tasks() if "AIOKafkaClient" in t.get_coro().__qualname__]
            assert not clients, "a client's metadata task outlived stop(), retrying a broker that is gone"
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "pipeline.kafka_worker" and "consumer" in r.getMessage()]
    assert warnings, "nothing said about closing the consumer of a broker that is gone"
    assert all("CancelledError" not in w and "aiokafka" not in w for w in warnings), warnings
    assert any(private.bootstrap_servers in w for w in warnings), f"the broker's address is not named: {warnings}"


@contextlib.asynccontextmanager
async def _in_flight_on_a_private_broker(tmp_path, requests: list[dict], max_queue_delay_ms: float, **changes):
    """A worker on a private broker, with `shutdown_timeout_s` 2 s (and `changes` to its settings), yielded with its
    settings and the broker's process once it holds `requests` in flight, its model waiting `max_queue_delay_ms` to
    fill a batch. The broker is resumed at the end if the test paused it."""
    slow = slow_repository(tmp_path / "slow", max_queue_delay_ms=max_queue_delay_ms)
    with LocalStack(tmp_path / "stack") as private:
        settings = replace(Settings(), kafka_bootstrap_servers=private.bootstrap_servers,
                           aws_endpoint_url=private.endpoint_url, model_repository=str(slow.root),
                           topic_partitions=2, kafka_session_timeout_ms=6000, kafka_heartbeat_interval_ms=300,
                           **{"shutdown_timeout_s": 2, **changes})
        await bootstrap(settings)
        broker = private._broker
        try:
            async with InferenceEngine(ModelCache(slow)) as engine:
                worker = KafkaWorker(settings, engine)
                await worker.start()
                try:
                    await asyncio.wait_for(worker.assigned.wait(), 30)
                    await publish_requests(settings, requests)
                    while worker.in_flight < len(requests):
                        await asyncio.sleep(0.02)
                    yield settings, worker, broker
                finally:
                    await asyncio.wait_for(worker.stop(), 60)  # hang guard (the test may have stopped it already)
        finally:
            if broker.poll() is None:
                broker.send_signal(signal.SIGCONT)  # a paused broker ends on SIGTERM only once resumed


@contextlib.asynccontextmanager
async def _answers_held_by_the_producer(tmp_path, stop_the_broker, **changes):
    """A worker on a private broker (`_in_flight_on_a_private_broker`, with `changes`), yielded with its settings,
    the ids of 50 requests and the broker's process once `stop_the_broker(process)` stopped the broker after the
    worker consumed the requests and before their answers, which then wait in its producer."""
    # The batch runs after the broker stopped: 2 s after its first request reached the batcher, a margin for a
    # loaded machine to see the requests in flight and stop the broker (1 s was little more than that, and a batch
    # answered before the broker stopped left the test waiting for answers in the producer until its timeout).
    requests, truth = example_requests(50, prefix="unsent")
    async with _in_flight_on_a_private_broker(tmp_path, requests, 2000, **changes) as (settings, worker, broker):
        stop_the_broker(broker)
        accumulator = worker._producer._message_accumulator
        while not (accumulator._batches or accumulator._pending_batches):
            await asyncio.sleep(0.05)
        yield settings, worker, truth, broker


async def _timed_stop(worker: KafkaWorker) -> float:
    started = time.monotonic()
    await asyncio.wait_for(worker.stop(), 60)  # hang guard
    return time.monotonic() - started


async def test_stop_with_the_broker_gone_ends_within_the_shutdown_timeout(tmp_path, caplog):
    """With the broker gone, stop() took 45 s: 30 s for the handlers waiting for their answers' acknowledgements,
    10 s for the final commit, then the producer's stop(), which waits for what it holds until each batch expires
    after request_timeout_ms (40 s). A pod's SIGKILL came first (Kubernetes' default grace period is 30 s). Bounded
    by MAAS_SHUTDOWN_TIMEOUT_S, it abandons the records it could not deliver and says how many."""
    def kill(broker) -> None:
        broker.kill()
        broker.wait()

    async with _answers_held_by_the_producer(tmp_path, kill) as (settings, worker, truth, _):
        took = await _timed_stop(worker)
    assert took < settings.shutdown_timeout_s + 0.5, f"stop() took {took:.1f} s"  # a little for the event loop
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("pipeline")]
    assert any(f"{len(truth)} request(s) not answered" in m for m in messages), messages
    abandoned = f"{len(truth) + 1} record(s) the broker had not acknowledged"  # the answers and a metrics record
    assert any(abandoned in m for m in messages), messages


@pytest.mark.slow
async def test_stop_with_an_unresponsive_broker_ends_in_time_and_loses_no_request(tmp_path, caplog):
    """A broker that does not answer (paused: its connections stay open, as in a network partition) held stop() for
    minutes: besides the producer, aiokafka's consumer.stop() waits for its group coordination, which looks for a
    coordinator for as long as none answers (79 s here). Cut short at MAAS_SHUTDOWN_TIMEOUT_S, stop() must leave no
    aiokafka task retrying the broker, and commit no offset of a request whose answer was not delivered: once the
    broker is back, a new worker of the group answers every one."""
    def pause(broker) -> None:
        broker.send_signal(signal.SIGSTOP)

    async with _answers_held_by_the_producer(tmp_path, pause) as (settings, worker, truth, broker):
        worker._consumer._coordinator.coordinator_dead()  # as a heartbeat does once its request timed out (40 s)
        took = await _timed_stop(worker)
        assert took < settings.shutdown_timeout_s + 0.5, f"stop() took {took:.1f} s"
        assert any("closing the consumer took longer" in r.getMessage() for r in caplog.records)
        left = [t.get_coro().__qualname__ for t in asyncio.all_tasks()]
        assert not [name for name in left if name.endswith(("_routine", "_md_synchronizer"))], left
        broker.send_signal(signal.SIGCONT)
        async with ResultCollector(settings) as collector, running_worker(settings):
            answers = await collector.wait_for(truth, timeout=60)
    assert set(answers) == set(truth), f"{len(truth) - len(answers)} requests lost"
    assert all(answer.kind == "result" for answer in answers.values())


@pytest.mark.slow
async def test_answers_the_broker_did_not_take_in_time_are_answered_again_once_it_is_back(tmp_path, caplog):
    """A broker that did not take the answers within the producer's request timeout (paused past it: down,
    restarting, partitioned away) stopped the worker. Restarted into a broker still away, a worker stops at once,
    and under Kubernetes the pod then waited out a growing back-off after the broker came back. The worker now
    answers those records again until the broker takes the answers. Meanwhile /health/ready said ready, its
    consumer lag growing: it now says why it is not, and is ready again once the answers are delivered."""
    def pause(broker) -> None:
        broker.send_signal(signal.SIGSTOP)

    async with (
        _answers_held_by_the_producer(tmp_path, pause, kafka_request_timeout_ms=1500,
                                      shutdown_timeout_s=20) as (settings, worker, truth, broker),
        HealthServer("127.0.0.1", 0, lambda: worker.not_ready) as health,
        aiohttp.ClientSession(f"http://127.0.0.1:{health.port}") as http,
    ):
        async with asyncio.timeout(30):  # hang guard: the producer gives the answers up after 1.5 s
            while not any("answering them again" in r.getMessage() for r in caplog.records):
                await asyncio.sleep(0.05)
        async with http.get("/health/ready") as response:
            body = await response.json()
            assert response.status == 503, body
        assert body["status"] == "not ready"
        reason = re.fullmatch(r"cannot deliver the answers of (\d+) request\(s\) to Kafka since (\S+): (.+)",
                              body["reason"])
        assert reason, body
        assert 0 < int(reason[1]) <= len(truth)
        assert 0 <= (datetime.now(UTC) - datetime.fromisoformat(reason[2])).total_seconds() < 30
        assert re.match(r"(RequestTimedOut|KafkaTimeout|NodeNotReady)Error\(", reason[3]), body  # as logged
        broker.send_signal(signal.SIGCONT)
        async with asyncio.timeout(60):  # hang guard
            while worker.answered < len(truth):
                await asyncio.sleep(0.05)
        assert worker.failure is None
        async with http.get("/health/ready") as response:
            assert response.status == 200 and await response.json() == {"status": "ready"}
        records = await read_topic(settings, settings.topics.results, len(truth))
    answered = {orjson.loads(record.value)["id"] for record in records}
    assert answered == set(truth), f"{len(set(truth) - answered)} requests lost"


@pytest.mark.parametrize(("error", "away"), [
    (NodeNotReadyError, True), (RequestTimedOutError, True), (KafkaTimeoutError, True),  # down, partitioned, expired
    (UnknownTopicOrPartitionError, False),  # a topic deleted: the restarted worker's bootstrap creates it again
    (TopicAuthorizationFailedError, False), (MessageSizeTooLargeError, False),  # refusals: no retry helps
])
def test_answers_are_made_again_for_a_broker_away_not_for_a_refusal(error, away):
    assert _broker_away(error()) is away


async def test_stop_cancels_the_reply_to_lookups_of_requests_it_abandons(tmp_path):
    """A reply_to topic new to the worker is looked up in a task of its own (up to 10 s with a cluster that does not
    answer), shielded from the handlers waiting for it: stop() abandoned those handlers at its deadline and left
    the lookup running past stop(), owned by no one, through a producer closed under it. stop() now ends it."""
    requests, _ = example_requests(4, prefix="lk")
    for request in requests:
        request["parameters"] = {"reply_to": "maas.results.team-a"}
    # The lookup comes after the batch ran: 1.5 s after its first request reached the batcher
    async with _in_flight_on_a_private_broker(tmp_path, requests, 1500) as (settings, worker, broker):
        broker.send_signal(signal.SIGSTOP)  # the cluster does not answer: connections stay open
        async with asyncio.timeout(30):  # hang guard
            while not worker._sink._lookups:
                await asyncio.sleep(0.02)
        (lookup,) = worker._sink._lookups.values()
        took = await _timed_stop(worker)
        assert took < settings.shutdown_timeout_s + 0.5, f"stop() took {took:.1f} s"
        assert lookup.cancelled()
        left = [t.get_coro().__qualname__ for t in asyncio.all_tasks()]
        assert "KafkaSink._look_up" not in left, left


async def test_a_worker_whose_s3_stopped_answering_exits_within_its_shutdown_timeout(repository, tmp_path):
    """An S3 call cannot be interrupted: with an endpoint that does not answer (paused: connections are accepted,
    nothing is read) a result's upload waits for its read timeout, three times over. stop() abandoned the request at
    its deadline, then the process waited for the upload's thread: `maas worker` exited 2 minutes after its SIGTERM
    (MAAS_SHUTDOWN_TIMEOUT_S 4), past any pod's grace period."""
    with LocalStack(tmp_path / "stack") as private:
        settings = replace(Settings(), kafka_bootstrap_servers=private.bootstrap_servers,
                           aws_endpoint_url=private.endpoint_url, model_repository=str(repository.root),
                           topic_partitions=1, shutdown_timeout_s=4)
        await bootstrap(settings)
        proc, assigned, lines = worker_process(settings, worker_id="s3-hangs")
        try:
            assert await asyncio.to_thread(assigned.wait, 60), "".join(lines)
            requests, _ = example_requests(2, prefix="upload")
            for number, request in enumerate(requests):
                uri = f"s3://{settings.batch_bucket}/{settings.claim_check_prefix}hung/{number}.json"
                request["parameters"] = {"output_uri": uri}
            private._moto.send_signal(signal.SIGSTOP)
            await publish_requests(settings, requests)
            async with asyncio.timeout(30):  # hang guard: the model runs, then the upload waits for S3
                while not calls_waiting_on(private.s3_port):
                    await asyncio.sleep(0.05)
            took = await sigterm_and_wait(proc)
        finally:
            proc.kill()
            private._moto.send_signal(signal.SIGCONT)  # a paused server ends on SIGTERM only once resumed
    assert_stopped_in_time(proc, lines, took, settings.shutdown_timeout_s, said="2 request(s) not answered")


async def test_a_worker_whose_slots_stay_full_polls_in_time_and_keeps_its_partitions(fast, tmp_path):
    """The consume loop stops fetching while MAAS_MAX_IN_FLIGHT requests are unanswered. aiokafka leaves the group
    when getmany() is not called for max_poll_interval_ms (300 s): a slow model with a backlog made the worker
    leave, its partitions went to others, and it went on beginning the records of its fetch, which they read
    again. It now polls before half of that passes, and reads again the records it had not begun."""
    slow = slow_repository(tmp_path / "slow", max_queue_delay_ms=3000)  # each batch waits 3 s to fill
    settings = replace(fast, model_repository=str(slow.root), max_in_flight=2)
    requests, truth = example_requests(6, prefix="full")
    async with InferenceEngine(ModelCache(slow)) as engine, ResultCollector(settings) as collector:
        worker = KafkaWorker(settings, engine)
        worker.max_poll_interval_ms = 2000  # it polls again after 1 s of waiting for slots
        async with worker:
            await asyncio.wait_for(worker.assigned.wait(), 30)
            revocations = worker._revocations
            await publish_requests(settings, requests, keys=["one-partition"] * 6)
            answers = await collector.wait_for(list(truth), timeout=60)
            assert worker._revocations == revocations, "the worker left its group and rejoined"
        await asyncio.sleep(1)  # a request answered twice would be seen by now
    assert set(answers) == set(truth) and all(a.kind == "result" for a in answers.values())
    assert collector.received == len(truth), f"{collector.received} answers to {len(truth)} requests"


async def test_the_collector_keeps_awaited_answers_and_only_the_latest_others(fast):
    """It kept every answer seen on the shared topics, forever: a long-lived client grew without bound."""
    requests, truth = example_requests(6, prefix="kept")
    ids = list(truth)
    async with running_worker(fast), ResultCollector(fast, max_unclaimed=2) as collector:
        collector.expect(ids[:2])
        await publish_requests(fast, requests)
        async with asyncio.timeout(30):  # hang guard
            while collector.received < 6:
                await asyncio.sleep(0.05)
        assert len(collector.answers) == 4, "the two awaited answers and the latest two of the other four"
        assert (await collector.wait_for(ids[:2], timeout=30)).keys() == set(ids[:2])
        assert len(await collector.wait_for(ids[2:], timeout=0.1)) == 2
        assert collector.answers == {}, "answers returned are forgotten"


async def test_the_collector_skips_records_on_the_shared_results_topic_that_are_no_answer(live):
    """Its task ended at the first record of the results topic it could not read as an answer (a tombstone, JSON
    that is not an object, an id that is not a string, a binary framing that does not fit): every answer after it,
    its own included, was never seen, and `wait_for` waited out its timeout."""
    producer = AIOKafkaProducer(**live.kafka_client_kwargs())
    async with ResultCollector(live) as collector:
        await producer.start()
        try:
            for value, headers in ((None, []), (b"[1]", []), (b'{"id": ["x"]}', []),
                                   (b'{"id": "framed"}', [("inference-header-content-length", b"999")])):
                await producer.send_and_wait(live.topics.results, value, key=b"other", headers=headers, partition=0)
            await producer.send_and_wait(live.topics.results, b'{"id": "mine", "outputs": []}', partition=0)
        finally:
            await producer.stop()
        answers = await collector.wait_for(["mine"], timeout=30)
    assert answers.keys() == {"mine"}
    assert collector.received == 1, "the records that are no answer are not counted as answers"


async def test_the_collector_says_so_when_it_can_no_longer_read_the_answers(live):
    """A record aiokafka cannot parse (a header key that is not UTF-8) ended the collector's task: `wait_for` waited
    out its whole timeout and returned nothing, as if the requests had not been answered."""
    async with ResultCollector(live) as collector:
        await _produce(live, [(b"other", b"{}", _NOT_UTF8_HEADER)], topic=live.topics.results)
        with pytest.raises(KafkaError, match="the answers can no longer be read: UnicodeDecodeError"):
            await collector.wait_for(["never"], timeout=60)


async def test_the_collector_goes_on_after_two_waits_for_one_id(live):
    """A wait that gave up on an id stopped awaiting it for a wait still under way for the same id: its answer was
    kept as unclaimed, and once that wait had returned it, the id stayed in line to be evicted; the eviction raised
    KeyError, which ended the collector's task, and no later answer was seen."""
    producer = AIOKafkaProducer(**live.kafka_client_kwargs())

    async def answer(*ids: str) -> None:
        for request_id in ids:
            await producer.send_and_wait(live.topics.results, orjson.dumps({"id": request_id, "outputs": []}),
                                         partition=0)

    async with ResultCollector(live, max_unclaimed=1) as collector:
        await producer.start()
        try:
            patient = asyncio.create_task(collector.wait_for(["x"], timeout=30))
            assert await collector.wait_for(["x"], timeout=0.1) == {}
            await answer("x")
            assert (await patient).keys() == {"x"}
            await answer("o1", "o2", "later")  # "x" would be the unclaimed answer evicted first
            answers = await collector.wait_for(["later"], timeout=30)
        finally:
            await producer.stop()
    assert answers.keys() == {"later"}


async def test_reply_to_topics_new_to_the_worker_do_not_starve_its_own_topics(fast, caplog):
    """aiokafka's producer tracked every topic's metadata until it was asked about one it did not know (a reply_to
    topic created after the worker started, or one that did not exist), and from then on only the topics asked
    about: the results batch queued just before (lingering linger_ms) lost its leader, the sender asked for metadata
    in a loop (141,298 requests in 40 s) and the worker stopped with NotLeaderForPartitionError. A topic that does not
    exist is refused without being created (the lookup asks for no auto-creation): its request gets an error on the
    results topic."""
    caplog.set_level(logging.DEBUG, logger="aiokafka")  # its client logs each metadata request
    late, missing = f"{fast.topics.results}.late", f"{fast.topics.results}.missing"
    requests, truth = example_requests(9, prefix="nt")
    requests[1]["parameters"] = {"reply_to": late}
    requests[4]["parameters"] = {"reply_to": missing}
    ids = list(truth)
    answers = {}
    async with running_worker(fast) as worker, ResultCollector(fast) as collector:
        await ensure_topics(fast.kafka_client_kwargs(), [late], partitions=fast.topic_partitions)
        for fetch in (requests[:3], requests[3:6], requests[6:]):  # one partition each: one record batch of answers
            await publish_requests(fast, fetch, keys=["one-partition"] * 3)
            on_results = [r["id"] for r in fetch if r.get("parameters", {}).get("reply_to") != late]
            answers |= await collector.wait_for(on_results, timeout=15)
            assert set(on_results) <= answers.keys()
        assert worker.ready
        assert all(a.kind == "result" for i, a in answers.items() if i != ids[4])
        refused = answers[ids[4]].body["error"]
        assert refused["code"] == "INVALID_REQUEST" and "no such topic" in refused["message"]
    (answer,) = await read_topic(fast, late, 1)
    assert answer.key == ids[1].encode() and "outputs" in orjson.loads(answer.value)
    asked = sum("Sending metadata request" in r.getMessage() for r in caplog.records)
    assert asked < 100, f"{asked} metadata requests"


def _record(request: dict, headers=()) -> tuple[bytes, bytes, list]:
    return request["id"].encode(), orjson.dumps(request, option=orjson.OPT_SERIALIZE_NUMPY), list(headers)


_NOT_UTF8_HEADER = [(_NotUtf8("x"), b"v")]


async def _produce_around_unreadable_records(settings, requests: list[dict]) -> None:
    """requests[1] unreadable between two others of its record batch at offsets 0-2 of partition 0, then one more
    batch there; two requests on partition 1. Produced before the worker starts, so that its first fetch holds both
    partitions: aiokafka may take partition 1's records, then drop them when partition 0's raises."""
    await _produce(settings, [_record(requests[0]), _record(requests[1], _NOT_UTF8_HEADER), _record(requests[2])])
    await _produce(settings, [_record(requests[3])])
    await _produce(settings, [_record(requests[4]), _record(requests[5])], partition=1)


def _check_unreadable_dead_letters(settings, dead: list, offsets: set[str]) -> None:  # offsets: "partition@offset"
    """Dead letters with nothing of the record (aiokafka gives nothing of a record it cannot parse) but where it is,
    and why."""
    sources = {dict(r.headers)["maas-source"].decode() for r in dead}
    assert sources == {f"{settings.topics.requests}-{offset}" for offset in offsets}
    for letter in dead:
        headers = dict(letter.headers)
        assert letter.key is None and letter.value == b""
        assert headers["maas-error-code"] == b"INVALID_REQUEST"
        assert headers["maas-error-message"].startswith(b"the Kafka record cannot be read")
        assert b"UnicodeDecodeError" in headers["maas-error-message"]


async def test_a_record_aiokafka_cannot_parse_is_dead_lettered_and_its_partition_goes_on(fast):
    """A header key that is not UTF-8 makes aiokafka's fetch raise (UnicodeDecodeError from its C parser), without
    saying where: the consume loop ended, the worker stopped, and every worker that took the partition after it
    stopped on the same record. The record is dead-lettered instead and the partition goes on. aiokafka cannot step
    over a record it fails to parse within its record batch: the records after it in that batch are dead-lettered
    too, each on its own; the ones before it, the later batches and the other partitions are answered."""
    requests, truth = example_requests(9, prefix="hdr")
    ids = list(truth)
    errors = REGISTRY.get_sample_value("maas_errors_total", {"code": "INVALID_REQUEST"}) or 0.0
    await _produce_around_unreadable_records(fast, requests)
    async with running_worker(fast) as worker, ResultCollector(fast) as collector:
        collector.expect(ids)
        answers = await collector.wait_for([ids[0], ids[3], ids[4], ids[5]], timeout=30)
        assert len(answers) == 4 and all(a.kind == "result" for a in answers.values())
        # On a partition with records answered before: offset 2 of partition 1.
        await _produce(fast, [_record(requests[6], _NOT_UTF8_HEADER)], partition=1)
        await _produce(fast, [_record(requests[7])], partition=1)
        await _produce(fast, [_record(requests[8])])
        answers = await collector.wait_for([ids[7], ids[8]], timeout=30)
        assert len(answers) == 2 and all(a.kind == "result" for a in answers.values())
        assert worker.ready
    results = await read_all(fast, fast.topics.results)  # the worker stopped: all its answers are there
    assert sorted(r.key.decode() for r in results) == [ids[i] for i in (0, 3, 4, 5, 7, 8)], "each answered once"
    _check_unreadable_dead_letters(fast, await read_all(fast, fast.topics.dlq), {"0@1", "0@2", "1@2"})
    # Counted as every request that ends in an error: maas_errors_total left them out
    assert REGISTRY.get_sample_value("maas_errors_total", {"code": "INVALID_REQUEST"}) == errors + 3


@pytest.mark.slow
async def test_aiokafkas_pure_python_parser_raises_otherwise_and_is_read_past_alike(fast, monkeypatch):
    """Without its C extensions (AIOKAFKA_NO_EXTENSIONS), aiokafka wraps the UnicodeDecodeError in a
    CorruptRecordException."""
    monkeypatch.setenv("AIOKAFKA_NO_EXTENSIONS", "1")
    requests, _ = example_requests(6, prefix="py")
    await _produce_around_unreadable_records(fast, requests)
    proc, assigned, lines = worker_process(fast, worker_id="pure-python")
    try:
        assert await asyncio.to_thread(assigned.wait, 60), "the worker never joined the group"
        results = await read_topic(fast, fast.topics.results, 4, timeout=30)
        dead = await read_topic(fast, fast.topics.dlq, 2)
        assert proc.poll() is None, "".join(lines)
    finally:
        proc.kill()
    await all_output(proc)
    assert sorted(r.key.decode() for r in results) == [requests[i]["id"] for i in (0, 3, 4, 5)]
    _check_unreadable_dead_letters(fast, dead, {"0@1", "0@2"})
    assert any("CorruptRecordException" in line for line in lines)


async def test_a_worker_that_stops_on_a_failure_says_what_failed(fast):
    """Its exit message said "cannot produce to Kafka" whatever failed."""
    engine = InferenceEngine(ModelCache(ModelRepository(fast.model_repository)), worker_id=fast.worker_id)
    async with engine:
        worker = KafkaWorker(fast, engine)
        await worker.start()
        await asyncio.wait_for(worker.assigned.wait(), 30)
        assert worker.failure is None
        await worker._consumer.stop()  # its consumer closed under it: the next fetch fails
        with pytest.raises(ConsumerStoppedError):
            await asyncio.wait_for(worker.wait(), 30)
    assert worker.failure == "reading requests from Kafka failed (ConsumerStoppedError())"


async def test_batch_metrics_that_cannot_be_published_are_counted_and_logged_once(fast, caplog):
    """A metrics record that could not be published showed only as asyncio's "... exception was never retrieved"."""
    def unpublished() -> float:
        return REGISTRY.get_sample_value("maas_batch_metrics_unpublished_total") or 0.0

    gc.collect()  # what earlier tests left for the collector (abandoned sends) is reported now, and not counted here
    caplog.clear()
    before = unpublished()
    async with running_worker(fast) as worker:
        await worker._producer.stop()  # closed under the worker: each send fails at once (ProducerClosed)
        for _ in range(3):  # as the engine's batch listener calls it, once per batch
            worker._metrics.publish(BatchRecord(MNIST_MLP, 1, 1, 1, 0.0, 0.0, 1.0, fast.worker_id))
        await worker._metrics.settle(10)
        assert worker._metrics.pending == 0
        assert worker.ready, "metrics never stop the worker"
    gc.collect()  # asyncio reports an exception never retrieved when its task or future is collected
    assert unpublished() == before + 3
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot publish batch metrics" in m for m in messages) == 1, "logged once, not once per record"
    assert not [m for m in messages if "never retrieved" in m]
