import asyncio

import pytest

from pipeline.tasks import gather_or_cancel


async def _sleep_then(delay: float, value: int, ended: list[int]) -> int:
    try:
        await asyncio.sleep(delay)
        return value
    finally:
        ended.append(value)


async def _fail_after(delay: float) -> None:
    await asyncio.sleep(delay)
    raise ValueError("the batch failed")


async def test_results_come_in_the_order_of_the_awaitables():
    ended: list[int] = []
    assert await gather_or_cancel(_sleep_then(0.05, 1, ended), _sleep_then(0, 2, ended)) == [1, 2]
    assert ended == [2, 1]


async def test_the_first_failure_cancels_the_others_before_it_reaches_the_caller():
    """asyncio.gather would raise at once and leave both sleepers running (``ended`` empty at the raise)."""
    ended: list[int] = []
    with pytest.raises(ValueError, match="the batch failed"):
        async with asyncio.timeout(5):
            await gather_or_cancel(_sleep_then(60, 1, ended), _fail_after(0.01), _sleep_then(60, 2, ended))
    assert sorted(ended) == [1, 2]
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_cancelling_the_caller_cancels_every_awaitable():
    ended: list[int] = []
    caller = asyncio.create_task(gather_or_cancel(_sleep_then(60, 1, ended), _sleep_then(60, 2, ended)))
    await asyncio.sleep(0.01)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert sorted(ended) == [1, 2]
