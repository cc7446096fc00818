"""Connecting to a unix socket of any path length, without blocking: one function for every client
(QMP monitors, libvirt daemons). stdlib and anyio only."""

from __future__ import annotations

import errno
import os
import socket
from typing import Final

import anyio
import anyio.lowlevel

__all__ = ["connect_unix"]

_MAX_UNIX_PATH: Final = 107
#: How long to wait before retrying a connect refused for a full backlog (AF_UNIX gives EAGAIN).
_CONNECT_RETRY: Final = 0.01


async def connect_unix(path: str | os.PathLike[str]) -> socket.socket:
    """Connect a non-blocking unix stream socket to ``path``, also when it exceeds 107 bytes.

    A long path is reached through ``/proc/self/fd/<fd>/<name>``, ``<fd>`` being an ``O_PATH``
    descriptor of the socket's directory (closed again before returning). Raises OSError as
    connect(2) does (FileNotFoundError: no socket; ConnectionRefusedError: nobody listens).
    Cancellable; while the listener's backlog is full it retries.
    """
    raw = os.fsencode(path)
    dirfd = -1
    if len(raw) > _MAX_UNIX_PATH:
        head, name = os.path.split(raw)
        dirfd = os.open(head or b".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        raw = b"/proc/self/fd/%d/%s" % (dirfd, name)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setblocking(False)
        while True:
            await anyio.lowlevel.checkpoint_if_cancelled()
            try:
                sock.connect(raw)
                return sock
            except (BlockingIOError, InterruptedError):
                # AF_UNIX reports a full backlog as EAGAIN, with nothing to wait on but time.
                await anyio.sleep(_CONNECT_RETRY)
            except OSError as exc:
                if exc.errno != errno.EISCONN:  # an earlier attempt completed after all
                    raise
                return sock
    except BaseException:
        sock.close()
        raise
    finally:
        if dirfd >= 0:
            os.close(dirfd)
