"""The `maas` command line. `maas --help` and `maas COMMAND --help` describe each command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from models.artifact import ArtifactError
from models.cache import ModelCache
from models.examples import MNIST_MLP, ensure_examples
from models.repository import ModelNotFoundError, ModelRepository
from pipeline.client import Answer, ResultCollector, example_requests, publish_requests
from pipeline.engine import InferenceEngine
from pipeline.kafka_worker import KafkaWorker
from pipeline.services import STATE_FILE, bootstrap, connected, read_state, write_state
from pipeline.settings import ConfigError, Settings

log = logging.getLogger("maas")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING if verbose else logging.CRITICAL)


def _stop_event() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM, so long-running commands shut down gracefully."""
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, event.set)
    return event


def _repository(settings: Settings) -> ModelRepository:
    if settings.model_repository.startswith("s3://"):
        raise ConfigError("MAAS_MODEL_REPOSITORY: s3:// repositories are not supported yet; use a local folder")
    return ModelRepository(settings.model_repository)


# -- maas up -----------------------------------------------------------------------------------------

async def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    repository = _repository(settings)
    for name, version in ensure_examples(repository):
        print(f"published example model {name} v{version} to {repository.root}")
    async with connected(settings, use_state=False) as live:
        stop = _stop_event()
        write_state(live)
        print("local stack is up (Ctrl-C to stop)")
        print(f"export KAFKA_BOOTSTRAP_SERVERS={live.kafka_bootstrap_servers}")
        print(f"export AWS_ENDPOINT_URL={live.aws_endpoint_url}")
        print(f"topics: {', '.join(live.topics.all())}; batch bucket: {live.batch_bucket}; "
              f"model repository: {repository.root}", flush=True)
        try:
            await stop.wait()
        finally:
            with contextlib.suppress(FileNotFoundError):
                STATE_FILE.unlink()
    print("local stack stopped")
    return 0


# -- maas worker -------------------------------------------------------------------------------------

async def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    repository = _repository(settings)
    if args.examples:
        ensure_examples(repository)
    async with connected(settings) as live:
        cache = ModelCache(repository)
        async with InferenceEngine(cache, worker_id=live.worker_id) as engine:
            worker = KafkaWorker(live, engine)
            await worker.start()
            print(f"worker {live.worker_id} consuming {live.topics.requests} on {live.kafka_bootstrap_servers} "
                  f"(group {live.consumer_group}); models from {repository.root}", flush=True)
            stop = _stop_event()
            stopped = asyncio.create_task(worker.wait())
            signalled = asyncio.create_task(stop.wait())
            await asyncio.wait([stopped, signalled], return_when=asyncio.FIRST_COMPLETED)
            signalled.cancel()
            await worker.stop()
            print(f"worker stopped after answering {worker.answered} requests", flush=True)
            if stopped.done() and stopped.exception() is not None:
                raise ConfigError(f"worker stopped: cannot produce to Kafka ({stopped.exception()!r})")
    return 0


# -- maas submit -------------------------------------------------------------------------------------

