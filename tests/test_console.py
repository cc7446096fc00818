"""The serial console as a byte stream: expect, typing, several readers, one writer, restarts.

Real QEMU with the tiny guest (a busybox shell on ttyS0 once it is ready), and the test driver's
scripted console (no process; its waits are virtual). Every test on asyncio and trio. Waits on a
real guest are bounded and generous (TCG on a shared machine); no test asserts on durations.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import anyio
import pytest

import aiovirt
from aiovirt import Console, ConsoleBusyError
from aiovirt.testing import ConsoleScript, GuestBehaviour, TinyGuest, script_guest

from .conftest import none_config

pytestmark = pytest.mark.anyio

BOOT_TIMEOUT = 120.0  # start to the guest's shell prompt (about 4 s on an idle machine)
ANSWER_TIMEOUT = 30.0  # a command typed to its answer


def prompt(guest: TinyGuest) -> bytes:
    return guest.shell_prompt.encode()


async def expect(con: Console, pattern: bytes | re.Pattern[bytes], timeout: float = ANSWER_TIMEOUT) -> bytes:
    with anyio.fail_after(timeout):
        return (await con.expect(pattern)).group()


async def boot(con: Console, guest: TinyGuest) -> None:
    """Wait for the ready marker, then for the shell's first prompt (typing earlier loses input)."""
    await expect(con, guest.ready_marker.encode(), BOOT_TIMEOUT)
    await expect(con, prompt(guest), BOOT_TIMEOUT)


@asynccontextmanager
async def shell_guest(conn: aiovirt.Connection, guest: TinyGuest, name: str) -> AsyncIterator[aiovirt.Domain]:
    async with conn.run(guest.domain_config(name)) as dom:
        yield dom


# -- the real guest -------------------------------------------------------------------------------


async def test_expect_boot_output_and_type_a_command(conn: aiovirt.Connection, tiny_guest: TinyGuest) -> None:
    async with shell_guest(conn, tiny_guest, "shell") as dom, dom.console() as con:
        await boot(con, tiny_guest)
        # The stream began with the run's first bytes: the ready marker is in what it saw.
        assert tiny_guest.ready_marker in con.text
        await con.send(b"echo answer-$((6*7))\n")
        # The shell echoes the line as typed, then prints the answer on a line of its own.
        await expect(con, b"echo answer-$((6*7))\r\n")
        assert await expect(con, re.compile(rb"^answer-(\d+)\r$", re.M)) == b"answer-42\r"
        await expect(con, prompt(tiny_guest))
        assert con.writer
        path = dom.console_path
    # QEMU logged the same bytes to the console file.
    assert path is not None
    logged = path.read_bytes()
    assert tiny_guest.ready_marker.encode() in logged and b"answer-42\r\n" in logged


async def test_two_readers_see_the_same_bytes(conn: aiovirt.Connection, tiny_guest: TinyGuest) -> None:
    async with shell_guest(conn, tiny_guest, "readers") as dom:
        async with dom.console() as first:
            await boot(first, tiny_guest)
            async with dom.console() as second, dom.console(replay=False) as live:
                # The second starts with what the run printed so far; the live one starts now.
                assert second.seen.startswith(first.seen)
                assert live.seen == b""
                await first.send(b"echo two-readers\n")
                end = re.compile(rb"\r\ntwo-readers\r\n" + re.escape(prompt(tiny_guest)) + rb"\x1b\[6n")
                for con in (first, second, live):
                    await expect(con, end)
                assert first.seen == second.seen
                assert first.seen.endswith(live.seen) and b"two-readers" in live.seen
                # A reader that never wrote cannot write while the first is the writer.
                with pytest.raises(ConsoleBusyError):
                    await second.send(b"x")
                assert not second.writer
            # Once the writer is gone, another console may write.
        async with dom.console() as third:
            await third.send(b"echo third\n")
            await expect(third, b"\r\nthird\r\n")


async def test_cancelled_expect_leaves_the_stream_usable(
    conn: aiovirt.Connection, tiny_guest: TinyGuest
) -> None:
    async with (
        shell_guest(conn, tiny_guest, "cancel") as dom,
        dom.console(replay=False) as con,
        dom.console(replay=False) as witness,
    ):
        # expect() waits for something that never comes while the guest boots; it is cancelled
        # once the witness saw the prompt, i.e. once those bytes reached both consoles.
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:

                async def wait_in_vain() -> None:
                    await con.expect(b"this never appears")

                tg.start_soon(wait_in_vain)
                await boot(witness, tiny_guest)
                scope.cancel()
        assert scope.cancelled_caught
        # Nothing the cancelled expect had read is lost: the marker and the prompt are found.
        await expect(con, tiny_guest.ready_marker.encode())
        await expect(con, prompt(tiny_guest))
        # Cancelled while it waits for an answer, then the answer is there all the same.
        await con.send(b"echo after-cancel\n")
        with anyio.move_on_after(0.01):
            await con.expect(b"never, either")
        await expect(con, b"\r\nafter-cancel\r\n")
        await expect(con, prompt(tiny_guest))


