"""Batch jobs on object storage against the real moto server: S3 -> SQS notification -> watcher -> results."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import replace

import numpy as np
import orjson
import pytest
from prometheus_client import REGISTRY
from worker_support import read_all, slow_repository

from infra.stack import LocalStack
from models.cache import ModelCache
from models.examples import MNIST_MLP, mnist_mlp_config, regressor_config, train_mnist_mlp, train_regressor
from pipeline.batch_jobs import (
    MAX_SUMMARY_BYTES,
    SOURCE_ETAG,
    BatchConfig,
    BatchJobRunner,
    BatchJobWatcher,
    KeyLocks,
    LatencyHistogram,
    MultipartWriter,
    ObjectRef,
    ensure_batch_notifications,
    iter_lines,
    object_refs,
)
from pipeline.client import example_requests
from pipeline.engine import InferenceEngine
from pipeline.metrics import BatchRecord
from pipeline.services import aws_client
from pipeline.settings import ConfigError, Settings
from pipeline.sqs_worker import POLL_GRACE_S


@contextlib.asynccontextmanager
async def watching(settings, repository, config):
    s3, sqs = aws_client(settings, "s3"), aws_client(settings, "sqs")
    queue_url = await asyncio.to_thread(ensure_batch_notifications, s3, sqs, config)
    async with InferenceEngine(ModelCache(repository), worker_id="batch-test") as engine:
        runner = BatchJobRunner(engine, s3, config, max_request_bytes=settings.max_request_bytes, worker_id="bt")
        async with BatchJobWatcher(runner, sqs, queue_url, wait_s=1, visibility_s=30) as watcher:
            yield s3, runner, watcher


async def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


def jsonl(rows: list) -> bytes:
    dump = orjson.OPT_SERIALIZE_NUMPY
    return b"".join((r if isinstance(r, bytes) else orjson.dumps(r, option=dump)) + b"\n" for r in rows)


async def test_job_through_notifications_in_order_with_inline_errors(live, repository):
    config = BatchConfig(bucket=live.batch_bucket, queue=f"{live.batch_bucket}-events", progress_interval_s=0.2)
    requests, truth = example_requests(40, prefix="bj")
    image = requests[0]["inputs"][0]["data"]
    rows = [*requests[:20],
            b"{broken json",
            {"id": "unknown", "model_name": "no_such_model", "data": image},
            b"",  # blank lines are skipped
            {"id": "short-1", "model_name": MNIST_MLP, "data": image},
            {"id": "bad-shape", "model_name": MNIST_MLP,
             "inputs": [{"name": "input", "shape": [1, 28, 28], "datatype": "FP32", "data": image}]},
            {"model_name": MNIST_MLP, "data": image},  # no id: named after its line
            *requests[20:]]
    key = "inbox/team a+b/job 1.jsonl"  # arrives URL-encoded in the event
    counted = [("maas_requests_total", {"model": MNIST_MLP, "outcome": "ok"}),
               ("maas_requests_total", {"model": MNIST_MLP, "outcome": "error"}),
               ("maas_requests_total", {"model": "-", "outcome": "error"}),
               *(("maas_errors_total", {"code": c}) for c in ("INVALID_JSON", "MODEL_NOT_FOUND", "INVALID_INPUT"))]
    before = [REGISTRY.get_sample_value(name, labels) or 0 for name, labels in counted]
    async with watching(live, repository, config) as (s3, _, watcher):
        await asyncio.to_thread(s3.put_object, Bucket=config.bucket, Key=key, Body=jsonl(rows))
        await wait_for(lambda: watcher.completed)
        summary = watcher.completed[0]
    # Its lines count on /metrics as the requests of a topic do: they counted in the batch histograms alone
    assert [(REGISTRY.get_sample_value(name, labels) or 0) - was
            for (name, labels), was in zip(counted, before, strict=True)] == [42, 1, 2, 1, 1, 1]
    assert summary["job"] == "team a+b/job 1"
    assert summary["lines"] == 45 and summary["ok"] == 42 and summary["errors"] == 3
    assert summary["errors_by_code"] == {"INVALID_JSON": 1, "MODEL_NOT_FOUND": 1, "INVALID_INPUT": 1}
    assert summary["model_versions"] == {MNIST_MLP: {"1": 42}}
    assert set(summary["latency_ms"]) == {"p50", "p90", "p99", "max", "mean"} and summary["latency_ms"]["p50"] > 0
    stored = orjson.loads(s3.get_object(Bucket=config.bucket, Key=config.summary_key("team a+b/job 1"))["Body"].read())
    assert stored["lines"] == 45
    body = s3.get_object(Bucket=config.bucket, Key="outbox/team a+b/job 1.results.jsonl")["Body"].read()
    lines = [orjson.loads(line) for line in body.splitlines()]
    assert len(lines) == 45
    ids = [line.get("id") for line in lines]
    assert ids[:20] == [r["id"] for r in requests[:20]] and ids[25:] == [r["id"] for r in requests[20:]]
    assert lines[20] == {"id": None, "error": lines[20]["error"], "line": 21}
    assert lines[20]["error"]["code"] == "INVALID_JSON"
    assert lines[21]["error"]["code"] == "MODEL_NOT_FOUND" and lines[21]["id"] == "unknown"
    assert lines[22]["id"] == "short-1" and "outputs" in lines[22]
    assert lines[23]["error"]["code"] == "INVALID_INPUT" and lines[23]["line"] == 25
    assert lines[24]["id"] == "line-26"
    correct = [int(next(o for o in line["outputs"] if o["name"] == "class")["data"][0]) == truth[line["id"]]
               for line in lines if line.get("id") in truth]
    assert np.mean(correct) > 0.9


async def test_the_watcher_keeps_the_latest_summaries_and_counts_them_all(live, repository, monkeypatch):
    """`completed` kept every job's summary for as long as the worker ran: one more per upload, without end."""
    monkeypatch.setattr(BatchJobWatcher, "MAX_COMPLETED", 2)
    config = BatchConfig(bucket=live.batch_bucket, queue=f"{live.batch_bucket}-events")
    requests, _ = example_requests(1, prefix="keep")
    async with watching(live, repository, config) as (s3, _, watcher):
        for n in range(3):
            await asyncio.to_thread(s3.put_object, Bucket=config.bucket, Key=f"inbox/keep-{n}.jsonl",
                                    Body=jsonl(requests))
        await wait_for(lambda: watcher.jobs_done >= 3, timeout=60)
    assert watcher.jobs_done == 3 and len(watcher.completed) == 2


