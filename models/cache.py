"""The warm model cache: keeps loaded versions between requests, within a memory budget.

Thread-safe, because models are loaded and run on executor threads while the event loop asks for them.
Works over any `Repository`: with an S3 one, the first load of a version downloads it into the repository's
local cache folder (checking its sha256 sums), and later loads, in this process or the next, read that folder.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from models.artifact import ArtifactError
from models.loaded import LoadedModel
from models.repository import ModelNotFoundError, Repository

log = logging.getLogger(__name__)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    loads: int = 0
    load_seconds: float = 0.0


@dataclass
class _LoadLock:
    """One key's load lock, and how many threads hold or wait on it: it is dropped when none does, or the
    cache would keep a lock for every version ever asked for."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0  # under the cache's lock


class ModelCache:
    """(name, version) -> LoadedModel, least recently used evicted past `max_bytes`.

    Concurrent first requests for one version load it once: the others wait on a per-key lock. A version that
    failed to load for its own sake (an ArtifactError: a malformed artifact, a failed warm-up, more memory than
    the process has) is not tried again for `load_retry_s`: the requests meanwhile get its error, and readiness
    reports it (`load_failure`). A repository that cannot be reached is not remembered: the next request retries.
    "latest" is resolved against the repository at most every `latest_ttl_s` seconds.
    """

    def __init__(self, repository: Repository, max_bytes: int = 4 << 30, latest_ttl_s: float = 5.0,
                 load_retry_s: float = 10.0):
        self.repository = repository
        self.max_bytes = max_bytes
        self.latest_ttl_s = latest_ttl_s
        self.load_retry_s = load_retry_s
        self._failures: dict[tuple[str, int], tuple[float, str]] = {}  # under the key's load lock
        self.stats = CacheStats()
        self._models: OrderedDict[tuple[str, int], LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._load_locks: dict[tuple[str, int], _LoadLock] = {}  # only those held or waited on
        self._loading: dict[tuple[str, int], bool] = {}  # loads under way: whether an unload came meanwhile
        self._latest: dict[str, tuple[float, int]] = {}

    def resolve(self, name: str, version: str | int | None = None) -> int:
        """The concrete version a request means; "latest" is cached for `latest_ttl_s`."""
        if version not in (None, "", "latest"):
            return self.repository.resolve(name, version)
        now = time.monotonic()
        with self._lock:
            cached = self._latest.get(name)
        if cached and now - cached[0] < self.latest_ttl_s:
            return cached[1]
        resolved = self.repository.resolve(name, None)
        with self._lock:
            self._latest[name] = (now, resolved)
        return resolved

    def peek(self, name: str, version: int) -> LoadedModel | None:
        """The model if it is loaded (a hit), else None: never loads, so an event loop may call it."""
        key = (name, version)
        with self._lock:
            model = self._models.get(key)
            if model is not None:
                self._models.move_to_end(key)
                self.stats.hits += 1
            return model

    def get(self, name: str, version: int) -> LoadedModel:
        return self.fetch(name, version)[0]

    def fetch(self, name: str, version: int) -> tuple[LoadedModel, bool]:
        """The model, and whether this call loaded it (False: it was loaded already, or by a concurrent call)."""
        key = (name, version)
        model = self.peek(name, version)
        if model is not None:
            return model, False
        with self._lock:
            load_lock = self._load_locks.setdefault(key, _LoadLock())
            load_lock.users += 1
        try:
            with load_lock.lock:
                return self._fetch_locked(key)
        finally:
            with self._lock:
                load_lock.users -= 1
                if not load_lock.users:  # a thread coming later makes a new one: no one can hold this one
                    del self._load_locks[key]

    def _fetch_locked(self, key: tuple[str, int]) -> tuple[LoadedModel, bool]:
        """`fetch` under the key's load lock."""
        name, version = key
        with self._lock:
            model = self._models.get(key)
            if model is not None:
                self.stats.hits += 1
                return model, False
            self.stats.misses += 1
        failed = self._failures.get(key)
        if failed is not None and time.monotonic() < failed[0]:
            raise ArtifactError(f"{failed[1]} (not retried for {self.load_retry_s:g} s after a failed load)")
        with self._lock:
            self._loading[key] = False
        try:
            model = self._load(name, version)
        except BaseException as exc:
            with self._lock:
                del self._loading[key]
            if isinstance(exc, ArtifactError):  # every request would load it again: let it rest a while
                log.warning("model %r version %d of %r failed to load: %s", name, version, self.repository, exc)
                self._failures[key] = (time.monotonic() + self.load_retry_s, self.repository.for_callers(str(exc)))
            raise
        self._failures.pop(key, None)
        with self._lock:
            self.stats.loads += 1
            self.stats.load_seconds += model.load_seconds + model.warmup_seconds
            if not self._loading.pop(key):  # unloaded while it loaded: its callers run it, the cache keeps none
                self._models[key] = model
                self._evict(keep=key)
        return model, True

    def load_failure(self, name: str, version: int) -> str | None:
        """Why the version's last load failed, until a load of it succeeds: readiness must say it is not ready,
        also once `load_retry_s` has passed and before anything asks for it again. It is said to callers, so it
        names files as `<name>/<version>/<file>`, not where the server keeps them (`Repository.for_callers`).
        (A read of one entry needs no lock: the entry is replaced whole.)"""
        failed = self._failures.get((name, version))
        return None if failed is None else failed[1]

    def _load(self, name: str, version: int) -> LoadedModel:
        """Load and warm up one version, within the budget: the least recently used versions are evicted
        before its weights are read, so the process never holds more than the budget plus one model's load."""
        stored = self.repository.weights_nbytes(name, version)
        if stored is not None:
            self._check_fits(name, version, stored)
            with self._lock:
                self._evict(room=stored)
        try:
            model = self.repository.load(name, version)
        except MemoryError:  # as a failed warm-up: the artifact asks for more than this process has, every time
            raise ArtifactError(f"model {name!r} version {version} does not fit in memory while it loads") from None
        except (ArtifactError, ModelNotFoundError, OSError):  # OSError: a repository that may answer next time
            raise
        except Exception as exc:  # as a failed warm-up: torch's CUDA out-of-memory is a RuntimeError, every time
            raise ArtifactError(f"model {name!r} version {version} could not be loaded: "
                                f"{type(exc).__name__}: {exc}") from exc
        self._check_fits(name, version, model.nbytes)  # placed in another dtype, it may have grown
        try:
            model.warmup()
        except Exception as exc:
            raise ArtifactError(f"model {name!r} version {version} failed its warm-up: "
                                f"{type(exc).__name__}: {exc}") from exc
        return model

    def _check_fits(self, name: str, version: int, nbytes: int) -> None:
        if nbytes > self.max_bytes:
            raise ArtifactError(f"model {name!r} version {version} holds {nbytes} bytes of weights, more than the "
                                f"whole model cache's budget of {self.max_bytes} bytes (MAAS_MODEL_CACHE_BYTES)")

    @property
    def nbytes(self) -> int:
        """Bytes of weights of the versions loaded now."""
        with self._lock:
            return self._bytes_held()

    def _bytes_held(self) -> int:  # under self._lock
        return sum(m.nbytes for m in self._models.values())

    def loaded(self) -> list[tuple[str, int]]:
        with self._lock:
            return list(self._models)

    def unload(self, name: str, version: int | None = None) -> int:
        """Drop the loaded versions of `name` (or only `version`), and those loading now once they have loaded:
        a load under way would otherwise add its version after the unload, which then left it in memory."""
        with self._lock:
            for key in self._loading:
                if key[0] == name and (version is None or key[1] == version):
                    self._loading[key] = True
            keys = [k for k in self._models if k[0] == name and (version is None or k[1] == version)]
            for key in keys:
                del self._models[key]
            return len(keys)

    def _evict(self, room: int = 0, keep: tuple[str, int] | None = None) -> None:  # under self._lock
        """Evict least recently used versions until `room` more bytes fit in the budget."""
        total = self._bytes_held() + room
        for key in list(self._models):
            if total <= self.max_bytes:
                break
            if key == keep:
                continue
            total -= self._models.pop(key).nbytes
            self.stats.evictions += 1
