"""Ctrl-C as a cancel scope: the first SIGINT cancels the innermost interruptible scope.

A verb runs inside one such scope, so Ctrl-C ends it as a cancellation (the library's cleanup
promises hold: a half-started QEMU is killed, a cancelled destroy or stop sends nothing
further). A verb for which Ctrl-C is the normal end (``--follow``, ``event --loop``) or which
must report after it (``stop-all``) opens its own scope inside. A second Ctrl-C is Python's
default: ``KeyboardInterrupt`` at once.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

import anyio

__all__ = ["Interrupts"]


class Interrupts:
    def __init__(self) -> None:
        self.received = False
        self._scopes: list[anyio.CancelScope] = []

    @contextmanager
    def scope(self) -> Iterator[anyio.CancelScope]:
        """A scope that the first Ctrl-C cancels (if it is the innermost one then)."""
        scope = anyio.CancelScope()
        self._scopes.append(scope)
        try:
            with scope:
                yield scope
        finally:
            self._scopes.remove(scope)

    def fire(self) -> None:
        self.received = True
        if self._scopes:
            self._scopes[-1].cancel()

    async def watch(self) -> None:
        """Wait for the first SIGINT and fire; then SIGINT is Python's own again."""
        with anyio.open_signal_receiver(signal.SIGINT) as signals:
            async for _ in signals:
                self.fire()
                return
