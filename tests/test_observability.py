"""Health, readiness, Prometheus metrics and JSON logs of a running worker."""

from __future__ import annotations

import asyncio
import json
import logging
import socket

import aiohttp
import pytest
from worker_support import running_worker

from pipeline.client import ResultCollector, example_requests, publish_requests
from pipeline.observability import HealthServer, JsonFormatter


async def test_health_and_metrics_follow_the_worker(live):
    async with (
        running_worker(live) as worker,
        HealthServer("127.0.0.1", 0, lambda: worker.ready) as health,
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
        await asyncio.sleep(live.commit_interval_ms / 1000 * 2)  # lag is sampled on the commit loop
        async with http.get(f"{base}/metrics") as response:
            text = await response.text()
        assert 'maas_requests_total{model="mnist_mlp",outcome="ok"}' in text
        assert "maas_batch_size_bucket" in text and "maas_queue_wait_seconds_bucket" in text
        assert f'maas_consumer_lag{{partition="0",topic="{live.topics.requests}"}} 0.0' in text
        await worker.stop()
        async with http.get(f"{base}/health/ready") as response:
            assert response.status == 503


def test_json_logs_carry_request_id_and_traceparent():
    record = logging.LogRecord("maas", logging.WARNING, __file__, 1, "dead-lettering %s", ("x",), None)
    record.request_id = "r-9"
    record.traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "dead-lettering x" and line["level"] == "WARNING"
    assert line["request_id"] == "r-9" and line["traceparent"].startswith("00-0af7")


async def test_health_server_failed_start_leaves_nothing_up_and_concurrent_stops_both_return():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        health = HealthServer("127.0.0.1", taken.getsockname()[1], lambda: True)
        with pytest.raises(OSError):
            await health.start()
    assert health._runner is None, "a failed start left the runner set up"
    health = await HealthServer("127.0.0.1", 0, lambda: True).start()
    await asyncio.gather(health.stop(), health.stop())
    assert health._runner is None
