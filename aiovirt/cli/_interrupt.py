"""Ctrl-C as a cancel scope: the first SIGINT (or SIGTERM) cancels the innermost interruptible scope.

A verb runs inside one such scope, so Ctrl-C ends it as a cancellation (the library's cleanup
promises hold: a half-started QEMU is killed, a cancelled destroy or stop sends nothing
further). A verb for which Ctrl-C is the normal end (``--follow``, ``event --loop``) or which
must report after it (``stop-all``) opens its own scope inside. A second signal gets Python's
default handling: ``KeyboardInterrupt`` (SIGINT) or the end of the process (SIGTERM), at once.
The exit status after an interruption is 128 + the signal's number (130 for Ctrl-C), as shells.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

import anyio

__all__ = ["Interrupts"]


class Interrupts:
    def __init__(self) -> None:
        self.received: signal.Signals | None = None
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

    @property
    def exit_status(self) -> int:
        return 128 + (self.received or signal.SIGINT)

    def fire(self, signum: signal.Signals = signal.SIGINT) -> None:
        self.received = signum
        if self._scopes:
            self._scopes[-1].cancel()

    async def watch(self) -> None:
        """Wait for the first SIGINT or SIGTERM and fire; then both are Python's own again."""
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                self.fire(signal.Signals(signum))
                return
