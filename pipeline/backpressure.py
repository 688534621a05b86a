"""In-flight limits of the sources: a worker holds at most `max_in_flight` unanswered messages."""

from __future__ import annotations

import asyncio


class Slots:
    """A counting semaphore that hands out several slots at once: a fetch takes as many as it can use."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.free = capacity
        self._freed = asyncio.Event()

    async def take(self, wanted: int) -> int:
        """Wait until `wanted` slots are free (all of them, if `wanted` exceeds the capacity), take them and
        return how many were taken.

        Waiting for the whole request rather than taking what trickles back keeps a fetch in one piece:
        at full load, slots come back a handful at a time, and fetches cut to that size cost the engine
        per piece what they would cost per fetch.
        """
        needed = min(wanted, self.capacity)
        while self.free < needed:
            self._freed.clear()
            await self._freed.wait()
        self.free -= needed
        return needed

    def give(self, count: int) -> None:
        self.free += count
        self._freed.set()