def _load_requests(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    try:
        if path.suffix == ".jsonl":
            requests = [orjson.loads(line) for line in text.splitlines() if line.strip()]
        else:
            body = orjson.loads(text)
            requests = body if isinstance(body, list) else [body]
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON / JSON Lines ({exc})") from None
    if not all(isinstance(r, dict) and isinstance(r.get("id"), str) for r in requests):
        raise ConfigError(f"{path}: every request must be a JSON object with a string id")
    return requests


def _summary(answer: Answer) -> str:
    if answer.kind == "result":
        outputs = {o["name"]: o["data"] for o in answer.body.get("outputs", [])}
        shown = {k: (v if len(v) <= 4 else [*v[:4], "..."]) for k, v in outputs.items()}
        return f"result v{answer.body.get('model_version')} {json.dumps(shown)}"
    error = answer.body.get("error", {})
    return f"{answer.kind} {error.get('code')}: {error.get('message')}"


async def _submit(settings: Settings, requests: list[dict[str, Any]], timeout: float
                  ) -> tuple[dict[str, Answer], float]:
    async with ResultCollector(settings) as collector:
        started = time.perf_counter()
        await publish_requests(settings, requests)
        answers = await collector.wait_for([r["id"] for r in requests], timeout)
        return answers, time.perf_counter() - started


async def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    if settings.embedded_kafka:
        state = read_state()
        if state is None:
            raise ConfigError("no broker to submit to: set KAFKA_BOOTSTRAP_SERVERS, or run `maas up` in this folder")
        settings = settings.with_endpoints(state["kafka_bootstrap_servers"], state["aws_endpoint_url"])
    if args.file:
        requests = _load_requests(Path(args.file))
    else:
        requests, _ = example_requests(args.count, args.model, prefix=f"submit-{int(time.time())}")
    answers, elapsed = await _submit(settings, requests, args.timeout)
    for request in requests:
        answer = answers.get(request["id"])
        print(f"{request['id']}: {_summary(answer) if answer else 'no answer within the timeout'}")
    print(f"{len(answers)}/{len(requests)} answered in {elapsed:.2f}s ({len(answers) / elapsed:.0f} requests/s)")
    return 0 if len(answers) == len(requests) else 1


# -- maas demo ---------------------------------------------------------------------------------------

async def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    started = time.perf_counter()
    repository = _repository(settings)
    for name, version in ensure_examples(repository):
        print(f"published example model {name} v{version} to {repository.root} (trained on synthetic digits)")
    async with connected(settings, use_state=False) as live:
        print(f"stack: Kafka {live.kafka_bootstrap_servers}, S3/SQS {live.aws_endpoint_url}")
        async with InferenceEngine(ModelCache(repository), worker_id=live.worker_id) as engine:
            worker = KafkaWorker(live, engine)
            async with worker:
                await asyncio.wait_for(worker.assigned.wait(), 30)
                requests, truth = example_requests(args.requests, MNIST_MLP, prefix="demo")
                print(f"publishing {len(requests)} requests for {MNIST_MLP} to {live.topics.requests} ...")
                answers, elapsed = await _submit(live, requests, args.timeout)
        print(f"{'request id':<14} {'class':>5} {'true':>5}  p(class)")
        correct = 0
        for request in requests:
            answer = answers.get(request["id"])
            if answer is None or answer.kind != "result":
                continue
            predicted = int(answer.output("class")[0])
            correct += predicted == truth[request["id"]]
        for request in requests[: args.show]:
            answer = answers.get(request["id"])
            if answer is None or answer.kind != "result":
                print(f"{request['id']:<14} {_summary(answer) if answer else 'no answer'}")
                continue
            predicted = int(answer.output("class")[0])
            p = float(answer.output("probabilities")[0][predicted])
            print(f"{request['id']:<14} {predicted:>5} {truth[request['id']]:>5}  {p:.3f}")
        results = sum(a.kind == "result" for a in answers.values())
        print(f"answered {len(answers)}/{len(requests)} ({results} results); accuracy {correct / len(requests):.1%}")
        print(f"throughput: {len(answers) / elapsed:.0f} requests/s end to end over Kafka "
              f"({elapsed:.2f}s for {len(requests)} requests)")
    print(f"demo finished in {time.perf_counter() - started:.1f}s; stack stopped")
    return 0 if len(answers) == len(requests) else 1


# -- maas models -------------------------------------------------------------------------------------

async def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    repository = _repository(settings)
    if args.models_command == "examples":
        published = ensure_examples(repository)
        for name, version in published:
            print(f"published {name} v{version}")
        if not published:
            print(f"examples already present in {repository.root}")
    elif args.models_command == "list":
        for name in repository.names():
            versions = repository.versions(name)
            print(f"{name}\tversions {versions}\tlatest {versions[-1]}")
    elif args.models_command == "describe":
        version = repository.resolve(args.name, args.version)
        config = repository.config(args.name, version)
        print(json.dumps({"name": args.name, "version": version, "versions": repository.versions(args.name),
                          **config.to_json()}, indent=2))
    return 0


async def cmd_bootstrap(args: argparse.Namespace, settings: Settings) -> int:
    if settings.embedded_kafka:
        raise ConfigError("set KAFKA_BOOTSTRAP_SERVERS (and AWS settings) to bootstrap a real cluster")
    await bootstrap(settings)
    print(f"topics {settings.topics.all()} and bucket {settings.batch_bucket} exist")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maas", description="Models as a service over events.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("up", help="start the local stack (Kafka-compatible broker + S3/SQS) and stay up")
    worker = sub.add_parser("worker", help="consume requests from Kafka and answer them")
    worker.add_argument("--examples", action="store_true", help="publish the example models first if missing")
    submit = sub.add_parser("submit", help="publish requests and print their answers")
    submit.add_argument("file", nargs="?", help="a .json (object or list) or .jsonl file of V2 requests; "
                                                "without it, generated MNIST-style requests are sent")
    submit.add_argument("--count", type=int, default=10, help="how many requests to generate (default 10)")
    submit.add_argument("--model", default=MNIST_MLP, help=f"model for generated requests (default {MNIST_MLP})")
    submit.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for answers (default 60)")
    demo = sub.add_parser("demo", help="the whole path on the embedded stack: publish, infer, read results")
    demo.add_argument("--requests", type=int, default=500, help="requests to publish (default 500)")
    demo.add_argument("--show", type=int, default=10, help="results to print (default 10)")
    demo.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for answers (default 120)")
    models = sub.add_parser("models", help="the model repository (MAAS_MODEL_REPOSITORY)")
    msub = models.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="models and their versions")
    describe = msub.add_parser("describe", help="one model's config")
    describe.add_argument("name")
    describe.add_argument("--version", default=None)
    msub.add_parser("examples", help="publish the example models if missing")
    sub.add_parser("bootstrap", help="create topics and buckets on the configured (real) Kafka / S3")
    return parser


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], Any]] = {
    "up": cmd_up,
    "worker": cmd_worker,
    "submit": cmd_submit,
    "demo": cmd_demo,
    "models": cmd_models,
    "bootstrap": cmd_bootstrap,
}


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        settings = Settings.from_env()
        code = asyncio.run(COMMANDS[args.command](args, settings))
    except (ConfigError, ArtifactError, ModelNotFoundError) as exc:
        print(f"maas: error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