async def test_multipart_upload_double_event_and_redelivery_give_one_output(live, repository):
    config = BatchConfig(bucket=live.batch_bucket, queue=f"{live.batch_bucket}-events")
    requests, _ = example_requests(950, prefix="mp")
    data = jsonl(requests)
    assert len(data) > 5 * 1024 * 1024 + 1
    key = "inbox/multi.jsonl"
    async with watching(live, repository, config) as (s3, runner, watcher):
        upload = s3.create_multipart_upload(Bucket=config.bucket, Key=key)
        parts = []
        for number, chunk in enumerate((data[:5 * 1024 * 1024], data[5 * 1024 * 1024:]), 1):
            part = s3.upload_part(Bucket=config.bucket, Key=key, PartNumber=number, UploadId=upload["UploadId"],
                                  Body=chunk)
            parts.append({"ETag": part["ETag"], "PartNumber": number})
        s3.complete_multipart_upload(Bucket=config.bucket, Key=key, UploadId=upload["UploadId"],
                                     MultipartUpload={"Parts": parts})
        await wait_for(lambda: len(watcher.completed) >= 2, timeout=60)
        first = s3.head_object(Bucket=config.bucket, Key=config.results_key("multi"))
        again = await runner.run(config.bucket, key)  # a redelivered event
        after = s3.head_object(Bucket=config.bucket, Key=config.results_key("multi"))
    fresh = [s for s in watcher.completed if not s.get("duplicate")]
    assert len(fresh) == 1 and fresh[0]["lines"] == 950 and fresh[0]["ok"] == 950
    assert [s.get("duplicate") for s in watcher.completed] == [None, True]
    assert again["duplicate"] and again["finished_at"] == fresh[0]["finished_at"]
    assert first["ETag"] == after["ETag"] and first["LastModified"] == after["LastModified"]


async def test_multipart_writer_streams_parts(live):
    s3 = aws_client(live, "s3")
    writer = MultipartWriter(s3, live.batch_bucket, "out/big.bin", 5 * 1024 * 1024, {"source-etag": "x"})
    chunk = bytes(range(256)) * 4096  # 1 MiB
    for _ in range(11):
        await writer.write(chunk)
    await writer.close()
    obj = s3.get_object(Bucket=live.batch_bucket, Key="out/big.bin")
    assert obj["ETag"].strip('"').endswith("-3") and obj["Metadata"] == {"source-etag": "x"}
    assert obj["Body"].read() == chunk * 11


async def test_iter_lines_bounds_long_lines():
    stream = io.BytesIO(b"a\n" + b"x" * 100 + b"\nbb\r\n\nlast")
    lines = [line async for line in iter_lines(stream.read, 7, max_line=20)]
    assert lines == [b"a", None, b"bb\r", b"", b"last"]
    # A long line that ends within one chunk is refused too, not only one that spills over the chunk
    stream = io.BytesIO(b"a\n" + b"y" * 30 + b"\nb\n")
    assert [line async for line in iter_lines(stream.read, 1 << 20, max_line=20)] == [b"a", None, b"b"]


async def test_unsafe_job_names_and_other_buckets_are_ignored(live, repository, caplog):
    """A job name with '.', '..' or empty segments would put its outputs outside the outbox for any tool that
    normalizes keys: such a file is left alone, with a warning saying why; so is an object of another bucket."""
    config = BatchConfig(bucket=live.batch_bucket, queue=f"{live.batch_bucket}-events")
    for key in ("inbox/../../escape.jsonl", "inbox/.jsonl", "inbox/a//b.jsonl", "inbox/./a.jsonl", "inbox/a\x01.jsonl"):
        with pytest.raises(ValueError, match="names no usable job"):
            config.job_name(key)
    assert config.job_name("inbox/team a/job+1.jsonl") == "team a/job+1"
    requests, _ = example_requests(2, prefix="unsafe")
    s3 = aws_client(live, "s3")
    async with InferenceEngine(ModelCache(repository), worker_id="batch-test") as engine:
        runner = BatchJobRunner(engine, s3, config, max_request_bytes=live.max_request_bytes, worker_id="bt")
        s3.put_object(Bucket=config.bucket, Key="inbox/../escape.jsonl", Body=jsonl(requests))
        assert await runner.run(config.bucket, "inbox/../escape.jsonl") is None
        assert await runner.run("some-other-bucket", "inbox/fine.jsonl") is None
    listed = s3.list_objects_v2(Bucket=config.bucket).get("Contents", [])
    assert [o["Key"] for o in listed] == ["inbox/../escape.jsonl"]  # no outputs written anywhere
    assert "names no usable job" in caplog.text and "not in the batch bucket" in caplog.text


class _EngineWithABug(InferenceEngine):
    """The real engine, but one request id trips an unexpected exception, as a bug would."""

    async def infer(self, request):
        if request.id == "trips-a-bug":
            raise RuntimeError("a bug reading /srv/maas/kernel-cache/abc.so")
        return await super().infer(request)


async def test_a_bug_on_one_line_becomes_that_lines_internal_error(live, repository, caplog):
    """The line's error names the exception's type; its message, which may quote the server's files, stays in the
    server's log (the results file is the uploader's)."""
    config = BatchConfig(bucket=live.batch_bucket, queue=f"{live.batch_bucket}-events")
    requests, _ = example_requests(3, prefix="bug")
    requests[1] = {**requests[1], "id": "trips-a-bug"}
    s3 = aws_client(live, "s3")
    async with _EngineWithABug(ModelCache(repository), worker_id="batch-test") as engine:
        runner = BatchJobRunner(engine, s3, config, max_request_bytes=live.max_request_bytes, worker_id="bt")
        s3.put_object(Bucket=config.bucket, Key="inbox/bug.jsonl", Body=jsonl(requests))
        summary = await runner.run(config.bucket, "inbox/bug.jsonl")
    assert summary["lines"] == 3 and summary["ok"] == 2 and summary["errors_by_code"] == {"INTERNAL": 1}
    body = s3.get_object(Bucket=config.bucket, Key=config.results_key("bug"))["Body"].read()
    lines = [orjson.loads(line) for line in body.splitlines()]
    assert [line["id"] for line in lines] == [requests[0]["id"], "trips-a-bug", requests[2]["id"]]
    assert lines[1]["error"]["code"] == "INTERNAL" and "RuntimeError" in lines[1]["error"]["message"]
    assert "/srv/maas" not in body.decode() and "a bug reading /srv/maas/kernel-cache/abc.so" in caplog.text