async def test_console_ends_when_the_domain_stops(conn: aiovirt.Connection, tiny_guest: TinyGuest) -> None:
    async with shell_guest(conn, tiny_guest, "ends") as dom, dom.console() as con:
        await boot(con, tiny_guest)
        await dom.shutdown()  # the guest's power-button handler prints, syncs and powers off
        with anyio.fail_after(60):
            with pytest.raises(anyio.EndOfStream):
                while True:
                    await con.receive()
        assert b"power button pressed, powering off" in con.seen
        with pytest.raises(aiovirt.ConnectionLostError):
            await con.send(b"too late\n")
    assert dom.state == aiovirt.DomainState.SHUTOFF


RESTART_CONTROLLER = textwrap.dedent(
    """
    import sys, anyio, aiovirt
    from aiovirt.testing import ensure_tiny_guest

    async def main(uri):
        guest = ensure_tiny_guest()
        prompt = guest.shell_prompt.encode()
        async with aiovirt.connect(uri) as conn:
            dom = await conn.define(guest.domain_config("restart"))
            await dom.start()
            async with dom.console() as con:
                with anyio.fail_after(120):
                    await con.expect(guest.ready_marker.encode())
                    await con.expect(prompt)
                    await con.send(b"echo first-$((20+1))\\n")
                    await con.expect(b"\\r\\nfirst-21\\r\\n")
                    await con.expect(prompt)
            print("started", dom.pid, flush=True)

    anyio.run(main, sys.argv[2], backend=sys.argv[1])
    """
)


async def test_console_works_again_after_a_controller_restart(
    anyio_backend: str, uri: str, tiny_guest: TinyGuest
) -> None:
    done = await anyio.run_process(
        [sys.executable, "-c", RESTART_CONTROLLER, anyio_backend, uri], check=False, stderr=subprocess.PIPE
    )
    assert done.returncode == 0, done.stderr.decode()
    pid = int(done.stdout.split()[1])
    async with aiovirt.connect(uri) as conn:
        dom = await conn.lookup("restart")
        try:
            assert dom.pid == pid and dom.state == aiovirt.DomainState.RUNNING
            async with dom.console() as con:
                # This controller has seen nothing of the run yet: the log has the earlier part.
                assert con.seen == b""
                await con.send(b"echo second-$((40+2))\n")
                await expect(con, b"\r\nsecond-42\r\n")
                await expect(con, prompt(tiny_guest))
            path = dom.console_path
            assert path is not None
            logged = path.read_bytes()
            assert logged.index(b"first-21\r\n") < logged.index(b"second-42\r\n")
        finally:
            await dom.destroy(timeout=5)


# -- what is refused ------------------------------------------------------------------------------


async def test_console_needs_an_active_domain_with_a_console(conn: aiovirt.Connection, uri: str) -> None:
    dom = await conn.define(none_config("off"))
    with pytest.raises(aiovirt.InvalidStateError, match="cannot open the console of domain 'off'"):
        async with dom.console():
            pass
    async with conn.run(none_config("silent", console=False)) as silent:
        with pytest.raises(aiovirt.InvalidStateError, match="console=False"):
            async with silent.console():
                pass
    async with conn.run(none_config("quiet")) as quiet:
        async with quiet.console() as con:
            assert con.seen == b"" and con.name == "quiet"
            with pytest.raises(ValueError, match="max_bytes"):
                await con.receive(0)
            with pytest.raises(TypeError, match="compiled bytes regex"):
                await con.expect("text")  # type: ignore[arg-type]
        with pytest.raises(anyio.ClosedResourceError):
            await con.receive()
        with pytest.raises(anyio.ClosedResourceError):
            await con.send(b"x")


async def test_a_read_only_connection_opens_no_console(conn: aiovirt.Connection, uri: str) -> None:
    async with conn.run(none_config("ro")), aiovirt.connect(uri, readonly=True) as ro:
        dom = await ro.lookup("ro")
        with pytest.raises(aiovirt.ReadOnlyError, match="open the console of"):
            async with dom.console():
                pass


async def test_a_console_that_cannot_be_reached(uri: str, state_root: Path) -> None:
    # As a QEMU taken back from a controller that served no console socket: the file is gone.
    async with aiovirt.connect(uri) as conn:
        dom = await conn.create(none_config("nosock"))
        pid = dom.pid
    (state_root / "run" / "nosock.serial").unlink()
    async with aiovirt.connect(uri) as conn:
        dom = await conn.lookup("nosock")
        try:
            assert dom.pid == pid
            with pytest.raises(aiovirt.ConnectionLostError, match="its console cannot be reached"):
                async with dom.console():
                    pass
            await dom.qmp("query-status")  # the rest of the domain works
        finally:
            await dom.destroy(timeout=5)


