"""Domains outlive their controller: reattach at connect, after an exit, a crash, a dead QEMU, a reboot.

Real QEMU (``machine="none"``), every test on asyncio and trio. A QEMU started by another controller
process (``tests/_controller.py``) is not our child once that process is gone: we cannot reap it,
and see its exit only through its pidfd. Some tests start QEMU in this process instead, close the
connection and then kill and reap it themselves, so that its pid is free for a pid-reuse test.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import uuid as uuid_mod
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

import aiovirt
from aiovirt import DomainState as S
from aiovirt import EventDetail as D
from aiovirt import EventKind as K
from aiovirt import StateReason as R
from aiovirt.drivers.qemu._process import Process, read_identity

from .conftest import none_config, pid_alive, qemu_pids

pytestmark = pytest.mark.anyio

CONTROLLER = Path(__file__).with_name("_controller.py")


# -- helpers -------------------------------------------------------------------------------------


def controller_argv(backend: str, uri: str, *args: str) -> list[str]:
    return [sys.executable, str(CONTROLLER), backend, uri, *args]


async def run_controller(backend: str, uri: str, *args: str, returncode: int = 0) -> list[str]:
    """Run the controller to its end; its output lines."""
    result = await anyio.run_process(controller_argv(backend, uri, *args), check=False)
    assert result.returncode == returncode, result.stderr.decode()
    return result.stdout.decode().splitlines()


async def read_line(stream: BufferedByteReceiveStream) -> str:
    with anyio.fail_after(60):
        return (await stream.receive_until(b"\n", 1 << 16)).decode()


@asynccontextmanager
async def held_controller(backend: str, uri: str, *args: str) -> AsyncIterator[tuple[int, list[str]]]:
    """A controller that did its work and waits (``--hold``): ``(its pid, its output)``.

    It is SIGKILLed when the block exits, unless the body did it already.
    """
    async with await anyio.open_process(controller_argv(backend, uri, *args, "--hold")) as proc:
        assert proc.stdout is not None
        stdout = BufferedByteReceiveStream(proc.stdout)
        lines: list[str] = []
        try:
            while not (line := await read_line(stdout)).startswith("ready"):
                lines.append(line)
            yield proc.pid, lines
        finally:
            with anyio.CancelScope(shield=True):
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()


def started_pids(lines: list[str]) -> dict[str, int]:
    return {words[1]: int(words[2]) for words in (line.split() for line in lines) if words[0] == "started"}


def _stat(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return data[data.rindex(b")") + 2 :].split()


def proc_letter(pid: int) -> str:
    return _stat(pid)[0].decode()


def parent_of(pid: int) -> int:
    return int(_stat(pid)[1])


def runtime_record(state_root: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((state_root / "run" / f"{name}.json").read_text())
    return data


def kill_and_reap(pid: int) -> None:
    """SIGKILL a QEMU this process spawned (through a connection that is closed now) and reap it."""
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


async def take(sub: aiovirt.Subscription[aiovirt.DomainEvent], n: int) -> list[tuple[K, D]]:
    out = []
    for _ in range(n):
        with anyio.fail_after(10):
            event = await sub.receive()
        out.append((event.kind, event.detail))
    return out


async def start_here(uri: str, *names: str, transient: tuple[str, ...] = ()) -> dict[str, int]:
    """Start domains in a connection of this process and close it (QEMUs keep running)."""
    pids = {}
    async with aiovirt.connect(uri) as conn:
        for name in names:
            dom = await conn.define(none_config(name))
            await dom.start()
            assert dom.pid is not None
            pids[name] = dom.pid
        for name in transient:
            dom = await conn.create(none_config(name))
            assert dom.pid is not None
            pids[name] = dom.pid
    return pids


# -- definitions ---------------------------------------------------------------------------------


async def test_define_close_reopen(uri: str, state_root: Path) -> None:
    async with aiovirt.connect(uri) as conn:
        a = await conn.define(none_config("a", memory_mib=24))
        b = await conn.define(none_config("b", uuid=uuid_mod.UUID(int=7)))
        configs = {"a": a.config, "b": b.config}
        assert conn.problems == []
    async with aiovirt.connect(uri) as conn:
        assert [d.name for d in await conn.list_domains()] == ["a", "b"]
        for name, cfg in configs.items():
            dom = await conn.lookup(name)
            assert dom.config == cfg and dom.uuid == cfg.uuid
            assert (dom.state, dom.persistent, dom.autostart, dom.pid) == (S.SHUTOFF, True, False, None)
        assert (await conn.lookup("b")).uuid == uuid_mod.UUID(int=7)
        assert conn.problems == []
    record = json.loads((state_root / "domains" / "a.json").read_text())
    assert record == {"format": 1, "autostart": False, "config": configs["a"].model_dump(mode="json")}


async def test_define_and_create_of_one_name_at_once(uri: str, state_root: Path) -> None:
    """Found by the crash test: define() used to check the name, await the write and then add the
    domain, so a create() in between vanished from the table while its QEMU ran."""

    async def attempt(make: Any) -> None:
        with contextlib.suppress(aiovirt.DomainExistsError):  # the one that came second
            await make(none_config("x"))

    async with aiovirt.connect(uri) as conn:
        async with anyio.create_task_group() as tg:
            tg.start_soon(attempt, conn.define)
            tg.start_soon(attempt, conn.create)
        listed = {d.pid for d in await conn.list_domains(active=True)}
        running = {p for p in qemu_pids(str(state_root)) if pid_alive(p)}
        for pid in running - listed:
            os.kill(pid, signal.SIGKILL)  # the lost QEMU: not ours to leak
        for dom in await conn.list_domains(active=True):
            await dom.destroy()
        assert running == listed, "a running QEMU is missing from list_domains()"


# -- the controller exits or crashes; QEMU lives on ------------------------------------------------


async def test_reattach_after_controller_exit(anyio_backend: str, uri: str, state_root: Path) -> None:
    """Started by another controller process that exited: RUNNING, same pid, QMP, events, destroy.

    Those QEMUs are not our children: their exit is seen through the pidfd only.
    """
    lines = await run_controller(anyio_backend, uri, "start", "a", "b", "p:paused")
    lines += await run_controller(anyio_backend, uri, "create", "t")
    pids = started_pids(lines)
    assert set(pids) == {"a", "b", "p", "t"} and all(pid_alive(p) for p in pids.values())

    async with aiovirt.connect(uri) as conn:
        assert conn.problems == []
        a, b, p, t = [await conn.lookup(n) for n in ("a", "b", "p", "t")]
        assert [d.name for d in await conn.list_domains(active=True)] == ["a", "b", "p", "t"]
        for dom in (a, b, t):
            assert dom.state == S.RUNNING and dom.pid == pids[dom.name]
            assert (await dom.qmp("query-status"))["status"] == "running"
        assert (p.state, p.reason, p.pid) == (S.PAUSED, R.USER, pids["p"])
        assert (await p.qmp("query-status"))["status"] == "paused"
        assert a.persistent and not t.persistent
        assert parent_of(pids["a"]) != os.getpid() and (await a.info()).uptime > 0  # not our child

        async with a.subscribe() as events:
            await a.suspend()
            assert (a.state, a.reason) == (S.PAUSED, R.USER)
            await a.resume()
            assert (a.state, a.reason) == (S.RUNNING, R.UNPAUSED)
            await p.resume()
            assert p.state == S.RUNNING
            await a.destroy()
            assert await take(events, 4) == [
                (K.SUSPENDED, D.PAUSED),
                (K.RESUMED, D.UNPAUSED),
                (K.SHUTDOWN, D.HOST),  # QEMU's own SHUTDOWN event on SIGTERM
                (K.STOPPED, D.DESTROYED),
            ]
        assert (a.state, a.reason, a.pid) == (S.SHUTOFF, R.DESTROYED, None)
        assert not pid_alive(pids["a"])
        assert not (state_root / "run" / "a.json").exists()
        assert not (state_root / "run" / "a.qmp").exists()

        # A QEMU crash while the controller runs, for a QEMU that is not our child.
        os.kill(pids["b"], signal.SIGKILL)
        with anyio.fail_after(30):
            await b.wait_for_state(S.SHUTOFF)
        assert b.reason == R.CRASHED
        assert not (state_root / "run" / "b.json").exists()
        assert (state_root / "domains" / "b.json").exists()

        await t.destroy()
        with pytest.raises(aiovirt.DomainNotFoundError):
            await conn.lookup("t")  # a transient domain is forgotten once stopped
        await p.destroy()

        await a.start()  # and it starts again, as our own child now
        assert (a.state, a.reason) == (S.RUNNING, R.BOOTED)
        await a.destroy()


async def test_reattach_after_controller_crash(anyio_backend: str, uri: str, state_root: Path) -> None:
    async with held_controller(anyio_backend, uri, "start", "a", "p:paused") as (holder, lines):
        pids = started_pids(lines)
        os.kill(holder, signal.SIGKILL)
    async with aiovirt.connect(uri) as conn:
        assert conn.problems == []
        a, p = await conn.lookup("a"), await conn.lookup("p")
        assert (a.state, a.pid) == (S.RUNNING, pids["a"])
        assert (p.state, p.pid) == (S.PAUSED, pids["p"])
        assert (await a.qmp("query-status"))["status"] == "running"
        record = runtime_record(state_root, "a")
        assert (record["pid"], record["phase"], record["uuid"]) == (pids["a"], "running", str(a.uuid))
    # Reattached twice in a row: nothing is lost by a reattach either.
    async with aiovirt.connect(uri) as conn:
        a, p = await conn.lookup("a"), await conn.lookup("p")
        assert (a.state, a.pid, p.state, p.pid) == (S.RUNNING, pids["a"], S.PAUSED, pids["p"])
        await a.destroy(graceful=True)
        await p.destroy()


@pytest.mark.parametrize("point", ["after-spawn", "before-cont"])
async def test_controller_crash_during_start(
    anyio_backend: str, uri: str, state_root: Path, point: str
) -> None:
    """SIGKILLed right after spawning QEMU, or before its CPUs started: either way its pid is not
    recorded yet (it is recorded with the "running" phase, one replacing write per start).

    The next controller finds the QEMU by the UUID on its command line, finishes the start and
    reports it as booted.
    """
    lines = await run_controller(anyio_backend, uri, "die-at", point, "half", returncode=-signal.SIGKILL)
    record = runtime_record(state_root, "half")
    assert record["phase"] == "starting"
    running = qemu_pids(str(state_root))
    assert len(running) == 1
    (pid,) = running
    assert record["pid"] is None
    if point == "after-spawn":
        assert lines == [f"spawned {pid}"]
    async with aiovirt.connect(uri) as conn:
        assert conn.problems == []
        dom = await conn.lookup("half")
        assert (dom.state, dom.reason, dom.pid) == (S.RUNNING, R.BOOTED, pid)
        assert (await dom.qmp("query-status"))["status"] == "running"
        record = runtime_record(state_root, "half")
        assert (record["phase"], record["pid"]) == ("running", pid)
        await dom.destroy()


async def test_controller_crash_between_fork_and_exec(anyio_backend: str, uri: str, state_root: Path) -> None:
    """Killed after the fork but before the exec: the child execs QEMU a moment after its parent's
    death, so the next controller may find a pid-less record and no QEMU yet. It must wait for it
    (a short grace after the record was written), not call it gone: that would leave the QEMU
    running unmanaged."""
    lines = await run_controller(
        anyio_backend, uri, "die-at", "before-exec", "late", returncode=-signal.SIGKILL
    )
    [forked] = lines
    child = int(forked.split()[1])
    assert runtime_record(state_root, "late")["phase"] == "starting"
    assert qemu_pids(str(state_root)) == set()  # not exec'd yet
    async with aiovirt.connect(uri) as conn:
        dom = await conn.lookup("late")
        assert (dom.state, dom.reason, dom.pid) == (S.RUNNING, R.BOOTED, child), dom
        await dom.destroy()
    assert qemu_pids(str(state_root)) == set()


# -- QEMU dies while no controller runs; its pid is reused ------------------------------------------


async def test_qemu_died_while_no_controller_ran(uri: str, state_root: Path, caplog: Any) -> None:
    pids = await start_here(uri, "dead", "alive", transient=("tdead",))
    kill_and_reap(pids["dead"])
    kill_and_reap(pids["tdead"])
    caplog.set_level(logging.INFO, logger="aiovirt")
    async with aiovirt.connect(uri) as conn:
        dead, alive = await conn.lookup("dead"), await conn.lookup("alive")
        assert (dead.state, dead.reason, dead.pid) == (S.SHUTOFF, R.DAEMON, None)
        assert (alive.state, alive.pid) == (S.RUNNING, pids["alive"])
        with pytest.raises(aiovirt.DomainNotFoundError):
            await conn.lookup("tdead")
        assert not (state_root / "run" / "dead.json").exists()
        assert not (state_root / "run" / "tdead.json").exists()
        assert (state_root / "domains" / "dead.json").exists()
        assert conn.problems == []  # nothing is wrong with the state directory
        assert any("dead" in r.getMessage() and str(pids["dead"]) in r.getMessage() for r in caplog.records)
        await dead.start()
        assert dead.state == S.RUNNING
        await dead.destroy()
        await alive.destroy()


_SIGNAL_TRAP = textwrap.dedent(
    """
    import os, signal, sys, time
    log = open(os.environ["TRAP_LOG"], "a")
    def trap(signum, frame):
        log.write(f"{signum}\\n"); log.flush()
    for s in signal.valid_signals():
        try:
            signal.signal(s, trap)
        except (OSError, ValueError, RuntimeError):
            pass  # SIGKILL, SIGSTOP
    print("ready", flush=True)
    time.sleep(120)
    """
)


def occupy_pid(pid: int, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes] | None:
    """Start ``argv`` with exactly ``pid`` (as root, through ``ns_last_pid``), or None if we cannot.

    Other processes may take the pid first: retried a few times. ``pid`` 0: any pid will do.
    """
    if pid == 0:
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE)
    for _ in range(50):
        try:
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(pid - 1))
        except OSError:
            return None
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE)
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    return None


async def test_pid_reuse_is_never_signalled(uri: str, state_root: Path, tmp_path: Path) -> None:
    """A domain's QEMU died while no controller ran, and an unrelated process now has its pid.

    The pid is really reused: as root we write ``pid - 1`` to ``/proc/sys/kernel/ns_last_pid`` and
    fork (retried: other processes may take the pid first). The impostor even has ``-uuid UUID``
    on its command line, so only the start time tells it apart. Reconnecting reports the domain
    SHUTOFF and sends the impostor no signal (it traps every catchable one and logs it; SIGKILL
    would end it and SIGSTOP stop it: both are checked).

    Only where ``ns_last_pid`` cannot be written (not root) is the reuse simulated: the record's
    pid is rewritten to the impostor's, a live process with a later start time.
    """
    pids = await start_here(uri, "reused")
    pid = pids["reused"]
    record = runtime_record(state_root, "reused")
    kill_and_reap(pid)

    trap_log = tmp_path / "signals.log"
    trap_log.touch()
    env = {**os.environ, "TRAP_LOG": str(trap_log)}
    argv = [sys.executable, "-c", _SIGNAL_TRAP, "-uuid", record["uuid"]]
    impostor = occupy_pid(pid, argv, env) or occupy_pid(0, argv, env)
    assert impostor is not None
    if impostor.pid != pid:
        print(f"pid {pid} could not be reused for real: simulated by rewriting the record")
        pid = impostor.pid
        (state_root / "run" / "reused.json").write_text(json.dumps({**record, "pid": pid}))
    try:
        assert impostor.stdout is not None
        assert impostor.stdout.readline() == b"ready\n"
        identity = read_identity(pid)
        assert identity is not None and identity.start_time != record["start_time"]
        async with aiovirt.connect(uri) as conn:
            dom = await conn.lookup("reused")
            assert (dom.state, dom.reason, dom.pid) == (S.SHUTOFF, R.DAEMON, None)
            assert not (state_root / "run" / "reused.json").exists()
        assert pid_alive(pid) and proc_letter(pid) in "RS"
        assert read_identity(pid) == identity
        assert trap_log.read_text() == ""
    finally:
        impostor.kill()
        impostor.wait()


async def test_attach_checks_start_time_and_uuid(tmp_path: Path) -> None:
    """``Process.attach`` refuses a live process whose start time or command line does not match."""
    argv = [sys.executable, "-c", "import time; time.sleep(60)", "-uuid", "u-1"]
    async with await anyio.open_process(argv) as proc:
        try:
            identity = read_identity(proc.pid)
            assert identity is not None
            attached = Process.attach(identity, uuid="u-1")
            assert attached is not None and attached.pid == proc.pid
            attached.close()
            assert Process.attach(identity, uuid="u-2") is None
            other_time = type(identity)(identity.pid, identity.start_time - 1)
            assert Process.attach(other_time, uuid="u-1") is None
            assert pid_alive(proc.pid)
        finally:
            proc.kill()


# -- host reboot ----------------------------------------------------------------------------------


@pytest.mark.parametrize("run_dir", ["kept", "wiped"])
async def test_host_reboot(uri: str, state_root: Path, tmp_path: Path, run_dir: str) -> None:
    """Simulated: every QEMU is killed while no controller runs, and where we can, an unrelated
    process takes one of their pids (so its start time does not match the record). ``wiped`` also
    empties the runtime directory, as a reboot does to ``/run`` and ``$XDG_RUNTIME_DIR`` (tmpfs).

    Definitions and autostart survive; every domain is SHUTOFF; autostart domains start again.
    """
    async with aiovirt.connect(uri) as conn:
        auto = await conn.define(none_config("auto"))
        await auto.set_autostart(True)
    pids = await start_here(uri, "plain", transient=("tmp",))
    async with aiovirt.connect(uri) as conn:
        pids["auto"] = (await conn.lookup("auto")).pid or 0  # started by autostart
        assert (await conn.lookup("auto")).state == S.RUNNING
    for pid in pids.values():
        kill_and_reap(pid)
    if run_dir == "wiped":
        for entry in (state_root / "run").iterdir():
            entry.unlink()
    impostor = occupy_pid(pids["plain"], ["sleep", "60"], dict(os.environ))
    try:
        async with aiovirt.connect(uri) as conn:
            assert conn.problems == []
            assert [d.name for d in await conn.list_domains()] == ["auto", "plain"]
            plain, auto = await conn.lookup("plain"), await conn.lookup("auto")
            assert plain.state == S.SHUTOFF and plain.reason in (
                (R.DAEMON,) if run_dir == "kept" else (R.UNKNOWN,)
            )
            assert (auto.state, auto.reason) == (S.RUNNING, R.BOOTED)  # started anew, not taken back
            assert {p.name for p in (state_root / "run").glob("*.json")} == {"auto.json"}
            await auto.destroy()
        if impostor is not None:
            assert pid_alive(impostor.pid) and proc_letter(impostor.pid) in "RS"
    finally:
        if impostor is not None:
            impostor.kill()
            impostor.wait()


# -- autostart and remove_logs ----------------------------------------------------------------------


async def test_autostart_across_reconnect(uri: str, state_root: Path) -> None:
    async with aiovirt.connect(uri) as conn:
        a = await conn.define(none_config("a"))
        await conn.define(none_config("b"))
        assert not a.autostart
        await a.set_autostart(True)
        assert a.autostart and a.state == S.SHUTOFF  # it takes effect at the next connect
        assert json.loads((state_root / "domains" / "a.json").read_text())["autostart"] is True
        await conn.define(none_config("a", memory_mib=20))  # redefining keeps the flag
        assert a.autostart
        async with conn.run(none_config("t")) as t:
            with pytest.raises(aiovirt.InvalidStateError):
                await t.set_autostart(True)  # transient

    async with aiovirt.connect(uri) as conn:
        a, b = await conn.lookup("a"), await conn.lookup("b")
        assert a.autostart and a.config.memory_mib == 20
        assert (a.state, a.reason) == (S.RUNNING, R.BOOTED)
        assert b.state == S.SHUTOFF and not b.autostart
        pid = a.pid
        # Nobody could subscribe before connect() returned: its own events are kept.
        assert [(e.name, e.kind) for e in conn.startup_events] == [("a", aiovirt.EventKind.STARTED)]

    async with aiovirt.connect(uri) as conn:
        a = await conn.lookup("a")
        assert a.pid == pid  # already running: taken back, not started twice
        assert conn.startup_events == []
        await a.set_autostart(False)
        await a.destroy()
    async with aiovirt.connect(uri) as conn:
        assert (await conn.lookup("a")).state == S.SHUTOFF and not (await conn.lookup("a")).autostart


async def test_autostart_failure_is_a_problem(uri: str, state_root: Path) -> None:
    async with aiovirt.connect(uri) as conn:
        bad = await conn.define(none_config("bad", extra_args=["-bogus"]))
        await bad.set_autostart(True)
        good = await conn.define(none_config("good"))
        await good.set_autostart(True)
    async with aiovirt.connect(uri) as conn:
        assert [(p.kind, p.path) for p in conn.problems] == [
            ("autostart", state_root / "domains" / "bad.json")
        ]
        assert "-bogus" in conn.problems[0].message
        assert ((await conn.lookup("bad")).state, (await conn.lookup("bad")).reason) == (S.SHUTOFF, R.FAILED)
        assert (await conn.lookup("good")).state == S.RUNNING
        await (await conn.lookup("good")).destroy()


async def test_destroy_remove_logs(anyio_backend: str, uri: str, state_root: Path) -> None:
    logs = state_root / "log"
    await run_controller(anyio_backend, uri, "start", "reattached")
    async with aiovirt.connect(uri) as conn:
        keep = await conn.define(none_config("keep"))
        await keep.start()
        await keep.destroy()
        assert (logs / "keep.log").exists() and (logs / "keep.console").exists()

        gone = await conn.define(none_config("gone"))
        await gone.start()
        await gone.destroy(remove_logs=True)
        assert not (logs / "gone.log").exists() and not (logs / "gone.console").exists()

        reattached = await conn.lookup("reattached")
        assert (logs / "reattached.log").exists() and (logs / "reattached.console").exists()
        await reattached.destroy(remove_logs=True)
        assert not (logs / "reattached.log").exists() and not (logs / "reattached.console").exists()
        assert sorted(p.name for p in logs.iterdir()) == ["keep.console", "keep.log"]

        await gone.start()  # the log is created again
        assert (logs / "gone.log").exists()
        await gone.destroy()