def test_latency_histogram_and_event_parsing():
    hist = LatencyHistogram()
    for ms in range(1, 1001):
        hist.add(float(ms))
    assert hist.percentile(50) == pytest.approx(500, rel=0.06)
    assert hist.percentile(99) == pytest.approx(990, rel=0.06) and hist.max == 1000
    event = {"Records": [{"eventName": "ObjectCreated:Put",
                          "s3": {"bucket": {"name": "b"}, "object": {"key": "inbox/a%2Bb+c.jsonl", "eTag": "e"}}},
                         {"eventName": "ObjectRemoved:Delete",
                          "s3": {"bucket": {"name": "b"}, "object": {"key": "x"}}}]}
    refs = object_refs(event)
    assert [(r.bucket, r.key, r.etag) for r in refs] == [("b", "inbox/a+b c.jsonl", "e")]
    assert object_refs({"Event": "s3:TestEvent"}) == []
    config = BatchConfig(bucket="b")
    assert config.job_name("inbox/x.jsonl") == "x" and config.job_name("outbox/x.jsonl") is None
    assert config.job_name("inbox/x.json") is None


async def test_the_watcher_outlives_an_unreachable_queue_endpoint(live, repository, caplog):
    """A network error (botocore's EndpointConnectionError, not a ClientError) is retried like a throttle: the
    batch worker must not die of an endpoint that is down for a while."""
    import boto3
    from botocore.config import Config

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sqs = boto3.client("sqs", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                       aws_access_key_id="x", aws_secret_access_key="x",
                       config=Config(connect_timeout=0.2, retries={"max_attempts": 1}))
    config = BatchConfig(bucket=live.batch_bucket)
    async with InferenceEngine(ModelCache(repository), worker_id="batch-test") as engine:
        runner = BatchJobRunner(engine, aws_client(live, "s3"), config, max_request_bytes=1 << 20, worker_id="bt")
        async with BatchJobWatcher(runner, sqs, f"http://127.0.0.1:{port}/000000000000/q", wait_s=1) as watcher:
            await wait_for(lambda: caplog.text.count("cannot receive from") >= 2, timeout=20)
            assert not watcher._task.done()


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_credentials_in_an_unreachable_queue_endpoint_never_reach_the_log(live, repository, fmt,
                                                                               restore_logging):
    """botocore's network errors quote the endpoint URL, and the watcher logs them (as the SQS worker does): an
    AWS_ENDPOINT_URL carrying a user and password wrote them into every such line of `maas batch worker`."""
    import boto3
    from botocore.config import Config

    from pipeline.observability import configure_logging

    root = logging.getLogger()
    saved = root.handlers[:]
    configure_logging(True, fmt)  # the handler `maas` commands log through
    (handler,) = root.handlers
    stream = io.StringIO()
    handler.setStream(stream)
    root.handlers[:] = [*saved, handler]
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://admin:hunter2@127.0.0.1:{port}"
    sqs = boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="x",
                       aws_secret_access_key="x", config=Config(connect_timeout=0.2, retries={"max_attempts": 1}))
    config = BatchConfig(bucket=live.batch_bucket)
    async with InferenceEngine(ModelCache(repository), worker_id="batch-test") as engine:
        runner = BatchJobRunner(engine, aws_client(live, "s3"), config, max_request_bytes=1 << 20)
        async with BatchJobWatcher(runner, sqs, f"{endpoint}/000000000000/q", wait_s=1):
            await wait_for(lambda: "Could not connect to the endpoint URL" in stream.getvalue(), timeout=20)
    logged = stream.getvalue()
    assert "hunter2" not in logged, logged
    assert f"http://***@127.0.0.1:{port}" in logged, logged  # the endpoint is still named, without its password


@pytest.mark.parametrize(("inbox", "outbox"), [("inbox/", "inbox/results/"), ("jobs/", "jobs/"), ("out/in/", "out/"),
                                               ("jobs", "jobs-out/"), ("", "outbox/"), ("inbox/", "")])
def test_prefixes_under_which_results_would_start_jobs_are_refused(inbox, outbox):
    """Results written under the inbox (or an inbox under the outbox, or an empty prefix) would each start another
    job, without end: refused when the configuration is built, with a message naming both settings."""
    with pytest.raises(ConfigError, match=r"MAAS_BATCH_INBOX_PREFIX=.* and MAAS_BATCH_OUTBOX_PREFIX="):
        BatchConfig(bucket="b", inbox_prefix=inbox, outbox_prefix=outbox)
    with pytest.raises(ConfigError):
        BatchConfig.from_settings(replace(Settings(), batch_inbox_prefix=inbox, batch_outbox_prefix=outbox))
    assert BatchConfig(bucket="b", inbox_prefix="jobs/in/", outbox_prefix="jobs/out/").outbox_prefix == "jobs/out/"


async def test_a_job_whose_output_keys_would_pass_s3s_1024_bytes_is_ignored(live, repository, caplog):
    """The results key is the inbox key plus a few bytes: a long name would run the whole file and then fail to
    write its results. Refused up front, in UTF-8 bytes (S3's measure), with a warning saying why."""
    config = BatchConfig(bucket=live.batch_bucket)
    assert config.job_name(f"inbox/{'é' * 501}.jsonl") == "é" * 501  # results key: 1,023 bytes
    long_key = f"inbox/{'é' * 502}.jsonl"  # results key: 1,025 bytes (the job file's own key: 1,016)
    with pytest.raises(ValueError, match="over S3's 1,024"):
        config.job_name(long_key)
    requests, _ = example_requests(2, prefix="long")
    s3 = aws_client(live, "s3")
    s3.put_object(Bucket=config.bucket, Key=long_key, Body=jsonl(requests))
    async with InferenceEngine(ModelCache(repository), worker_id="batch-test") as engine:
        runner = BatchJobRunner(engine, s3, config, max_request_bytes=live.max_request_bytes, worker_id="bt")
        assert await runner.run(config.bucket, long_key) is None
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=config.bucket)["Contents"]] == [long_key]
    assert "longest output key would be 1,025 UTF-8 bytes" in caplog.text


