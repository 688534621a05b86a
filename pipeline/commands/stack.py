"""`maas up` and `maas bootstrap`: the local stack, or topics and buckets on a real cluster."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os

from models.examples import ensure_examples
from pipeline.commands._common import stop_event
from pipeline.services import (
    STATE_FILE,
    bootstrap,
    connected,
    open_repository,
    read_state,
    stack_lock,
    write_state,
)
from pipeline.settings import ConfigError, Settings


async def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    # One `maas up` a folder: a second stack would take over the state file, and its stop would remove it. The
    # lock, held for the command's life and dropped by the kernel whatever ends it, also refuses a second one
    # started while the first is still starting (and has written no state yet).
    # A state file found while this process holds the lock is a dead `maas up`'s: removed before the stack starts
    # (seconds), or the lock this process holds vouched for it meanwhile, and others went to its dead addresses.
    STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
    with open(stack_lock(), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            running = read_state()
            if running is not None:
                raise ConfigError(f"a local stack is already up here (pid {running['pid']}, Kafka "
                                  f"{running['kafka_bootstrap_servers']}); stop it first, or run `maas up` in "
                                  "another folder") from None
            raise ConfigError("another `maas up` is starting a local stack here; stop it first, or run `maas up` "
                              "in another folder") from None
        with contextlib.suppress(FileNotFoundError):
            STATE_FILE.unlink()
        return await _up(settings)


async def _up(settings: Settings) -> int:
    async with connected(settings, use_state=False) as live:
        repository = open_repository(live)  # after connecting: an s3:// repository needs the live endpoint
        for name, version in ensure_examples(repository):
            print(f"published example model {name} v{version} to {repository.root}")
        stop = stop_event()
        write_state(live)
        print("local stack is up (Ctrl-C to stop)")
        print(f"export KAFKA_BOOTSTRAP_SERVERS={live.kafka_bootstrap_servers}")
        if live.aws_endpoint_url:  # not with real AWS (MAAS_AWS=aws, AWS_PROFILE, ...): its clients need none
            print(f"export AWS_ENDPOINT_URL={live.aws_endpoint_url}")
        print(f"topics: {', '.join(live.topics.all())}; batch bucket: {live.batch_bucket}; "
              f"model repository: {repository.root}", flush=True)
        try:
            await stop.wait()
        finally:
            mine = read_state()
            if mine is not None and mine["pid"] == os.getpid():  # not another stack's file
                with contextlib.suppress(FileNotFoundError):
                    STATE_FILE.unlink()
    print("local stack stopped")
    return 0


async def cmd_bootstrap(args: argparse.Namespace, settings: Settings) -> int:
    if settings.embedded_kafka:
        raise ConfigError("set KAFKA_BOOTSTRAP_SERVERS (and AWS settings) to bootstrap a real cluster")
    await bootstrap(settings)
    print(f"topics {settings.topics.all()} and bucket {settings.batch_bucket} exist")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("up", help="start the local stack (Kafka-compatible broker + S3/SQS) and stay up"
                   ).set_defaults(run=cmd_up)
    sub.add_parser("bootstrap", help="create topics and buckets on the configured (real) Kafka / S3"
                   ).set_defaults(run=cmd_bootstrap)
