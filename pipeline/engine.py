"""The inference engine: validate a request against its model, batch it, run it off the event loop.

Every source (Kafka, SQS, HTTP, cloud functions, batch files) calls `InferenceEngine.infer()`; what
differs between them is only how requests arrive and where answers go.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from models.artifact import ArtifactError, ModelConfig, TensorSpec, short_repr
from models.cache import ModelCache
from models.loaded import LoadedModel, default_device, device_type
from models.numpy_models import NUMPY_WEIGHT_DTYPES, numpy_twin
from models.repository import ModelNotFoundError, Repository, RepositoryUnavailableError, VersionError
from models.text import InvalidTextError, texts_of
from pipeline.batcher import BatchKey, DynamicBatcher, Pending
from pipeline.errors import ErrorCode, InferenceError
from pipeline.metrics import (
    BORROWED_TUNINGS,
    KERNEL_BINARIES,
    MODEL_CACHE,
    MODEL_CACHE_BYTES,
    MODEL_EVICTIONS,
    MODEL_LOAD,
    QUEUE_WAIT,
    BatchRecord,
)
from pipeline.protocol import InferenceRequest, InferenceResponse
from pipeline.runtime import DaemonThreadPool, configure_torch_threads
from pipeline.settings import Settings

log = logging.getLogger(__name__)

BatchListener = Callable[[BatchRecord], None]
#: The share of MAAS_SHUTDOWN_TIMEOUT_S a serving process's engine waits, once its sources have stopped, for the call
#: under way on the model thread (`InferenceEngine.stop`).
STOP_SHARE = 0.25
#: How often stop() looks whether the model thread has ended its call, up to `stop_timeout_s`.
JOIN_POLL_S = 0.01


class InferenceEngine:
    """Owns the batcher and the model executor. Use `async with` or `start()`/`stop()`.

    Models run on one dedicated thread (one executor per device): torch and numpy release the GIL while
    they compute, so decoding and producing on the event loop overlap with the model. `stop()` waits for that
    thread's call under way for up to `stop_timeout_s` (see there).
    """

    def __init__(self, cache: ModelCache, *, worker_id: str = "local", max_queue_per_model: int = 1024,
                 max_running_batches: int = 8, stop_timeout_s: float = 30.0) -> None:
        self.cache = cache
        self.worker_id = worker_id
        self.stop_timeout_s = stop_timeout_s
        self._batcher = DynamicBatcher(self._run_batch, max_queue=max_queue_per_model,
                                       max_running=max_running_batches)
        self._executor: DaemonThreadPool | None = None
        self._stopped: asyncio.Task | None = None  # the latest stop, which every stop() waits for
        self._running: str | None = None  # what the model thread runs now, for stop()'s warning
        self._listeners: list[BatchListener] = []
        self._configs: dict[tuple[str, str | None], tuple[float, int, ModelConfig]] = {}
        self._max_cached_configs = 4096
        self._lookups: dict[tuple[str, str | None], asyncio.Future] = {}
        self._served: set[str] = set()  # names that resolved to a model: the repository's, never a caller's
        self._evictions_counted = cache.stats.evictions  # those on maas_model_cache_evictions_total so far

    @classmethod
    def for_settings(cls, cache: ModelCache, settings: Settings) -> InferenceEngine:
        """A serving process's engine. It stops after its sources, which waited for the batches in flight already:
        what is still on the model thread then gets `STOP_SHARE` of MAAS_SHUTDOWN_TIMEOUT_S."""
        return cls(cache, worker_id=settings.worker_id, max_running_batches=settings.max_running_batches,
                   stop_timeout_s=settings.shutdown_timeout_s * STOP_SHARE)

    def add_batch_listener(self, listener: BatchListener) -> None:
        self._listeners.append(listener)

    def remove_batch_listener(self, listener: BatchListener) -> None:
        """Undo `add_batch_listener` (a listener not added is ignored): a source that stops while the engine
        it shares keeps running must not be called, nor kept alive, by every later batch."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    async def start(self) -> InferenceEngine:
        """A start that fails (torch cannot be imported, say) or is cancelled stops what it started before it raises:
        `async with` never calls stop() then, and the model thread lived on and the batcher went on taking requests
        for an engine its caller never got."""
        self._stopped = None
        self._executor = DaemonThreadPool(1, "maas-model")
        self._executor.submit(configure_torch_threads)  # first there: torch (if imported) counts threads per thread
        await self._batcher.start()
        try:
            if await asyncio.to_thread(_serves_torch_models, self.cache.repository):
                await self._in_executor("the import of torch", _import_torch)
        except BaseException:
            await self.stop()
            raise
        return self

    async def stop(self) -> None:
        """Fail what is queued, give up the batches handed to the model thread, and wait, off the event loop, up to
        `stop_timeout_s` for the call under way there to end.

        Waited for without limit, a model that hangs (a GPU hang, a C call that never returns) held stop(), and a
        worker's SIGTERM with it, forever. Past the bound the call is abandoned on its thread, a daemon that does not
        hold the process's exit (`DaemonThreadPool`). Its requests were answered UNAVAILABLE when their batch was
        given up, and the batch, should it end later, answers no one. The workers stop before their engine, and what
        they did not answer by then stays uncommitted (Kafka) or undeleted (SQS): it is redelivered.

        A stop() called while another waits returns when that one is done, not once the first has taken the model
        thread; a caller cancelled while it waits leaves the stop running for the others.
        """
        if self._stopped is None:
            self._stopped = asyncio.create_task(self._stop(), name="maas-engine-stop")
        await asyncio.shield(self._stopped)

    async def _stop(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.stop_timeout_s
        await self._batcher.stop()
        if self._executor is None:
            return
        executor, self._executor = self._executor, None
        executor.shutdown(cancel_futures=True)
        # Watched from the event loop, not waited for through `asyncio.to_thread`: the default executor's threads may
        # all be held by S3 or SQS calls their sources abandoned, and the wait would queue behind them.
        while not executor.join(0) and loop.time() < deadline:
            await asyncio.sleep(JOIN_POLL_S)
        if not executor.join(0):
            log.warning("stopping: the model thread is still running %s %.1f s after the stop began; abandoned there "
                        "(its requests were answered UNAVAILABLE)", self._running or "a call", self.stop_timeout_s)

    async def __aenter__(self) -> InferenceEngine:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _load_on_model_thread(self, name: str, version: int) -> tuple[LoadedModel, bool]:
        """On the model thread: the model's first load may be what imports torch, whose thread count is a
        setting of the thread that runs it."""
        fetched = self.cache.fetch(name, version)
        configure_torch_threads()
        return fetched

    async def _in_executor(self, what: str, fn: Callable, *args):
        """`fn(*args)` on the model thread; `what` names the call in stop()'s warning, should it outlast the stop."""
        if self._executor is None:
            raise InferenceError(ErrorCode.UNAVAILABLE, "the engine is not started")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._run_as, what, fn, *args)

    def _run_as(self, what: str, fn: Callable, *args):
        self._running = what
        try:
            return fn(*args)
        finally:
            self._running = None

    async def model_config(self, name: str, version: str | int | None) -> tuple[int, ModelConfig]:
        """Resolve a (name, version) the way requests do; raises MODEL_NOT_FOUND with what exists.

        Answers come from a cache on the event loop: configs are immutable per version, and "latest" is
        re-resolved at most every `latest_ttl_s`. Only a miss touches the repository (in a thread), once
        per key however many requests for it arrive together (a fetch of 500 records names one model).
        """
        key = (name, None if version in (None, "", "latest") else str(version))
        cached = self._cached_config(key)
        if cached is not None:
            return cached
        lookup = self._lookups.get(key)
        if lookup is None:
            lookup = self._lookups[key] = asyncio.ensure_future(self._lookup_config(key, name, version))
            lookup.add_done_callback(lambda _: self._lookups.pop(key, None))
        return await asyncio.shield(lookup)

    def _cached_config(self, key: tuple[str, str | None]) -> tuple[int, ModelConfig] | None:
        cached = self._configs.get(key)
        if cached is not None and (key[1] is not None or time.monotonic() < cached[0]):
            return cached[1], cached[2]
        return None

    async def _lookup_config(self, key: tuple[str, str | None], name: str, version: str | int | None
                             ) -> tuple[int, ModelConfig]:
        def lookup() -> tuple[int, ModelConfig]:
            # The repository itself, not the cache's resolve(): its answer for "latest" may be latest_ttl_s old
            # already, and this one is kept for latest_ttl_s more.
            resolved = self.cache.repository.resolve(name, version)
            return resolved, self.cache.repository.config(name, resolved)

        try:
            resolved, config = await asyncio.to_thread(lookup)
        except VersionError as exc:
            raise InferenceError(ErrorCode.INVALID_REQUEST, str(exc)) from None
        except ModelNotFoundError as exc:
            raise InferenceError(ErrorCode.MODEL_NOT_FOUND, exc.message) from None
        except ArtifactError as exc:
            raise InferenceError(ErrorCode.INTERNAL, f"model {name!r} is misconfigured: "
                                 f"{self.cache.repository.for_callers(str(exc))}") from None
        except RepositoryUnavailableError as exc:
            raise repository_unavailable(name, key[1], exc) from None
        if len(self._configs) >= self._max_cached_configs:
            self._configs.clear()  # bounded: names come from callers
        self._configs[key] = (time.monotonic() + self.cache.latest_ttl_s, resolved, config)
        self._served.add(name)
        return resolved, config

    def serves(self, name: str) -> bool:
        """Whether `name` named a model of the repository in a request (or lookup) so far. Metrics label a model by
        its name only then: a caller's made-up names would each become a time series of their own, and a request
        may fail before its name is looked up (its claim-checked inputs cannot be read, say)."""
        return name in self._served

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        """Run one request; raises `InferenceError` (with the request id) when it cannot be answered."""
        (outcome,) = await self.infer_many([request])
        if isinstance(outcome, InferenceError):
            raise outcome
        return outcome

    async def infer_many(self, requests: Sequence[InferenceRequest]) -> list[InferenceResponse | InferenceError]:
        """Run requests that arrived together; one outcome per request, in order, errors returned not raised.

        Sources that receive records in fetches hand over the whole fetch: one await for all of it instead
        of a task and a chain of awaits per request, and requests for the same model enter the batcher as
        one queue item (up to the model's max_batch_size rows) instead of one each. Per request, that was
        most of what the engine cost on the event loop.
        """
        outcomes: list[InferenceResponse | InferenceError | None] = [None] * len(requests)
        groups: dict[tuple[BatchKey, int], list[tuple[int, int]]] = {}
        configs: dict[BatchKey, ModelConfig] = {}
        found: dict[tuple[str, str | None], tuple[int, ModelConfig] | InferenceError] = {}
        for index, request in enumerate(requests):
            named = (request.model_name, request.model_version)
            resolved = found.get(named)
            if resolved is None:  # once per model named in the call: a fetch usually names one
                try:
                    resolved = await self.model_config(*named)
                except InferenceError as exc:
                    resolved = exc
                found[named] = resolved
            if isinstance(resolved, InferenceError):
                outcomes[index] = resolved.addressed_to(request.id)
                continue
            version, config = resolved
            try:
                rows = self._validate(request, config)
                priority = 0
                if request.parameters:  # most requests have none
                    deadline = request.deadline_ms
                    if deadline is not None and time.time() * 1000 > deadline:
                        raise InferenceError(ErrorCode.DEADLINE_EXCEEDED, "deadline_ms passed before the request ran")
                    priority = request.parameters.get("priority") or 0  # an int, or None (null: none given)
            except InferenceError as exc:
                outcomes[index] = exc.addressed_to(request.id)
                continue
            key = (request.model_name, version)
            configs[key] = config
            group = groups.get((key, priority))
            if group is None:
                group = groups[key, priority] = []
            group.append((index, rows))
        waiting: list[tuple[list[tuple[int, int]], asyncio.Future, int, ModelConfig]] = []
        try:  # a later chunk may wait for room in a full queue: the chunks queued before it are given up too
            for (key, priority), members in groups.items():
                config = configs[key]
                for chunk, rows in _chunks(members, config.batching.max_batch_size):
                    try:
                        future = await self._batcher.submit(key, config.batching,
                                                            [(requests[i], r) for i, r in chunk], rows, priority)
                    except InferenceError as exc:
                        for index, _ in chunk:
                            outcomes[index] = exc.addressed_to(requests[index].id)
                    else:
                        waiting.append((chunk, future, key[1], config))
            if waiting:
                await asyncio.wait([future for _, future, _, _ in waiting])
        except asyncio.CancelledError:  # the caller gave up: its requests give up their rows in the batches
            for _, future, _, _ in waiting:
                future.cancel()
            raise
        for chunk, future, version, config in waiting:
            error = future.exception()
            if error is not None and not isinstance(error, InferenceError):
                log.error("model %s:%s failed a batch", requests[chunk[0][0]].model_name, version, exc_info=error)
                error = execution_failed(error)
            results = [error] * len(chunk) if error is not None else future.result()
            datatypes = {s.name: s.datatype for s in config.outputs}
            for (index, _), result in zip(chunk, results, strict=True):
                request = requests[index]
                if isinstance(result, InferenceError):
                    outcomes[index] = result.addressed_to(request.id)
                    continue
                if request.outputs is not None:  # otherwise every output, in a dict of this request's own
                    result = {name: result[name] for name in request.outputs}
                outcomes[index] = InferenceResponse(request.id, request.model_name, version, result, datatypes)
        return outcomes  # type: ignore[return-value]  # every slot was filled above

    @staticmethod
    def _validate(request: InferenceRequest, config: ModelConfig) -> int:
        """Check the request against the model's signature; returns its rows (the batch dimension)."""
        tensors = request.inputs
        specs = config.inputs
        if len(tensors) != len(specs):
            raise _names_error(tensors, specs)
        datatypes = request.datatypes
        for spec in specs:
            array = tensors.get(spec.name)
            if array is None:
                raise _names_error(tensors, specs)
            problem = spec.mismatch(datatypes[spec.name], array.shape)
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
                raise InferenceError(ErrorCode.INVALID_REQUEST, f"outputs: unknown output(s) "
                                     f"{short_repr(unknown)}; the model has {sorted(known)}")
        return rows

    async def load(self, name: str, version: int) -> LoadedModel:
        """A loaded model without leaving the loop; only a miss loads it, on the model thread (batches and the
        repository extension's load request alike). A failure is an INTERNAL error that says what is wrong, a
        repository that cannot be reached an UNAVAILABLE one (see `repository_unavailable`)."""
        key = (name, version)
        model = self.cache.peek(*key)
        if model is not None:
            MODEL_CACHE.labels("hit").inc()
            return model
        try:
            model, loaded = await self._in_executor(f"the load of {name!r} version {version}",
                                                    self._load_on_model_thread, *key)
        except RepositoryUnavailableError as exc:  # an OSError too: its message quotes the store's endpoint
            raise repository_unavailable(name, version, exc) from None
        except (ArtifactError, ModelNotFoundError, OSError) as exc:  # messages name no server folder; cut any
            reason = exc.message if isinstance(exc, ModelNotFoundError) else str(exc)  # without its `where`
            raise load_failed(name, version, self.cache.repository.for_callers(reason)) from None
        finally:  # a load that failed may have evicted others to make room
            self._count_evictions()
        if not loaded:  # another request loaded it meanwhile
            MODEL_CACHE.labels("hit").inc()
            return model
        MODEL_CACHE.labels("miss").inc()
        label = f"{model.name}:{model.version}"
        MODEL_LOAD.labels(label).observe(model.load_seconds + model.warmup_seconds)
        ahead = model.compile_ahead  # a GPU warm-up's compile-only pass: what a cold start compiled
        if ahead is not None and ahead.parallel:
            KERNEL_BINARIES.labels(label, "compiled").inc(ahead.compiled)
            KERNEL_BINARIES.labels(label, "cache").inc(max(ahead.binaries - ahead.compiled, 0))
        MODEL_CACHE_BYTES.set(self.cache.nbytes)
        return model

    def _count_evictions(self) -> None:
        """Count the cache's evictions not counted yet on maas_model_cache_evictions_total. Not those since a load
        began: a load queued behind another on the model thread counted that one's too."""
        evictions = self.cache.stats.evictions
        MODEL_EVICTIONS.inc(evictions - self._evictions_counted)
        self._evictions_counted = evictions

    def unload(self, name: str) -> None:
        """Drop the loaded versions of `name` from the warm cache (they load again on their next request), and
        say so on maas_model_cache_bytes: set only by loads, it kept reporting their weights."""
        self.cache.unload(name)
        MODEL_CACHE_BYTES.set(self.cache.nbytes)

    async def _run_batch(self, key: BatchKey, items: list[Pending]) -> None:
        """Run one closed batch; settles every item's future whatever happens.

        An item holds the requests submitted together; its future gets one outcome per request (outputs
        or an InferenceError), so one bad request never fails its batch-mates.
        """
        results = {id(item): [None] * len(item.payload) for item in items}
        try:
            model = await self.load(*key)
        except InferenceError as exc:
            for item in items:
                if not item.future.done():  # a cancelled caller's is done
                    item.future.set_exception(InferenceError(exc.code, exc.message))
            return
        now_ms = time.time() * 1000
        # Validated requests of a model whose inputs have fixed shapes past the batch dimension all
        # concatenate; only variable dimensions need grouping by shape.
        fixed = all(-1 not in spec.shape[1:] for spec in model.config.inputs)
        groups: dict[tuple, list[_Entry]] = defaultdict(list)
        for item in items:
            if item.future.done():
                continue
            slots = results[id(item)]
            for position, (request, rows) in enumerate(item.payload):
                deadline = request.deadline_ms
                if deadline is not None and now_ms > deadline:
                    slots[position] = InferenceError(ErrorCode.DEADLINE_EXCEEDED,
                                                     "deadline_ms passed while the request was queued")
                    continue
                signature = () if fixed else tuple((n, a.shape[1:]) for n, a in request.inputs.items())
                groups[signature].append(_Entry(request, rows, slots, position, item.enqueued, item.future))
        for group in groups.values():
            await self._run_group(model, group)
        for item in items:
            if not item.future.done():
                item.future.set_result(results[id(item)])

    async def _refuse_invalid_text(self, model: LoadedModel, group: list[_Entry], exc: InvalidTextError) -> None:
        """Refuse the requests whose text is not UTF-8, each with its own element's index, and run the rest as
        one batch: isolating them one by one would run every batch-mate of one bad text alone."""
        rest = []
        for entry in group:
            try:
                texts_of(entry.request.inputs.get(exc.name, ()), exc.name)
            except InvalidTextError as own:
                entry.settle(InferenceError(ErrorCode.INVALID_INPUT, str(own)))
            else:
                rest.append(entry)
        if len(rest) == len(group):  # the model decoded text of its own making: its failure, not a caller's
            log.error("model %s:%s: %s, in no request's input", model.name, model.version, exc)
            for entry in group:
                entry.settle(execution_failed(exc))
        elif rest:
            await self._run_group(model, rest)

    async def _run_group(self, model: LoadedModel, group: list[_Entry]) -> None:
        """Run requests whose inputs concatenate (same names, same shapes past the batch dimension)."""
        names = [s.name for s in model.config.inputs]
        rows = sum([e.rows for e in group])
        wanted = [(e.request.deadline_ms, e.future) for e in group]
        try:
            inputs = [e.request.inputs for e in group]
            # Requests of a group share their shapes past the batch dimension (and their datatypes).
            row_bytes = sum(a.nbytes // a.shape[0] for a in inputs[0].values())
            limit = _INPUT_LIMITS.get(model.config.dtype)
            if row_bytes * rows <= _PREPARE_ON_LOOP_BYTES:
                rejected, batch = _prepare(inputs, names, limit)
                work = partial(_infer_prepared, model, rejected, batch)
            else:
                work = partial(_execute, model, inputs, names, limit)
            ran = await self._in_executor(f"a batch of {len(group)} request(s) of {model.name!r} version "
                                          f"{model.version}", _on_model_thread, model, wanted, work)
        except InvalidTextError as exc:
            await self._refuse_invalid_text(model, group, exc)
            return
        except Exception as exc:
            if len(group) > 1:  # isolate the request that breaks the batch; its batch-mates still run
                for entry in group:
                    await self._run_group(model, [entry])
                return
            log.exception("model %s:%s failed on request %s", model.name, model.version, group[0].request.id)
            group[0].settle(execution_failed(exc))
            return
        if isinstance(ran, list):  # requests dropped while the batch waited for the model thread: run the rest
            for index in ran:
                group[index].settle(InferenceError(ErrorCode.DEADLINE_EXCEEDED,
                                                   "deadline_ms passed while the request was queued"))
            dropped = set(ran)
            remaining = [entry for index, entry in enumerate(group) if index not in dropped and not entry.future.done()]
            if remaining:
                await self._run_group(model, remaining)
            return
        (rejected, outputs), started, finished = ran.value, ran.started, ran.finished
        if ran.borrowed:
            BORROWED_TUNINGS.labels(f"{model.name}:{model.version}").inc(ran.borrowed)
        if rejected:
            for index, message in rejected.items():
                group[index].settle(InferenceError(ErrorCode.INVALID_INPUT, message))
            group = [entry for index, entry in enumerate(group) if index not in rejected]
            if not group:
                return
            rows = sum([entry.rows for entry in group])
        wrong = next((name for name, v in outputs.items() if v.ndim == 0 or v.shape[0] != rows), None)
        if wrong is not None:  # a broken model: its batch-mates cannot be told apart either
            log.error("model %s:%s returned %s of shape %s for a batch of %d rows", model.name, model.version,
                      wrong, outputs[wrong].shape, rows)
            for entry in group:
                entry.settle(InferenceError(ErrorCode.INTERNAL, f"model execution failed: output {wrong!r} does "
                                            "not have one row per input row"))
            return
        _split_outputs(group, outputs)
        if not _finite(outputs.values()):
            _refuse_non_finite_outputs(model, group)
        waits = [started - entry.enqueued for entry in group]
        queue_wait = QUEUE_WAIT.labels(f"{model.name}:{model.version}")
        for enqueued in {entry.enqueued for entry in group}:  # requests submitted together waited as one
            queue_wait.observe(started - enqueued)
        record = BatchRecord(
            model=model.name, version=model.version, batch_size=rows, requests=len(group),
            queue_wait_ms_max=max(waits) * 1000, queue_wait_ms_mean=sum(waits) / len(waits) * 1000,
            compute_ms=(finished - started) * 1000, worker=self.worker_id,
        )
        record.observe()
        for listener in self._listeners:
            try:
                listener(record)
            except Exception:
                log.exception("batch listener failed")


@dataclass(slots=True)
class _Entry:
    """One request of a closed batch, and where its outcome goes (its slot in its queue item's results)."""

    request: InferenceRequest
    rows: int
    results: list
    position: int
    enqueued: float
    future: asyncio.Future  # its queue item's: cancelled when its caller gave up

    def settle(self, outcome: dict[str, np.ndarray] | InferenceError) -> None:
        self.results[self.position] = outcome


def execution_failed(exc: BaseException) -> InferenceError:
    """The error of a request its model failed on, once the failure is logged: the exception's type, not its
    message, which may quote a file of the server's (a kernel cache, a library), its memory or its devices, and
    reaches HTTP callers and batch result files as it is."""
    return InferenceError(ErrorCode.INTERNAL, f"model execution failed ({type(exc).__name__}; the server's log "
                          "has the details)")


def load_failed(name: str, version: int, reason: str) -> InferenceError:
    """The error of a version that cannot be loaded: its requests get it, its readiness reports it."""
    return InferenceError(ErrorCode.INTERNAL, f"model {name!r} version {version} failed to load: {reason}")


def repository_unavailable(name: str, version: int | str | None, exc: RepositoryUnavailableError
                           ) -> InferenceError:
    """The error of a request whose model the repository cannot give now (S3 down or answering with an error):
    UNAVAILABLE, as transient as the outage, so workers retry it and then dead-letter it, and HTTP answers 503,
    which invites a retry. The store's own message, which quotes its endpoint URL, bucket and key, is logged only.
    `version` None is "latest" (the lookup that failed would have resolved it)."""
    label = "latest" if version is None else version
    log.warning("model %r version %s: the model repository is unavailable: %s", name, label, exc)
    return InferenceError(ErrorCode.UNAVAILABLE, f"model {name!r} version {label}: the model repository is "
                          "unavailable; retry later")


def _serves_torch_models(repository: Repository) -> bool:
    """Whether this process will need torch: it serves on a GPU, or the latest version of some model has no
    numpy twin (judged on its config alone: bf16 weights are only found out when they load)."""
    try:
        if device_type(default_device()) != "cpu":
            return True
        for name in repository.names():
            versions = repository.versions(name)
            if versions and numpy_twin(repository.config(name, versions[-1]), NUMPY_WEIGHT_DTYPES) is None:
                return True
    except (ArtifactError, OSError, LookupError, ValueError) as exc:  # a request will say what is wrong
        log.warning("cannot tell whether the models need torch (%s); it is imported when one does", exc)
    return False


def _import_torch() -> None:
    """On the model thread, before the engine serves. Importing torch holds the GIL for most of a second: when a
    first request's load did it on the model thread, the event loop stalled ~0.26 s behind it."""
    import torch  # noqa: F401

    configure_torch_threads()


def _split_outputs(group: list[_Entry], outputs: dict[str, np.ndarray]) -> None:
    """Give each request its rows of the batch's outputs (views, no copies)."""
    if len(outputs) == 1 and len(next(iter(outputs.values()))) == len(group):  # a row each: one numpy call
        ((name, batch),) = outputs.items()
        for entry, row in zip(group, batch.reshape(len(group), 1, *batch.shape[1:]), strict=True):
            entry.settle({name: row})
        return
    offset = 0
    for entry in group:
        rows = entry.rows
        entry.settle({k: v[offset:offset + rows] for k, v in outputs.items()})
        offset += rows


def _names_error(tensors: dict[str, np.ndarray], specs: tuple[TensorSpec, ...]) -> InferenceError:
    expected = [s.name for s in specs]
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        return InferenceError(ErrorCode.INVALID_INPUT, f"inputs: unknown input(s) {short_repr(unknown)}; the model "
                              f"takes {sorted(expected)}")
    missing = next(name for name in expected if name not in tensors)
    return InferenceError(ErrorCode.INVALID_INPUT, f"inputs: input {missing!r} is missing")


def _chunks(members: list[tuple[int, int]], max_rows: int) -> Iterator[tuple[list[tuple[int, int]], int]]:
    """Consecutive runs of (index, rows) of at most `max_rows` rows in all (each fits alone: validated)."""
    chunk: list[tuple[int, int]] = []
    total = 0
    for member in members:
        if chunk and total + member[1] > max_rows:
            yield chunk, total
            chunk, total = [], 0
        chunk.append(member)
        total += member[1]
    if chunk:
        yield chunk, total


# A batch this small is concatenated and checked on the event loop (tens of microseconds): on the model
# thread the same work holds the GIL while the loop waits for it, and costs it extra GIL hand-overs.
_PREPARE_ON_LOOP_BYTES = 1 << 20


@dataclass(slots=True)
class _Ran:
    """What a call on the model thread returned, when the thread took it up and finished it (queue wait ends
    and compute starts there, not when the batch was handed to the executor), and the tunings it borrowed."""

    value: Any
    started: float
    finished: float
    borrowed: int


def _on_model_thread(model: LoadedModel, wanted: list[tuple[float | None, asyncio.Future]],
                     work: Callable[[], Any]) -> _Ran | list[int]:
    """Run a group's `work`, unless some of its requests were dropped while it waited behind other batches for
    the thread (a deadline passed, a caller gave up): then the positions of the expired ones, for the group to
    run again without them and without the abandoned ones. (A future's state is only read here.)"""
    now_ms = time.time() * 1000
    expired = [i for i, (deadline, _) in enumerate(wanted) if deadline is not None and now_ms > deadline]
    if expired or any(future.cancelled() for _, future in wanted):
        return expired
    borrowed = model.borrowed_tunings
    started = time.monotonic()
    value = work()
    return _Ran(value, started, time.monotonic(), model.borrowed_tunings - borrowed)


def _refuse_non_finite_outputs(model: LoadedModel, group: list[_Entry]) -> None:
    """A NaN or infinity out of finite inputs (an overflow inside the model) is no answer: as JSON it reads
    `null`, and a class taken from it is made up."""
    for entry in group:
        outcome = entry.results[entry.position]
        if isinstance(outcome, dict) and not _finite(outcome.values()):
            name = next(name for name, value in outcome.items() if not _finite([value]))
            entry.settle(InferenceError(ErrorCode.INVALID_INPUT, f"output {name!r} came out NaN or infinite for "
                                        f"these inputs (an overflow inside {model.config.dtype} model "
                                        f"{model.name!r}): they lie outside the range it computes"))


def _finite(arrays: Iterable[np.ndarray], limit: float | None = None) -> bool:
    """Whether every float array holds only finite values (within +-limit, when given)."""
    if limit is None:
        return all(a.dtype.kind != "f" or np.isfinite(a).all() for a in arrays)
    return all(a.dtype.kind != "f" or ((a >= -limit) & (a <= limit)).all() for a in arrays)


#: Inputs arrive in FP32; a model computing in FP16 would turn larger ones into infinities.
_INPUT_LIMITS = {"FP16": float(np.finfo(np.float16).max)}


def _infer_prepared(model: LoadedModel, rejected: dict[int, str], batch: dict[str, np.ndarray] | None
                    ) -> tuple[dict[int, str], dict[str, np.ndarray] | None]:
    """On the model thread: run a batch prepared on the event loop (None: every request had NaN or Inf)."""
    return rejected, None if batch is None else model.infer(batch)


def _execute(model: LoadedModel, inputs: list[dict[str, np.ndarray]], names: list[str], limit: float | None
             ) -> tuple[dict[int, str], dict[str, np.ndarray] | None]:
    """On the model thread: prepare a large batch (see `_prepare`) and run it."""
    rejected, batch = _prepare(inputs, names, limit)
    return rejected, None if batch is None else model.infer(batch)


def _prepare(inputs: list[dict[str, np.ndarray]], names: list[str], limit: float | None = None
             ) -> tuple[dict[int, str], dict[str, np.ndarray] | None]:
    """Refuse requests with NaN/Inf (or, given `limit`, values beyond +-limit) and concatenate the rest into
    one batch (None when none is left); the refused ones map to their error messages.

    The check runs once over the whole batch, not per request in the decoder: numpy releases the GIL for
    it, and every release is a hand-over between the event loop and the model thread. Only a batch that
    holds a value at fault is searched for the requests that sent it.
    """
    batch = _concatenate(inputs, names)
    if _finite(batch.values(), limit):
        return {}, batch
    rejected = {}
    for index, tensors in enumerate(inputs):
        name = next((name for name in names if not _finite([tensors[name]], limit)), None)
        if name is None:
            continue
        if limit is None or not _finite([tensors[name]]):
            rejected[index] = f"input {name!r}: NaN or infinite values are not allowed"
        else:
            rejected[index] = f"input {name!r}: values beyond +-{limit:g} do not fit the model's FP16 computation"
    kept = [tensors for index, tensors in enumerate(inputs) if index not in rejected]
    return rejected, _concatenate(kept, names) if kept else None


def _concatenate(inputs: list[dict[str, np.ndarray]], names: list[str]) -> dict[str, np.ndarray]:
    return {n: np.concatenate([t[n] for t in inputs]) if len(inputs) > 1 else inputs[0][n] for n in names}