async def test_job_locks_last_only_while_held_or_awaited(live, repository):
    """Keys come from uploads: a lock kept per key ever seen grows without bound. A lock goes when its last holder
    or waiter has gone, and not before: a job arriving while another waits must queue behind the same lock."""
    locks, order = KeyLocks(), []
    first_in, release_first = asyncio.Event(), asyncio.Event()

    async def job(name: str, entered: asyncio.Event | None = None, release: asyncio.Event | None = None) -> None:
        async with locks.hold(("b", "k")):
            order.append(f"{name} in")
            if entered is not None:
                entered.set()
            if release is not None:
                await release.wait()
            order.append(f"{name} out")

    first = asyncio.create_task(job("first", first_in, release_first))
    await first_in.wait()
    second = asyncio.create_task(job("second"))
    await asyncio.sleep(0)  # second now waits on the lock
    release_first.set()
    await first
    third = asyncio.create_task(job("third"))  # the entry still exists for second: third queues behind it
    await asyncio.gather(second, third)
    assert order == ["first in", "first out", "second in", "second out", "third in", "third out"]
    assert len(locks) == 0

    config = BatchConfig(bucket=live.batch_bucket)
    requests, _ = example_requests(2, prefix="locks")
    s3 = aws_client(live, "s3")
    for name in ("a", "b"):
        s3.put_object(Bucket=config.bucket, Key=f"inbox/{name}.jsonl", Body=jsonl(requests))
    async with InferenceEngine(ModelCache(repository), worker_id="batch-test") as engine:
        runner = BatchJobRunner(engine, s3, config, max_request_bytes=live.max_request_bytes, worker_id="bt")
        summaries = await asyncio.gather(*(runner.run(config.bucket, f"inbox/{n}.jsonl") for n in "aab"))
        assert sorted(bool(s.get("duplicate")) for s in summaries) == [False, False, True]
        assert len(runner._locks) == 0


async def test_shorthand_lines_follow_a_newly_published_version(live, repository):
    """The shorthand's tensor is shaped from the model's config: it must be the config of the version that runs.
    A config cached for the life of the runner kept shaping lines for the old version after a new one (here
    with another input size) was published."""
    repository.publish("swap", mnist_mlp_config(), train_mnist_mlp(steps=1))
    config = BatchConfig(bucket=live.batch_bucket)
    s3 = aws_client(live, "s3")
    async with InferenceEngine(ModelCache(repository, latest_ttl_s=0.0), worker_id="batch-test") as engine:
        runner = BatchJobRunner(engine, s3, config, max_request_bytes=live.max_request_bytes, worker_id="bt")
        s3.put_object(Bucket=config.bucket, Key="inbox/v1.jsonl", Body=jsonl([
            {"id": "a", "model_name": "swap", "data": [0.1] * 784}]))
        assert (await runner.run(config.bucket, "inbox/v1.jsonl"))["model_versions"] == {"swap": {"1": 1}}
        assert repository.publish("swap", regressor_config(), train_regressor(steps=1)) == 2  # takes 10 values
        s3.put_object(Bucket=config.bucket, Key="inbox/v2.jsonl", Body=jsonl([
            {"id": "b", "model_name": "swap", "data": [0.1] * 10},
            {"id": "c", "model_name": "swap", "model_version": 1, "data": [0.1] * 784}]))
        summary = await runner.run(config.bucket, "inbox/v2.jsonl")
    assert summary["errors_by_code"] == {} and summary["model_versions"] == {"swap": {"2": 1, "1": 1}}


async def test_claim_check_fields_in_a_line_are_refused_by_name(live, repository):
    """Batch lines are not claim checks: `inputs_uri` was answered "input 'input' is missing" and
    `parameters.output_uri` was silently not written. Each is now an INVALID_REQUEST naming the field."""
    config = BatchConfig(bucket=live.batch_bucket)
    requests, _ = example_requests(2, prefix="cc")
    image = requests[0]["inputs"][0]["data"]
    s3 = aws_client(live, "s3")
    s3.put_object(Bucket=config.bucket, Key="cc/in.json", Body=orjson.dumps(
        {"inputs": requests[0]["inputs"]}, option=orjson.OPT_SERIALIZE_NUMPY))
    output_uri = f"s3://{config.bucket}/cc/out.json"
    s3.put_object(Bucket=config.bucket, Key="inbox/cc.jsonl", Body=jsonl([
        {"id": "in-uri", "model_name": MNIST_MLP, "inputs_uri": f"s3://{config.bucket}/cc/in.json"},
        {"id": "in-uri-short", "model_name": MNIST_MLP, "data": image, "inputs_uri": "s3://elsewhere/x.json"},
        {"id": "out-uri", "model_name": MNIST_MLP, "data": image, "parameters": {"output_uri": output_uri}},
        {**requests[1], "parameters": {"output_uri": output_uri}},
        requests[1]]))
    async with InferenceEngine(ModelCache(repository), worker_id="batch-test") as engine:
        runner = BatchJobRunner(engine, s3, config, max_request_bytes=live.max_request_bytes, worker_id="bt")
        summary = await runner.run(config.bucket, "inbox/cc.jsonl")
    assert summary["ok"] == 1 and summary["errors_by_code"] == {"INVALID_REQUEST": 4}
    body = s3.get_object(Bucket=config.bucket, Key=config.results_key("cc"))["Body"].read()
    lines = [orjson.loads(line) for line in body.splitlines()]
    assert [line["id"] for line in lines] == ["in-uri", "in-uri-short", "out-uri", requests[1]["id"], requests[1]["id"]]
    for line in lines[:2]:
        assert line["error"]["message"] == "inputs_uri: not supported in batch files: put the inputs in the line"
    for line in lines[2:4]:
        assert line["error"]["message"] == ("parameters.output_uri: not supported in batch files: results go to the "
                                            "job's results file")
    assert "outputs" in lines[4]


class _CountingEngine(InferenceEngine):
    """The real engine, counting the requests it holds at once."""

    held = peak = 0

    async def infer(self, request):
        self.held += 1
        self.peak = max(self.peak, self.held)
        try:
            return await super().infer(request)
        finally:
            self.held -= 1


