"""The anyio QMP client, against a real QEMU first and a fake peer only for what QEMU won't do."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

from aiovirt._errors import CommandError, ConnectionLostError, EventsDroppedError, ProtocolError
from aiovirt.qmp._client import QMPClient, connect_unix
from aiovirt.qmp._codec import Event

pytestmark = pytest.mark.anyio

# A safety net so a broken client fails a test instead of hanging the run; never a measurement.
LIMIT = 60


# -- a real QEMU -------------------------------------------------------------------------------------


@dataclass
class Qemu:
    proc: subprocess.Popen[bytes]
    sock: str  # the monitor socket's full path
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)


QEMU_ARGV = (
    "qemu-system-x86_64",
    *("-machine", "none", "-accel", "tcg", "-nodefaults", "-no-user-config", "-display", "none", "-S"),
)
MONITOR = ("-mon", "chardev=mon,mode=control")


def _listening(bind_name: str) -> bool:
    """Whether a unix socket bound to ``bind_name`` is listening (flag __SO_ACCEPTCON)."""
    with open("/proc/net/unix") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == bind_name and int(fields[3], 16) & 0x10000:
                return True
    return False


def spawn_qemu(directory: Path, bind_name: str) -> Qemu:
    """Start QEMU in ``directory`` with its monitor bound to ``bind_name`` (relative to it).

    Returns once the monitor listens, so a connect cannot race QEMU's bind() and listen().
    """
    log = directory / "qemu.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                *QEMU_ARGV,
                # The pidfile names the directory, so the suite's leak check recognises this QEMU.
                *("-pidfile", str(directory / "qemu.pid")),
                *("-chardev", f"socket,id=mon,path={bind_name},server=on,wait=off", *MONITOR),
            ],
            cwd=directory,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    qemu = Qemu(proc, os.path.join(directory, bind_name), log)
    try:
        deadline = time.monotonic() + LIMIT
        while not _listening(bind_name):
            if proc.poll() is not None:
                raise RuntimeError(f"QEMU exited with {proc.returncode}: {log.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"QEMU's monitor did not listen: {log.read_text()}")
            time.sleep(0.01)
    except BaseException:
        reap(qemu)
        raise
    return qemu


def reap(qemu: Qemu) -> None:
    if qemu.proc.poll() is None:
        qemu.proc.kill()  # also ends a SIGSTOPped QEMU
    qemu.proc.wait()


@pytest.fixture
def short_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # pytest's tmp_path (named after the test) can exceed the 107 bytes of a unix socket path.
    return tmp_path_factory.mktemp("qmp")


@pytest.fixture
def qemu(short_dir: Path) -> Iterator[Qemu]:
    # Absolute bind name: unique in /proc/net/unix whatever else runs on the machine.
    q = spawn_qemu(short_dir, str(short_dir / "mon.sock"))
    try:
        yield q
    finally:
        reap(q)


@pytest.fixture(params=["socket", "stream"])
def transport(request: pytest.FixtureRequest) -> str:
    """How the client is handed the connection: a plain socket, or an anyio stream."""
    return str(request.param)


@asynccontextmanager
async def connect(qemu: Qemu, transport: str = "socket", **kwargs: Any) -> AsyncIterator[QMPClient]:
    if transport == "socket":
        async with QMPClient.open_unix(qemu.sock, **kwargs) as client:
            yield client
    else:
        stream = await anyio.connect_unix(qemu.sock)
        async with QMPClient.open(stream, **kwargs) as client:
            yield client


def names(events: list[Event]) -> list[str]:
    return [e.name for e in events]


# -- basics --------------------------------------------------------------------------------------------


async def test_handshake_and_query_status(qemu: Qemu, transport: str) -> None:
    with anyio.fail_after(LIMIT):
        async with connect(qemu, transport) as client:
            assert client.greeting.version["qemu"]["major"] >= 7
            assert "oob" in client.greeting.capabilities
            status = await client.execute("query-status")
            assert status["running"] is False
            assert status["status"] == "prelaunch"  # -S: never started
            assert not client.closed
        assert client.closed


async def test_200_concurrent_calls(qemu: Qemu, transport: str) -> None:
    results: list[Any] = []

    async def call() -> None:
        results.append(await client.execute("query-status"))

    with anyio.fail_after(LIMIT):
        async with connect(qemu, transport) as client, anyio.create_task_group() as tg:
            for _ in range(200):
                tg.start_soon(call)
    assert len(results) == 200
    assert all(r["status"] == "prelaunch" for r in results)


async def test_concurrent_calls_get_their_own_replies(qemu: Qemu) -> None:
    # Replies that differ per call: a misrouted reply would show.
    got: dict[int, str] = {}

    async def call(i: int, option: str) -> None:
        [info] = await client.execute("query-command-line-options", {"option": option})
        got[i] = info["option"]

    with anyio.fail_after(LIMIT):
        async with connect(qemu) as client:
            options = [info["option"] for info in await client.execute("query-command-line-options")]
            assert len(options) > 10
            wanted = {i: options[i % len(options)] for i in range(200)}
            async with anyio.create_task_group() as tg:
                for i, option in wanted.items():
                    tg.start_soon(call, i, option)
    assert got == wanted


async def test_command_error(qemu: Qemu) -> None:
    with anyio.fail_after(LIMIT):
        async with connect(qemu) as client:
            with pytest.raises(CommandError) as info:
                await client.execute("no-such-command")
            assert info.value.command == "no-such-command"
            assert info.value.error_class == "CommandNotFound"
            assert info.value.desc == "The command no-such-command has not been found"
            assert info.value.arguments == {}

            with pytest.raises(CommandError) as info:
                await client.execute("query-command-line-options", {"option": "no-such-option"})
            assert info.value.error_class == "GenericError"
            assert "no-such-option" in info.value.desc
            assert info.value.arguments == {"option": "no-such-option"}

            # An error is one call's business: the client goes on.
            assert (await client.execute("query-status"))["status"] == "prelaunch"


async def test_body_exception_is_not_wrapped(qemu: Qemu) -> None:
    async def body() -> None:
        async with connect(qemu) as client:
            await client.execute("query-status")
            raise KeyError("mine")

    with anyio.fail_after(LIMIT), pytest.raises(KeyError, match="mine"):
        await body()


# -- events --------------------------------------------------------------------------------------------


async def test_events_reach_callback_and_subscribers_in_order(qemu: Qemu, transport: str) -> None:
    seen: list[Event] = []
    with anyio.fail_after(LIMIT):
        async with connect(qemu, transport, on_event=seen.append) as client:
            with client.subscribe() as sub1, client.subscribe() as sub2:
                await client.execute("cont")
                # QEMU sends RESUME before cont's reply: it is dispatched before execute returns.
                assert names(seen) == ["RESUME"]
                await client.execute("stop")
                assert names(seen) == ["RESUME", "STOP"]
                for sub in (sub1, sub2):
                    assert [(await sub.receive()).name for _ in range(2)] == ["RESUME", "STOP"]
                    assert sub.receive_nowait() is None
    assert all(e.timestamp > 1e9 for e in seen)  # QEMU's wall-clock timestamps, in seconds


async def test_subscriber_overflow(qemu: Qemu) -> None:
    with anyio.fail_after(LIMIT):
        async with connect(qemu) as client:
            with client.subscribe(max_buffer=1) as tiny, client.subscribe() as big:
                for command in ("cont", "stop", "cont"):
                    await client.execute(command)
                # The tiny one gets what fit, then learns how much it lost, then goes on.
                assert (await tiny.receive()).name == "RESUME"
                with pytest.raises(EventsDroppedError) as info:
                    await tiny.receive()
                assert info.value.dropped == 2
                await client.execute("stop")
                assert (await tiny.receive()).name == "STOP"
                # The other subscriber lost nothing.
                assert [(await big.receive()).name for _ in range(4)] == ["RESUME", "STOP", "RESUME", "STOP"]


async def test_on_event_error_propagates(qemu: Qemu) -> None:
    def broken(event: Event) -> None:
        raise ValueError(f"bug in the callback ({event.name})")

    clients: list[QMPClient] = []

    async def body() -> None:
        async with connect(qemu, on_event=broken) as client:
            clients.append(client)
            await client.execute("cont")
            await anyio.sleep_forever()

    # A bug in the callback is never swallowed: it ends the connection and comes out of it.
    with (
        anyio.fail_after(LIMIT),
        pytest.RaisesGroup(pytest.RaisesExc(ValueError, match="bug in the callback")),
    ):
        await body()
    assert clients[0].closed


# -- the end of the connection -------------------------------------------------------------------------


async def test_quit(qemu: Qemu, transport: str) -> None:
    seen: list[Event] = []
    with anyio.fail_after(LIMIT):
        async with connect(qemu, transport, on_event=seen.append) as client:
            with client.subscribe() as sub:
                assert await client.execute("quit") == {}
                await client.wait_closed()
                # Every event QEMU sent before closing was dispatched by then.
                assert names(seen) == ["SHUTDOWN"]
                assert seen[0].data == {"guest": False, "reason": "host-qmp-quit"}
                assert client.closed
                with pytest.raises(ConnectionLostError) as info:
                    await client.execute("query-status")
                assert info.value.command == "query-status"
                # The subscription drains, then ends.
                assert [e.name async for e in sub] == ["SHUTDOWN"]
            with client.subscribe() as late:
                assert [e async for e in late] == []
    assert qemu.proc.wait() == 0


async def test_sigterm(qemu: Qemu) -> None:
    seen: list[Event] = []
    with anyio.fail_after(LIMIT):
        async with connect(qemu, on_event=seen.append) as client:
            await client.execute("query-status")
            qemu.signal(signal.SIGTERM)
            await client.wait_closed()
            assert names(seen) == ["SHUTDOWN"]
            assert seen[0].data["reason"] == "host-signal"
            with pytest.raises(ConnectionLostError):
                await client.execute("query-status")


async def test_pending_calls_fail_when_qemu_dies(qemu: Qemu) -> None:
    errors: list[ConnectionLostError] = []

    async def call(command: str) -> None:
        try:
            await client.execute(command)
        except ConnectionLostError as exc:
            errors.append(exc)

    with anyio.fail_after(LIMIT):
        async with connect(qemu) as client:
            qemu.signal(signal.SIGSTOP)  # QEMU can no longer answer
            async with anyio.create_task_group() as tg:
                tg.start_soon(call, "query-status")
                tg.start_soon(call, "query-version")
                await anyio.wait_all_tasks_blocked()  # both sent, both waiting for a reply
                assert not errors
                qemu.signal(signal.SIGKILL)
            await client.wait_closed()
            assert sorted(e.command or "" for e in errors) == ["query-status", "query-version"]
            with pytest.raises(ConnectionLostError, match="while waiting for 'query-name'"):
                await client.execute("query-name")


async def test_aclose_fails_pending_calls(qemu: Qemu) -> None:
    failed = anyio.Event()

    async def call() -> None:
        with pytest.raises(ConnectionLostError):
            await client.execute("query-status")
        failed.set()

    with anyio.fail_after(LIMIT):
        async with connect(qemu) as client:
            qemu.signal(signal.SIGSTOP)
            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                await anyio.wait_all_tasks_blocked()
                await client.aclose()
                await failed.wait()
            assert client.closed
            await client.wait_closed()
            await client.aclose()  # idempotent


# -- cancellation ---------------------------------------------------------------------------------------


async def test_cancelled_execute_leaves_client_usable(qemu: Qemu, transport: str) -> None:
    with anyio.fail_after(LIMIT):
        async with connect(qemu, transport) as client:
            for _ in range(3):
                with anyio.move_on_after(0) as scope:
                    await client.execute("query-status")
                assert scope.cancelled_caught
            assert (await client.execute("query-status"))["status"] == "prelaunch"
            assert not client.closed


async def test_late_reply_of_cancelled_call_is_dropped(qemu: Qemu, transport: str) -> None:
    with anyio.fail_after(LIMIT):
        async with connect(qemu, transport) as client:
            qemu.signal(signal.SIGSTOP)
            with anyio.move_on_after(0.1) as scope:
                await client.execute("query-version")  # sent, but QEMU is stopped
            assert scope.cancelled_caught
            qemu.signal(signal.SIGCONT)
            # QEMU answers query-version first; that reply must not reach this call.
            status = await client.execute("query-status")
            assert status["status"] == "prelaunch"
            assert "qemu" in await client.execute("query-version")


# -- connecting -----------------------------------------------------------------------------------------


async def test_socket_path_longer_than_107_bytes(short_dir: Path) -> None:
    deep = short_dir / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    bind_name = f"mon-{uuid.uuid4().hex}.sock"  # relative: QEMU itself cannot bind the long path
    q = spawn_qemu(deep, bind_name)
    try:
        assert len(os.fsencode(q.sock)) > 107
        with anyio.fail_after(LIMIT):
            async with QMPClient.open_unix(q.sock) as client:
                assert (await client.execute("query-status"))["status"] == "prelaunch"
            sock = await connect_unix(Path(q.sock))
            sock.close()
    finally:
        reap(q)


async def test_second_client_handshake_is_bounded(qemu: Qemu) -> None:
    # QEMU serves one client at a time: a second one is connected but never greeted.
    with anyio.fail_after(LIMIT):
        async with connect(qemu) as first:
            with pytest.raises(ConnectionLostError, match="handshake did not complete") as info:
                async with QMPClient.open_unix(qemu.sock, handshake_timeout=0.5):
                    pytest.fail("greeted")
            assert isinstance(info.value.__cause__, TimeoutError)
            assert (await first.execute("query-status"))["status"] == "prelaunch"


async def test_a_client_closed_before_its_reader_ran_leaves_its_fd_number_alone(
    qemu: Qemu, short_dir: Path
) -> None:
    """A client closed at once, before anything read its socket, must not wait on the closed
    socket's fd number: by then it may name another socket, whose wait it would break
    (BusyResourceError) or whose event-loop registration it would take and then drop, and that
    socket's owner would never hear from it again."""
    (short_dir / "other").mkdir()
    other = spawn_qemu(short_dir / "other", str(short_dir / "other" / "mon.sock"))
    try:
        with anyio.fail_after(LIMIT):
            sock_a = await connect_unix(qemu.sock)
            number = sock_a.fileno()
            sock_b = await connect_unix(other.sock)
            async with QMPClient.open(sock_a) as a:
                await a.aclose()  # nothing in between yields: a's reader has not run yet
                os.dup2(sock_b.fileno(), number)  # the closed socket's number now names b's
                sock_b.close()
                async with QMPClient.open(socket.socket(fileno=number)) as b:
                    assert (await b.execute("query-status"))["status"] == "prelaunch"
            assert a.closed
    finally:
        reap(other)


