"""The batched partitioner must pick exactly what aiokafka's producer would, key by key."""

from __future__ import annotations

import random

import pytest
from aiokafka.partitioner import DefaultPartitioner, murmur2

from pipeline.partitioning import murmur2_many, partitions_for_keys


def _keys(count: int, lengths: range, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.choice(lengths)) for _ in range(count)]


@pytest.mark.parametrize("lengths", [range(0, 1), range(1, 4), range(4, 5), range(9, 10), range(0, 41)])
@pytest.mark.parametrize("count", [1, 15, 16, 300])
def test_murmur2_many_matches_kafka_murmur2(lengths: range, count: int) -> None:
    keys = _keys(count, lengths, seed=count * 100 + lengths.start)
    assert murmur2_many(keys).tolist() == [murmur2(key) for key in keys]


def test_high_bytes_and_request_ids() -> None:
    keys = [bytes([255] * n) for n in range(12)] + [f"req-{i:07d}".encode() for i in range(200)]
    assert murmur2_many(keys).tolist() == [murmur2(key) for key in keys]


@pytest.mark.parametrize("partitions", [[0], [0, 1, 2, 3], [0, 2, 5, 7, 11]])
def test_partitions_match_the_default_partitioner(partitions: list[int]) -> None:
    keys = _keys(500, range(0, 37), seed=len(partitions))
    expected = [DefaultPartitioner()(key, partitions, partitions) for key in keys]
    assert partitions_for_keys(keys, partitions) == expected


def test_records_without_a_key_go_to_some_partition() -> None:
    keys: list[bytes | None] = [None, b"a", None, b"request-1"] * 10
    got = partitions_for_keys(keys, [3, 4, 9])
    assert all(p in (3, 4, 9) for p in got)
    assert got[1::2] == [DefaultPartitioner()(k, [3, 4, 9], [3, 4, 9]) for k in keys[1::2]]
    assert partitions_for_keys([], [0, 1]) == []
