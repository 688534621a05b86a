"""Client helpers: publish V2 requests to Kafka and collect their answers by request id.

`maas submit` and `maas demo` use these; so can any Python service that talks to the platform.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from models.datatypes import NUMPY_DTYPES
from models.examples import MNIST_MLP, synthetic_digits
from pipeline.codec import REQUEST_ID, Framed, decode_response, encode_request, header_map
from pipeline.services import stop_producer
from pipeline.settings import Settings


@dataclass
class Answer:
    """What came back for one request: a result, an error result, or a dead-letter record."""

    kind: str  # "result" | "error" | "dead_letter"
    body: dict[str, Any]

    def output(self, name: str) -> np.ndarray:
        for out in self.body.get("outputs", []):
            if out["name"] == name:
                return np.asarray(out["data"]).reshape(out["shape"])
        raise KeyError(f"no output {name!r} in {self.body.get('id')}")


class ResultCollector:
    """Tails the results and dead-letter topics from their current end, keeping answers by request id.

    The topics are shared: most answers on them are other clients'. An answer is kept until `wait_for` returns
    it when its id is awaited (`expect`, or a `wait_for` under way); of the others, which may be this client's
    answers that came before it waited for them, only the latest `max_unclaimed` are kept.
    """

    def __init__(self, settings: Settings, topics: Iterable[str] | None = None, *, max_unclaimed: int = 10_000
                 ) -> None:
        self.settings = settings
        self.topics = list(topics or (settings.topics.results, settings.topics.dlq))
        self.max_unclaimed = max_unclaimed
        self.answers: dict[str, Answer] = {}  # held now: awaited, and (at most max_unclaimed) unclaimed
        self.received = 0  # answers read, kept or not
        self.duplicates = 0  # answers to an id whose first answer is held still (at-least-once delivery)
        self._awaited: set[str] = set()
        self._unclaimed: OrderedDict[str, None] = OrderedDict()  # ids of held answers no one awaits, oldest first
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task | None = None
        self._changed = asyncio.Event()

    async def start(self) -> ResultCollector:
        self._consumer = AIOKafkaConsumer(**self.settings.kafka_client_kwargs(), group_id=None,
                                          enable_auto_commit=False,
                                          fetch_max_wait_ms=self.settings.kafka_fetch_max_wait_ms)
        try:
            await self._consumer.start()
            partitions = []
            for topic in self.topics:
                ids = await self._partitions(topic)
                partitions += [TopicPartition(topic, p) for p in ids]
            self._consumer.assign(partitions)
            for tp, offset in (await self._consumer.end_offsets(partitions)).items():
                self._consumer.seek(tp, offset)
        except BaseException:  # an unreachable broker: close what was opened, then say so
            await self._consumer.stop()
            self._consumer = None
            raise
        self._task = asyncio.create_task(self._run(), name="maas-result-collector")
        return self

    async def _partitions(self, topic: str, timeout: float = 10.0) -> set[int]:
        assert self._consumer is not None
        deadline = time.monotonic() + timeout
        while True:
            ids = self._consumer.partitions_for_topic(topic)
            if ids:
                return ids
            if time.monotonic() > deadline:
                raise RuntimeError(f"topic {topic!r} does not exist on {self.settings.kafka_bootstrap_servers}")
            await self._consumer.topics()  # refreshes metadata
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()
        self._task = self._consumer = None

    async def __aenter__(self) -> ResultCollector:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _run(self) -> None:
        assert self._consumer is not None
        try:
            while True:
                fetched = await self._consumer.getmany(timeout_ms=200)
                for tp, records in fetched.items():
                    for record in records:
                        self._add(tp.topic, record)
                if fetched:
                    self._changed.set()
        finally:  # ended (a record aiokafka cannot parse, a lost broker): `wait_for` says so rather than waiting on
            self._changed.set()

    def _add(self, topic: str, record: Any) -> None:
        if topic == self.settings.topics.dlq:
            headers = {k: (v or b"").decode("utf-8", "replace") for k, v in record.headers or ()}  # Kafka allows null
            # The record keeps the request's key, which may be a caller's partition key rather than its id.
            key = headers.get(REQUEST_ID) or (record.key.decode("utf-8", "replace") if record.key else None)
            body = {"id": key, "error": {"code": headers.get("maas-error-code"),
                                         "message": headers.get("maas-error-message")}, "headers": headers}
            kind = "dead_letter"
        else:
            try:
                body = decode_response(record.value, header_map(record.headers))
                key = body.get("id")
            except Exception:  # the topic is shared: any record may be on it (a tombstone, a JSON list, a bad framing)
                return  # no answer of ours; raised here, it ended the task, and no answer after it was seen
            kind = "error" if "error" in body else "result"
        if not isinstance(key, str):  # no request's id: one that is a list or a dict could not even be looked up
            return
        self.received += 1
        if key in self.answers:
            self.duplicates += 1  # at-least-once: keep the first answer, count the rest
            return
        self.answers[key] = Answer(kind, body)
        if key not in self._awaited:
            self._unclaimed[key] = None
            if len(self._unclaimed) > self.max_unclaimed:
                del self.answers[self._unclaimed.popitem(last=False)[0]]

    def _check_reading(self) -> None:
        """Raise if the results topics are no longer read: no answer would come, however long the wait. A KafkaError,
        which `maas submit` reports in a line."""
        task = self._task
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            raise KafkaError(f"the answers can no longer be read: {task.exception()!r:.300}") from task.exception()

    def expect(self, ids: Iterable[str]) -> None:
        """Await these ids from now on (call it before publishing their requests): their answers are kept until
        `wait_for` returns them, however many others arrive meanwhile."""
        for request_id in ids:
            self._awaited.add(request_id)
            self._unclaimed.pop(request_id, None)

    async def wait_for(self, ids: Iterable[str], timeout: float) -> dict[str, Answer]:
        """Wait until every id has an answer or `timeout` passes; returns what arrived, and forgets it (and the
        ids: an answer arriving later is an unclaimed one)."""
        wanted = set(ids)
        self.expect(wanted)
        deadline = time.monotonic() + timeout
        try:
            while not wanted <= self.answers.keys():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._check_reading()
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except TimeoutError:
                    break
        finally:  # returned, or given up on by a cancelled caller: no longer held either way
            self._awaited.difference_update(wanted)
            found = {i: self.answers.pop(i) for i in wanted if i in self.answers}
            for request_id in found:  # unclaimed when another wait for it gave up first: no longer held to evict
                self._unclaimed.pop(request_id, None)
        return found


async def publish_requests(settings: Settings, requests: Iterable[dict[str, Any] | bytes | Framed],
                           keys: Iterable[str | None] | None = None) -> int:
    """Produce requests to the requests topic (key = request id); returns how many were sent.

    A request is a V2 dict (sent as JSON), raw bytes, or a `Framed` from `pipeline.codec.encode_request`
    (JSON or the binary tensor extension, with its framing headers).
    """
    producer = AIOKafkaProducer(**settings.kafka_client_kwargs(), acks="all", linger_ms=5,
                                max_batch_size=settings.producer_max_batch_bytes,
                                max_request_size=max(1 << 20, settings.max_request_bytes + 65536))
    await producer.start()
    try:
        futures = []
        key_iter = iter(keys) if keys is not None else None
        for request in requests:
            headers = None
            if isinstance(request, Framed):
                value, headers = request.body, request.kafka_headers()
            elif isinstance(request, bytes):
                value = request
            else:
                value = orjson.dumps(request, option=orjson.OPT_SERIALIZE_NUMPY)
            key = next(key_iter) if key_iter else (request.get("id") if isinstance(request, dict) else None)
            futures.append(await producer.send(settings.topics.requests, value, headers=headers,
                                               key=key.encode() if isinstance(key, str) else key))
        await asyncio.gather(*futures)
        return len(futures)
    finally:  # on a failure or cancellation, what is still queued is abandoned after MAAS_SHUTDOWN_TIMEOUT_S
        await stop_producer(producer, settings.shutdown_timeout_s)


def as_binary(request: dict[str, Any]) -> Framed:
    """A V2 request dict re-encoded with the binary tensor extension (and binary outputs asked for)."""
    inputs = {t["name"]: np.asarray(t["data"], dtype=NUMPY_DTYPES[t["datatype"]]).reshape(t["shape"])
              for t in request["inputs"]}
    return encode_request(request["id"], request["model_name"], inputs, binary=True, binary_outputs=True,
                          model_version=request.get("model_version"), parameters=request.get("parameters"),
                          datatypes={t["name"]: t["datatype"] for t in request["inputs"]})


def example_requests(count: int, model: str = MNIST_MLP, seed: int = 7, prefix: str = "req"
                     ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """`count` single-row requests for the MNIST-style MLP, and the true label of each request id."""
    images, labels = synthetic_digits(count, seed=seed)
    requests, truth = [], {}
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        request_id = f"{prefix}-{i:06d}"
        requests.append({
            "id": request_id,
            "model_name": model,
            "inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": image}],
        })
        truth[request_id] = int(label)
    return requests, truth
