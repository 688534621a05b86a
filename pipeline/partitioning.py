"""Kafka's default key partitioning (Java-compatible murmur2), for many keys at once.

A worker answers a fetch of hundreds of records at a time, each keyed by its request id. aiokafka's
pure-Python murmur2 costs about 2 us per key, as much as encoding the answer; the same arithmetic on
numpy columns (keys of one length side by side) costs a fraction of it per key. The result is what
`aiokafka.partitioner.DefaultPartitioner` picks for each key, so keyed consumers see no difference.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from aiokafka.partitioner import murmur2

_SEED = 0x9747B28C
_M = np.uint32(0x5BD1E995)
_MIN_COLUMN_KEYS = 16  # below this, numpy's per-call cost outweighs the pure-Python loop


def murmur2_many(keys: Sequence[bytes]) -> np.ndarray:
    """Kafka's murmur2 of every key (uint32), in order."""
    out = np.empty(len(keys), dtype=np.uint32)
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, key in enumerate(keys):
        by_length[len(key)].append(index)
    for length, indices in by_length.items():
        if len(indices) < _MIN_COLUMN_KEYS:
            out[indices] = [murmur2(keys[i]) for i in indices]
            continue
        columns = np.frombuffer(b"".join([keys[i] for i in indices]), dtype=np.uint8).reshape(len(indices), length)
        out[indices] = _murmur2_columns(columns, length)
    return out


def _murmur2_columns(data: np.ndarray, length: int) -> np.ndarray:
    """murmur2 of equal-length keys, one per row of `data` (uint8, rows x length); uint32 wraps like Java's int."""
    rows = data.shape[0]
    h = np.full(rows, (_SEED ^ length) & 0xFFFFFFFF, dtype=np.uint32)
    whole = length - length % 4
    if whole:
        words = np.ascontiguousarray(data[:, :whole]).view("<u4")
        for i in range(whole // 4):
            k = words[:, i] * _M
            k ^= k >> 24
            k *= _M
            h *= _M
            h ^= k
    tail = length % 4
    if tail >= 3:
        h ^= data[:, whole + 2].astype(np.uint32) << 16
    if tail >= 2:
        h ^= data[:, whole + 1].astype(np.uint32) << 8
    if tail >= 1:
        h ^= data[:, whole].astype(np.uint32)
        h *= _M
    h ^= h >> 13
    h *= _M
    h ^= h >> 15
    return h


def partitions_for_keys(keys: Sequence[bytes | None], partitions: Sequence[int]) -> list[int]:
    """The partition Kafka's default partitioner gives each key, out of `partitions` (sorted by id); a record
    without a key goes to a random one, as the producer would send it."""
    out = [random.choice(partitions) if key is None else 0 for key in keys]
    keyed = [i for i, key in enumerate(keys) if key is not None]
    hashes = murmur2_many([keys[i] for i in keyed])
    for i, slot in zip(keyed, ((hashes & 0x7FFFFFFF) % len(partitions)).tolist(), strict=True):
        out[i] = partitions[slot]
    return out
