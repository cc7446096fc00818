"""Byte streams to a libvirt daemon: unix socket, TLS (with libvirt's one-byte verdict), ssh.

:class:`~aiovirt.rpc.RPCClient` speaks over any connected ``anyio.abc.ByteStream``, or over a
connected ``socket.socket`` directly (:class:`SocketChannel`: the fastest, no stream layers); these
helpers make the ones libvirt's transports need:

- unix: :func:`connect_unix` (any path length) or :func:`connect_unix_socket` (a plain socket);
- TCP: ``await anyio.connect_tcp(host, port)`` as is;
- TLS: :func:`connect_tls_stream` (TCP, the TLS handshake, then the daemon's verdict byte);
- ssh, or anything that runs a command speaking the protocol on its stdin/stdout (libvirt runs
  ``virt-ssh-helper URI`` or ``nc -U SOCKET`` on the remote host): :func:`process_stream`.
"""

from __future__ import annotations

import os
import socket
import ssl
from typing import Final, Protocol

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.streams.stapled import StapledByteStream
from anyio.streams.tls import TLSStream

from .._errors import ConnectionLostError
from .._unix import connect_unix as connect_unix_socket  # the raw-socket connect QMP uses too

__all__ = [
    "Channel",
    "SocketChannel",
    "connect_tls_stream",
    "connect_unix",
    "connect_unix_socket",
    "expect_tls_verdict",
    "process_stream",
]

# sun_path is 108 bytes including the terminating NUL.
_MAX_UNIX_PATH: Final = 107
TLS_ACCEPTED: Final = b"\x01"
"""What libvirtd sends after the TLS handshake once it accepted the client's certificate and address."""


class Channel(Protocol):
    """What the client needs of a transport: the part of ``anyio.abc.ByteStream`` it uses."""

    async def receive(self, max_bytes: int = 65536) -> bytes: ...

    async def send(self, item: bytes) -> None: ...

    async def aclose(self) -> None: ...


class SocketChannel:
    """Non-blocking I/O straight on a connected stream socket, without anyio's stream layers.

    A send that fits in the socket's buffer completes without a trip through the event loop. Raises
    as an anyio stream does: EndOfStream at EOF, BrokenResourceError for a failed socket,
    ClosedResourceError once closed.
    """

    __slots__ = ("_closed", "_sock")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._closed = False

    async def receive(self, max_bytes: int = 65536) -> bytes:
        while True:
            if self._closed:
                raise anyio.ClosedResourceError
            await anyio.wait_readable(self._sock)
            try:
                data = self._sock.recv(max_bytes)
            except (BlockingIOError, InterruptedError):
                continue  # a spurious wakeup
            except OSError as exc:
                if self._closed:
                    raise anyio.ClosedResourceError from exc
                raise anyio.BrokenResourceError from exc
            if not data:
                raise anyio.EndOfStream
            return data

    async def send(self, item: bytes) -> None:
        view = memoryview(item)
        sent = 0
        while sent < len(view):
            if self._closed:
                raise anyio.ClosedResourceError
            try:
                sent += self._sock.send(view[sent:], socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                await anyio.wait_writable(self._sock)
            except OSError as exc:
                raise anyio.BrokenResourceError from exc

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            # Wakes any task waiting on the socket (with ClosedResourceError) before it goes.
            anyio.notify_closing(self._sock)
            self._sock.close()
        await anyio.lowlevel.checkpoint()


async def connect_unix(path: str | os.PathLike[str]) -> anyio.abc.SocketStream:
    """Connect to the unix socket at ``path``, also when the path exceeds 107 bytes.

    A long path is reached through ``/proc/self/fd/<fd>/<name>``, ``<fd>`` being an ``O_PATH``
    descriptor of its directory (closed again before returning). Raises OSError as connect(2).
    """
    raw = os.fsencode(path)
    if len(raw) <= _MAX_UNIX_PATH:
        return await anyio.connect_unix(raw)
    head, name = os.path.split(raw)
    dirfd = os.open(head or b".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return await anyio.connect_unix(b"/proc/self/fd/%d/%s" % (dirfd, name))
    finally:
        os.close(dirfd)


async def expect_tls_verdict(stream: anyio.abc.ByteStream) -> None:
    """Read libvirtd's verdict byte, sent after the TLS handshake and before any RPC.

    libvirtd sends ``\\x01`` when it accepts the client (its certificate and address checks
    passed) and closes the connection otherwise. Raises ConnectionLostError for anything else.
    """
    try:
        verdict = await stream.receive(1)
    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
        raise ConnectionLostError(
            "the libvirt daemon closed the TLS connection instead of accepting it "
            "(it refused this client's certificate or address)"
        ) from exc
    if verdict != TLS_ACCEPTED:
        raise ConnectionLostError(
            f"the libvirt daemon refused this client's certificate or address (verdict {verdict!r})"
        )


async def connect_tls_stream(
    host: str,
    port: int,
    ssl_context: ssl.SSLContext,
    *,
    server_hostname: str | None = None,
) -> TLSStream:
    """TCP to ``host:port``, TLS with ``ssl_context`` (verifying ``server_hostname``, default
    ``host``), then libvirt's verdict byte: the stream is then ready for the RPC. Not bounded in
    time: wrap in ``anyio.fail_after``. On failure the connection is closed."""
    tcp = await anyio.connect_tcp(host, port)
    try:
        tls = await TLSStream.wrap(
            tcp, server_side=False, hostname=server_hostname or host, ssl_context=ssl_context
        )
    except BaseException:
        await anyio.aclose_forcefully(tcp)
        raise
    try:
        await expect_tls_verdict(tls)
    except BaseException:
        await anyio.aclose_forcefully(tls)
        raise
    return tls


def process_stream(process: anyio.abc.Process) -> StapledByteStream:
    """One byte stream over a child's stdin (what we send) and stdout (what it answers), e.g.
    ``ssh user@host virt-ssh-helper qemu:///system`` started with ``anyio.open_process``.
    Closing the stream closes both pipes; the process itself stays the caller's to end."""
    if process.stdin is None or process.stdout is None:
        raise ValueError("the process needs stdin and stdout pipes (stdin=PIPE, stdout=PIPE)")
    return StapledByteStream(process.stdin, process.stdout)
