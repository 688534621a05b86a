"""Child processes of the pipeline benchmark: `python -m bench._pipeline_child MODE CONFIG_JSON`.

MODE is one of
- `raw`: the ceiling, a plain aiokafka consume -> produce loop: every request record is answered by a record of
  the same size (its own bytes) on the results topic; offsets are committed after each polled batch is acked.
- `jsonloop`: the issue-7 baseline, a plain per-message JSON inference loop: stdlib `json.loads`, numpy, the
  model for one row, `json.dumps` of a V2 result, produce; no batching; commit after each polled batch.
- `worker`: the real thing, `KafkaWorker` + `InferenceEngine` + `ModelCache` + `ModelRepository`, configured from
  the environment (`Settings.from_env`), with its model loaded and warmed before it joins the group.

Each prints `EVENT assigned {"t": unix_time}` once it owns its partitions (consumption starts there), the
worker `EVENT answered {"t": ...}` once `n` answers were acknowledged (`KafkaWorker.answered`, polled every 5 ms),
and `EVENT done {...}` when it stops (the loops after `n` records with "t_last_ack", the worker on SIGTERM).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.abc import ConsumerRebalanceListener

PRODUCER_BATCH_BYTES = 256 * 1024


def emit(name: str, payload: dict[str, Any] | None = None) -> None:
    print(f"EVENT {name} {json.dumps(payload or {})}", flush=True)


class _Assigned(ConsumerRebalanceListener):
    def __init__(self) -> None:
        self.at: float | None = None

    async def on_partitions_revoked(self, revoked) -> None:
        pass

    async def on_partitions_assigned(self, assigned) -> None:
        if assigned and self.at is None:
            self.at = time.time()
            emit("assigned", {"t": self.at})


def _clients(cfg: dict[str, Any]) -> tuple[AIOKafkaConsumer, AIOKafkaProducer]:
    """The same client options as `pipeline.kafka_worker.KafkaWorker` with default settings."""
    producer = AIOKafkaProducer(bootstrap_servers=cfg["bootstrap"], acks="all", linger_ms=2,
                                max_batch_size=PRODUCER_BATCH_BYTES)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=cfg["bootstrap"], group_id=cfg["group"], enable_auto_commit=False,
        auto_offset_reset="earliest", max_poll_records=500, fetch_max_bytes=52428800,
        max_partition_fetch_bytes=4 * 1024 * 1024 + 1024, session_timeout_ms=10000, heartbeat_interval_ms=1000,
    )
    return consumer, producer


async def _loop(cfg: dict[str, Any], answer) -> None:
    """Consume `n` records, answer each with `answer(record) -> (value, key)`, commit per polled batch."""
    consumer, producer = _clients(cfg)
    await producer.start()
    await consumer.start()
    listener = _Assigned()
    consumer.subscribe([cfg["requests"]], listener=listener)
    done, results = 0, cfg["results"]
    try:
        while done < cfg["n"]:
            fetched = await consumer.getmany(timeout_ms=200, max_records=500)
            futures = []
            for records in fetched.values():
                for record in records:
                    value, key = answer(record)
                    futures.append(await producer.send(results, value, key=key))
            if futures:
                await asyncio.gather(*futures)
                await consumer.commit()
                done += len(futures)
        emit("done", {"processed": done, "t_assigned": listener.at, "t_last_ack": time.time()})
    finally:
        await consumer.stop()
        await producer.stop()


def run_raw(cfg: dict[str, Any]) -> None:
    asyncio.run(_loop(cfg, lambda record: (record.value, record.key)))


def run_jsonloop(cfg: dict[str, Any]) -> None:
    import numpy as np

    from models.repository import ModelRepository

    repository = ModelRepository(cfg["repo"])
    model = repository.load(cfg["model"], repository.resolve(cfg["model"]))
    model.warmup()
    datatypes = {s.name: s.datatype for s in model.config.outputs}

    def answer(record) -> tuple[bytes, bytes]:
        body = json.loads(record.value)
        tensor = body["inputs"][0]
        x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        outputs = model.infer({tensor["name"]: x})
        result = {
            "id": body["id"], "model_name": model.name, "model_version": str(model.version),
            "outputs": [{"name": name, "shape": list(a.shape), "datatype": datatypes[name],
                         "data": a.reshape(-1).tolist()} for name, a in outputs.items()],
        }
        return json.dumps(result).encode(), body["id"].encode()

    asyncio.run(_loop(cfg, answer))


async def _worker(cfg: dict[str, Any]) -> None:
    from models.cache import ModelCache
    from models.repository import ModelRepository
    from pipeline.engine import InferenceEngine
    from pipeline.kafka_worker import KafkaWorker
    from pipeline.runtime import configure_process
    from pipeline.settings import Settings

    settings = Settings.from_env()
    configure_process(settings)  # as `maas worker` does
    cache = ModelCache(ModelRepository(settings.model_repository))
    cache.get(cfg["model"], cache.resolve(cfg["model"]))  # load + warm up before consuming
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with InferenceEngine(cache, worker_id=settings.worker_id,
                               max_running_batches=settings.max_running_batches) as engine:
        worker = KafkaWorker(settings, engine)
        await worker.start()
        await worker.assigned.wait()
        emit("assigned", {"t": time.time()})
        announcer = asyncio.create_task(_announce_answered(worker, cfg["n"])) if cfg.get("n") else None
        stopped = asyncio.create_task(worker.wait())
        signalled = asyncio.create_task(stop.wait())
        await asyncio.wait([stopped, signalled], return_when=asyncio.FIRST_COMPLETED)
        signalled.cancel()
        if announcer is not None:
            announcer.cancel()
        await worker.stop()
        emit("done", {"answered": worker.answered, "failure": repr(worker._failure) if worker._failure else None})


async def _announce_answered(worker, n: int) -> None:
    """Emit "answered" once `n` answers were acknowledged by the broker (polled every 5 ms)."""
    while worker.answered < n:
        await asyncio.sleep(0.005)
    emit("answered", {"t": time.time(), "answered": worker.answered})


def run_worker(cfg: dict[str, Any]) -> None:
    if cfg.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
        try:
            asyncio.run(_worker(cfg))
        finally:
            profiler.disable()
            profiler.dump_stats(cfg["profile"])
    else:
        asyncio.run(_worker(cfg))


def main() -> None:
    mode, cfg = sys.argv[1], json.loads(sys.argv[2])
    {"raw": run_raw, "jsonloop": run_jsonloop, "worker": run_worker}[mode](cfg)


if __name__ == "__main__":
    main()
