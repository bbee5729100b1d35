"""A one-shot wake-up for coroutines on one event loop: ``await w.wait()`` sleeps until ``w.wake_all()``.

Used where a condition changes in plain (synchronous) code on the loop's thread and waiters must
re-check it: no polling, and a cancelled waiter leaves nothing behind. Not thread-safe: call
``wake_all`` on the loop (``loop.call_soon_threadsafe`` from other threads).

Not here: waking from other threads (use ``loop.call_soon_threadsafe``), timeouts (the caller's).
"""

from __future__ import annotations

import asyncio

__all__ = ["Wakeup"]


class Wakeup:
    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    async def wait(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)

    def wake_all(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def __bool__(self) -> bool:
        return bool(self._waiters)
