"""`maas submit`: publish requests and print their answers."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from models.examples import MNIST_MLP
from pipeline.client import Answer, ResultCollector, as_binary, example_requests, publish_requests
from pipeline.codec import Framed
from pipeline.commands._common import positive_int, seconds
from pipeline.services import read_state
from pipeline.settings import ConfigError, Settings


def _load_requests(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it ({exc})") from None
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
    if not requests:
        raise ConfigError(f"{path}: holds no request")
    seen: set[str] = set()
    for number, request in enumerate(requests, 1):  # answers are told apart by id: one would stand for both
        if request["id"] in seen:
            raise ConfigError(f"{path}: request {number} has the id {request['id'][:60]!r} of an earlier one; each "
                              "request needs its own")
        seen.add(request["id"])
    return requests


def summary(answer: Answer) -> str:
    if answer.kind == "result":
        outputs = {o["name"]: np.asarray(o["data"]).reshape(-1).tolist() for o in answer.body.get("outputs", [])}
        shown = {k: (v if len(v) <= 4 else [*v[:4], "..."]) for k, v in outputs.items()}
        return f"result v{answer.body.get('model_version')} {json.dumps(shown)}"
    error = answer.body.get("error", {})
    return f"{answer.kind} {error.get('code')}: {error.get('message')}"


async def submit_and_wait(settings: Settings, requests: list[dict[str, Any]] | list[Framed], timeout: float,
                          ids: list[str] | None = None) -> tuple[dict[str, Answer], float]:
    """Publish requests (dicts, or Framed with `ids`) and wait for their answers; returns them and the time."""
    ids = ids if ids is not None else [r["id"] for r in requests]
    async with ResultCollector(settings) as collector:
        collector.expect(ids)  # answers that arrive while the rest are published are kept, however many
        started = time.perf_counter()
        await publish_requests(settings, requests, keys=ids)
        answers = await collector.wait_for(ids, timeout)
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
    payloads = [as_binary(r) for r in requests] if args.binary else requests
    answers, elapsed = await submit_and_wait(settings, payloads, args.timeout, [r["id"] for r in requests])
    for request in requests:
        answer = answers.get(request["id"])
        print(f"{request['id']}: {summary(answer) if answer else 'no answer within the timeout'}")
    print(f"{len(answers)}/{len(requests)} answered in {elapsed:.2f}s ({len(answers) / elapsed:.0f} requests/s)")
    if not answers:  # as `maas batch submit` says when no summary comes
        print(f"no answer within {args.timeout:g}s: is `maas worker` running on {settings.kafka_bootstrap_servers} "
              f"(started in this folder, or with the same KAFKA_BOOTSTRAP_SERVERS)?", file=sys.stderr)
    return 0 if len(answers) == len(requests) else 1


def register(sub: argparse._SubParsersAction) -> None:
    submit = sub.add_parser("submit", help="publish requests and print their answers")
    submit.add_argument("file", nargs="?", help="a .json (object or list) or .jsonl file of V2 requests; "
                                                "without it, generated MNIST-style requests are sent")
    submit.add_argument("--count", type=positive_int, default=10, help="how many requests to generate (default 10)")
    submit.add_argument("--model", default=MNIST_MLP, help=f"model for generated requests (default {MNIST_MLP})")
    submit.add_argument("--timeout", type=seconds, default=60.0, help="seconds to wait for answers (default 60)")
    submit.add_argument("--binary", action="store_true",
                        help="send tensors with the binary tensor extension (and ask for binary outputs)")
    submit.set_defaults(run=cmd_submit)
