"""What a caller of ``aiovirt.connect("qemu+unix:///system?socket=...")`` gets from a daemon that misbehaves:
a fake daemon on a real unix socket (what a real libvirtd cannot be made to send), and a real one for
what it can (an unknown procedure, a read-only socket). Each is a clear error, nothing hangs, and
once the connection is broken every other pending call fails with it. Both anyio backends.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

import aiovirt
from aiovirt.config import to_libvirt_xml
from aiovirt.rpc import DomainRef, LibvirtError, UnsupportedAuthError
from aiovirt.rpc import _protocol as P
from aiovirt.rpc._codec import decode_header, encode_packet
from aiovirt.rpc._xdr import Packer

from ._libvirtd import running_libvirtd
from .conftest import none_config

pytestmark = pytest.mark.anyio
BOUND = 10  # nothing here may take longer: a hang fails the test

Handler = Callable[["FakeDaemon", Any, bytes], Awaitable[bool]]


def _ints(*values: int) -> bytes:
    p = Packer()
    for v in values:
        p.int32(v)
    return p.getvalue()


def _auth(*types: int) -> bytes:
    p = Packer()
    p.array(list(types), 20, p.int32)
    return p.getvalue()


def _version(v: int) -> bytes:
    p = Packer()
    p.uhyper(v)
    return p.getvalue()


#: A healthy daemon's answers to what connect() asks, by procedure.
_ANSWERS: dict[int, bytes] = {
    P.Procedure.AUTH_LIST: _auth(0),
    P.Procedure.CONNECT_SUPPORTS_FEATURE: _ints(1),
    P.Procedure.CONNECT_OPEN: b"",
    P.Procedure.CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY: _ints(7),
    P.Procedure.CONNECT_GET_LIB_VERSION: _version(9_000_000),
    P.Procedure.CONNECT_LIST_ALL_DOMAINS: _ints(0, 0),  # no domains, count 0
    P.Procedure.CONNECT_CLOSE: b"",
}


class FakeDaemon:
    """The daemon's end: answers connect()'s calls, and hands every other call to ``handler``
    (which returns False to end the connection)."""

    def __init__(
        self, stream: anyio.abc.ByteStream, handler: Handler, auth: bytes, answers: dict[int, bytes]
    ) -> None:
        self.stream = stream
        self.handler = handler
        self.auth = auth
        self.answers = answers
        self.buf = bytearray()
        self.calls: list[int] = []

    async def packet(self) -> tuple[Any, bytes]:
        while True:
            if len(self.buf) >= 28:
                length, header = decode_header(self.buf)
                if len(self.buf) >= length:
                    body = bytes(self.buf[28:length])
                    del self.buf[:length]
                    return header, body
            self.buf += await self.stream.receive()

    async def reply(
        self, header: Any, body: bytes = b"", *, procedure: int | None = None, serial: int | None = None
    ) -> None:
        await self.stream.send(
            encode_packet(
                header.program,
                header.procedure if procedure is None else procedure,
                P.MessageType.REPLY,
                header.serial if serial is None else serial,
                0,
                body,
            )
        )

    async def serve(self) -> None:
        try:
            while True:
                header, body = await self.packet()
                if header.program == P.Program.KEEPALIVE:
                    continue
                self.calls.append(header.procedure)
                if header.procedure == P.Procedure.AUTH_LIST:
                    await self.reply(header, self.auth)
                elif header.procedure in self.answers:
                    await self.reply(header, self.answers[header.procedure])
                elif not await self.handler(self, header, body):
                    return
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            pass


async def with_fake_daemon(
    tmp_path: Path,
    handler: Handler,
    body: Callable[[str], Awaitable[None]],
    *,
    auth: bytes = _auth(0),
    answers: dict[int, bytes] | None = None,
) -> FakeDaemon:
    """Serve one connection on a unix socket with ``handler`` while ``body(uri)`` runs."""
    path = tmp_path / "fake.sock"
    served: list[FakeDaemon] = []
    async with await anyio.create_unix_listener(path) as listener, anyio.create_task_group() as tg:

        async def accept() -> None:
            stream = await listener.accept()
            async with stream:
                daemon = FakeDaemon(stream, handler, auth, dict(_ANSWERS) if answers is None else answers)
                served.append(daemon)
                await daemon.serve()

        tg.start_soon(accept)
        with anyio.fail_after(BOUND):
            await body(f"qemu+unix:///system?socket={path}")
        tg.cancel_scope.cancel()
    return served[0]


async def close_on(daemon: FakeDaemon, header: Any, body: bytes) -> bool:
    return False


async def test_sasl_or_polkit_only_is_refused_clearly(tmp_path: Path) -> None:
    for auth, name in ((_auth(1), "sasl"), (_auth(2), "polkit"), (_auth(1, 2), "sasl or polkit")):

        async def body(uri: str, name: str = name) -> None:
            with pytest.raises(UnsupportedAuthError, match=f"requires authentication by {name},") as info:
                async with aiovirt.connect(uri):
                    pass
            assert 'auth_unix_rw = "none"' in str(info.value)

        daemon = await with_fake_daemon(tmp_path, close_on, body, auth=auth)
        assert daemon.calls == [P.Procedure.AUTH_LIST]  # nothing else was even tried
        (tmp_path / "fake.sock").unlink()


async def test_daemon_closes_during_connect(tmp_path: Path) -> None:
    async def body(uri: str) -> None:
        with pytest.raises(aiovirt.ConnectionLostError, match="closed the connection"):
            async with aiovirt.connect(uri):
                pass

    answers = {k: v for k, v in _ANSWERS.items() if k != P.Procedure.CONNECT_LIST_ALL_DOMAINS}
    daemon = await with_fake_daemon(tmp_path, close_on, body, answers=answers)
    assert daemon.calls[-1] == P.Procedure.CONNECT_LIST_ALL_DOMAINS  # it closed during load()


def _broken_after_two_calls(send: Callable[[FakeDaemon, Any], Awaitable[None]]) -> Handler:
    """A handler that holds the first call, and on the second breaks the connection with ``send``
    (which writes something bad, or nothing: then the daemon just closes)."""
    held: list[Any] = []

    async def handler(daemon: FakeDaemon, header: Any, body: bytes) -> bool:
        held.append(header)
        if len(held) < 2:
            return True
        await send(daemon, header)
        await anyio.sleep(0.2)  # let the client read it before the end
        return False

    return handler


async def _two_pending_calls(uri: str) -> list[BaseException]:
    """Two calls in flight on one connection when the daemon breaks it: what each gets, and what
    the connection says afterwards."""
    failures: list[BaseException] = []
    async with aiovirt.connect(uri) as conn:

        async def call(coro: Awaitable[object]) -> None:
            try:
                await coro
            except aiovirt.AiovirtError as exc:
                failures.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, conn.define(none_config("pending-1")))
            await anyio.wait_all_tasks_blocked()
            assert isinstance(conn.driver, aiovirt.drivers.remote.RemoteDriver)
            tg.start_soon(call, conn.driver.client.get_hostname())
        with pytest.raises(aiovirt.ConnectionLostError):  # and every later call
            await conn.create(none_config("later"))
        while not conn.problems:
            await anyio.sleep(0.01)
        assert [p.kind for p in conn.problems] == ["unreachable"]
    return failures


@pytest.mark.parametrize(
    "bad",
    ["close", "over-long packet", "unknown program", "unknown serial", "wrong procedure", "garbage error"],
)
async def test_a_broken_connection_fails_every_pending_call(tmp_path: Path, bad: str) -> None:
    async def send(daemon: FakeDaemon, header: Any) -> None:
        if bad == "over-long packet":
            # A length word over libvirt's 16 MiB limit, and the header of a plausible reply.
            await daemon.stream.send(struct.pack(">I", P.PACKET_MAX + 1) + bytes(24))
        elif bad == "unknown program":
            await daemon.stream.send(encode_packet(0x12345678, 1, P.MessageType.MESSAGE, 0, 0, b""))
        elif bad == "unknown serial":
            await daemon.reply(header, serial=777)
        elif bad == "wrong procedure":
            await daemon.reply(header, procedure=P.Procedure.DOMAIN_GET_INFO)
        elif bad == "garbage error":
            await daemon.stream.send(
                encode_packet(
                    header.program, header.procedure, P.MessageType.REPLY, header.serial, 1, b"\xff"
                )
            )

    failures: list[BaseException] = []

    async def body(uri: str) -> None:
        failures.extend(await _two_pending_calls(uri))

    await with_fake_daemon(tmp_path, _broken_after_two_calls(send), body)
    assert len(failures) == 2
    assert all(isinstance(f, aiovirt.ConnectionLostError) for f in failures)
    assert {f.command for f in failures if isinstance(f, aiovirt.ConnectionLostError)} == {
        "DOMAIN_DEFINE_XML_FLAGS",
        "CONNECT_GET_HOSTNAME",
    }
    causes = {type(f.__cause__) for f in failures}
    if bad == "close":
        assert "closed the connection" in str(failures[0])
    else:
        assert causes == {aiovirt.ProtocolError}, causes
        assert "protocol error" in str(failures[0])


async def test_a_lifecycle_event_that_does_not_decode(tmp_path: Path) -> None:
    async def handler(daemon: FakeDaemon, header: Any, body: bytes) -> bool:
        bad_event = encode_packet(
            P.Program.REMOTE,
            P.Procedure.DOMAIN_EVENT_CALLBACK_LIFECYCLE,
            P.MessageType.MESSAGE,
            0,
            0,
            b"\x00",
        )
        await daemon.stream.send(bad_event)
        await anyio.sleep(0.2)
        return False

    async def body(uri: str) -> None:
        async with aiovirt.connect(uri) as conn:
            with pytest.raises(aiovirt.ConnectionLostError) as lost:
                await conn.define(none_config("x"))
            assert isinstance(lost.value.__cause__, aiovirt.ProtocolError)
            assert "lifecycle event does not decode" in str(lost.value)

    await with_fake_daemon(tmp_path, handler, body)


async def test_what_a_real_daemon_refuses() -> None:
    with running_libvirtd() as daemon:
        async with aiovirt.connect(daemon.uri("test:///default")) as conn:
            assert isinstance(conn.driver, aiovirt.drivers.remote.RemoteDriver)
            client = conn.driver.client
            with anyio.fail_after(BOUND):
                # A procedure the daemon does not know: its error, and the connection lives on.
                with pytest.raises(LibvirtError, match="procedure") as unknown:
                    await client.call(9999)
                assert unknown.value.code == P.ErrorCode.RPC
                assert (await conn.lookup("test")).active
                await (await conn.create(none_config("after"))).destroy()
        # The read-only socket opens a read-only connection whatever was asked: then the daemon
        # refuses each write with its own error.
        ro = f"test+unix:///default?socket={daemon.socket}-ro"
        async with aiovirt.connect(ro) as conn:
            with anyio.fail_after(BOUND), pytest.raises(LibvirtError, match=r"read-only|read only") as denied:
                await conn.define(none_config("denied"))
            assert denied.value.code == P.ErrorCode.OPERATION_DENIED
        async with aiovirt.connect(ro, readonly=True) as conn:
            assert [d.name for d in await conn.list_domains()] == ["test"]
        # A URI the daemon has no driver for.
        with anyio.fail_after(BOUND), pytest.raises(aiovirt.InvalidURIError):
            async with aiovirt.connect(f"xen+unix:///system?socket={daemon.socket}"):
                pass
        # Nobody listening.
        with anyio.fail_after(BOUND), pytest.raises(aiovirt.ConnectionLostError, match="cannot connect"):
            async with aiovirt.connect(f"test+unix:///default?socket={daemon.directory}/none"):
                pass


async def test_a_missed_stop_is_learnt_from_the_daemons_refusal(tmp_path: Path) -> None:
    # A daemon whose STOPPED event never came (events are not guaranteed across a reconnect of
    # libvirt's own event loop): the first request it refuses makes the driver ask for the state.
    ref = DomainRef("ghost", uuid.uuid4(), 3)
    listed = Packer()
    listed.array([ref], 16384, lambda r: r.pack(listed))
    listed.uint32(1)
    state = {"running": True}

    async def handler(daemon: FakeDaemon, header: Any, body: bytes) -> bool:
        proc = header.procedure
        if proc == P.Procedure.CONNECT_LIST_ALL_DOMAINS:
            flags = struct.unpack(">iI", body)[1]
            await daemon.reply(header, listed.getvalue() if flags == 0 else _ints(0, 0))
        elif proc == P.Procedure.DOMAIN_GET_STATE:
            await daemon.reply(header, _ints(1, 1) if state["running"] else _ints(5, 2))
        elif proc == P.Procedure.DOMAIN_GET_XML_DESC:
            p = Packer()
            p.string(to_libvirt_xml(none_config("ghost", uuid=ref.uuid)), P.STRING_MAX)
            await daemon.reply(header, p.getvalue())
        elif proc == P.Procedure.DOMAIN_SUSPEND:
            state["running"] = False  # it stopped meanwhile; its event is lost
            error = P.RemoteError(P.ErrorCode.OPERATION_INVALID, 10, "domain is not running", 2)
            p = Packer()
            error.pack(p)
            await daemon.stream.send(
                encode_packet(header.program, proc, P.MessageType.REPLY, header.serial, 1, p.getvalue())
            )
        else:
            return False
        return True

    async def body(uri: str) -> None:
        async with aiovirt.connect(uri) as conn:
            dom = await conn.lookup("ghost")
            assert dom.state == aiovirt.DomainState.RUNNING
            with pytest.raises(aiovirt.InvalidStateError, match="not running"):
                await dom.suspend()
            assert (dom.state, dom.reason) == (aiovirt.DomainState.SHUTOFF, aiovirt.StateReason.SHUTDOWN)

    answers = {k: v for k, v in _ANSWERS.items() if k != P.Procedure.CONNECT_LIST_ALL_DOMAINS}
    await with_fake_daemon(tmp_path, handler, body, answers=answers)
