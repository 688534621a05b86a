"""Helpers for tests that run workers: in-process, or as `maas worker` child processes, and what they find of a
`maas up` in their folder."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.record.memory_records import MemoryRecords

from models.cache import ModelCache
from models.examples import MNIST_MLP, mnist_mlp_config, train_mnist_mlp
from models.repository import ModelRepository
from pipeline.engine import InferenceEngine
from pipeline.kafka_worker import KafkaWorker


@contextlib.contextmanager
def maas_up_recorded(folder: Path, kafka: str, aws: str | None):
    """`folder` as a running `maas up` leaves it, this process standing for it: `.maas/stack.json` naming this
    process and the stack's addresses, and the lock on `.maas/stack.lock` that a `maas up` holds for its life."""
    (folder / ".maas").mkdir(exist_ok=True)
    (folder / ".maas" / "stack.json").write_text(json.dumps(
        {"pid": os.getpid(), "kafka_bootstrap_servers": kafka, "aws_endpoint_url": aws}))
    with open(folder / ".maas" / "stack.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield


def slow_repository(root, max_queue_delay_ms: float) -> ModelRepository:
    """A repository whose mnist_mlp waits `max_queue_delay_ms` to fill a batch: a worker then holds consumed
    requests unanswered for that long (for crash, shutdown and backpressure tests)."""
    repository = ModelRepository(root)
    repository.publish(MNIST_MLP, mnist_mlp_config(max_batch_size=64, max_queue_delay_ms=max_queue_delay_ms),
                       train_mnist_mlp(steps=1))
    return repository


@contextlib.asynccontextmanager
async def running_worker(settings, **kwargs):
    """An in-process worker on `settings`, yielded once it owns partitions."""
    engine = InferenceEngine(ModelCache(ModelRepository(settings.model_repository)), worker_id=settings.worker_id)
    async with engine, KafkaWorker(settings, engine, **kwargs) as worker:
        await asyncio.wait_for(worker.assigned.wait(), 30)
        yield worker


async def read_topic(settings, topic: str, count: int, timeout: float = 20.0) -> list:
    """Read at least `count` records of a topic from the beginning (or what arrives within `timeout`), from all of
    its partitions (a topic the broker created on first use has its default count, not the settings')."""
    consumer = AIOKafkaConsumer(**settings.kafka_client_kwargs(), group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.subscribe([topic])
        records, deadline = [], time.monotonic() + timeout
        while len(records) < count and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
        return records
    finally:
        await consumer.stop()


async def read_all(settings, topic: str, timeout: float = 30.0) -> list:
    """Every record of a topic, read up to the end offsets its partitions have when it is called. For a topic that
    nothing writes to any more (its producers stopped, their sends acknowledged): all that is there, without the
    fixed wait `read_topic` needs to tell that no more records come (too short a wait for a loaded broker to serve
    the ones that did come)."""
    consumer = AIOKafkaConsumer(**settings.kafka_client_kwargs(), group_id=None, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.subscribe([topic])
        records = []
        async with asyncio.timeout(timeout):
            while not consumer.assignment():  # every partition, once the topic's metadata came
                for batch in (await consumer.getmany(timeout_ms=200)).values():
                    records.extend(batch)
            ends = await consumer.end_offsets(list(consumer.assignment()))
            while any([await consumer.position(tp) < end for tp, end in ends.items()]):
                for batch in (await consumer.getmany(timeout_ms=200)).values():
                    records.extend(batch)
        return records
    finally:
        await consumer.stop()


async def stored_batches(settings, topic: str, max_bytes: int = 64 * 1024 * 1024) -> dict[int, list[tuple[int, list]]]:
    """Each partition of `topic` as the broker stored it: its record batches in order, each as (its size in bytes,
    its records). A consumer hands out records, not the batches they came in, and Kafka checks a whole batch against
    the topic's max.message.bytes (which Tansu does not enforce): this fetches the partitions with raw Fetch requests
    (the request aiokafka's fetcher sends, of the version it agrees with the broker) and walks the bytes returned."""
    client = AIOKafkaClient(**settings.kafka_client_kwargs())
    await client.bootstrap()
    try:
        await client.set_topics([topic])
        stored: dict[int, list[tuple[int, list]]] = {}
        for partition in sorted(client.cluster.partitions_for_topic(topic) or ()):
            leader = client.cluster.leader_for_partition(TopicPartition(topic, partition))
            batches, offset = stored.setdefault(partition, []), 0
            while True:
                request = FetchRequest(100, 1, max_bytes, 0, [(topic, [(partition, offset, max_bytes)])])
                response = await client.send(leader, request)
                ((_, ((_, error_code, highwater, *data),)),) = response.topics
                assert error_code == 0, f"fetching {topic}/{partition} at {offset}: error {error_code}"
                data = bytes(data[-1] or b"")
                records, position = MemoryRecords(data), 0
                while (batch := records.next_batch()) is not None:
                    # A batch starts with its base offset (8 bytes) and its length from there on (4 bytes).
                    size = 12 + int.from_bytes(data[position + 8:position + 12], "big", signed=True)
                    batches.append((size, list(batch)))
                    position += size
                    offset = batch.next_offset
                if offset >= highwater or position == 0:
                    break
        return stored
    finally:
        await client.close()


def worker_process(settings, *, repository_root=None, worker_id: str, args: tuple[str, ...] = ()
                   ) -> tuple[subprocess.Popen, threading.Event, list[str]]:
    """`maas -v worker [args]` in a child process; the event is set once it owns partitions."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "MAAS_", "AWS_"))}
    root = str(repository_root) if repository_root else settings.model_repository
    env.update(replace(settings, model_repository=root).to_env(), MAAS_WORKER_ID=worker_id,
               MAAS_KAFKA_SESSION_TIMEOUT_MS="6000", MAAS_KAFKA_HEARTBEAT_INTERVAL_MS="300",
               AWS_ACCESS_KEY_ID="maas-local", AWS_SECRET_ACCESS_KEY="maas-local", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "-v", "worker", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assigned = threading.Event()
    lines: list[str] = []

    def watch() -> None:
        for line in proc.stdout:
            lines.append(line)
            if "assigned partitions" in line and "[]" not in line:
                assigned.set()

    proc.watcher = threading.Thread(target=watch, daemon=True)  # see `all_output`
    proc.watcher.start()
    return proc, assigned, lines


async def all_output(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Wait for a `worker_process` to exit and for its watcher to have read its output to the end: the lines it
    wrote last may still be in the pipe when the process has exited."""
    await asyncio.to_thread(proc.wait, timeout)
    await asyncio.to_thread(proc.watcher.join, timeout)
    assert not proc.watcher.is_alive(), "the process's output never ended"


async def sigterm_and_wait(proc: subprocess.Popen) -> float:
    """SIGTERM a `worker_process`; the seconds until it exited and its output was read (60 s hang guard)."""
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    await all_output(proc, 60)
    return time.monotonic() - started


def assert_stopped_in_time(proc: subprocess.Popen, lines: list[str], took: float, shutdown_timeout_s: float,
                           said: str) -> None:
    """A `worker_process` stopped by SIGTERM exited cleanly, within its MAAS_SHUTDOWN_TIMEOUT_S and a second, and
    logged `said` on its way out."""
    assert proc.returncode == 0, "".join(lines)
    assert any(said in line for line in lines), "".join(lines)
    assert took < shutdown_timeout_s + 1, f"the worker exited {took:.1f} s after its SIGTERM"


def calls_waiting_on(port: int) -> int:
    """How many connections to the server on loopback `port` wait for it: accepted by the kernel and not by the
    server (its listening socket's backlog), or holding bytes it has not read. A server paused with SIGSTOP (one that
    does not answer, as in a network partition) is then known to hold a call made after the pause, with no fixed
    wait for the call to be made; a call it read before the pause is not seen (Linux: /proc/net/tcp)."""
    waiting = 0
    for row in map(str.split, Path("/proc/net/tcp").read_text().splitlines()[1:]):
        if row[1].endswith(f":{port:04X}") and (row[3] == "0A" or row[3] == "01"):  # LISTEN, ESTABLISHED
            waiting += int(row[4].split(":")[1], 16) > 0  # tx_queue:rx_queue (for LISTEN: the accept backlog)
    return waiting
