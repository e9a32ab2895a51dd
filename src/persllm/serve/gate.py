"""Admission: at most so many generations at once, a bounded queue, and worker threads that keep their slot."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any


class Busy(Exception):
    """The queue is full."""


class Gate:
    """At most `slots` requests generate at once and `queue` more wait; beyond that, Busy."""

    def __init__(self, slots: int, queue: int) -> None:
        self.slots, self.queue = max(1, slots), max(0, queue)
        self.running = 0
        self.waiting = 0
        self._free: asyncio.Semaphore | None = None

    async def enter(self) -> None:
        """Wait for a slot, or raise Busy when the queue is already full."""
        if self._free is None:
            self._free = asyncio.Semaphore(self.slots)
        if self.running + self.waiting >= self.slots + self.queue:
            raise Busy
        self.waiting += 1
        try:
            await self._free.acquire()
        finally:
            self.waiting -= 1
        self.running += 1

    def leave(self) -> None:
        """Give the slot back (on the event loop)."""
        self.running -= 1
        assert self._free is not None
        self._free.release()


def in_thread(gate: Gate, work: Callable[[], Any]) -> asyncio.Future[Any]:
    """Run `work` on its own thread; the slot is released when the thread ends, even if the client left earlier."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def run() -> None:
        try:
            outcome: tuple[Any, BaseException | None] = (work(), None)
        except BaseException as exc:  # noqa: BLE001 (handed to the awaiting request, which reports it)
            outcome = (None, exc)

        def settle() -> None:
            gate.leave()
            if not future.done():
                if outcome[1] is not None:
                    future.set_exception(outcome[1])
                else:
                    future.set_result(outcome[0])

        with contextlib.suppress(RuntimeError):  # the loop is gone: the server has shut down
            loop.call_soon_threadsafe(settle)

    threading.Thread(target=run, name="persllm-serve", daemon=True).start()
    return future