@pytest.mark.parametrize("lines_in_budget", [2, 0])
async def test_lines_in_flight_are_bounded_by_bytes_and_a_line_is_always_admitted(live, repository, lines_in_budget):
    """512 lines of up to MAAS_MAX_REQUEST_BYTES each would be far more memory than "bounded" means: the window is
    bounded by the bytes of its lines too. A budget smaller than one line still admits one at a time."""
    requests, _ = example_requests(12, prefix="bytes")
    data = jsonl(requests)
    smallest = min(len(line) for line in data.splitlines())
    config = BatchConfig(bucket=live.batch_bucket, window_bytes=max(1, lines_in_budget * smallest))
    s3 = aws_client(live, "s3")
    s3.put_object(Bucket=config.bucket, Key="inbox/bytes.jsonl", Body=data)
    async with _CountingEngine(ModelCache(repository), worker_id="batch-test") as engine:
        runner = BatchJobRunner(engine, s3, config, max_request_bytes=live.max_request_bytes, worker_id="bt")
        summary = await runner.run(config.bucket, "inbox/bytes.jsonl")
    assert summary["ok"] == 12
    assert 1 <= engine.peak <= max(1, lines_in_budget)


class _GatedEngine(InferenceEngine):
    """The real engine, holding every request until `gate` is set; `entered` is set once one is held."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.entered, self.gate = asyncio.Event(), asyncio.Event()

    async def infer(self, request):
        self.entered.set()
        await self.gate.wait()
        return await super().infer(request)


async def test_a_run_of_a_replaced_upload_does_not_overwrite_the_newer_ones_outputs(live, repository, caplog):
    """The job file is uploaded again while a run of the first upload is still going; the second upload's run
    finishes first. The older run, finishing last, used to overwrite the newer results and summary."""
    config = BatchConfig(bucket=live.batch_bucket)
    requests, _ = example_requests(4, prefix="race")
    newer = [{**r, "id": f"new-{r['id']}"} for r in requests[2:]]
    s3 = aws_client(live, "s3")
    s3.put_object(Bucket=config.bucket, Key="inbox/race.jsonl", Body=jsonl(requests[:2]))
    async with (_GatedEngine(ModelCache(repository), worker_id="slow") as slow,
                InferenceEngine(ModelCache(repository), worker_id="fast") as fast):
        older_run = asyncio.create_task(BatchJobRunner(slow, s3, config, max_request_bytes=live.max_request_bytes,
                                                       worker_id="slow").run(config.bucket, "inbox/race.jsonl"))
        await slow.entered.wait()
        etag = s3.put_object(Bucket=config.bucket, Key="inbox/race.jsonl", Body=jsonl(newer))["ETag"].strip('"')
        runner = BatchJobRunner(fast, s3, config, max_request_bytes=live.max_request_bytes, worker_id="fast")
        assert (await runner.run(config.bucket, "inbox/race.jsonl"))["source"]["etag"] == etag
        slow.gate.set()
        assert await older_run is None
    summary = s3.get_object(Bucket=config.bucket, Key=config.summary_key("race"))
    results = s3.get_object(Bucket=config.bucket, Key=config.results_key("race"))
    assert orjson.loads(summary["Body"].read())["source"]["etag"] == etag
    assert results["Metadata"]["source-etag"] == etag
    assert [orjson.loads(line)["id"] for line in results["Body"].read().splitlines()] == [r["id"] for r in newer]
    assert "was replaced while the job ran" in caplog.text and "its results are dropped" in caplog.text


def _in_queue(sqs, queue_url: str) -> int:
    """Messages in the queue, in flight included."""
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=names)["Attributes"]
    return sum(int(attributes[name]) for name in names)


async def test_jobs_queued_behind_a_long_one_run_once_on_another_watcher(live, repository):
    """A watcher received up to 10 messages but kept only the one it worked on invisible: behind a long job the
    others came back into view, a second watcher ran them, and the first ran them again afterwards. The long
    job is held for 2.5 visibility timeouts while the second watcher polls: its message, extended, stays hidden.
    Not a shorter timeout: the watcher extends it every third, and a loaded machine's moto call can be slow."""
    visibility_s = 4
    config = BatchConfig(bucket=live.batch_bucket, queue=f"{live.batch_bucket}-events")
    s3, sqs = aws_client(live, "s3"), aws_client(live, "sqs")
    queue_url = await asyncio.to_thread(ensure_batch_notifications, s3, sqs, config)
    requests, _ = example_requests(1, prefix="vis")
    for job in ("j1", "j2", "j3"):
        s3.put_object(Bucket=config.bucket, Key=f"inbox/{job}.jsonl", Body=jsonl(requests))
    await wait_for(lambda: _in_queue(sqs, queue_url) >= 3)  # and the s3:TestEvent of the notification set-up
    async with (_GatedEngine(ModelCache(repository), worker_id="slow") as slow,
                InferenceEngine(ModelCache(repository), worker_id="fast") as fast):
        watchers = [BatchJobWatcher(BatchJobRunner(engine, s3, config, max_request_bytes=live.max_request_bytes,
                                                   worker_id=engine.worker_id), sqs, queue_url, wait_s=1,
                                    visibility_s=visibility_s) for engine in (slow, fast)]
        async with watchers[0]:
            await slow.entered.wait()  # the first watcher is in a long job
            held_until = time.monotonic() + 2.5 * visibility_s
            async with watchers[1]:
                await wait_for(lambda: len(watchers[1].completed) == 2)
                await asyncio.sleep(held_until - time.monotonic())  # would the long job's message come back?
            slow.gate.set()
            await wait_for(lambda: watchers[0].completed)
    runs = [(s["job"], s["worker"], bool(s.get("duplicate"))) for w in watchers for s in w.completed]
    assert sorted(job for job, _, duplicate in runs if not duplicate) == ["j1", "j2", "j3"]
    assert len(runs) == 3, runs


async def test_messages_that_are_not_s3_events_are_deleted_with_a_warning(live, repository, caplog):
    """Such a message would only come back, so it is deleted; the warning is the one trace left of it: its id and
    an excerpt that never shows a value (a stray message may carry anything). S3's own test event is no stray."""
    config = BatchConfig(bucket=live.batch_bucket, queue=f"{live.batch_bucket}-events")
    s3, sqs = aws_client(live, "s3"), aws_client(live, "sqs")
    queue_url = await asyncio.to_thread(ensure_batch_notifications, s3, sqs, config)
    sqs.send_message(QueueUrl=queue_url, MessageBody=orjson.dumps({"Event": "s3:TestEvent"}).decode())
    ids = [sqs.send_message(QueueUrl=queue_url, MessageBody=body)["MessageId"]
           for body in ("not an S3 event at all", '{"password": "hunter2"}')]
    async with InferenceEngine(ModelCache(repository), worker_id="batch-test") as engine:
        runner = BatchJobRunner(engine, s3, config, max_request_bytes=live.max_request_bytes, worker_id="bt")
        async with BatchJobWatcher(runner, sqs, queue_url, wait_s=1, visibility_s=30):
            await wait_for(lambda: _in_queue(sqs, queue_url) == 0)
    warnings = [r.getMessage() for r in caplog.records if "is not an S3 event notification" in r.getMessage()]
    assert sorted(warnings) == sorted([
        f"batch queue message {ids[0]} is not an S3 event notification (22 characters: 'not an S3 event at all'); "
        "deleted",
        f"batch queue message {ids[1]} is not an S3 event notification (23 characters: a JSON object with keys "
        "['password']); deleted"])
    assert "hunter2" not in caplog.text


