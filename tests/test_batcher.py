"""The dynamic batcher closes batches by size or by delay, honours priority, and pushes back when full."""

from __future__ import annotations

import asyncio
import time

from models.artifact import BatchingPolicy
from pipeline.batcher import DynamicBatcher


class Recorder:
    def __init__(self, hold: asyncio.Event | None = None) -> None:
        self.batches: list[list[str]] = []
        self.hold = hold

    async def __call__(self, key, items) -> None:
        if self.hold is not None:
            await self.hold.wait()
        self.batches.append([item.payload for item in items])
        for item in items:
            item.future.set_result(item.payload)


async def test_batch_closes_at_max_batch_size():
    recorder = Recorder()
    batcher = DynamicBatcher(recorder)
    policy = BatchingPolicy(max_batch_size=4, max_queue_delay_ms=10_000)
    futures = [await batcher.submit(("m", 1), policy, f"r{i}", rows=1) for i in range(8)]
    assert await asyncio.wait_for(asyncio.gather(*futures), 5) == [f"r{i}" for i in range(8)]
    assert [len(b) for b in recorder.batches] == [4, 4]
    await batcher.stop()


async def test_batch_closes_after_max_queue_delay():
    recorder = Recorder()
    batcher = DynamicBatcher(recorder)
    policy = BatchingPolicy(max_batch_size=64, max_queue_delay_ms=50)
    started = time.monotonic()
    futures = [await batcher.submit(("m", 1), policy, f"r{i}", rows=1) for i in range(3)]
    await asyncio.wait_for(asyncio.gather(*futures), 5)
    assert recorder.batches == [["r0", "r1", "r2"]]
    assert time.monotonic() - started >= 0.045
    await batcher.stop()


async def test_rows_count_towards_the_batch_size_and_oversize_items_wait_for_the_next_batch():
    recorder = Recorder()
    batcher = DynamicBatcher(recorder)
    policy = BatchingPolicy(max_batch_size=4, max_queue_delay_ms=30)
    futures = [await batcher.submit(("m", 1), policy, name, rows=rows) for name, rows in
               [("a", 3), ("b", 2), ("c", 1)]]
    await asyncio.wait_for(asyncio.gather(*futures), 5)
    assert recorder.batches == [["a"], ["b", "c"]]
    await batcher.stop()


async def test_higher_priority_runs_first_and_full_queue_blocks_submit():
    hold = asyncio.Event()
    recorder = Recorder(hold)
    batcher = DynamicBatcher(recorder, max_queue=3, max_running=1)
    policy = BatchingPolicy(max_batch_size=1, max_queue_delay_ms=0)
    first = await batcher.submit(("m", 1), policy, "first", rows=1)
    await asyncio.sleep(0.01)  # "first" is now being run (held)
    low = await batcher.submit(("m", 1), policy, "low", rows=1, priority=0)
    high = await batcher.submit(("m", 1), policy, "high", rows=1, priority=5)
    await batcher.submit(("m", 1), policy, "fill", rows=1)
    blocked = asyncio.create_task(batcher.submit(("m", 1), policy, "late", rows=1))
    await asyncio.sleep(0.05)
    assert not blocked.done(), "submit must wait while the model's queue is full"
    hold.set()
    await asyncio.wait_for(asyncio.gather(first, low, high, await blocked), 5)
    assert [b[0] for b in recorder.batches][:3] == ["first", "high", "low"]
    await batcher.stop()


async def test_the_next_batch_waits_at_the_runner_while_one_runs_and_then_fills_up():
    # Two batches may be with the runner at once (the second queued behind the first in the model's
    # executor); requests arriving meanwhile gather into one batch instead of trickling out one by one.
    started: list[list[str]] = []
    release = asyncio.Event()

    async def runner(key, items) -> None:
        started.append([item.payload for item in items])
        await release.wait()
        for item in items:
            item.future.set_result(item.payload)

    batcher = DynamicBatcher(runner, max_running=2)
    policy = BatchingPolicy(max_batch_size=8, max_queue_delay_ms=0)
    futures = [await batcher.submit(("m", 1), policy, "a", rows=1)]
    await asyncio.sleep(0.01)
    futures.append(await batcher.submit(("m", 1), policy, "b", rows=1))
    await asyncio.sleep(0.01)
    futures += [await batcher.submit(("m", 1), policy, f"c{i}", rows=1) for i in range(5)]
    await asyncio.sleep(0.01)
    assert started == [["a"], ["b"]], "a third batch must not start while two are running"
    release.set()
    await asyncio.wait_for(asyncio.gather(*futures), 5)
    assert started[2] == [f"c{i}" for i in range(5)]
    await batcher.stop()


async def test_close_when_idle_runs_a_lone_request_at_once_and_fills_batches_while_busy():
    hold = asyncio.Event()
    recorder = Recorder(hold)
    batcher = DynamicBatcher(recorder, max_running=2)
    policy = BatchingPolicy(max_batch_size=8, max_queue_delay_ms=10_000, close_when_idle=True)
    started = time.monotonic()
    lone = await batcher.submit(("m", 1), policy, "lone", rows=1)
    await asyncio.sleep(0.05)
    hold.set()
    assert await asyncio.wait_for(lone, 2) == "lone"  # not after the 10 s delay: nothing else was running
    hold.clear()
    first = await batcher.submit(("m", 1), policy, "first", rows=1)
    await asyncio.sleep(0.05)  # "first" runs (held); what comes now waits for it, not for the delay
    rest = [await batcher.submit(("m", 1), policy, name, rows=1) for name in ("b", "c", "d")]
    await asyncio.sleep(0.05)
    hold.set()
    assert await asyncio.wait_for(asyncio.gather(first, *rest), 2) == ["first", "b", "c", "d"]
    assert recorder.batches == [["lone"], ["first"], ["b", "c", "d"]]
    assert time.monotonic() - started < 5
    await batcher.stop()