async def test_consoles_end_when_the_connection_closes(uri: str) -> None:
    async with AsyncExitStack() as stack:
        async with aiovirt.connect(uri) as conn:
            dom = await conn.create(none_config("closing"))
            con = await stack.enter_async_context(dom.console())
            await con.send(b"typed into a machine with no serial device\n")  # QEMU takes it all the same
        with pytest.raises(anyio.EndOfStream):
            await con.receive()
        with pytest.raises(aiovirt.ConnectionClosedError):
            async with dom.console():
                pass
    async with aiovirt.connect(uri) as conn:  # the QEMU lives on; its console is reached again
        dom = await conn.lookup("closing")
        try:
            async with dom.console() as con:
                assert con.seen == b""
                await con.send(b"again\n")
        finally:
            await dom.destroy(timeout=5)


# -- the test driver's scripted console ------------------------------------------------------------

SCRIPT = ConsoleScript(
    boot=b"Booting the pretend guest\r\n",
    prompt=b"$ ",
    answers={b"uname": b"Pretend\r\n", b"echo hi": b"hi\r\n"},
    unknown=b"sh: not found\r\n",
)


@asynccontextmanager
async def scripted(name: str, script: ConsoleScript = SCRIPT, **kw: object) -> AsyncIterator[aiovirt.Domain]:
    async with aiovirt.connect("test:///empty") as conn:
        script_guest(conn, name, GuestBehaviour(console=script, **kw))  # type: ignore[arg-type]
        async with conn.run(none_config(name)) as dom:
            yield dom


async def test_scripted_console_boots_and_answers() -> None:
    async with scripted("pretend") as dom, dom.console() as con:
        assert await expect(con, b"$ ") == b"$ "
        assert con.seen == b"Booting the pretend guest\r\n$ "
        await con.send(b"uname\r")
        await con.send(b"ech\x7fho hi\r\n")  # a backspace, and \r\n ends one line
        await con.send(b"nope\n")
        await expect(con, b"sh: not found\r\n$ ")
        assert con.text == (
            "Booting the pretend guest\r\n$ uname\r\nPretend\r\n$ ech\b \bho hi\r\nhi\r\n"
            "$ nope\r\nsh: not found\r\n$ "
        )


async def test_scripted_console_readers_writer_and_end() -> None:
    async with scripted("pretend2") as dom, dom.console(writer=True) as writer, dom.console() as reader:
        assert writer.writer and not reader.writer
        with pytest.raises(ConsoleBusyError, match="one writer at a time"):
            async with dom.console(writer=True):
                pass
        with pytest.raises(ConsoleBusyError):
            await reader.send(b"uname\n")
        await writer.send(b"uname\n")
        for con in (writer, reader):
            await expect(con, b"Pretend\r\n$ ")
        assert writer.seen == reader.seen
        await writer.send_eof()  # gives the role up; reading goes on
        await reader.send(b"echo hi\n")
        assert reader.writer
        await expect(writer, b"hi\r\n")
        await dom.destroy()
        with pytest.raises(anyio.EndOfStream):
            while True:
                await reader.receive()
        with pytest.raises(aiovirt.ConnectionLostError):
            await reader.send(b"x")


async def test_scripted_console_slow_reader_is_told_what_it_lost() -> None:
    async with (
        scripted("slow", ConsoleScript(prompt=b"> ")) as dom,
        dom.console(max_buffer=2) as slow,
        dom.console() as fast,
    ):
        for _ in range(5):
            await fast.send(b"\n")  # each line answers with \r\n then a prompt: one chunk each
        await expect(fast, b"> \r\n> \r\n> \r\n> \r\n> \r\n> ")
        assert await slow.receive() == b"> "  # the boot prompt, replayed
        assert await slow.receive() == b"\r\n> "
        assert await slow.receive() == b"\r\n> "
        with pytest.raises(aiovirt.EventsDroppedError) as dropped:
            await slow.receive()
        assert dropped.value.dropped == 3
        await fast.send(b"\n")
        assert await slow.receive() == b"\r\n> "  # still usable


async def test_scripted_console_outlives_its_connection() -> None:
    # test:///default keeps its guests between connections, and their console output with them.
    async with AsyncExitStack() as stack:
        async with aiovirt.connect("test:///default") as conn:
            script_guest(conn, "kept", GuestBehaviour(console=SCRIPT))
            dom = await conn.create(none_config("kept"))
            con = await stack.enter_async_context(dom.console())
            await con.send(b"uname\n")
            await expect(con, b"Pretend\r\n$ ")
        with pytest.raises(anyio.EndOfStream):
            await con.receive()  # the console of a closed connection has ended
    async with aiovirt.connect("test:///default") as conn:
        dom = await conn.lookup("kept")
        try:
            async with dom.console() as con:
                assert con.seen == b"Booting the pretend guest\r\n$ uname\r\nPretend\r\n$ "
        finally:
            await dom.destroy()


async def test_cancelled_expect_on_the_scripted_console() -> None:
    async with scripted("cancel2") as dom, dom.console() as con:
        with anyio.move_on_after(0.05) as scope:
            await con.expect(b"never")
        assert scope.cancelled_caught
        await con.send(b"uname\n")
        assert (await con.expect(re.compile(rb"(Pretend)\r\n"))).group(1) == b"Pretend"
        assert (await con.receive()) == b"$ "
