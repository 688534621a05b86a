"""Health, readiness, Prometheus metrics and JSON logs of a running worker."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import time

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer
from prometheus_client import REGISTRY
from worker_support import all_output, read_topic, running_worker, worker_process

from pipeline.client import ResultCollector, example_requests, publish_requests
from pipeline.observability import MASK_CREDENTIALS, WITHHOLD_REQUEST_TEXT, HealthServer, JsonFormatter
from pipeline.services import aws_client


def series(text: str) -> set[str]:
    """The time series of a /metrics page (its sample lines, value left out)."""
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


async def answered(worker) -> None:
    """Wait until `worker` holds no record in flight. An answer can be read from the results topic before the
    broker's acknowledgement reaches the worker, which counts it (maas_requests_total) and lets go of the record
    only then."""
    async with asyncio.timeout(10):
        while worker.in_flight:
            await asyncio.sleep(0.02)


async def eventually(check, timeout: float = 10.0) -> None:
    """Wait until `check()` is true (a sample the commit loop takes every commit interval), or fail."""
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.05)


async def test_health_and_metrics_follow_the_worker(live):
    async with (
        running_worker(live) as worker,
        HealthServer("127.0.0.1", 0, lambda: worker.not_ready) as health,
        aiohttp.ClientSession() as http,
    ):
        base = f"http://127.0.0.1:{health.port}"
        async with http.get(f"{base}/health/live") as response:
            assert response.status == 200
        async with http.get(f"{base}/health/ready") as response:
            assert response.status == 200 and (await response.json())["status"] == "ready"
        requests, truth = example_requests(30, prefix="observed")
        async with ResultCollector(live) as collector:
            await publish_requests(live, requests)
            await collector.wait_for(truth, timeout=30)
        await answered(worker)
        lag = f'maas_consumer_lag{{partition="0",topic="{live.topics.requests}"}} 0.0'
        deadline = time.monotonic() + 10
        while True:  # lag is sampled on the commit loop, after its commit
            async with http.get(f"{base}/metrics") as response:
                text = await response.text()
            if lag in text or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert 'maas_requests_total{model="mnist_mlp",outcome="ok"}' in text
        assert "maas_batch_size_bucket" in text and "maas_queue_wait_seconds_bucket" in text
        assert lag in text
        await worker.stop()
        async with http.get(f"{base}/health/ready") as response:
            assert response.status == 503
            assert await response.json() == {"status": "not ready", "reason": "not running"}
        async with http.get(f"{base}/metrics") as response:
            text = await response.text()
        assert f'topic="{live.topics.requests}"' not in text, "a stopped worker's lag stays in /metrics, never changing"


def test_json_logs_carry_request_id_and_traceparent():
    record = logging.LogRecord("maas", logging.WARNING, __file__, 1, "dead-lettering %s", ("x",), None)
    record.request_id = "r-9"
    record.traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "dead-lettering x" and line["level"] == "WARNING"
    assert line["request_id"] == "r-9" and line["traceparent"].startswith("00-0af7")


async def test_the_health_port_logs_a_malformed_request_without_its_text(caplog):
    """The health port listens on 0.0.0.0 by default: a request aiohttp cannot parse was logged with its bytes, as
    the API's port no longer logs them (an API key's header, say)."""
    logging.getLogger("aiohttp.server").removeFilter(WITHHOLD_REQUEST_TEXT)  # as in a worker, where no API server ran
    async with HealthServer("127.0.0.1", 0, lambda: None) as health:
        reader, writer = await asyncio.open_connection("127.0.0.1", health.port)
        writer.write(b"GET /health/live HTTP/1.1\r\nHost: x\r\nx-api-key: SECRET-KEY\x01\r\n\r\n")
        await writer.drain()
        assert (await reader.read()).split(b"\r\n")[0].endswith(b" 400 Bad Request")
        writer.close()
    assert "SECRET-KEY" not in caplog.text and "malformed HTTP request" in caplog.text, caplog.text


async def test_readiness_says_why_not_without_the_credentials_in_it():
    """A probe or an operator saw a bare "not ready": why (a failure, answers the broker does not take) was in the
    worker's log alone. The reason quotes errors, and an error may quote an endpoint URL with its credentials: they
    are masked, as in the logs, on a port that listens on 0.0.0.0 by default."""
    reason: str | None = 'stopped: cannot reach "http://user:secret@127.0.0.1:4566/"'
    async with HealthServer("127.0.0.1", 0, lambda: reason) as health, aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{health.port}/health/ready") as response:
            assert response.status == 503
            assert await response.json() == {"status": "not ready",
                                             "reason": 'stopped: cannot reach "http://***@127.0.0.1:4566/"'}
        reason = None
        async with http.get(f"http://127.0.0.1:{health.port}/health/ready") as response:
            assert response.status == 200 and await response.json() == {"status": "ready"}


async def test_health_server_failed_start_leaves_nothing_up_and_concurrent_stops_both_return():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        health = HealthServer("127.0.0.1", taken.getsockname()[1], lambda: None)
        with pytest.raises(OSError):
            await health.start()
    assert health._runner is None, "a failed start left the runner set up"
    health = await HealthServer("127.0.0.1", 0, lambda: None).start()
    await asyncio.gather(health.stop(), health.stop())
    assert health._runner is None


async def test_made_up_model_names_do_not_grow_the_scrape(live):
    """Requests for 60 models that do not exist, among them ones whose claim-checked inputs cannot be read (they
    fail before their model is looked up), add no time series per name to /metrics: only the fixed "-" ones."""
    s3 = aws_client(live, "s3")
    s3.put_object(Bucket=live.batch_bucket, Key=f"{live.claim_check_prefix}unreadable.json", Body=b"{not json")
    requests, truth = example_requests(60, prefix="made-up")
    for i, request in enumerate(requests):
        request["model_name"] = f"made-up-{i}"
        if i % 2:
            del request["inputs"]
            request["inputs_uri"] = f"s3://{live.batch_bucket}/{live.claim_check_prefix}unreadable.json"
    async with (
        running_worker(live) as worker,
        HealthServer("127.0.0.1", 0, lambda: None) as health,
        aiohttp.ClientSession() as http,
    ):
        async with ResultCollector(live) as collector:
            await publish_requests(live, requests)
            answers = await collector.wait_for(truth, timeout=30)
        assert len(answers) == 60 and {answer.kind for answer in answers.values()} == {"error"}
        await answered(worker)  # every answer counted, under whatever labels it gets
        async with http.get(f"http://127.0.0.1:{health.port}/metrics") as response:
            text = await response.text()
    assert not [line for line in series(text) if "made-up" in line]
    assert 'maas_requests_total{model="-",outcome="error"}' in series(text)


async def test_consumer_lag_is_reported_for_owned_partitions_only(live):
    """A partition the group moved to another member kept its last maas_consumer_lag sample on this worker's
    /metrics for as long as the process lived: summed over the group it was counted twice (a lag the autoscaler
    scales on), and a backlog sampled once never went away."""

    def lag(worker) -> set[str]:
        return {s.labels["partition"] for m in REGISTRY.collect() for s in m.samples
                if s.name == "maas_consumer_lag" and s.labels["topic"] == live.topics.requests}

    async with running_worker(live, drain_timeout_s=5) as worker:
        await eventually(lambda: lag(worker) == {"0", "1"})  # sampled on the commit loop, once a fetch says the end
        other = AIOKafkaConsumer(**live.kafka_client_kwargs(), group_id=live.consumer_group)
        await other.start()
        try:
            other.subscribe([live.topics.requests])
            for _ in range(150):  # joins the group: one of the two partitions moves to it
                await other.getmany(timeout_ms=200)
                if other.assignment() and len(worker._consumer.assignment()) == 1:
                    break
            owned = {str(tp.partition) for tp in worker._consumer.assignment()}
            assert len(owned) == 1
            await eventually(lambda: lag(worker) == owned)  # the moved partition's sample goes at the next one
        finally:
            await other.stop()


async def test_a_request_id_cannot_write_a_log_line_of_its_own(live):
    """`maas worker` logs a refused reply_to with the request's id: an id holding a line feed wrote a line of the
    caller's making (time, level, logger and text), which log alerts took for the worker's own."""
    proc, assigned, lines = worker_process(live, worker_id="forged-logs")
    try:
        assert await asyncio.to_thread(assigned.wait, 60), "the worker never joined the group"
        requests, _ = example_requests(1, prefix="forged")
        requests[0]["id"] = "forged-1\n2026-01-01 00:00:00,000 ERROR pipeline.kafka_worker: FORGED"
        requests[0]["parameters"] = {"reply_to": "no-such-topic"}
        await publish_requests(live, requests)
        assert len(await read_topic(live, live.topics.results, 1)) == 1  # answered there, as INVALID_REQUEST
        await asyncio.sleep(0.5)
    finally:
        proc.terminate()
        await all_output(proc)  # its lines may be in the pipe still
    (line,) = [line for line in lines if "FORGED" in line]
    assert " WARNING pipeline.sinks: request forged-1\\n2026-01-01 00:00:00,000 ERROR " in line


def test_a_log_call_whose_arguments_do_not_fit_its_format_does_not_raise_in_the_caller(monkeypatch):
    """Logging reports a message it cannot format on stderr and goes on; the credentials filter formatted it outside
    that guard, so a library's faulty log call (`"%d" % "x"`) raised in the code that logged, a worker's task
    included."""
    monkeypatch.setattr(logging, "raiseExceptions", False)  # what handleError prints is not this test's business
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(MASK_CREDENTIALS)
    logger = logging.getLogger("maas.test.unformattable")
    monkeypatch.setattr(logger, "handlers", [handler])
    monkeypatch.setattr(logger, "propagate", False)
    logger.warning("%d records lost", "many")
    logger.warning("cannot reach %s", "http://user:secret@host:4566/")
    assert stream.getvalue() == "cannot reach http://***@host:4566/\n"