async def test_malformed_records_are_skipped_and_the_records_beside_them_run(live, repository, caplog):
    """A record not shaped as S3 writes one (not an object, an `s3` that is a string, a key that is a number) raised
    AttributeError or TypeError out of object_refs: the watcher ran none of the message's jobs and left the message
    to come back, with a traceback each time, until its DLQ. Such a record is skipped with a warning."""
    config = BatchConfig(bucket=live.batch_bucket, queue=f"{live.batch_bucket}-events")
    s3, sqs = aws_client(live, "s3"), aws_client(live, "sqs")
    requests, _ = example_requests(1, prefix="malformed")
    s3.put_object(Bucket=config.bucket, Key="inbox/good.jsonl", Body=jsonl(requests))  # before the notification
    queue_url = await asyncio.to_thread(ensure_batch_notifications, s3, sqs, config)
    created = "ObjectCreated:Put"
    records = [None, "inbox/x.jsonl", {"eventName": created, "s3": "inbox/x.jsonl"},
               {"eventName": created, "s3": {"bucket": {"name": config.bucket}, "object": {"key": 5, "eTag": 1}}},
               {"eventName": created, "s3": {"bucket": {"name": [config.bucket]}, "object": {"key": "inbox/x.jsonl"}}},
               {"eventName": created, "s3": {"bucket": {"name": config.bucket},
                                             "object": {"key": "inbox/good.jsonl", "eTag": 7}}}]
    assert object_refs({"Records": records}) == [ObjectRef(config.bucket, "inbox/good.jsonl")]
    assert caplog.text.count("names no S3 object") == 5
    caplog.clear()
    async with InferenceEngine(ModelCache(repository), worker_id="batch-test") as engine:
        runner = BatchJobRunner(engine, s3, config, max_request_bytes=live.max_request_bytes, worker_id="bt")
        sqs.send_message(QueueUrl=queue_url, MessageBody=orjson.dumps({"Records": records}).decode())
        async with BatchJobWatcher(runner, sqs, queue_url, wait_s=1, visibility_s=30) as watcher:
            await wait_for(lambda: _in_queue(sqs, queue_url) == 0, timeout=15)
    assert [s["job"] for s in watcher.completed] == ["good"] and "failed" not in caplog.text
    assert caplog.text.count("names no S3 object") == 5


async def test_stop_cancels_a_job_past_the_drain_timeout_and_releases_its_message(live, repository, caplog):
    """stop() used to run the job under way to its end, however long; a pod is killed soon after its SIGTERM."""
    config = BatchConfig(bucket=live.batch_bucket, queue=f"{live.batch_bucket}-events")
    s3, sqs = aws_client(live, "s3"), aws_client(live, "sqs")
    queue_url = await asyncio.to_thread(ensure_batch_notifications, s3, sqs, config)
    requests, _ = example_requests(2, prefix="stop")
    s3.put_object(Bucket=config.bucket, Key="inbox/long.jsonl", Body=jsonl(requests))
    await wait_for(lambda: _in_queue(sqs, queue_url) >= 1)
    async with _GatedEngine(ModelCache(repository), worker_id="slow") as slow:  # the gate never opens
        runner = BatchJobRunner(slow, s3, config, max_request_bytes=live.max_request_bytes, worker_id="slow")
        watcher = BatchJobWatcher(runner, sqs, queue_url, wait_s=1, visibility_s=600, drain_timeout_s=0.5)
        await watcher.start()
        await slow.entered.wait()
        await asyncio.wait_for(watcher.stop(), 30)
    assert watcher.completed == [] and "released for another watcher" in caplog.text
    assert s3.list_multipart_uploads(Bucket=config.bucket).get("Uploads", []) == []  # the upload was aborted
    assert "Contents" not in s3.list_objects_v2(Bucket=config.bucket, Prefix=config.outbox_prefix)
    # visible again at once, not in 600 s: a fresh watcher runs the job
    async with InferenceEngine(ModelCache(repository), worker_id="fast") as fast:
        runner = BatchJobRunner(fast, s3, config, max_request_bytes=live.max_request_bytes, worker_id="fast")
        async with BatchJobWatcher(runner, sqs, queue_url, wait_s=1, visibility_s=30) as again:
            await wait_for(lambda: any(s["job"] == "long" for s in again.completed))


async def test_a_stop_called_while_another_drains_returns_when_that_one_is_done(live, repository):
    """A second stop() found nothing left to stop and returned at once, while the first still let the job run: its
    caller took the watcher for stopped with a job under way. The first's caller giving up leaves the drain going."""
    config = BatchConfig(bucket=live.batch_bucket, queue=f"{live.batch_bucket}-events")
    s3, sqs = aws_client(live, "s3"), aws_client(live, "sqs")
    queue_url = await asyncio.to_thread(ensure_batch_notifications, s3, sqs, config)
    requests, _ = example_requests(1, prefix="twice")
    s3.put_object(Bucket=config.bucket, Key="inbox/twice.jsonl", Body=jsonl(requests))
    async with _GatedEngine(ModelCache(repository), worker_id="slow") as slow:
        runner = BatchJobRunner(slow, s3, config, max_request_bytes=live.max_request_bytes, worker_id="slow")
        watcher = BatchJobWatcher(runner, sqs, queue_url, wait_s=1, visibility_s=30, drain_timeout_s=30)
        await watcher.start()
        await asyncio.wait_for(slow.entered.wait(), 30)
        first = asyncio.create_task(watcher.stop())
        await asyncio.sleep(0)  # the first stop() is draining the job
        second = asyncio.create_task(watcher.stop())
        await asyncio.sleep(0.5)
        assert not second.done(), "the second stop() returned while the job was still running"
        first.cancel()  # its caller gives up waiting
        await asyncio.sleep(0.2)
        assert not second.done(), "the drain ended with the first stop()'s caller"
        slow.gate.set()
        await asyncio.wait_for(second, 30)
        assert [s["job"] for s in watcher.completed] == ["twice"]  # the drain ran the job to its end first


