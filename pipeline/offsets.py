"""Which offsets are safe to commit when records finish out of order.

Records of one partition are handled concurrently, so record 7 may be answered before record 5. The
committable offset of a partition is the lowest offset still in flight (or one past the highest seen):
committing it never skips an unanswered record, which is what makes delivery at-least-once.
"""

from __future__ import annotations

from aiokafka import TopicPartition


class OffsetTracker:
    def __init__(self) -> None:
        self._pending: dict[TopicPartition, set[int]] = {}
        self._next: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}

    def begin(self, tp: TopicPartition, offsets: list[int]) -> None:
        """Records at these offsets (ascending, as fetched) are now in flight."""
        self._pending.setdefault(tp, set()).update(offsets)
        self._next[tp] = max(self._next.get(tp, 0), offsets[-1] + 1)

    def done(self, tp: TopicPartition, offsets: list[int]) -> None:
        """Records at these offsets are answered (their answers acknowledged)."""
        pending = self._pending.get(tp)
        if pending is not None:
            pending.difference_update(offsets)

    def next_offset(self, tp: TopicPartition) -> int | None:
        """One past the highest offset begun on `tp`; None when none was since the partition was assigned."""
        return self._next.get(tp)

    def in_flight(self, tp: TopicPartition | None = None) -> int:
        if tp is not None:
            return len(self._pending.get(tp, ()))
        return sum(len(p) for p in self._pending.values())

    def committable(self, partitions: set[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        """Offsets to commit now: only those that moved since the last `mark_committed`."""
        out = {}
        for tp, nxt in self._next.items():
            if partitions is not None and tp not in partitions:
                continue
            pending = self._pending.get(tp)
            offset = min(pending) if pending else nxt
            if offset > self._committed.get(tp, -1):
                out[tp] = offset
        return out

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        self._committed.update(offsets)

    def forget(self, partitions: set[TopicPartition]) -> None:
        """Drop the state of partitions this worker no longer owns (after a rebalance)."""
        for tp in partitions:
            self._pending.pop(tp, None)
            self._next.pop(tp, None)
            self._committed.pop(tp, None)
