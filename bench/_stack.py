"""Helpers for the pipeline benchmark: the local stack, topics, pre-produced backlogs, read-back, child processes.

Nothing here measures anything by itself; `bench/pipeline.py` decides what is timed.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from infra.stack import LocalStack

ROOT = Path(__file__).resolve().parents[1]
PARTITIONS = 4
PRODUCER_BATCH_BYTES = 256 * 1024  # ENVIRONMENT.md: 16 KB halves throughput for 8 KB records


class BenchStack:
    """A LocalStack (Tansu + moto) that can be replaced by a fresh one (the memory store never frees)."""

    def __init__(self) -> None:
        self.stack: LocalStack | None = None
        self.restarts = 0

    def start(self) -> BenchStack:
        self.stack = LocalStack(Path(tempfile.mkdtemp(prefix="maas-bench-stack-"))).start()
        return self

    def restart(self) -> None:
        self.stop()
        self.start()
        self.restarts += 1

    def stop(self) -> None:
        if self.stack is not None:
            self.stack.stop()
            self.stack = None

    @property
    def bootstrap(self) -> str:
        assert self.stack is not None
        return self.stack.bootstrap_servers

    @property
    def endpoint_url(self) -> str:
        assert self.stack is not None
        return self.stack.endpoint_url

    def broker_rss_mb(self) -> float | None:
        """Resident memory of the Tansu process (LocalStack keeps its Popen in `_broker`)."""
        proc = getattr(self.stack, "_broker", None)
        if proc is None:
            return None
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None


async def create_topics(bootstrap: str, names: Sequence[str], partitions: int = PARTITIONS) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, partitions, 1) for n in names])
    finally:
        await admin.close()


def _tps(topic: str, partitions: int = PARTITIONS) -> list[TopicPartition]:
    return [TopicPartition(topic, p) for p in range(partitions)]


async def produce_all(bootstrap: str, topic: str, values: Sequence[bytes], keys: Sequence[bytes],
                      headers: Sequence[list[tuple[str, bytes]]] | None = None) -> float:
    """Pre-produce a backlog (pipelined, acks=all); returns the seconds it took."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                                max_batch_size=PRODUCER_BATCH_BYTES)
    await producer.start()
    started = time.perf_counter()
    try:
        futures = []
        for i, value in enumerate(values):
            futures.append(await producer.send(topic, value, key=keys[i], headers=headers[i] if headers else None))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return time.perf_counter() - started


@dataclass
class Record:
    key: bytes | None
    value: bytes
    timestamp_ms: int
    headers: list[tuple[str, bytes]] = field(default_factory=list)


# Tansu answers ListOffsets(latest) with the base offset of the last record batch + 1, not the offset after
# the last record (measured: 110 records in two batches -> end offset 101). So nothing here trusts end
# offsets: topics are read until the expected count arrives or the partitions fall quiet.

async def read_all(bootstrap: str, topic: str, expected: int, *, quiet_s: float = 1.0,
                   timeout: float = 60.0) -> list[Record]:
    """The records of `topic` (for small result topics): until `expected` arrived, or `quiet_s` without any."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                check_crcs=False, max_partition_fetch_bytes=4 << 20)
    await consumer.start()
    try:
        tps = _tps(topic)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[Record] = []
        deadline = time.monotonic() + timeout
        last_seen = time.monotonic()
        while len(out) < expected or time.monotonic() - last_seen < (0.2 if expected else quiet_s):
            if time.monotonic() > deadline or (len(out) < expected and time.monotonic() - last_seen > 10):
                break
            fetched = await consumer.getmany(timeout_ms=200, max_records=5000)
            for records in fetched.values():
                out += [Record(r.key, r.value, r.timestamp, list(r.headers or ())) for r in records]
            if fetched:
                last_seen = time.monotonic()
        return out
    finally:
        await consumer.stop()


async def time_span(bootstrap: str, topic: str) -> tuple[int, int]:
    """(first, last) CreateTime in ms of `topic`, from the first and the last record batch of each partition.

    Each partition is written by one producer, so its timestamps grow with its offsets.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                check_crcs=False, max_partition_fetch_bytes=1 << 20)
    await consumer.start()
    try:
        tps = _tps(topic)
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)  # base offset of the last batch + 1 on Tansu (see above)
        starts = await consumer.beginning_offsets(tps)
        first, last = [], []
        for tp in tps:
            if ends[tp] <= starts[tp]:
                continue
            consumer.seek(tp, starts[tp])
            got = await consumer.getmany(tp, timeout_ms=5000, max_records=1)
            if got.get(tp):
                first.append(got[tp][0].timestamp)
            consumer.seek(tp, ends[tp] - 1)
            newest = None
            while got := await consumer.getmany(tp, timeout_ms=300, max_records=5000):
                newest = got[tp][-1].timestamp
            if newest is not None:
                last.append(newest)
        return min(first, default=0), max(last, default=0)
    finally:
        await consumer.stop()


class Child:
    """A benchmark child process (`python -m bench._pipeline_child MODE CONFIG`); its stdout lines are kept.

    Lines "EVENT {json}" are parsed into `events`; the child prints "assigned" when it owns its partitions
    and "done" with its figures when it stops.
    """

    def __init__(self, mode: str, config: dict[str, Any], env: dict[str, str] | None = None) -> None:
        full_env = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}
        full_env.setdefault("OMP_NUM_THREADS", "2")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench._pipeline_child", mode, json.dumps(config)],
            cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: list[str] = []
        self.events: dict[str, dict[str, Any]] = {}
        self._changed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            if line.startswith("EVENT "):
                name, _, payload = line[6:].partition(" ")
                self.events[name] = json.loads(payload or "{}")
            self._changed.set()

    async def wait_event(self, name: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while name not in self.events:
            if self.proc.poll() is not None and name not in self.events:
                await asyncio.sleep(0.2)  # let the reader thread catch the last lines
                if name in self.events:
                    break
                raise RuntimeError(f"child exited ({self.proc.returncode}) before {name!r}:\n" + self.tail())
            if time.monotonic() > deadline:
                raise TimeoutError(f"child gave no {name!r} within {timeout:.0f}s:\n" + self.tail())
            await asyncio.sleep(0.02)
        return self.events[name]

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.lines[-lines:])

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()

    async def finish(self, timeout: float = 60.0) -> dict[str, Any]:
        """SIGTERM (graceful drain for the worker) and wait for the "done" event."""
        self.terminate()
        try:
            return await self.wait_event("done", timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