async def test_stop_releases_what_the_poll_under_way_receives(live, repository):
    """stop() past its drain timeout cancelled a watcher that was long-polling: the poll (a boto3 call cannot be
    told to end) went on in its thread and received a message no one handled, which stayed invisible for
    visibility_s and came back one receive closer to the DLQ. stop() waits for the poll, at most wait_s, and
    releases what it received."""
    config = BatchConfig(bucket=live.batch_bucket, queue=f"{live.batch_bucket}-events")
    s3, sqs = aws_client(live, "s3"), aws_client(live, "sqs")
    queue_url = await asyncio.to_thread(ensure_batch_notifications, s3, sqs, config)
    body = orjson.dumps({"Event": "s3:TestEvent"}).decode()
    async with InferenceEngine(ModelCache(repository), worker_id="batch-test") as engine:
        runner = BatchJobRunner(engine, s3, config, max_request_bytes=live.max_request_bytes, worker_id="bt")
        watcher = BatchJobWatcher(runner, sqs, queue_url, wait_s=5, visibility_s=600, drain_timeout_s=0.1)
        await watcher.start()
        await asyncio.sleep(0.5)  # its first poll waits on the empty queue
        stopping = asyncio.create_task(watcher.stop())
        await asyncio.sleep(0.5)  # past the drain timeout: the watcher is cancelled, its poll goes on
        await asyncio.to_thread(sqs.send_message, QueueUrl=queue_url, MessageBody=body)
        await asyncio.sleep(0.5)  # the poll receives it
        await asyncio.wait_for(stopping, 30)
    received = sqs.receive_message(QueueUrl=queue_url, WaitTimeSeconds=1,
                                   AttributeNames=["ApproximateReceiveCount"]).get("Messages", [])
    assert [m["Body"] for m in received] == [body], "visible again at once, not in 600 s"
    assert received[0]["Attributes"]["ApproximateReceiveCount"] == "2"  # the poll under way received it first


async def test_stop_abandons_a_poll_that_its_endpoint_does_not_answer(repository, tmp_path, caplog):
    """stop() waited for the poll under way (a boto3 call cannot be told to end): an SQS endpoint that does not
    answer (paused: connections are accepted, nothing is read) held it for the call's read timeout, three times over
    (90 s and more). It now waits for the poll up to `POLL_GRACE_S` past its `wait_s`, then abandons it."""
    private = LocalStack(tmp_path / "stack").start(kafka=False)
    try:
        settings = replace(Settings(), aws_endpoint_url=private.endpoint_url, batch_bucket="hung-batch")
        config = BatchConfig(bucket=settings.batch_bucket, queue=f"{settings.batch_bucket}-events")
        s3, sqs = aws_client(settings, "s3"), aws_client(settings, "sqs")
        queue_url = await asyncio.to_thread(ensure_batch_notifications, s3, sqs, config)
        try:
            async with InferenceEngine(ModelCache(repository), worker_id="batch-hung") as engine:
                runner = BatchJobRunner(engine, s3, config, max_request_bytes=settings.max_request_bytes,
                                        worker_id="hung")
                watcher = BatchJobWatcher(runner, sqs, queue_url, wait_s=1, drain_timeout_s=0.5)
                await watcher.start()
                await asyncio.sleep(0.5)  # polling, 1 s at a time, without a pause
                private._moto.send_signal(signal.SIGSTOP)
                await asyncio.sleep(0.5)  # the poll under way, or the one after it, waits for the server now
                started = time.monotonic()
                await asyncio.wait_for(watcher.stop(), 60)  # hang guard
                took = time.monotonic() - started
        finally:
            private._moto.send_signal(signal.SIGCONT)  # a paused server ends on SIGTERM only once resumed
    finally:
        private.stop()
    assert took < watcher.wait_s + POLL_GRACE_S + 0.5, f"stop() took {took:.1f} s"
    assert any("did not end within" in r.getMessage() for r in caplog.records)


