"""`maas demo`: the whole path on a private embedded stack."""

from __future__ import annotations

import argparse
import asyncio
import time

from models.examples import MNIST_MLP, ensure_examples
from pipeline.client import example_requests
from pipeline.commands._common import positive_int, seconds
from pipeline.commands.submit import submit_and_wait, summary
from pipeline.engine import InferenceEngine
from pipeline.kafka_worker import KafkaWorker
from pipeline.services import connected, model_cache, open_repository
from pipeline.settings import Settings


async def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    started = time.perf_counter()
    async with connected(settings, use_state=False) as live:
        repository = open_repository(live)  # after connecting: an s3:// repository needs the live endpoint
        for name, version in ensure_examples(repository):
            print(f"published example model {name} v{version} to {repository.root} (trained on synthetic digits)")
        print(f"stack: Kafka {live.kafka_bootstrap_servers}, S3/SQS {live.aws_endpoint_url}")
        async with InferenceEngine.for_settings(model_cache(settings, repository), live) as engine:
            worker = KafkaWorker(live, engine)
            async with worker:
                await asyncio.wait_for(worker.assigned.wait(), 30)
                requests, truth = example_requests(args.requests, MNIST_MLP, prefix="demo")
                print(f"publishing {len(requests)} requests for {MNIST_MLP} to {live.topics.requests} ...")
                answers, elapsed = await submit_and_wait(live, requests, args.timeout)
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
                print(f"{request['id']:<14} {summary(answer) if answer else 'no answer'}")
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


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="the whole path on the embedded stack: publish, infer, read results")
    demo.add_argument("--requests", type=positive_int, default=500, help="requests to publish (default 500)")
    demo.add_argument("--show", type=positive_int, default=10, help="results to print (default 10)")
    demo.add_argument("--timeout", type=seconds, default=120.0, help="seconds to wait for answers (default 120)")
    demo.set_defaults(run=cmd_demo)
