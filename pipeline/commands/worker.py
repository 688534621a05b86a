"""`maas worker`: consume requests from Kafka and answer them until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from infra.bootstrap import ensure_queue
from models.examples import ensure_examples
from pipeline.batch_metrics import BatchMetricsPublisher
from pipeline.commands._common import port, stop_event
from pipeline.engine import InferenceEngine
from pipeline.kafka_worker import KafkaWorker
from pipeline.observability import HealthServer
from pipeline.services import (
    answer_producer,
    aws_client,
    claim_check_store,
    connected,
    model_cache,
    open_repository,
    record_limits,
    stop_producer,
)
from pipeline.settings import ConfigError, Settings
from pipeline.sinks import KafkaSink, ResultSink, SqsSink
from pipeline.sqs_worker import SqsWorker


async def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    async with connected(settings) as live:
        repository = open_repository(live)  # after connecting: an s3:// repository needs the live endpoint
        if args.examples:
            ensure_examples(repository)
        async with InferenceEngine.for_settings(model_cache(settings, repository), live) as engine, \
                contextlib.AsyncExitStack() as stack:
            if args.source == "sqs":
                worker = await _sqs_worker(live, engine, stack)
            else:
                worker = await stack.enter_async_context(KafkaWorker(live, engine))
                print(f"worker {live.worker_id} consuming {live.topics.requests} on {live.kafka_bootstrap_servers} "
                      f"(group {live.consumer_group}); models from {repository.root}", flush=True)
            port = args.health_port if args.health_port is not None else live.health_port
            if port:
                not_ready = (lambda: worker.not_ready) if isinstance(worker, KafkaWorker) else (lambda: None)
                health = await stack.enter_async_context(HealthServer(args.health_host, port, not_ready))
                print(f"health and metrics on http://{args.health_host}:{health.port}/health/ready, /metrics",
                      flush=True)
            failure = await _run_until_signalled(worker)
        print(f"worker stopped after answering {worker.answered} requests", flush=True)
        if failure is not None:
            raise ConfigError(f"worker stopped: {failure}")
    return 0


async def _run_until_signalled(worker: KafkaWorker | SqsWorker) -> str | None:
    """Serve until SIGINT/SIGTERM (then drain gracefully) or until the worker fails; returns what failed."""
    stop = asyncio.create_task(stop_event().wait())
    waiters = [stop]
    if isinstance(worker, KafkaWorker):
        waiters.append(asyncio.create_task(worker.wait()))
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for waiter in waiters:
        waiter.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    await worker.stop()
    return worker.failure if isinstance(worker, KafkaWorker) else None


async def _sqs_worker(live: Settings, engine: InferenceEngine, stack: contextlib.AsyncExitStack) -> SqsWorker:
    sqs = aws_client(live, "sqs")
    queue_url = await asyncio.to_thread(ensure_queue, sqs, live.sqs_requests_queue, f"{live.sqs_requests_queue}-dlq")
    store = claim_check_store(live)
    metrics: BatchMetricsPublisher | None = None  # SQS only: Prometheus only (no metrics topic without Kafka)
    if live.sqs_results_queue_url:
        sink: ResultSink = await SqsSink.for_queues(sqs, live.sqs_results_queue_url, live.sqs_dlq_url, store=store)
        where = live.sqs_results_queue_url
    else:
        producer = answer_producer(live)
        await producer.start()
        # Closed after the worker stops, each within half of MAAS_SHUTDOWN_TIMEOUT_S: what the producer could not
        # deliver by then is abandoned, its messages left undeleted (redelivered).
        stack.push_async_callback(stop_producer, producer, live.shutdown_timeout_s / 2)
        sink = KafkaSink.for_settings(producer, live, store, await record_limits(producer, live))
        stack.push_async_callback(sink.stop)  # after the worker stops, before the producer does
        metrics = BatchMetricsPublisher.for_settings(producer, live)
        where = f"Kafka topic {live.topics.results}"
    worker = await stack.enter_async_context(SqsWorker(live, engine, sqs, queue_url, sink, store=store,
                                                       drain_timeout_s=live.shutdown_timeout_s / 2, metrics=metrics))
    print(f"worker {live.worker_id} receiving from SQS {queue_url}; answers to {where}", flush=True)
    return worker


def register(sub: argparse._SubParsersAction) -> None:
    worker = sub.add_parser("worker", help="consume requests from Kafka and answer them")
    worker.add_argument("--source", choices=("kafka", "sqs"), default="kafka",
                        help="where requests come from: the Kafka requests topic (default) or the SQS queue "
                             "MAAS_SQS_REQUESTS_QUEUE (answers to Kafka, or to MAAS_SQS_RESULTS_QUEUE_URL)")
    worker.add_argument("--examples", action="store_true", help="publish the example models first if missing")
    worker.add_argument("--health-port", type=port, default=None,
                        help="serve /health/live, /health/ready and /metrics on this port (default: MAAS_HEALTH_PORT, "
                             "0 = off)")
    worker.add_argument("--health-host", default="0.0.0.0", help="address for the health server (default 0.0.0.0)")
    worker.set_defaults(run=cmd_worker)