async def test_connect_to_missing_socket(short_dir: Path) -> None:
    with pytest.raises(ConnectionLostError, match="cannot connect") as info:
        async with QMPClient.open_unix(short_dir / "nothing.sock"):
            pytest.fail("connected")
    assert isinstance(info.value.__cause__, FileNotFoundError)


async def test_connect_to_dead_qemu(qemu: Qemu) -> None:
    reap(qemu)  # its socket file stays behind, with nobody listening
    with pytest.raises(ConnectionLostError, match="cannot connect") as info:
        async with QMPClient.open_unix(qemu.sock):
            pytest.fail("connected")
    assert isinstance(info.value.__cause__, ConnectionRefusedError)


# -- a fake peer, for what QEMU cannot be made to do ------------------------------------------------

GREETING = b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": []}}\r\n'


class FakePeer:
    """The monitor's end of a socketpair, driven by the test."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def command(self) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            self.buffer += await self.stream.receive()
        line, _, self.buffer = self.buffer.partition(b"\n")
        msg: dict[str, Any] = json.loads(line)
        return msg

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)

    async def reply(self, cmd: dict[str, Any], body: dict[str, Any] | None = None) -> None:
        """Answer ``cmd`` as QEMU does: echo its id if it had one."""
        msg = {"return": {}} if body is None else dict(body)
        if "id" in cmd:
            msg["id"] = cmd["id"]
        await self.send(json.dumps(msg).encode() + b"\r\n")

    async def negotiate(self) -> None:
        await self.send(GREETING)
        cmd = await self.command()
        assert cmd["execute"] == "qmp_capabilities"
        await self.reply(cmd)


@asynccontextmanager
async def fake_monitor(
    peer_script: Callable[[FakePeer], Any], *, transport: str = "socket", **kwargs: Any
) -> AsyncIterator[QMPClient]:
    """A client connected to a peer running ``peer_script`` (which negotiates first or not)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    error: BaseException | None = None
    async with await anyio.abc.UNIXSocketStream.from_socket(theirs) as peer_stream:
        peer = FakePeer(peer_stream)
        async with anyio.create_task_group() as tg:
            tg.start_soon(peer_script, peer)
            stream: socket.socket | anyio.abc.ByteStream = ours
            if transport == "stream":
                stream = await anyio.abc.UNIXSocketStream.from_socket(ours)
            try:
                async with QMPClient.open(stream, **kwargs) as client:
                    yield client
            except Exception as exc:
                error = exc  # raised below, outside the task group, so pytest.raises sees it bare
            tg.cancel_scope.cancel()
    if error is not None:
        raise error