def _batch_worker_process(settings, *args: str) -> tuple[subprocess.Popen, list[str]]:
    """`maas -v batch worker --wait 1 [args]` on `settings`, and the list its output lines are added to."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "MAAS_", "AWS_"))}
    env.update(settings.to_env(), MAAS_WORKER_ID=settings.worker_id,
               MAAS_BATCH_QUEUE=f"{settings.batch_bucket}-events", AWS_ACCESS_KEY_ID="maas-local",
               AWS_SECRET_ACCESS_KEY="maas-local", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "-v", "batch", "worker", "--wait", "1", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    proc.watcher = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    proc.watcher.start()
    return proc, output


def test_maas_batch_worker_stops_within_its_shutdown_timeout(live, tmp_path):
    """`maas batch worker` let the job under way run for up to 20 s after SIGTERM whatever MAAS_SHUTDOWN_TIMEOUT_S
    said (20 s by default: its metrics and producer then took up to 10 s more, past a pod's grace period). The job
    now gets half of the timeout, then it is cancelled and its message released for another watcher."""
    slow = slow_repository(tmp_path / "slow", max_queue_delay_ms=10_000)  # a 1-line job waits 10 s for its batch
    settings = replace(live, model_repository=str(slow.root), shutdown_timeout_s=4)
    proc, output = _batch_worker_process(settings)
    try:
        config = BatchConfig.from_settings(settings, queue=f"{settings.batch_bucket}-events")
        deadline = time.monotonic() + 60
        while not any("batch worker watching" in line for line in output):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(output)
            time.sleep(0.1)
        requests, _ = example_requests(1, prefix="long")
        aws_client(settings, "s3").put_object(Bucket=config.bucket, Key=config.inbox_key("long"), Body=jsonl(requests))
        while not any("job long: s3://" in line for line in output):  # under way, waiting for its batch
            assert proc.poll() is None and time.monotonic() < deadline, "".join(output)
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        proc.watcher.join(30)
    assert proc.returncode == 0, "".join(output)
    assert any("released for another watcher" in line for line in output), "".join(output)
    assert any("batch worker stopped after 0 jobs" in line for line in output), "".join(output)


def test_maas_batch_worker_publishes_batch_metrics_and_serves_health_and_metrics(live):
    """`maas batch worker` published no per-batch record to the metrics topic and had no health or /metrics port,
    unlike `maas worker`: both now, with the same settings (MAAS_HEALTH_PORT / --health-port)."""
    with socket.socket() as probe:  # a free port (0 turns the server off, as for `maas worker`)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc, output = _batch_worker_process(live, "--health-port", str(port), "--health-host", "127.0.0.1")
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health/ready", timeout=5) as response:
                    assert response.status == 200 and orjson.loads(response.read()) == {"status": "ready"}
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "no health server: " + "".join(output)
                time.sleep(0.2)
        config = BatchConfig.from_settings(live, queue=f"{live.batch_bucket}-events")
        requests, _ = example_requests(20, prefix="bm")
        s3 = aws_client(live, "s3")
        s3.put_object(Bucket=config.bucket, Key=config.inbox_key("metrics"), Body=jsonl(requests))
        deadline = time.monotonic() + 60
        while True:
            try:
                summary = orjson.loads(s3.get_object(Bucket=config.bucket, Key=config.summary_key("metrics"))
                                       ["Body"].read())
                break
            except s3.exceptions.NoSuchKey:
                assert time.monotonic() < deadline, "no summary: " + "".join(output)
                time.sleep(0.2)
        assert summary["lines"] == 20 and summary["ok"] == 20
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
            page = response.read().decode()
        assert f'maas_batch_size_count{{model="{MNIST_MLP}:1"}}' in page
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert proc.returncode == 0, "".join(output)
    records = [orjson.loads(r.value) for r in asyncio.run(read_all(live, live.topics.metrics))]  # it exited
    assert records, "no batch record on the metrics topic"
    for record in records:
        assert set(BatchRecord.__dataclass_fields__) <= record.keys()
        assert record["model"] == MNIST_MLP and record["version"] == 1 and record["worker"] == live.worker_id
        assert record["batch_size"] >= record["requests"] >= 1 and record["compute_ms"] >= 0
    assert sum(record["requests"] for record in records) == 20


class _ReplacedAfterHead(BatchJobRunner):
    """The real runner; the job file is replaced (`body`) or deleted (None) just after the run's first HEAD."""

    def __init__(self, *args, then: bytes | None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.then, self.heads = then, 0

    async def _head(self, bucket, key):
        head = await super()._head(bucket, key)
        self.heads += 1
        if self.heads == 1:
            if self.then is None:
                await asyncio.to_thread(self.s3.delete_object, Bucket=bucket, Key=key)
            else:
                await asyncio.to_thread(self.s3.put_object, Bucket=bucket, Key=key, Body=self.then)
        return head


@pytest.mark.parametrize("replaced", [True, False])
async def test_a_job_file_replaced_or_deleted_between_its_head_and_its_read_is_not_a_failure(live, repository, caplog,
                                                                                           replaced):
    """The run reads the upload its HEAD saw (GET If-Match its ETag). One replaced in between made that GET fail
    with PreconditionFailed (one deleted, NoSuchKey), raised as the job's failure: a traceback, and the message or
    the S3 invocation retried. As when it is replaced while the job runs, the new upload's own event runs it; as
    when it is gone before the HEAD, there is nothing to do."""
    caplog.set_level(logging.INFO, logger="pipeline.batch_jobs")
    config = BatchConfig(bucket=live.batch_bucket)
    requests, _ = example_requests(2, prefix="swapped")
    s3 = aws_client(live, "s3")
    s3.put_object(Bucket=config.bucket, Key="inbox/swapped.jsonl", Body=jsonl(requests[:1]))
    async with InferenceEngine(ModelCache(repository), worker_id="batch-test") as engine:
        runner = _ReplacedAfterHead(engine, s3, config, max_request_bytes=live.max_request_bytes, worker_id="bt",
                                    then=jsonl(requests[1:]) if replaced else None)
        assert await runner.run(config.bucket, "inbox/swapped.jsonl") is None
        assert "Contents" not in s3.list_objects_v2(Bucket=config.bucket, Prefix=config.outbox_prefix)
        assert ("was replaced before the job read it" if replaced else "is gone; nothing to do") in caplog.text
        if replaced:  # the new upload's event
            summary = await runner.run(config.bucket, "inbox/swapped.jsonl")
            assert summary["lines"] == 1 and summary["ok"] == 1
            body = s3.get_object(Bucket=config.bucket, Key=config.results_key("swapped"))["Body"].read()
            assert [orjson.loads(line)["id"] for line in body.splitlines()] == [requests[1]["id"]]


@pytest.mark.parametrize(("planted", "why"), [
    (orjson.dumps({"job": "big", "status": "completed", "pad": "x" * MAX_SUMMARY_BYTES}),
     "is over the 1048576 bytes a summary may have"),
    (b'{"job": "torn", "lines": 3', "is not a JSON object"),
    (b"[1, 2, 3]", "is not a JSON object"),
])
async def test_a_summary_this_code_did_not_write_is_not_taken_for_the_jobs(live, repository, caplog, planted, why):
    """The duplicate check read the summary of this upload's etag whole and unchecked: one over MAX_SUMMARY_BYTES
    was read whatever its size, one that is not JSON raised JSONDecodeError, one that is not an object TypeError,
    out of every run of the job, so it never ran and its message went to the DLQ. None is a summary this code
    wrote: the job runs and writes its own, which a duplicate event then finds."""
    config = BatchConfig(bucket=live.batch_bucket)
    requests, _ = example_requests(2, prefix="planted")
    s3 = aws_client(live, "s3")
    etag = s3.put_object(Bucket=config.bucket, Key="inbox/planted.jsonl", Body=jsonl(requests))["ETag"].strip('"')
    s3.put_object(Bucket=config.bucket, Key=config.summary_key("planted"), Body=planted,
                  Metadata={SOURCE_ETAG: etag})
    async with InferenceEngine(ModelCache(repository), worker_id="batch-test") as engine:
        runner = BatchJobRunner(engine, s3, config, max_request_bytes=live.max_request_bytes, worker_id="bt")
        summary = await runner.run(config.bucket, "inbox/planted.jsonl")
        assert not summary.get("duplicate") and summary["lines"] == 2 and summary["ok"] == 2
        assert why in caplog.text
        again = await runner.run(config.bucket, "inbox/planted.jsonl")  # its own summary is one
    assert again["duplicate"] and again["finished_at"] == summary["finished_at"]
