"""`maas batch worker` and `maas batch submit FILE`: batch jobs on object storage (S3 -> SQS -> engine -> S3)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from models.examples import ensure_examples
from pipeline.batch_jobs import SOURCE_ETAG, BatchConfig, BatchJobRunner, BatchJobWatcher, ensure_batch_notifications
from pipeline.batch_metrics import BatchMetricsPublisher
from pipeline.commands._common import port, seconds, stop_event, whole_number
from pipeline.engine import InferenceEngine
from pipeline.observability import HealthServer
from pipeline.services import (
    answer_producer,
    aws_client,
    connected,
    model_cache,
    open_repository,
    read_state,
    stop_producer,
)
from pipeline.settings import ConfigError, Settings

UNCLAIMED_HINT_S = 30.0  # `batch submit`: a job no worker reported on for this long gets a hint on stderr


async def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    config = BatchConfig.from_settings(settings)  # a bad prefix stops here, before any stack or model is touched
    async with connected(settings) as live:
        repository = open_repository(live)  # after connecting: an s3:// repository needs the live endpoint
        if args.examples:
            ensure_examples(repository)
        s3, sqs = aws_client(live, "s3"), aws_client(live, "sqs")
        queue_url = await asyncio.to_thread(ensure_batch_notifications, s3, sqs, config)
        async with InferenceEngine.for_settings(model_cache(settings, repository), live) as engine, \
                contextlib.AsyncExitStack() as stack:
            # Per-batch records to the metrics topic, as `maas worker` publishes them: beside the jobs, never
            # holding one up (a record that cannot be published is counted, maas_batch_metrics_unpublished_total).
            # A stop (SIGTERM) within MAAS_SHUTDOWN_TIMEOUT_S: the job under way gets half of it (then it is
            # cancelled and its message released for another watcher), the metrics and the producer a quarter each.
            producer = answer_producer(live)
            await producer.start()
            stack.push_async_callback(stop_producer, producer, live.shutdown_timeout_s / 4)
            metrics = BatchMetricsPublisher.for_settings(producer, live).attach(engine)
            stack.push_async_callback(metrics.close, live.shutdown_timeout_s / 4)
            runner = BatchJobRunner(engine, s3, config, max_request_bytes=live.max_request_bytes,
                                    worker_id=live.worker_id)
            watcher = await stack.enter_async_context(BatchJobWatcher(runner, sqs, queue_url, wait_s=args.wait,
                                                                      drain_timeout_s=live.shutdown_timeout_s / 2))
            print(f"batch worker watching s3://{config.bucket}/{config.inbox_prefix}*.jsonl via {queue_url}; "
                  f"results to s3://{config.bucket}/{config.outbox_prefix}", flush=True)
            health_port = args.health_port if args.health_port is not None else live.health_port
            if health_port:
                health = await stack.enter_async_context(HealthServer(args.health_host, health_port, lambda: None))
                print(f"health and metrics on http://{args.health_host}:{health.port}/health/ready, /metrics",
                      flush=True)
            stop, done = asyncio.create_task(stop_event().wait()), asyncio.create_task(watcher.wait())
            await asyncio.wait([stop, done], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
        print(f"batch worker stopped after {watcher.jobs_done} jobs", flush=True)
    return 0


def _count_lines(path: Path) -> int:
    count = 0
    with path.open("rb") as f:
        for line in f:
            count += bool(line.strip())
    return count


def _bar(done: int, total: int, rate: float, width: int = 30) -> str:
    frac = min(1.0, done / total) if total else 0.0
    filled = int(frac * width)
    return f"\r[{'#' * filled}{'.' * (width - filled)}] {done:,}/{total:,} lines {frac:6.1%}  {rate:,.0f} lines/s"


def _get_json(s3: Any, bucket: str, key: str) -> tuple[dict[str, Any], dict[str, str]] | None:
    try:
        obj = s3.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
    return orjson.loads(obj["Body"].read()), obj.get("Metadata", {})


def _download_results(s3: Any, bucket: str, key: str, etag: str, out: Path) -> str | None:
    """Write the results to `out` only if they are the results of the upload whose ETag is `etag`; returns the
    source-etag they carry. A run of an older (or newer) upload of the same job may have written them: one GET
    gives metadata and body together, so the check and the bytes cannot come from two different writes."""
    obj = s3.get_object(Bucket=bucket, Key=key)
    body, partial = obj["Body"], out.with_name(f"{out.name}.part")
    try:
        source = obj.get("Metadata", {}).get(SOURCE_ETAG)
        if source != etag:
            return source
        with partial.open("wb") as f:
            for chunk in body.iter_chunks(1 << 20):
                f.write(chunk)
        partial.replace(out)
        return source
    finally:
        body.close()
        partial.unlink(missing_ok=True)  # only there when writing failed


async def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    if settings.embedded_aws:
        state = read_state()
        if state is None:
            raise ConfigError("no S3 to submit to: set AWS_ENDPOINT_URL / AWS credentials, or run `maas up` here")
        settings = settings.with_endpoints(None, state["aws_endpoint_url"])
    path = Path(args.file)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    config = BatchConfig.from_settings(settings)
    job = args.job or path.name.removesuffix(".jsonl")
    key = config.inbox_key(job)
    try:
        config.job_name(key)
    except ValueError as exc:
        raise ConfigError(f"--job {job!r}: {exc}") from None
    # A job may name a folder ("team-a/run-3"); its results land beside FILE as one file.
    out = Path(args.output or path.with_name(f"{job.replace('/', '_')}.results.jsonl"))
    s3 = aws_client(settings, "s3")
    total = await asyncio.to_thread(_count_lines, path)
    print(f"uploading {path} ({path.stat().st_size:,} bytes, {total:,} lines) to s3://{config.bucket}/{key}",
          file=sys.stderr, flush=True)
    transfer = TransferConfig(multipart_threshold=16 << 20, multipart_chunksize=16 << 20, max_concurrency=4)
    await asyncio.to_thread(s3.upload_file, str(path), config.bucket, key, Config=transfer)
    etag = (await asyncio.to_thread(s3.head_object, Bucket=config.bucket, Key=key))["ETag"].strip('"')
    started = time.monotonic()
    summary = None
    seen = hinted = False  # seen: a progress object of this upload, so a worker has the job
    while time.monotonic() - started < args.timeout:
        found = await asyncio.to_thread(_get_json, s3, config.bucket, config.summary_key(job))
        if found is not None and found[1].get(SOURCE_ETAG) == etag:
            summary = found[0]
            break
        progress = await asyncio.to_thread(_get_json, s3, config.bucket, config.progress_key(job))
        if progress is not None and progress[0].get("etag") == etag:
            seen = True
            print(_bar(progress[0]["lines_done"], total, progress[0]["lines_per_s"]), end="", file=sys.stderr,
                  flush=True)
        elif not (seen or hinted) and time.monotonic() - started >= UNCLAIMED_HINT_S:
            hinted = True  # said once, long before --timeout (an hour by default) runs out
            print(f"no worker has reported on the job after {UNCLAIMED_HINT_S:.0f}s: is `maas batch worker` running "
                  f"on s3://{config.bucket}/{config.inbox_prefix}? (still waiting, up to --timeout)", file=sys.stderr,
                  flush=True)
        await asyncio.sleep(args.poll)
    if summary is None:
        print(f"\nno summary within {args.timeout:.0f}s: is `maas batch worker` running?", file=sys.stderr)
        return 1
    print(_bar(summary["lines"], total, summary["throughput_lines_per_s"]), file=sys.stderr, flush=True)
    results = f"s3://{config.bucket}/{config.results_key(job)}"
    source = await asyncio.to_thread(_download_results, s3, config.bucket, config.results_key(job), etag, out)
    if source != etag:
        print(f"{results} holds the results of another upload of job {job!r} (source-etag {source}, not {etag}): "
              "the job file was replaced meanwhile; nothing downloaded", file=sys.stderr)
        return 1
    print(f"results: {out} ({results})")
    print(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    return 0 if summary["lines"] == total else 1


def register(sub: argparse._SubParsersAction) -> None:
    batch = sub.add_parser("batch", help="batch jobs: JSON Lines files of requests on object storage")
    bsub = batch.add_subparsers(dest="batch_command", required=True)
    worker = bsub.add_parser("worker", help="watch the batch bucket's inbox (S3 -> SQS notifications), run jobs")
    worker.add_argument("--examples", action="store_true", help="publish the example models first if missing")
    worker.add_argument("--wait", type=whole_number(0, 20), default=10,
                        help="SQS long-poll seconds, 0..20 (default 10)")
    worker.add_argument("--health-port", type=port, default=None,
                        help="serve /health/live, /health/ready and /metrics on this port (default: MAAS_HEALTH_PORT, "
                             "0 = off)")
    worker.add_argument("--health-host", default="0.0.0.0", help="address for the health server (default 0.0.0.0)")
    worker.set_defaults(run=cmd_worker)
    submit = bsub.add_parser("submit", help="upload a job file, show progress, download the results")
    submit.add_argument("file", help="a .jsonl file: one V2 request (or {id, model_name, data|text}) per line")
    submit.add_argument("--job", help="job name (default: the file name without .jsonl)")
    submit.add_argument("--output", help="where to write the results (default: <job>.results.jsonl beside FILE)")
    submit.add_argument("--timeout", type=seconds, default=3600.0, help="seconds to wait for the job (default 3600)")
    submit.add_argument("--poll", type=seconds, default=0.5, help="seconds between progress checks (default 0.5)")
    submit.set_defaults(run=cmd_submit)
