"""File descriptors watched without a task or a thread per fd, on asyncio and trio alike.

:class:`FdWaits` awaits one fd and tells the event loop it is closing only when a task waits on
it. :class:`Readers` calls a function each time an fd turns readable: asyncio has that
(``loop.add_reader``); trio does not, so there one task waits on an epoll instance that holds every
fd added (level-triggered) and calls their callbacks. A thousand monitors and consoles then cost
one task and a thousand EOFs a few wakeups, not a thousand of each. An owner may pause its fd's
callback while it reads the fd itself. stdlib, anyio and sniffio only.
"""

from __future__ import annotations

import asyncio
import select
from collections.abc import Callable

import anyio
import sniffio

__all__ = ["FdWaits", "Readers"]


class FdWaits:
    """Awaits one fd through anyio, counting the waiters, so that closing it tells the event loop
    (``anyio.notify_closing``: a waiter then gets ClosedResourceError before the number is reused)
    only when a task waits. Closing one of a thousand domains' fds costs no trip through anyio."""

    __slots__ = ("_fd", "_waiters")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._waiters = 0

    async def readable(self) -> None:
        self._waiters += 1
        try:
            await anyio.wait_readable(self._fd)
        finally:
            self._waiters -= 1

    async def writable(self) -> None:
        self._waiters += 1
        try:
            await anyio.wait_writable(self._fd)
        finally:
            self._waiters -= 1

    def notify_closing(self) -> None:
        """Call just before the fd is closed."""
        if self._waiters:
            anyio.notify_closing(self._fd)


class Readers:
    """Reader callbacks for the fds of one owner (a connection). Make it in the event loop and run
    :meth:`serve` in a task for as long as fds may be added; a callback must not raise or block.

    An fd must be removed before it is closed (its number may be reused).
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._epoll: select.epoll | None = None
        self._callbacks: dict[int, Callable[[], None]] = {}
        if sniffio.current_async_library() == "asyncio":
            self._loop = asyncio.get_running_loop()
        else:
            self._epoll = select.epoll()

    @property
    def needs_task(self) -> bool:
        """True where :meth:`serve` must run in a task for callbacks to be called (trio)."""
        return self._loop is None

    def add(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback()`` each time ``fd`` is readable, until :meth:`remove`."""
        if self._loop is not None:
            self._loop.add_reader(fd, callback)
            self._callbacks[fd] = callback
            return
        if self._epoll is None:
            return  # serve() has ended: the owner is closing, and closes its fds itself
        self._epoll.register(fd, select.EPOLLIN)
        self._callbacks[fd] = callback

    def remove(self, fd: int) -> None:
        if self._callbacks.pop(fd, None) is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(fd)
        elif self._epoll is not None:
            self._epoll.unregister(fd)

    def pause(self, fd: int) -> None:
        """No callback for ``fd`` until :meth:`resume` (its owner reads it itself meanwhile)."""
        if fd not in self._callbacks:
            return
        if self._loop is not None:
            self._loop.remove_reader(fd)
        elif self._epoll is not None:
            self._epoll.modify(fd, 0)

    def resume(self, fd: int) -> None:
        callback = self._callbacks.get(fd)
        if callback is None:
            return
        if self._loop is not None:
            self._loop.add_reader(fd, callback)
        elif self._epoll is not None:
            self._epoll.modify(fd, select.EPOLLIN)

    async def serve(self) -> None:
        """Call the callbacks of readable fds until cancelled (trio; on asyncio the loop calls
        them and this returns at once). Once it has ended, no callback is called."""
        epoll = self._epoll
        if epoll is None:
            return
        try:
            while True:
                await anyio.wait_readable(epoll.fileno())
                callbacks = self._callbacks
                for fd, _ in epoll.poll(0):
                    callback = callbacks.get(fd)
                    if callback is not None:
                        callback()
        finally:
            self._epoll = None
            self._callbacks.clear()
            anyio.notify_closing(epoll.fileno())
            epoll.close()
