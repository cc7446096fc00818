"""Faults of the host under the controller: a full disk while a record is written.

The state directory's RUN is a small tmpfs of its own, mounted by the test (as root) and filled.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import aiovirt
from aiovirt import DomainState as S
from aiovirt import StateReason as R

from .conftest import none_config, qemu_pids

pytestmark = pytest.mark.anyio


@pytest.fixture
def small_run(state_root: Path) -> Iterator[Path]:
    """``state_root/run`` as a 256 KiB tmpfs."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")  # CI runs as root: this runs there
    run = state_root / "run"
    run.mkdir(parents=True, mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(run)], check=True)
    try:
        yield run
    finally:
        subprocess.run(["umount", "-l", str(run)], check=True)


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    return filler


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def test_a_full_disk_at_start_leaves_the_domain_as_it_was(
    uri: str, state_root: Path, small_run: Path
) -> None:
    async with aiovirt.connect(uri) as conn:
        dom = await conn.define(none_config("full"))
        filler = _fill(small_run)
        fds = _open_fds()
        async with conn.subscribe() as events:
            with pytest.raises(aiovirt.StateDirError, match=r"full\.json.*cannot write: No space left"):
                await dom.start()
            assert events.receive_nowait() is None  # no STARTED, no STOPPED: nothing happened
        assert (dom.state, dom.reason, dom.pid) == (S.SHUTOFF, R.UNKNOWN, None)
        assert _open_fds() == fds  # the monitor socket and its listener were closed
        assert sorted(p.name for p in small_run.iterdir()) == ["filler"]  # no socket, no record, no temp
        assert qemu_pids(str(state_root)) == set()
        filler.unlink()  # space is back: the domain is usable
        await dom.start()
        assert dom.state == S.RUNNING
        await dom.destroy()


# -- QEMU dying, or speaking garbage, at the worst moments -------------------------------------------

FAKE_QEMU = Path(__file__).with_name("_fake_qemu.py")
HANG = 30


def _stop_once_it_handles_sigterm(pid: int) -> None:
    from .test_defects import _stop_once_it_handles_sigterm as stop

    stop(pid)


def _records(state_root: Path) -> list[str]:
    run = state_root / "run"
    return sorted(p.name for p in run.iterdir()) if run.exists() else []


@pytest.mark.parametrize(
    ("mode", "cause"),
    [
        ("garbage", "not valid JSON"),
        ("long", "longer than"),
        ("greet-then-exit", "QEMU closed its monitor|lost"),
        ("silent", "within"),
    ],
)
async def test_a_monitor_that_is_not_qmp(
    conn: aiovirt.Connection, state_root: Path, monkeypatch: pytest.MonkeyPatch, mode: str, cause: str
) -> None:
    """Bounded, clear, and nothing left: the stand-in is killed, its record and socket removed."""
    monkeypatch.setenv("AIOVIRT_FAKE_MONITOR", mode)
    dom = await conn.define(none_config("fake", emulator=str(FAKE_QEMU)))
    with anyio.fail_after(HANG), pytest.raises(aiovirt.LaunchError) as info:
        await dom.start()
    assert info.value.__cause__ is not None

    assert re.search(cause, f"{info.value} {info.value.__cause__}"), (info.value, info.value.__cause__)
    assert (dom.state, dom.reason, dom.pid) == (S.SHUTOFF, R.FAILED, None)
    assert _records(state_root) == []


async def test_qemu_killed_during_the_handshake(conn: aiovirt.Connection, state_root: Path) -> None:
    dom = await conn.define(none_config("hs"))
    errors: list[BaseException] = []

    async def start() -> None:
        try:
            await dom.start()
        except aiovirt.LaunchError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(start)
        await dom.wait_for_state(S.PAUSED)
        assert dom.pid is not None
        os.kill(dom.pid, 9)
    assert (dom.state, dom.reason) == (S.SHUTOFF, R.FAILED)
    [err] = errors
    assert isinstance(err, aiovirt.LaunchError) and err.returncode == -9
    assert _records(state_root) == [] and qemu_pids(str(state_root)) == set()


async def test_qemu_killed_during_a_command(conn: aiovirt.Connection, state_root: Path) -> None:
    dom = await conn.create(none_config("cmd"))
    pid = dom.pid
    assert pid is not None
    _stop_once_it_handles_sigterm(pid)  # the command waits for a reply that never comes
    seen: list[aiovirt.ConnectionLostError] = []

    async def ask() -> None:
        try:
            await dom.qmp("query-status")
        except aiovirt.ConnectionLostError as exc:
            seen.append(exc)

    with anyio.fail_after(HANG):
        async with anyio.create_task_group() as tg:
            tg.start_soon(ask)
            await anyio.sleep(0.2)
            os.kill(pid, 9)
    [lost] = seen
    assert lost.command == "query-status"
    with anyio.fail_after(HANG):  # the monitor's EOF can reach the caller before the exit is seen
        await dom.wait_for_state(S.SHUTOFF)
    assert (dom.state, dom.reason) == (S.SHUTOFF, R.CRASHED)
    assert _records(state_root) == []


async def test_qemu_killed_during_stop_all(conn: aiovirt.Connection, state_root: Path) -> None:
    doms = [await conn.create(none_config(f"s{i}")) for i in range(3)]
    victim = doms[0].pid
    assert victim is not None

    async def kill_soon() -> None:
        await anyio.sleep(0.3)  # during the ACPI stage (the guests have no OS: they ignore it)
        os.kill(victim, 9)

    with anyio.fail_after(HANG):
        async with anyio.create_task_group() as tg:
            tg.start_soon(kill_soon)
            results = await conn.stop_all(policy=aiovirt.StopPolicy(acpi_timeout=1, term_timeout=5))
    by_name = {r.name: r for r in results}
    assert by_name["s0"].stopped and doms[0].reason == R.CRASHED
    assert all(
        by_name[f"s{i}"].stopped and by_name[f"s{i}"].stage is aiovirt.StopStage.SIGTERM for i in (1, 2)
    )
    assert _records(state_root) == [] and qemu_pids(str(state_root)) == set()
