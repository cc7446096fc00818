"""A QEMU's serial console: the unix socket the controller holds, fed to a ConsolePort.

QEMU serves the console (``-chardev socket,...,server=on,logfile=...``) to one client at a time;
the controller is that client for as long as it supervises the QEMU: it connects before the
spawn (QEMU accepts at start-up, ``wait=on``, so nothing the guest prints is missed), reads
without pause and fans the bytes out to the open consoles (:class:`~aiovirt._console.ConsolePort`,
which never blocks). When the controller exits, QEMU listens again and keeps logging; the next
controller connects to ``RUN/NAME.serial`` when it takes the QEMU back.

Reading and writing are plain non-blocking socket calls awaited with ``anyio.wait_readable`` /
``wait_writable`` (no transport, no thread), as the QMP client does.
"""

from __future__ import annotations

import socket

import anyio

from ..._console import ConsolePort
from ..._errors import ConnectionLostError

__all__ = ["SerialConsole"]

_RECEIVE_SIZE = 4096


class SerialConsole:
    """One connection to a QEMU's console socket and the port it feeds. Run :meth:`serve` in a task."""

    def __init__(self, name: str, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._fd = sock.fileno()
        self._name = name
        self.port = ConsolePort(name, self._write)

    async def serve(self) -> None:
        """Read until QEMU closes the console (it exited) or the task is cancelled; then close."""
        try:
            while True:
                await anyio.wait_readable(self._fd)
                try:
                    data = self._sock.recv(_RECEIVE_SIZE)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    break
                if not data:
                    break
                self.port.feed(data)
        finally:
            self.port.close("its console is closed (the domain stopped, or the connection was closed)")
            anyio.notify_closing(self._fd)
            self._sock.close()

    async def _write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                try:
                    sent = self._sock.send(view, socket.MSG_NOSIGNAL)
                except (BlockingIOError, InterruptedError):
                    await anyio.wait_writable(self._fd)
                    continue
                view = view[sent:]
        except (OSError, anyio.ClosedResourceError) as exc:
            raise ConnectionLostError(f"domain {self._name!r}: its console went away") from exc
