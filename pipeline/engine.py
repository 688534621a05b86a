"""The inference engine: validate a request against its model, batch it, run it off the event loop.

Every source (Kafka, SQS, HTTP, cloud functions, batch files) calls `InferenceEngine.infer()`; what
differs between them is only how requests arrive and where answers go.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from models.artifact import ArtifactError, ModelConfig
from models.cache import ModelCache
from models.loaded import LoadedModel
from models.repository import ModelNotFoundError
from pipeline.batcher import BatchKey, DynamicBatcher, Pending
from pipeline.errors import ErrorCode, InferenceError
from pipeline.metrics import MODEL_CACHE, QUEUE_WAIT, BatchRecord
from pipeline.protocol import InferenceRequest, InferenceResponse

log = logging.getLogger(__name__)

BatchListener = Callable[[BatchRecord], None]


class InferenceEngine:
    """Owns the batcher and the model executor. Use `async with` or `start()`/`stop()`.

    Models run on one dedicated thread (one executor per device): torch releases the GIL while it
    computes, so decoding and producing on the event loop overlap with the model.
    """

    def __init__(self, cache: ModelCache, *, worker_id: str = "local", max_queue_per_model: int = 1024) -> None:
        self.cache = cache
        self.worker_id = worker_id
        self._batcher = DynamicBatcher(self._run_batch, max_queue=max_queue_per_model)
        self._executor: ThreadPoolExecutor | None = None
        self._listeners: list[BatchListener] = []
        self._configs: dict[tuple[str, str | None], tuple[float, int, ModelConfig]] = {}
        self._max_cached_configs = 4096

    def add_batch_listener(self, listener: BatchListener) -> None:
        self._listeners.append(listener)

    async def start(self) -> InferenceEngine:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="maas-model")
        await self._batcher.start()
        return self

    async def stop(self) -> None:
        await self._batcher.stop()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    async def __aenter__(self) -> InferenceEngine:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _in_executor(self, fn: Callable, *args):
        if self._executor is None:
            raise InferenceError(ErrorCode.UNAVAILABLE, "the engine is not started")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def model_config(self, name: str, version: str | int | None) -> tuple[int, ModelConfig]:
        """Resolve a (name, version) the way requests do; raises MODEL_NOT_FOUND with what exists.

        Answers come from a cache on the event loop: configs are immutable per version, and "latest" is
        re-resolved at most every `latest_ttl_s`. Only a miss touches the repository (in a thread).
        """
        key = (name, None if version in (None, "", "latest") else str(version))
        cached = self._configs.get(key)
        if cached is not None and (key[1] is not None or time.monotonic() < cached[0]):
            return cached[1], cached[2]

        def lookup() -> tuple[int, ModelConfig]:
            resolved = self.cache.resolve(name, version)
            return resolved, self.cache.repository.config(name, resolved)

        try:
            resolved, config = await asyncio.to_thread(lookup)
        except ModelNotFoundError as exc:
            raise InferenceError(ErrorCode.MODEL_NOT_FOUND, str(exc)) from None
        except ArtifactError as exc:
            raise InferenceError(ErrorCode.INTERNAL, f"model {name!r} is misconfigured: {exc}") from None
        if len(self._configs) >= self._max_cached_configs:
            self._configs.clear()  # bounded: names come from callers
        self._configs[key] = (time.monotonic() + self.cache.latest_ttl_s, resolved, config)
        return resolved, config

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        try:
            version, config = await self.model_config(request.model_name, request.model_version)
            self._validate(request, config)
            if request.deadline_ms is not None and time.time() * 1000 > request.deadline_ms:
                raise InferenceError(ErrorCode.DEADLINE_EXCEEDED, "deadline_ms passed before the request ran")
            future = await self._batcher.submit(
                (request.model_name, version), config.batching, request, request.batch_rows,
                int(request.parameters.get("priority", 0)),
            )
            outputs: dict[str, np.ndarray] = await future
        except InferenceError as exc:
            exc.request_id = exc.request_id or request.id
            raise
        wanted = request.outputs or [s.name for s in config.outputs]
        return InferenceResponse(
            id=request.id,
            model_name=request.model_name,
            model_version=version,
            outputs={name: outputs[name] for name in wanted},
            datatypes={s.name: s.datatype for s in config.outputs},
        )

    @staticmethod
    def _validate(request: InferenceRequest, config: ModelConfig) -> None:
        expected = {s.name for s in config.inputs}
        unknown = sorted(set(request.inputs) - expected)
        if unknown:
            raise InferenceError(ErrorCode.INVALID_INPUT, f"inputs: unknown input(s) {unknown}; the model takes "
                                 f"{sorted(expected)}")
        for spec in config.inputs:
            if spec.name not in request.inputs:
                raise InferenceError(ErrorCode.INVALID_INPUT, f"inputs: input {spec.name!r} is missing")
            problem = spec.mismatch(request.datatypes[spec.name], request.inputs[spec.name].shape)
            if problem:
                raise InferenceError(ErrorCode.INVALID_INPUT, problem)
        rows = request.batch_rows
        if rows < 1:
            raise InferenceError(ErrorCode.INVALID_INPUT, "inputs: the batch dimension is 0 (empty batch)")
        if rows > config.batching.max_batch_size:
            raise InferenceError(ErrorCode.INVALID_INPUT, f"inputs: {rows} rows exceed the model's "
                                 f"max_batch_size {config.batching.max_batch_size}")
        if request.outputs is not None:
            known = {s.name for s in config.outputs}
            unknown = sorted(set(request.outputs) - known)
            if unknown:
                raise InferenceError(ErrorCode.INVALID_REQUEST, f"outputs: unknown output(s) {unknown}; the "
                                     f"model has {sorted(known)}")

    async def _load(self, key: BatchKey) -> LoadedModel:
        hits = self.cache.stats.hits
        try:
            model = await self._in_executor(self.cache.get, *key)
        except (ArtifactError, ModelNotFoundError, OSError) as exc:
            raise InferenceError(ErrorCode.INTERNAL, f"model {key[0]!r} version {key[1]} failed to load: {exc}") \
                from None
        MODEL_CACHE.labels("hit" if self.cache.stats.hits > hits else "miss").inc()
        return model

    async def _run_batch(self, key: BatchKey, items: list[Pending]) -> None:
        """Run one closed batch; settles every item's future whatever happens."""
        try:
            model = await self._load(key)
        except InferenceError as exc:
            for item in items:
                item.future.set_exception(InferenceError(exc.code, exc.message))
            return
        now_ms = time.time() * 1000
        live = []
        for item in items:
            deadline = item.payload.deadline_ms
            if item.future.done():
                continue
            if deadline is not None and now_ms > deadline:
                item.future.set_exception(InferenceError(ErrorCode.DEADLINE_EXCEEDED,
                                                         "deadline_ms passed while the request was queued"))
            else:
                live.append(item)
        groups: dict[tuple, list[Pending]] = defaultdict(list)
        for item in live:
            groups[tuple((n, a.shape[1:]) for n, a in sorted(item.payload.inputs.items()))].append(item)
        for group in groups.values():
            await self._run_group(model, group)

    async def _run_group(self, model: LoadedModel, group: list[Pending]) -> None:
        names = [s.name for s in model.config.inputs]
        started = time.monotonic()
        try:
            rejected, outputs = await self._in_executor(_execute, model, [i.payload.inputs for i in group], names)
        except Exception as exc:
            if len(group) > 1:  # isolate the request that breaks the batch; its batch-mates still run
                for item in group:
                    await self._run_group(model, [item])
                return
            log.exception("model %s:%s failed on request %s", model.name, model.version, group[0].payload.id)
            group[0].future.set_exception(InferenceError(ErrorCode.INTERNAL, f"model execution failed: {exc!r}"))
            return
        for index, name in rejected.items():
            group[index].future.set_exception(InferenceError(
                ErrorCode.INVALID_INPUT, f"input {name!r}: NaN or infinite values are not allowed"))
        group = [item for index, item in enumerate(group) if index not in rejected]
        if not group:
            return
        finished = time.monotonic()
        offset = 0
        for item in group:
            rows = item.rows
            if not item.future.done():
                item.future.set_result({k: v[offset:offset + rows] for k, v in outputs.items()})
            offset += rows
        waits = [started - item.enqueued for item in group]
        label = f"{model.name}:{model.version}"
        for wait in waits:
            QUEUE_WAIT.labels(label).observe(wait)
        record = BatchRecord(
            model=model.name, version=model.version, batch_size=offset, requests=len(group),
            queue_wait_ms_max=max(waits) * 1000, queue_wait_ms_mean=sum(waits) / len(waits) * 1000,
            compute_ms=(finished - started) * 1000, worker=self.worker_id,
        )
        record.observe()
        for listener in self._listeners:
            try:
                listener(record)
            except Exception:
                log.exception("batch listener failed")


def _execute(model: LoadedModel, inputs: list[dict[str, np.ndarray]], names: list[str]
             ) -> tuple[dict[int, str], dict[str, np.ndarray] | None]:
    """On the model thread: refuse requests with NaN/Inf, concatenate the rest, run them as one batch.

    The finiteness check lives here rather than in the decoder because numpy releases the GIL for it:
    on the event loop every request would wait for the model thread to hand the GIL back.
    """
    rejected = {}
    for index, tensors in enumerate(inputs):
        for name in names:
            array = tensors[name]
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                rejected[index] = name
                break
    kept = [tensors for index, tensors in enumerate(inputs) if index not in rejected]
    if not kept:
        return rejected, None
    batch = {n: np.concatenate([t[n] for t in kept]) if len(kept) > 1 else kept[0][n] for n in names}
    return rejected, model.infer(batch)
