"""Token-bucket rate limits per (tenant, model), and API-key authentication for the HTTP API.

Both are in-process: one bucket table per server process. Scaling out multiplies the allowance by the
number of replicas, which is the usual trade-off of local limiters (no shared store in the hot path).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.settings import ConfigError, Settings


@dataclass
class TokenBucket:
    """`rate` tokens per second up to `burst`; `take()` says whether a request may pass, or how long to wait."""

    rate: float
    burst: float
    tokens: float = -1.0
    updated: float = 0.0

    def take(self, now: float, cost: float = 1.0) -> float:
        """0.0 when the request passes (tokens spent), else the seconds until it would."""
        if self.tokens < 0:
            self.tokens, self.updated = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate if self.rate > 0 else float("inf")


@dataclass(frozen=True)
class Limit:
    rate: float
    burst: float


class RateLimiter:
    """Buckets keyed by (tenant, model); per-model overrides of the default limit.

    The table is bounded (least recently used buckets are dropped) so that many tenants cannot grow it
    without limit; a dropped bucket starts full again, which only ever errs on the generous side.
    """

    def __init__(self, default: Limit | None, per_model: Mapping[str, Limit] | None = None,
                 max_buckets: int = 100_000, clock=time.monotonic) -> None:
        self.default = default
        self.per_model = dict(per_model or {})
        self.max_buckets = max_buckets
        self._clock = clock
        self._buckets: OrderedDict[tuple[str, str], TokenBucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.default is not None or bool(self.per_model)

    def check(self, tenant: str, model: str, cost: float = 1.0) -> float:
        """0.0 when allowed, else the Retry-After seconds."""
        limit = self.per_model.get(model, self.default)
        if limit is None:
            return 0.0
        key = (tenant, model)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(limit.rate, limit.burst)
            if len(self._buckets) > self.max_buckets:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(self._clock(), cost)

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimiter:
        return cls.parse(settings.rate_limit, settings.rate_limit_models)

    @classmethod
    def parse(cls, default_spec: str, models_spec: str = "") -> RateLimiter:
        """MAAS_RATE_LIMIT="RATE[:BURST]" for every model; MAAS_RATE_LIMIT_MODELS="m1=RATE:BURST,m2=RATE"."""
        default = _parse_limit(default_spec, "MAAS_RATE_LIMIT") if default_spec else None
        per_model = {}
        for item in filter(None, (s.strip() for s in models_spec.split(","))):
            model, _, spec = item.partition("=")
            per_model[model.strip()] = _parse_limit(spec, f"MAAS_RATE_LIMIT_MODELS ({model})")
        return cls(default, per_model)


def _parse_limit(spec: str, name: str) -> Limit:
    rate_text, _, burst_text = spec.partition(":")
    try:
        rate = float(rate_text)
        burst = float(burst_text) if burst_text else max(1.0, rate)
    except ValueError:
        raise ConfigError(f"{name}={spec!r}: expected RATE[:BURST] in requests per second") from None
    # nan compares false with everything and inf never runs out: both would switch the limit off
    if not (math.isfinite(rate) and math.isfinite(burst) and rate > 0 and burst >= 1):
        raise ConfigError(f"{name}={spec!r}: RATE must be a number > 0 and BURST a number >= 1")
    return Limit(rate, burst)


class ApiKeys:
    """API keys -> tenant names. Keys are never logged. A presented key is compared with every key, as digests
    of one length, so neither how long a key is nor which one matched shows in the time it takes."""

    def __init__(self, keys: Mapping[str, str]) -> None:
        self._digests = [(_digest(key), tenant) for key, tenant in keys.items()]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def tenant(self, presented: str | None) -> str | None:
        if not presented:
            return None
        digest, found = _digest(presented), None
        for key, tenant in self._digests:
            if hmac.compare_digest(key, digest) and found is None:
                found = tenant
        return found

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiKeys:
        return cls.parse(settings.api_keys)

    @classmethod
    def parse(cls, spec: str) -> ApiKeys:
        """MAAS_API_KEYS="tenant-a:KEY1,tenant-b:KEY2" (or bare keys: tenant = key-1, key-2, ...)."""
        keys = {}
        items = [s.strip() for s in spec.split(",") if s.strip()]
        for i, item in enumerate(items, 1):
            tenant, sep, key = item.partition(":")
            if not sep:
                tenant, key = f"key-{i}", item
            tenant, key = tenant.strip(), key.strip()  # "team-a: KEY" made a key with a space, which no caller sends
            if not key or not tenant:
                raise ConfigError(f"MAAS_API_KEYS item {i} has an empty {'key' if not key else 'tenant'}")
            if key in keys:  # the later tenant took it: the earlier one's callers spent its quota, with its rights
                raise ConfigError(f"MAAS_API_KEYS item {i} repeats the key of tenant {keys[key]!r}: each key names "
                                  "one tenant")
            keys[key] = tenant
        return cls(keys)


def _digest(key: str) -> bytes:
    # HTTP headers may carry any byte: surrogateescape keeps them instead of failing to encode
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
