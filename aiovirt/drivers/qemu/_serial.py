"""A QEMU's serial console: the unix socket the controller holds, fed to a ConsolePort.

QEMU serves the console (``-chardev socket,...,server=on,logfile=...``) to one client at a time;
the controller is that client for as long as it supervises the QEMU: it connects before the
spawn (QEMU accepts at start-up, ``wait=on``, so nothing the guest prints is missed), reads
without pause and fans the bytes out to the open consoles (:class:`~aiovirt._console.ConsolePort`,
which never blocks). When the controller exits, QEMU listens again and keeps logging; the next
controller connects to ``RUN/NAME.serial`` when it takes the QEMU back.

The socket is read by a reader callback (:class:`~aiovirt._fds.Readers`: the loop's on asyncio, one
task for all of a connection's consoles on trio), never by a task of its own; writes are plain
non-blocking sends awaited with ``wait_writable``. No transport, no thread.
"""

from __future__ import annotations

import socket

import anyio

from ..._console import ConsolePort
from ..._errors import ConnectionLostError
from ..._fds import FdWaits, Readers

__all__ = ["SerialConsole"]

_RECEIVE_SIZE = 4096
#: At close, what QEMU already sent is fed first, up to this many receives (256 KiB).
_DRAIN_READS = 64
_CLOSED_WHY = "its console is closed (the domain stopped, or the connection was closed)"


class SerialConsole:
    """One connection to a QEMU's console socket and the port it feeds, read from its creation
    until QEMU closes the console or :meth:`close`."""

    def __init__(self, name: str, sock: socket.socket, readers: Readers) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._fd = sock.fileno()
        self._waits = FdWaits(self._fd)
        self._name = name
        self._readers = readers
        self.port = ConsolePort(name, self._write)
        readers.add(self._fd, self._readable)

    def _readable(self) -> None:
        if self._read_ready() is False:
            self.close()

    def _read_ready(self) -> bool | None:
        """Feed what is there: True if something was, None if nothing, False at EOF or error."""
        try:
            data = self._sock.recv(_RECEIVE_SIZE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return False
        if not data:
            return False
        self.port.feed(data)
        return True

    @property
    def closed(self) -> bool:
        return self._sock.fileno() < 0

    def close(self) -> None:
        """Feed what QEMU already sent, then close. Idempotent."""
        if self.closed:
            return
        self._readers.remove(self._fd)
        for _ in range(_DRAIN_READS):  # bounded: a live QEMU may keep printing
            if not self._read_ready():
                break
        self.port.close(_CLOSED_WHY)
        self._waits.notify_closing()  # a console write waiting gets ConnectionLostError
        self._sock.close()

    async def _write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                try:
                    sent = self._sock.send(view, socket.MSG_NOSIGNAL)
                except (BlockingIOError, InterruptedError):
                    await self._waits.writable()
                    continue
                view = view[sent:]
        except (OSError, anyio.ClosedResourceError) as exc:
            raise ConnectionLostError(f"domain {self._name!r}: its console went away") from exc