async def test_stop_fails_queued_requests_instead_of_dropping_them():
    hold = asyncio.Event()
    batcher = DynamicBatcher(Recorder(hold))
    policy = BatchingPolicy(max_batch_size=1, max_queue_delay_ms=0)
    futures = [await batcher.submit(("m", 1), policy, f"r{i}", rows=1) for i in range(3)]
    await asyncio.sleep(0.01)
    await batcher.stop()
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert all(getattr(r, "code", None) == "UNAVAILABLE" for r in results)


async def test_stop_while_a_request_arrives_in_the_same_tick_does_not_hang():
    """Python 3.11's wait_for returns an item that arrived in the tick its caller was cancelled and drops the
    cancellation: a collector waiting that way for more rows would outlive stop(), which would never return."""
    batcher = DynamicBatcher(Recorder())
    policy = BatchingPolicy(max_batch_size=4, max_queue_delay_ms=2000)
    first = await batcher.submit(("m", 1), policy, "r0", rows=1)
    await asyncio.sleep(0.01)  # the collector now waits for a second row
    second = await batcher.submit(("m", 1), policy, "r1", rows=1)  # resolves that wait ...
    await asyncio.wait_for(batcher.stop(), 5)  # ... in the tick stop() cancels the collector
    results = await asyncio.gather(first, second, return_exceptions=True)
    assert all(getattr(r, "code", None) == "UNAVAILABLE" for r in results)


async def test_a_submit_blocked_on_a_full_queue_during_stop_is_answered():
    hold = asyncio.Event()
    batcher = DynamicBatcher(Recorder(hold), max_queue=2, max_running=1)
    policy = BatchingPolicy(max_batch_size=1, max_queue_delay_ms=0)
    futures = [await batcher.submit(("m", 1), policy, f"r{i}", rows=1) for i in range(3)]
    await asyncio.sleep(0.01)  # r0 runs (held), r1 waits for room, r2 fills the queue
    late = asyncio.create_task(batcher.submit(("m", 1), policy, "late", rows=1))
    await asyncio.sleep(0.01)
    assert not late.done()  # blocked on the full queue
    await asyncio.wait_for(batcher.stop(), 5)
    future = await asyncio.wait_for(late, 2)
    results = await asyncio.wait_for(asyncio.gather(future, *futures, return_exceptions=True), 2)
    assert all(getattr(r, "code", None) == "UNAVAILABLE" for r in results)


async def test_a_request_held_back_for_size_yields_to_a_higher_priority_one():
    """A request that did not fit its batch starts the next one, unless one of higher priority came meanwhile."""
    hold = asyncio.Event()
    recorder = Recorder(hold)
    batcher = DynamicBatcher(recorder, max_running=2)
    policy = BatchingPolicy(max_batch_size=2, max_queue_delay_ms=200)
    futures = [await batcher.submit(("m", 1), policy, "first", rows=1)]
    await asyncio.sleep(0.3)  # "first" closed after its delay and runs (held)
    futures.append(await batcher.submit(("m", 1), policy, "small", rows=1))  # a batch fills around it
    await asyncio.sleep(0.05)
    futures.append(await batcher.submit(("m", 1), policy, "big", rows=2))  # does not fit beside "small": held
    await asyncio.sleep(0.3)  # ["small"] runs too: the next batch waits for room, "big" held for it
    futures.append(await batcher.submit(("m", 1), policy, "urgent", rows=1, priority=9))
    hold.set()
    await asyncio.wait_for(asyncio.gather(*futures), 5)
    await batcher.stop()
    assert recorder.batches == [["first"], ["small"], ["urgent"], ["big"]]


async def test_an_idle_collector_retires_and_a_later_request_starts_a_new_one():
    hold = asyncio.Event()
    recorder = Recorder(hold)
    batcher = DynamicBatcher(recorder, max_running=1, retire_after_s=0.05)
    policy = BatchingPolicy(max_batch_size=1, max_queue_delay_ms=0)
    running = await batcher.submit(("old", 1), policy, "slow", rows=1)
    await batcher.submit(("m", 1), policy, "r0", rows=1)
    await asyncio.sleep(0.2)
    assert batcher.collecting == [("old", 1), ("m", 1)]  # a batch runs for both: nothing retires
    hold.set()
    assert await asyncio.wait_for(running, 2) == "slow"
    await asyncio.sleep(0.2)
    assert batcher.collecting == []  # idle for longer than retire_after_s: the tasks and queues are gone
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("batcher-")]
    future = await batcher.submit(("m", 1), policy, "r1", rows=1)
    assert await asyncio.wait_for(future, 2) == "r1" and batcher.collecting == [("m", 1)]
    await batcher.stop()
    assert recorder.batches == [["slow"], ["r0"], ["r1"]]