async def test_fake_garbage_after_negotiation() -> None:
    async def script(peer: FakePeer) -> None:
        await peer.negotiate()
        await peer.command()
        await peer.send(b"this is not json\r\n")
        await anyio.sleep_forever()

    with anyio.fail_after(LIMIT):
        async with fake_monitor(script) as client:
            with pytest.raises(ConnectionLostError) as info:
                await client.execute("query-status")
            assert isinstance(info.value.__cause__, ProtocolError)
            assert info.value.__cause__.data == b"this is not json\r"
            await client.wait_closed()
            assert client.closed


def _event(name: str) -> bytes:
    return json.dumps({"event": name, "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}).encode()


@pytest.mark.parametrize("transport", ["socket", "stream"])
@pytest.mark.parametrize("chunks", ["one write", "a write per message", "split mid-line"])
async def test_fake_events_before_a_reply_are_dispatched_before_its_caller_resumes(
    transport: str, chunks: str
) -> None:
    """However the bytes arrive (on asyncio the socket transport parses in the loop's reader
    callback and hands replies straight to their callers), an event sent before a reply has been
    dispatched when that reply's caller resumes, and the order of events is QEMU's."""

    async def script(peer: FakePeer) -> None:
        await peer.negotiate()
        for _ in range(3):
            cmd = await peer.command()
            reply = {"return": {}, **({"id": cmd["id"]} if "id" in cmd else {})}
            lines = [_event("BEFORE"), json.dumps(reply).encode(), _event("AFTER")]
            data = b"".join(line + b"\r\n" for line in lines)
            if chunks == "one write":
                await peer.send(data)
            elif chunks == "a write per message":
                for line in lines:
                    await peer.send(line + b"\r\n")
                    await anyio.sleep(0.01)
            else:
                for i in range(0, len(data), 7):
                    await peer.send(data[i : i + 7])
                    await anyio.sleep(0.001)
        await anyio.sleep_forever()

    seen: list[str] = []

    def on_event(event: Event) -> None:
        seen.append(event.name)

    with anyio.fail_after(LIMIT):
        async with fake_monitor(script, transport=transport, on_event=on_event) as client:
            for i in range(3):
                assert await client.execute("query-status") == {}
                assert seen.count("BEFORE") == i + 1
                with anyio.fail_after(LIMIT):
                    while seen.count("AFTER") < i + 1:
                        await anyio.sleep(0.005)
    assert seen == ["BEFORE", "AFTER"] * 3


async def test_fake_a_cancelled_caller_leaves_the_monitor_read() -> None:
    """The caller waiting for a reply may be the one reading the monitor (trio: see
    QMPClient._read_as_caller). Cancelled, it stops reading, and the events and replies that
    follow still arrive: for no caller at all, and for the next caller."""
    replied = anyio.Event()

    async def script(peer: FakePeer) -> None:
        await peer.negotiate()
        first = await peer.command()  # never answered while its caller waits
        await replied.wait()
        await peer.send(_event("IDLE") + b"\r\n")
        await peer.reply(first)  # a late reply: dropped
        await peer.reply(await peer.command(), {"return": {"status": "running"}})
        await anyio.sleep_forever()

    seen: list[str] = []

    def on_event(event: Event) -> None:
        seen.append(event.name)

    with anyio.fail_after(LIMIT):
        async with fake_monitor(script, on_event=on_event) as client:
            with anyio.move_on_after(0.2) as scope:
                await client.execute("query-status")
            assert scope.cancelled_caught
            replied.set()
            while "IDLE" not in seen:  # nobody calls: the reader callback took reading back
                await anyio.sleep(0.005)
            assert await client.execute("query-status") == {"status": "running"}
            assert seen == ["IDLE"]


async def test_fake_on_event_raising_while_a_caller_reads() -> None:
    """An event before a reply, whose callback raises: the caller that reads (trio) ends the
    connection with it, as the reader callback does when it reads."""

    async def script(peer: FakePeer) -> None:
        await peer.negotiate()
        cmd = await peer.command()
        reply = {"return": {}, **({"id": cmd["id"]} if "id" in cmd else {})}
        await peer.send(_event("BOOM") + b"\r\n" + json.dumps(reply).encode() + b"\r\n")  # one write:
        await anyio.sleep_forever()  # nothing sent to a client that may be gone

    def broken(event: Event) -> None:
        raise ValueError(f"bug in the callback ({event.name})")

    lost: list[ConnectionLostError] = []
    with (
        anyio.fail_after(LIMIT),
        pytest.RaisesGroup(pytest.RaisesExc(ValueError, match=r"bug in the callback \(BOOM\)")),
    ):
        async with fake_monitor(script, on_event=broken) as client:
            try:
                await client.execute("query-status")
            except ConnectionLostError as exc:
                lost.append(exc)
            await client.wait_closed()
    assert len(lost) == 1
    assert lost[0].command == "query-status"


@pytest.mark.parametrize("last", [1, 2, 5, 13])
async def test_fake_commands_racing_the_monitors_end_get_connection_lost(last: int) -> None:
    """Callers keep sending while QEMU answers ``last`` commands and hangs up. The end is read by
    whoever parses (the reader callback, or on trio a reading caller), which finishes the
    connection: a command sent in between must fail as lost, never with the codec's
    LocalProtocolError (found by the crash-safety run, seed 3898967572)."""

    async def script(peer: FakePeer) -> None:
        await peer.negotiate()
        for _ in range(last):
            await peer.reply(await peer.command())
        await peer.stream.aclose()

    outcomes: list[str] = []

    async def hammer(client: QMPClient) -> None:
        while True:
            try:
                await client.execute("query-status")
            except ConnectionLostError:
                outcomes.append("lost")
                return
            outcomes.append("ok")
            await anyio.lowlevel.checkpoint()

    with anyio.fail_after(LIMIT):
        async with fake_monitor(script) as client, anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(hammer, client)
    assert outcomes.count("lost") == 8
    assert outcomes.count("ok") == last


PARSE_ERROR = b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray bytes"}}\r\n'


async def test_fake_idless_error_answers_the_command_sent_without_id() -> None:
    async def script(peer: FakePeer) -> None:
        await peer.negotiate()
        assert "id" not in await peer.command()  # nothing else pending: sent without an id
        await peer.send(PARSE_ERROR)
        await peer.reply(await peer.command())
        await anyio.sleep_forever()

    with anyio.fail_after(LIMIT):
        async with fake_monitor(script) as client:
            with pytest.raises(CommandError, match="stray bytes"):
                await client.execute("query-status")
            assert await client.execute("query-status") == {}


async def test_fake_unattributable_idless_error_ends_connection() -> None:
    # An id-less error when every pending command carried its id: it cannot be attributed, and
    # guessing could hand one caller another's reply.
    async def script(peer: FakePeer) -> None:
        await peer.negotiate()
        first, second = await peer.command(), await peer.command()
        assert "id" not in first
        assert "id" in second
        await peer.reply(first)
        await peer.send(PARSE_ERROR)
        await anyio.sleep_forever()

    results: list[Any] = []

    async def call() -> None:
        try:
            results.append(await client.execute("query-status"))
        except ConnectionLostError as exc:
            results.append(exc)

    with anyio.fail_after(LIMIT):
        async with fake_monitor(script) as client, anyio.create_task_group() as tg:
            tg.start_soon(call)
            tg.start_soon(call)
    assert {} in results
    [lost] = [r for r in results if isinstance(r, ConnectionLostError)]
    assert isinstance(lost.__cause__, ProtocolError)
    assert "could not parse" in str(lost.__cause__)


async def test_fake_never_greets() -> None:
    with anyio.fail_after(LIMIT), pytest.raises(ConnectionLostError, match=r"within 0\.2 s") as info:
        async with fake_monitor(lambda peer: anyio.sleep_forever(), handshake_timeout=0.2):
            pytest.fail("greeted")
    assert isinstance(info.value.__cause__, TimeoutError)


async def test_fake_not_qmp() -> None:
    async def script(peer: FakePeer) -> None:
        await peer.send(b"SSH-2.0-OpenSSH_9.2\r\n")
        await anyio.sleep_forever()

    with anyio.fail_after(LIMIT), pytest.raises(ProtocolError, match="not valid JSON"):
        async with fake_monitor(script):
            pytest.fail("greeted")


@pytest.mark.parametrize("when", ["before-greeting", "during-negotiation"])
async def test_fake_closes_during_handshake(when: str) -> None:
    async def script(peer: FakePeer) -> None:
        if when == "during-negotiation":
            await peer.send(GREETING)
            await peer.command()
        await peer.stream.aclose()

    with anyio.fail_after(LIMIT), pytest.raises(ConnectionLostError, match="during the handshake"):
        async with fake_monitor(script):
            pytest.fail("greeted")


async def test_fake_negotiation_refused() -> None:
    async def script(peer: FakePeer) -> None:
        await peer.send(GREETING)
        cmd = await peer.command()
        await peer.reply(cmd, {"error": {"class": "GenericError", "desc": "no"}})
        await anyio.sleep_forever()

    with anyio.fail_after(LIMIT), pytest.raises(CommandError) as info:
        async with fake_monitor(script):
            pytest.fail("negotiated")
    assert info.value.command == "qmp_capabilities"


async def test_fake_interrupted_write_ends_connection(transport: str) -> None:
    # A peer that stops reading: a big command fills the socket's buffer and the write blocks.
    # Cancelled then, part of a line may have gone out; nothing after it could be framed.
    async def script(peer: FakePeer) -> None:
        await peer.negotiate()
        await anyio.sleep_forever()

    with anyio.fail_after(LIMIT):
        async with fake_monitor(script, transport=transport) as client:
            with anyio.move_on_after(0.2) as scope:
                await client.execute("x", {"blob": "a" * 16_000_000})
            assert scope.cancelled_caught
            assert client.closed
            with pytest.raises(ConnectionLostError, match="interrupted"):
                await client.execute("query-status")


@pytest.mark.parametrize(
    ("offered", "oob", "enabled"),
    [(["oob"], True, ["oob"]), (["oob"], False, []), ([], True, [])],
)
async def test_fake_oob_negotiated_only_when_offered_and_wanted(
    offered: list[str], oob: bool, enabled: list[str]
) -> None:
    negotiated: list[dict[str, Any]] = []

    async def script(peer: FakePeer) -> None:
        greeting = {
            "QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": offered}
        }
        await peer.send(json.dumps(greeting).encode() + b"\r\n")
        cmd = await peer.command()
        negotiated.append(cmd)
        await peer.reply(cmd)
        await anyio.sleep_forever()

    with anyio.fail_after(LIMIT):
        async with fake_monitor(script, oob=oob) as client:
            assert client.greeting.capabilities == tuple(offered)
    assert negotiated[0]["execute"] == "qmp_capabilities"
    assert negotiated[0]["arguments"] == {"enable": enabled}


async def test_without_oob(qemu: Qemu) -> None:
    # The in-band-only monitor (what libvirt uses): same guarantees.
    seen: list[Event] = []
    with anyio.fail_after(LIMIT):
        async with connect(qemu, on_event=seen.append, oob=False) as client:
            async with anyio.create_task_group() as tg:
                for _ in range(50):
                    tg.start_soon(client.execute, "query-status")
            await client.execute("cont")
            assert names(seen) == ["RESUME"]
            assert await client.execute("quit") == {}
            await client.wait_closed()
            assert names(seen) == ["RESUME", "SHUTDOWN"]
