"""A guest's serial console as an anyio byte stream: several readers, one writer, ``expect``.

Two halves, one per side of the driver seam:

- :class:`ConsolePort` is the driver's: one per running machine. The driver feeds it what the
  guest prints (:meth:`ConsolePort.feed`, never blocking) and gives it a function that writes to
  the guest; it closes it when the console ends (the machine exited, the connection closed).
  It keeps the last :data:`SCROLLBACK` bytes of this run, so a console opened after the guest
  printed something still sees it.
- :class:`Console` is the caller's (``async with dom.console() as con:``): an
  :class:`anyio.abc.ByteStream` (``receive``, ``send``, ``aclose``) plus :meth:`Console.expect`
  and what it saw so far (:attr:`Console.seen`, :attr:`Console.text`).

Readers: every open console receives every byte, through its own bounded buffer (an
:class:`~aiovirt._broadcast.Broadcaster` subscription: feeding never blocks; a reader that falls
``max_buffer`` chunks behind gets :class:`~aiovirt.EventsDroppedError` once it has received what
fit, and can keep reading).

Writer: one console at a time may write. It becomes the writer at its first :meth:`Console.send`
(or when opened with ``writer=True``) and stays it until it is closed (or :meth:`send_eof`); a
send from another console meanwhile raises :class:`ConsoleBusyError`, at once, having sent
nothing (as ``virsh console`` refuses a second session). Reading never needs the role.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from typing import Final

import anyio
import anyio.abc
import anyio.lowlevel

from ._broadcast import Broadcaster, Subscription
from ._errors import ConnectionLostError, ConsoleBusyError

__all__ = ["SCROLLBACK", "SEEN_LIMIT", "Console", "ConsolePort"]

SCROLLBACK: Final = 64 << 10
"""How much of a run's console output a port keeps for consoles opened later (bytes)."""

SEEN_LIMIT: Final = 1 << 20
"""How much of what it received a console keeps in :attr:`Console.seen` (bytes; what it has not
read yet is always kept)."""


class ConsolePort:
    """One machine's serial console, shared by every :class:`Console` opened on it (driver side).

    ``write`` sends bytes to the guest (awaited: the guest's input may push back). ``scrollback``,
    if given, is the buffer to keep the recent output in (a driver whose runs outlive its
    connections passes the run's own, so a later connection sees it too).
    """

    def __init__(
        self,
        name: str,
        write: Callable[[bytes], Awaitable[None]],
        *,
        scrollback: bytearray | None = None,
        limit: int = SCROLLBACK,
    ) -> None:
        self.name = name
        self._write = write
        self._scrollback = scrollback if scrollback is not None else bytearray()
        self._limit = limit
        self._output: Broadcaster[bytes] = Broadcaster()
        self._writer: Console | None = None
        self._write_lock = anyio.Lock()
        self._closed_why: str | None = None

    # -- the driver's side ----------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """What the guest printed. Never blocks."""
        if not data or self._closed_why is not None:
            return
        self._scrollback += data
        excess = len(self._scrollback) - self._limit
        if excess > 0:
            del self._scrollback[:excess]
        self._output.publish(bytes(data))

    def close(self, why: str = "the console closed") -> None:
        """The console ended: readers get ``EndOfStream`` once they have read what was fed."""
        if self._closed_why is None:
            self._closed_why = why
            self._output.close()

    @property
    def closed(self) -> bool:
        return self._closed_why is not None

    # -- the consoles' side ---------------------------------------------------------------------

    def open(self, *, replay: bool = True, max_buffer: int = 256, writer: bool = False) -> Console:
        return Console(self, replay=replay, max_buffer=max_buffer, writer=writer)

    def _subscribe(
        self, stack: ExitStack, max_buffer: int, replay: bool
    ) -> tuple[bytes, Subscription[bytes]]:
        # No await between the snapshot and the subscription: nothing is missed nor seen twice.
        history = bytes(self._scrollback) if replay else b""
        return history, stack.enter_context(self._output.subscribe(max_buffer))

    def _claim(self, console: Console) -> None:
        if self._writer is None:
            self._writer = console
        elif self._writer is not console:
            raise ConsoleBusyError(self.name)

    def _release(self, console: Console) -> None:
        if self._writer is console:
            self._writer = None

    async def _send(self, console: Console, data: bytes) -> None:
        self._claim(console)
        if self._closed_why is not None:
            raise ConnectionLostError(f"domain {self.name!r}: {self._closed_why}")
        async with self._write_lock:  # one send at a time reaches the guest, whole
            await self._write(data)


