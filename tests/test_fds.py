"""Watching fds without a task each (``aiovirt._fds``): reader callbacks and counted waits, on real
socket pairs, on asyncio and trio."""

from __future__ import annotations

import socket

import anyio
import pytest

from aiovirt._fds import FdWaits, Readers

pytestmark = pytest.mark.anyio

LIMIT = 10.0


async def test_reader_callbacks_run_while_readable_and_stop_when_removed() -> None:
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    a.setblocking(False)
    c.setblocking(False)
    got: list[tuple[str, bytes]] = []
    arrived = anyio.Event()

    def reader(name: str, sock: socket.socket) -> None:
        got.append((name, sock.recv(4096)))
        arrived.set()

    with a, b, c, d, anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            readers = Readers()
            tg.start_soon(readers.serve)
            readers.add(a.fileno(), lambda: reader("a", a))
            readers.add(c.fileno(), lambda: reader("c", c))
            b.send(b"one")
            while len(got) < 1:
                await arrived.wait()
                arrived = anyio.Event()
            d.send(b"two")
            b.send(b"three")
            while len(got) < 3:
                await arrived.wait()
                arrived = anyio.Event()
            assert sorted(got) == [("a", b"one"), ("a", b"three"), ("c", b"two")]
            readers.remove(a.fileno())
            readers.remove(a.fileno())  # removing twice is harmless
            b.send(b"unread")
            d.send(b"four")
            while len(got) < 4:
                await arrived.wait()
                arrived = anyio.Event()
            assert got[3] == ("c", b"four")
            assert a.recv(4096) == b"unread"  # nobody read it once a was removed
            tg.cancel_scope.cancel()


async def test_a_level_triggered_reader_is_called_until_it_has_read_everything() -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    chunks: list[bytes] = []
    done = anyio.Event()

    def read_a_little() -> None:
        data = a.recv(3)
        chunks.append(data)
        if not data:
            readers.remove(a.fileno())
            done.set()

    with a, b, anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            readers = Readers()
            tg.start_soon(readers.serve)
            readers.add(a.fileno(), read_a_little)
            b.sendall(b"0123456789")
            b.close()
            await done.wait()
            tg.cancel_scope.cancel()
    assert b"".join(chunks) == b"0123456789"
    assert chunks[-1] == b""


async def test_a_paused_reader_is_not_called_until_resumed() -> None:
    """Its owner reads the fd itself meanwhile (a QMP caller on trio); what arrives then is left
    to it, and the callback takes over again once resumed."""
    a, b = socket.socketpair()
    a.setblocking(False)
    got: list[bytes] = []
    arrived = anyio.Event()

    def reader() -> None:
        got.append(a.recv(4096))
        arrived.set()

    with a, b, anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            readers = Readers()
            tg.start_soon(readers.serve)
            readers.add(a.fileno(), reader)
            readers.pause(a.fileno())
            b.send(b"mine")
            await anyio.wait_readable(a.fileno())
            for _ in range(10):  # the readers' task (trio) gets its turns: it must not read
                await anyio.sleep(0.01)
            assert got == [] and a.recv(4096) == b"mine"
            readers.resume(a.fileno())
            b.send(b"yours")
            await arrived.wait()
            assert got == [b"yours"]
            readers.remove(a.fileno())
            readers.pause(a.fileno())  # after removal: harmless, and no callback comes back
            readers.resume(a.fileno())
            b.send(b"nobody's")
            for _ in range(10):
                await anyio.sleep(0.01)
            assert got == [b"yours"]
            tg.cancel_scope.cancel()


async def test_fd_waits_wake_a_waiter_on_closing(anyio_backend: str) -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    waits = FdWaits(a.fileno())
    outcome: list[str] = []

    async def wait() -> None:
        try:
            await waits.readable()
        except anyio.ClosedResourceError:
            outcome.append("closed")

    with b, anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.wait_all_tasks_blocked()
            waits.notify_closing()
            a.close()
    assert outcome == ["closed"]
    # With no waiter, closing needs nothing of the loop, and a new socket of the same number
    # is waited on as usual.
    c, d = socket.socketpair()
    with c, d:
        FdWaits(c.fileno()).notify_closing()
        d.send(b"x")
        with anyio.fail_after(LIMIT):
            await FdWaits(c.fileno()).readable()
