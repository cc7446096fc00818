"""Fan-out of items (QMP events, lifecycle events) to any number of bounded subscribers.

Policy, the same for every stream in aiovirt: publishing never blocks and never fails. Each
subscriber has its own buffer of ``max_buffer`` items. When it is full, new items are dropped for
that subscriber only and counted; once the subscriber has received everything that did fit, its
next receive raises :class:`~aiovirt.EventsDroppedError` with the count, so losing events is never
silent. The subscription stays usable after that error.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

import anyio

from ._errors import EventsDroppedError

__all__ = ["Broadcaster", "Subscription"]

T = TypeVar("T")


class Subscription(Generic[T]):
    """One subscriber's view of a :class:`Broadcaster`: an async iterator of items."""

    def __init__(self, max_buffer: int) -> None:
        if max_buffer < 1:
            raise ValueError("max_buffer must be at least 1")
        self.max_buffer = max_buffer
        self._items: deque[T] = deque()
        self._dropped = 0
        self._closed = False
        self._wakeup: anyio.Event | None = None

    def _push(self, item: T) -> None:
        if self._closed:
            return
        if len(self._items) >= self.max_buffer:
            self._dropped += 1
        else:
            self._items.append(item)
        self._wake()

    def _close(self) -> None:
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None

    def receive_nowait(self) -> T | None:
        """The next buffered item, or None when nothing is buffered right now.

        Raises :class:`EventsDroppedError` once items were dropped, after everything buffered before them.
        """
        if self._items:
            return self._items.popleft()
        if self._dropped:
            dropped, self._dropped = self._dropped, 0
            raise EventsDroppedError(dropped)
        return None

    async def receive(self) -> T:
        """Wait for the next item. Raises ``anyio.EndOfStream`` once the source is closed and drained."""
        while True:
            item = self.receive_nowait()
            if item is not None:
                return item
            if self._closed:
                raise anyio.EndOfStream
            wakeup = self._wakeup = anyio.Event()
            await wakeup.wait()

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None


class Broadcaster(Generic[T]):
    """Delivers every published item to every current subscriber, never blocking the publisher."""

    def __init__(self) -> None:
        self._subscribers: list[Subscription[T]] = []
        self._closed = False

    def publish(self, item: T) -> None:
        for sub in self._subscribers:
            sub._push(item)

    @contextmanager
    def subscribe(self, max_buffer: int = 256) -> Iterator[Subscription[T]]:
        """Receive every item published while the ``with`` block is open."""
        sub: Subscription[T] = Subscription(max_buffer)
        if self._closed:
            sub._close()
        self._subscribers.append(sub)
        try:
            yield sub
        finally:
            self._subscribers.remove(sub)

    def close(self) -> None:
        """End every subscription (after it has drained) and any made later."""
        self._closed = True
        for sub in self._subscribers:
            sub._close()

    @property
    def closed(self) -> bool:
        return self._closed