class Console(anyio.abc.ByteStream):
    """The serial console of a running domain, from :meth:`aiovirt.Domain.console`.

    The stream starts with what the guest printed in this run before it was opened (the last
    :data:`SCROLLBACK` bytes the controller received), unless opened with ``replay=False``; then
    it goes on live. What the console saw is logged by the driver too (``dom.console_path``).

    - :meth:`receive` returns the next bytes (``EndOfStream`` once the console ended: the domain
      stopped, or the connection was closed; ``EventsDroppedError`` if this reader fell behind).
    - :meth:`send` types bytes into the guest (this console becomes the writer, see the module).
    - :meth:`expect` waits until what was received since the previous match (or the open)
      matches ``pattern`` and returns the match; the stream goes on after it. Bound it with the
      caller's cancel scope (``with anyio.fail_after(30): await con.expect(b"login: ")``); a
      cancelled ``expect`` loses nothing: the next ``expect`` or ``receive`` starts where it did.
    - :attr:`seen` is what this console received so far (its last :data:`SEEN_LIMIT` bytes),
      :attr:`text` the same decoded as UTF-8.
    """

    def __init__(self, port: ConsolePort, *, replay: bool, max_buffer: int, writer: bool) -> None:
        self._port = port
        self._stack = ExitStack()
        history, self._sub = port._subscribe(self._stack, max_buffer, replay)
        self._stack.callback(port._release, self)
        self._data = bytearray(history)  # what was received and is still kept
        self._offset = 0  # the stream position of _data[0]
        self._pos = 0  # the stream position up to which the caller has read (receive, expect)
        self._closed = False
        self._eof_sent = False
        if writer:
            try:
                port._claim(self)
            except BaseException:
                self._stack.close()
                raise

    @property
    def name(self) -> str:
        """The domain's name."""
        return self._port.name

    @property
    def seen(self) -> bytes:
        """What this console received so far (at most its last :data:`SEEN_LIMIT` bytes, and
        always everything it has not returned yet)."""
        return bytes(self._data)

    @property
    def text(self) -> str:
        """:attr:`seen` as text (UTF-8; what cannot be decoded becomes U+FFFD)."""
        return self._data.decode("utf-8", errors="replace")

    @property
    def writer(self) -> bool:
        """Whether this console is the domain's writer now."""
        return self._port._writer is self

    # -- reading --------------------------------------------------------------------------------

    async def _pull(self) -> None:
        """Wait for the next chunk and keep it. The only wait of reading: cancelling it loses nothing
        (the subscription hands a chunk over only when it returns it)."""
        if self._closed:
            raise anyio.ClosedResourceError
        chunk = await self._sub.receive()
        if self._closed:
            raise anyio.ClosedResourceError
        self._data += chunk
        excess = min(len(self._data) - SEEN_LIMIT, self._pos - self._offset)
        if excess > 0:
            del self._data[:excess]
            self._offset += excess

    async def receive(self, max_bytes: int = 65536) -> bytes:
        """The next bytes the guest printed (at most ``max_bytes``)."""
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        await anyio.lowlevel.checkpoint_if_cancelled()
        while self._pos == self._offset + len(self._data):
            await self._pull()
        start = self._pos - self._offset
        data = bytes(self._data[start : start + max_bytes])
        self._pos += len(data)
        return data

    async def expect(self, pattern: bytes | re.Pattern[bytes]) -> re.Match[bytes]:
        """Wait until the output after the previous match (or the open) matches ``pattern``.

        ``pattern`` is literal bytes or a compiled bytes regex (``re.compile(rb"\\$ $", re.M)``).
        Returns the match, made against the bytes searched: ``m.string[: m.start()]`` is what
        came before it. The stream then stands right after the match. Raises ``EndOfStream`` if
        the console ends first; waits as long as the caller's cancel scope allows.
        """
        if isinstance(pattern, (bytes, bytearray)):
            regex = re.compile(re.escape(bytes(pattern)))
        elif isinstance(pattern, re.Pattern) and isinstance(pattern.pattern, bytes):
            regex = pattern
        else:
            raise TypeError(f"expect() wants bytes or a compiled bytes regex, not {pattern!r}")
        await anyio.lowlevel.checkpoint_if_cancelled()
        while True:
            searched = bytes(self._data[self._pos - self._offset :])
            match = regex.search(searched)
            if match is not None:
                self._pos += match.end()
                return match
            await self._pull()

    # -- writing --------------------------------------------------------------------------------

    async def send(self, item: bytes) -> None:
        """Type ``item`` into the guest's console. Returns once it was handed to the hypervisor.

        Raises :class:`ConsoleBusyError` (sending nothing) while another console is the writer,
        :class:`~aiovirt.ConnectionLostError` once the console ended.
        """
        if self._closed:
            raise anyio.ClosedResourceError
        if self._eof_sent:
            raise anyio.ClosedResourceError("send_eof() was called on this console")
        await anyio.lowlevel.checkpoint_if_cancelled()
        if item:
            await self._port._send(self, bytes(item))

    async def send_eof(self) -> None:
        """A serial line has no end-of-file: this gives up the writer role (reading goes on)."""
        self._eof_sent = True
        self._port._release(self)
        await anyio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Stop reading and give up the writer role. Idempotent."""
        if not self._closed:
            self._closed = True
            self._stack.close()
        await anyio.lowlevel.checkpoint()
