"""Running several awaitables at once without leaving any of them behind.

`asyncio.gather` raises the first failure at once and lets the others run on, owned by no one: answers of a
batch already being retried go out anyway, and on a function's event loop, which outlives its invocation (the
runtime is reused while warm), they run on inside the next invocation. `gather_or_cancel` is gather for work
that is all or nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def gather_or_cancel(*awaitables: Awaitable[T]) -> list[T]:
    """The results of `awaitables` run at once, in order; on the first failure (or if this is cancelled) the
    others are cancelled and waited for before it is raised, so that none outlives the call."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
