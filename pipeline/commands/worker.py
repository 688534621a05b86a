"""`maas worker`: consume requests from Kafka and answer them until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from models.cache import ModelCache
from models.examples import ensure_examples
from pipeline.commands._common import open_repository, stop_event
from pipeline.engine import InferenceEngine
from pipeline.kafka_worker import KafkaWorker
from pipeline.observability import HealthServer
from pipeline.services import connected
from pipeline.settings import ConfigError, Settings


async def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    async with connected(settings) as live:
        repository = open_repository(live)  # after connecting: an s3:// repository needs the live endpoint
        if args.examples:
            ensure_examples(repository)
        cache = ModelCache(repository)
        async with InferenceEngine(cache, worker_id=live.worker_id) as engine:
            worker = KafkaWorker(live, engine)
            await worker.start()
            print(f"worker {live.worker_id} consuming {live.topics.requests} on {live.kafka_bootstrap_servers} "
                  f"(group {live.consumer_group}); models from {repository.root}", flush=True)
            async with contextlib.AsyncExitStack() as extras:
                port = args.health_port if args.health_port is not None else live.health_port
                if port:
                    health = await extras.enter_async_context(HealthServer(args.health_host, port,
                                                                           lambda: worker.ready))
                    print(f"health and metrics on http://{args.health_host}:{health.port}/health/ready, /metrics",
                          flush=True)
                stop = stop_event()
                stopped = asyncio.create_task(worker.wait())
                signalled = asyncio.create_task(stop.wait())
                await asyncio.wait([stopped, signalled], return_when=asyncio.FIRST_COMPLETED)
                signalled.cancel()
                await worker.stop()
            print(f"worker stopped after answering {worker.answered} requests", flush=True)
            if stopped.done() and stopped.exception() is not None:
                raise ConfigError(f"worker stopped: cannot produce to Kafka ({stopped.exception()!r})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    worker = sub.add_parser("worker", help="consume requests from Kafka and answer them")
    worker.add_argument("--examples", action="store_true", help="publish the example models first if missing")
    worker.add_argument("--health-port", type=int, default=None,
                        help="serve /health/live, /health/ready and /metrics on this port (default: MAAS_HEALTH_PORT, "
                             "0 = off)")
    worker.add_argument("--health-host", default="0.0.0.0", help="address for the health server (default 0.0.0.0)")
    worker.set_defaults(run=cmd_worker)
