"""Domain lifecycle against real QEMU, on asyncio and trio."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
from pathlib import Path

import anyio
import pytest

import aiovirt
from aiovirt import DomainState as S
from aiovirt import StateReason as R
from aiovirt.testing import TinyGuest

from .conftest import none_config, pid_alive, qemu_pids

pytestmark = pytest.mark.anyio


async def test_lifecycle_of_a_no_os_domain(conn: aiovirt.Connection) -> None:
    dom = await conn.define(none_config("life"))
    assert (dom.state, dom.reason) == (S.SHUTOFF, R.UNKNOWN)
    assert dom.pid is None

    await dom.start()
    assert (dom.state, dom.reason) == (S.RUNNING, R.BOOTED)
    pid = dom.pid
    assert pid is not None and pid_alive(pid)
    assert (await dom.qmp("query-status"))["status"] == "running"
    with pytest.raises(aiovirt.InvalidStateError, match="running"):
        await dom.start()

    await dom.suspend()
    assert (dom.state, dom.reason) == (S.PAUSED, R.USER)
    assert (await dom.qmp("query-status"))["status"] == "paused"
    with pytest.raises(aiovirt.InvalidStateError):
        await dom.shutdown()  # refused while paused, as libvirt does
    with pytest.raises(aiovirt.InvalidStateError):
        await dom.suspend()

    await dom.resume()
    assert (dom.state, dom.reason) == (S.RUNNING, R.UNPAUSED)

    await dom.reset()
    assert dom.state == S.RUNNING and dom.pid == pid

    info = await dom.info()
    assert info.state == S.RUNNING and info.pid == pid
    assert info.rss_bytes > 0 and info.cpu_time >= 0 and info.uptime >= 0

    await dom.destroy()
    assert (dom.state, dom.reason) == (S.SHUTOFF, R.DESTROYED)
    assert dom.pid is None and not pid_alive(pid)
    with pytest.raises(aiovirt.InvalidStateError):
        await dom.destroy()

    await dom.start()  # a persistent domain starts again
    assert dom.state == S.RUNNING and dom.pid != pid
    await dom.destroy()


async def test_qmp_errors_carry_qemus_class(conn: aiovirt.Connection) -> None:
    async with conn.run(none_config("qmperr")) as dom:
        with pytest.raises(aiovirt.CommandError) as info:
            await dom.qmp("no-such-command")
        assert info.value.error_class == "CommandNotFound"
        assert "no-such-command" in info.value.desc


async def test_tiny_guest_honours_acpi_shutdown(conn: aiovirt.Connection, tiny_guest: TinyGuest) -> None:
    async with conn.run(tiny_guest.domain_config("acpi", memory_mib=256)) as dom:
        assert dom.console_path is not None
        with anyio.fail_after(180):
            while tiny_guest.ready_marker not in dom.console_path.read_text(errors="replace"):
                await anyio.sleep(0.2)
        pid = dom.pid
        assert pid is not None
        await dom.shutdown()
        with anyio.fail_after(60):
            await dom.wait_for_state(S.SHUTOFF)
        assert dom.reason == R.SHUTDOWN
        assert dom.shutdown_reason == "guest-shutdown"
        assert not pid_alive(pid)


async def test_no_os_guest_ignores_acpi(conn: aiovirt.Connection) -> None:
    async with conn.run(none_config("deaf")) as dom:
        await dom.shutdown()  # QEMU takes the request; nothing in the guest acts on it
        with anyio.move_on_after(1):
            await dom.wait_for_state(S.SHUTOFF)
        assert dom.state == S.RUNNING


async def test_graceful_destroy_of_a_stopped_qemu(conn: aiovirt.Connection) -> None:
    dom = await conn.create(none_config("stuck"))
    pid = dom.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # a QEMU that cannot react to SIGTERM, for real
    with pytest.raises(aiovirt.DestroyTimeoutError) as info:
        await dom.destroy(graceful=True, timeout=0.5)
    assert info.value.pid == pid
    assert pid_alive(pid), "graceful destroy must never SIGKILL"
    assert dom.state == S.RUNNING and dom.pid == pid

    await dom.destroy(graceful=False, timeout=0.5)
    assert (dom.state, dom.reason) == (S.SHUTOFF, R.DESTROYED)
    assert not pid_alive(pid)


async def test_cancelled_destroy_sends_no_further_signal(conn: aiovirt.Connection) -> None:
    dom = await conn.create(none_config("cancel-destroy"))
    pid = dom.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    with anyio.move_on_after(0.5) as scope:
        await dom.destroy(timeout=30)  # would SIGKILL after 30 s
    assert scope.cancelled_caught
    assert pid_alive(pid), "a cancelled destroy sent SIGKILL"
    assert dom.state == S.RUNNING
    # The SIGTERM it did send is pending: let the process run and it acts on it.
    os.kill(pid, signal.SIGCONT)
    with anyio.fail_after(30):
        await dom.wait_for_state(S.SHUTOFF)
    assert dom.reason == R.DESTROYED


async def test_cancelled_run_leaves_no_qemu(conn: aiovirt.Connection) -> None:
    pids: list[int] = []
    with anyio.move_on_after(1) as scope:
        async with conn.run(none_config("cancel-run")) as dom:
            assert dom.pid is not None
            pids.append(dom.pid)
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert pids and not pid_alive(pids[0])
    assert dom.state == S.SHUTOFF
    with pytest.raises(aiovirt.DomainNotFoundError):
        await conn.lookup("cancel-run")  # transient: forgotten once stopped


async def test_cancelled_start_leaves_no_qemu(conn: aiovirt.Connection, state_root: Path) -> None:
    before = qemu_pids(str(state_root))
    for delay in (0.0, 0.005, 0.02, 0.05):
        dom = await conn.define(none_config(f"cancel-start-{int(delay * 1000)}"))
        with anyio.move_on_after(delay):
            await dom.start()
        if dom.active:
            await dom.destroy()
        assert dom.state == S.SHUTOFF
        assert not (state_root / "run" / f"{dom.name}.json").exists()
    assert {p for p in qemu_pids(str(state_root)) - before if pid_alive(p)} == set()


async def test_run_body_exception_propagates_unwrapped(conn: aiovirt.Connection) -> None:
    pids: list[int] = []
    with pytest.raises(KeyError, match="boom"):
        async with conn.run(none_config("raises")) as dom:
            assert dom.pid is not None
            pids.append(dom.pid)
            raise KeyError("boom")
    assert not pid_alive(pids[0])


async def test_connect_body_exception_propagates_unwrapped(uri: str) -> None:
    with pytest.raises(ValueError, match="mine"):
        async with aiovirt.connect(uri):
            raise ValueError("mine")


async def test_qemu_exit_reasons(conn: aiovirt.Connection) -> None:
    crashed = await conn.define(none_config("crashes"))
    await crashed.start()
    assert crashed.pid is not None
    os.kill(crashed.pid, signal.SIGKILL)  # from outside: no SHUTDOWN event
    with anyio.fail_after(30):
        await crashed.wait_for_state(S.SHUTOFF)
    assert crashed.reason == R.CRASHED

    quits = await conn.define(none_config("quits"))
    await quits.start()
    async with quits.subscribe() as events:
        # QEMU sends the SHUTDOWN event, then (usually) the reply, then closes the monitor.
        with contextlib.suppress(aiovirt.ConnectionLostError):
            await quits.qmp("quit")
        with anyio.fail_after(30):
            await quits.wait_for_state(S.SHUTOFF)
        assert quits.reason == R.SHUTDOWN
        kinds = [(e.kind, e.detail) async for e in _take(events, 2)]
    assert kinds == [
        (aiovirt.EventKind.SHUTDOWN, aiovirt.EventDetail.HOST),
        (aiovirt.EventKind.STOPPED, aiovirt.EventDetail.SHUTDOWN),
    ]


async def _take(sub: aiovirt.Subscription[aiovirt.DomainEvent], n: int):  # type: ignore[no-untyped-def]
    for _ in range(n):
        with anyio.fail_after(10):
            yield await sub.receive()


async def test_long_state_directory(tmp_path: Path) -> None:
    root = tmp_path / ("d" * 60) / ("e" * 60)
    assert len(str(root / "run" / "long.qmp")) > 107
    async with aiovirt.connect(f"qemu:///embed?root={root}") as conn, conn.run(none_config("long")) as dom:
        assert (await dom.qmp("query-status"))["status"] == "running"


async def test_permissions(conn: aiovirt.Connection, state_root: Path) -> None:
    async with conn.run(none_config("perm")):
        for d in (state_root, state_root / "domains", state_root / "run", state_root / "log"):
            assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
        for f in (
            state_root / "run" / "perm.qmp",
            state_root / "run" / "perm.json",
            state_root / "log" / "perm.log",
            state_root / "lock",
        ):
            assert stat.S_IMODE(f.lstat().st_mode) == 0o600, f
        assert stat.S_ISSOCK((state_root / "run" / "perm.qmp").lstat().st_mode)
    defined = await conn.define(none_config("perm-def"))
    assert stat.S_IMODE((state_root / "domains" / f"{defined.name}.json").stat().st_mode) == 0o600


async def test_second_controller_is_refused(uri: str) -> None:
    async with aiovirt.connect(uri):
        with pytest.raises(aiovirt.StateDirLockedError) as info:
            async with aiovirt.connect(uri):
                pass
        assert info.value.pid == os.getpid()
    async with aiovirt.connect(uri):  # released on exit
        pass
