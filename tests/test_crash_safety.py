"""The state directory under crashes, corruption and planted files; the lock; permissions.

Every async test runs on asyncio and trio against real QEMU (``machine="none"``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import random
import re
import signal
import stat
import uuid as uuid_mod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

import aiovirt
from aiovirt import DomainState as S
from aiovirt import StateReason as R
from aiovirt.drivers.qemu._process import read_cmdline, read_identity

from .conftest import none_config, pid_alive, qemu_pids
from .test_reattach import (
    controller_argv,
    held_controller,
    kill_and_reap,
    read_line,
    runtime_record,
    start_here,
)

pytestmark = pytest.mark.anyio


# -- corrupt and planted records ------------------------------------------------------------------


def _json(record: dict[str, Any]) -> bytes:
    return json.dumps(record).encode()


def _with(record: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**record, **changes}


def _config_with(record: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**record, "config": {**record["config"], **changes}}


#: How a good record (file ``NAME.json``, parsed) is spoiled: new bytes for the file.
CORRUPTIONS: dict[str, Callable[[dict[str, Any]], bytes]] = {
    "truncated": lambda r: _json(r)[: len(_json(r)) // 2],
    "empty": lambda r: b"",
    "not-json": lambda r: b"\x00\xff not json at all",
    "not-an-object": lambda r: b"[1, 2, 3]",
    "deeply-nested": lambda r: b"[" * 200_000,
    "wrong-schema": lambda r: _json(_config_with(r, memory_mib="lots")),
    "no-config": lambda r: _json({"format": 1, "autostart": False}),
    "no-uuid": lambda r: _json(_config_with(r, uuid=None)),
    "other-name": lambda r: _json(_config_with(r, name="someone-else")),
    "format-2": lambda r: _json(_with(r, format=2)),
    "format-true": lambda r: _json(_with(r, format=True)),
    "no-format": lambda r: _json({k: v for k, v in r.items() if k != "format"}),
}
#: Files that are not records at all (planted): set up in place of ``path``; ``outside`` is a
#: directory outside the state directory that must stay untouched.
PLANTED = ["symlink", "dangling-symlink", "fifo", "directory"]


def plant(kind: str, path: Path, good: bytes, outside: Path) -> None:
    path.unlink()
    if kind == "symlink":
        (outside / "target.json").write_bytes(good)  # a valid record: following it would "work"
        path.symlink_to(outside / "target.json")
    elif kind == "dangling-symlink":
        path.symlink_to(outside / "created-by-following.json")
    elif kind == "fifo":
        os.mkfifo(path, 0o600)
    elif kind == "directory":
        path.mkdir(mode=0o700)


def snapshot(directory: Path) -> dict[str, tuple[bytes, int, float]]:
    return {p.name: (p.read_bytes(), p.stat().st_mode, p.stat().st_mtime) for p in directory.iterdir()}


def spoil(kind: str, path: Path, outside: Path) -> None:
    good = path.read_bytes()
    if kind in CORRUPTIONS:
        path.write_bytes(CORRUPTIONS[kind](json.loads(good)))
    else:
        plant(kind, path, good, outside)


def assert_set_aside(kind: str, path: Path, before: bytes | None, outside: Path) -> Path:
    """The spoiled file was renamed to NAME.json.corrupt, unchanged (a link stays a link)."""
    aside = path.with_name(path.name + ".corrupt")
    if kind in CORRUPTIONS:
        assert aside.read_bytes() == before
    elif kind == "symlink":
        assert aside.is_symlink() and aside.readlink() == outside / "target.json"
    elif kind == "dangling-symlink":
        assert aside.is_symlink() and not (outside / "created-by-following.json").exists()
    elif kind == "fifo":
        assert stat.S_ISFIFO(aside.lstat().st_mode)
    elif kind == "directory":
        assert aside.is_dir()
    return aside


ALL_KINDS = [*CORRUPTIONS, *PLANTED]


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    return d


@pytest.mark.parametrize("kind", ALL_KINDS)
async def test_bad_definition(uri: str, state_root: Path, outside: Path, kind: str, caplog: Any) -> None:
    async with aiovirt.connect(uri) as conn:
        await conn.define(none_config("bad"))
        await conn.define(none_config("ok"))
    path = state_root / "domains" / "bad.json"
    spoil(kind, path, outside)
    before = path.read_bytes() if kind in CORRUPTIONS else None
    outside_before = snapshot(outside)

    caplog.set_level(logging.WARNING, logger="aiovirt")
    async with aiovirt.connect(uri) as conn:
        aside = assert_set_aside(kind, path, before, outside)
        assert not path.exists() and not path.is_symlink()
        assert [(p.kind, p.path) for p in conn.problems] == [("definition", aside)]
        assert str(aside) in caplog.text
        assert [d.name for d in await conn.list_domains()] == ["ok"]
        ok = await conn.lookup("ok")
        await ok.start()
        assert (await ok.qmp("query-status"))["status"] == "running"
        await ok.destroy()
        # The name is free again; the bad file stays where it was put aside.
        await conn.define(none_config("bad"))
    assert snapshot(outside) == outside_before

    async with aiovirt.connect(uri) as conn:  # still reported, once, until someone removes it
        assert [(p.kind, p.path) for p in conn.problems] == [("definition", aside)]
        assert [d.name for d in await conn.list_domains()] == ["bad", "ok"]
    assert aside.exists() or aside.is_symlink()


@pytest.mark.parametrize("kind", ALL_KINDS)
async def test_bad_runtime_record_of_a_running_domain(
    uri: str, state_root: Path, outside: Path, kind: str
) -> None:
    """The QEMU of a defined domain is found by the UUID on its command line and taken back; its
    runtime record is written anew, so that the next controller finds it too."""
    pids = await start_here(uri, "bad", "ok")
    path = state_root / "run" / "bad.json"
    spoil(kind, path, outside)
    before = path.read_bytes() if kind in CORRUPTIONS else None
    outside_before = snapshot(outside)
    async with aiovirt.connect(uri) as conn:
        aside = assert_set_aside(kind, path, before, outside)
        assert [(p.kind, p.path) for p in conn.problems] == [("runtime", aside)]
        bad, ok = await conn.lookup("bad"), await conn.lookup("ok")
        assert (bad.state, bad.pid, ok.state, ok.pid) == (S.RUNNING, pids["bad"], S.RUNNING, pids["ok"])
        assert (await bad.qmp("query-status"))["status"] == "running"
        assert runtime_record(state_root, "bad")["pid"] == pids["bad"]
    assert snapshot(outside) == outside_before
    async with aiovirt.connect(uri) as conn:
        assert [(p.kind, p.path) for p in conn.problems] == [("runtime", aside)]  # still reported
        bad = await conn.lookup("bad")
        assert (bad.state, bad.pid) == (S.RUNNING, pids["bad"])
        await bad.destroy()
        await (await conn.lookup("ok")).destroy()


async def test_bad_runtime_record_of_a_paused_domain(uri: str, state_root: Path) -> None:
    """Taken back by UUID, a paused QEMU is PAUSED: not reported as started nor as running."""
    pids = await start_here(uri, "p")
    async with aiovirt.connect(uri) as conn:
        await (await conn.lookup("p")).suspend()
    (state_root / "run" / "p.json").write_bytes(b"{")
    async with aiovirt.connect(uri) as conn, conn.subscribe() as events:
        p = await conn.lookup("p")
        assert (p.state, p.reason, p.pid) == (S.PAUSED, R.USER, pids["p"])
        assert (await p.qmp("query-status"))["status"] == "paused"
        await p.resume()
        assert p.state == S.RUNNING
        await p.destroy()
        kinds = [e.kind async for e in _drain(events)]
        assert aiovirt.EventKind.STARTED not in kinds


async def _drain(sub: aiovirt.Subscription[aiovirt.DomainEvent]):  # type: ignore[no-untyped-def]
    while (event := sub.receive_nowait()) is not None:
        yield event


async def test_bad_runtime_record_of_a_transient_domain(uri: str, state_root: Path) -> None:
    """A transient domain's config lived only in its runtime record: without it the QEMU cannot be
    managed. It is reported (with its pid) and never signalled; everything else works."""
    pids = await start_here(uri, "ok", transient=("t",))
    (state_root / "run" / "t.json").write_bytes(b"garbage")
    try:
        async with aiovirt.connect(uri) as conn:
            assert [p.path for p in conn.problems] == [state_root / "run" / "t.json.corrupt"]
            assert str(pids["t"]) in conn.problems[0].message
            with pytest.raises(aiovirt.DomainNotFoundError):
                await conn.lookup("t")
            assert pid_alive(pids["t"])
            await (await conn.lookup("ok")).destroy()
    finally:
        kill_and_reap(pids["t"])


async def test_runtime_record_of_another_uuid(uri: str, state_root: Path) -> None:
    """A runtime record whose UUID is not its definition's (edited by hand): set aside, and its
    QEMU, which is another machine, is left alone; the domain can start without clobbering it."""
    pids = await start_here(uri, "x")
    definition = state_root / "domains" / "x.json"
    record = json.loads(definition.read_text())
    record["config"]["uuid"] = str(uuid_mod.uuid4())
    definition.write_text(json.dumps(record))
    try:
        async with aiovirt.connect(uri) as conn:
            assert [(p.kind, p.path) for p in conn.problems] == [
                ("runtime", state_root / "run" / "x.json.corrupt")
            ]
            x = await conn.lookup("x")
            assert x.state == S.SHUTOFF and str(x.uuid) == record["config"]["uuid"]
            assert pid_alive(pids["x"])
            await x.start()
            assert x.pid != pids["x"] and pid_alive(pids["x"])
            await x.destroy()
    finally:
        kill_and_reap(pids["x"])


async def test_duplicate_uuid_in_definitions(uri: str, state_root: Path) -> None:
    async with aiovirt.connect(uri) as conn:
        a = await conn.define(none_config("a"))
    record = json.loads((state_root / "domains" / "a.json").read_text())
    record["config"]["name"] = "b"
    (state_root / "domains" / "b.json").write_text(json.dumps(record))
    async with aiovirt.connect(uri) as conn:
        assert [d.name for d in await conn.list_domains()] == ["a"]
        assert (await conn.lookup("a")).uuid == a.uuid
        assert [p.path for p in conn.problems] == [state_root / "domains" / "b.json.corrupt"]


async def test_set_aside_never_overwrites(uri: str, state_root: Path) -> None:
    """A second bad file of the same name is kept too (the first one is not overwritten)."""
    async with aiovirt.connect(uri) as conn:
        await conn.define(none_config("bad"))
    for content in (b"first", b"second"):
        (state_root / "domains" / "bad.json").write_bytes(content)
        async with aiovirt.connect(uri):
            pass
    kept = sorted(p.read_bytes() for p in (state_root / "domains").glob("bad.json.corrupt*"))
    assert kept == [b"first", b"second"]


async def test_planted_symlinks_elsewhere(uri: str, state_root: Path, outside: Path) -> None:
    """Symlinks planted for the lock, a log, the state subdirectories: never followed."""
    async with aiovirt.connect(uri) as conn:
        await conn.define(none_config("vm"))
    target = outside / "precious"
    target.write_bytes(b"precious\n")
    target.chmod(0o644)
    before = snapshot(outside)

    log = state_root / "log" / "vm.log"
    log.symlink_to(target)
    async with aiovirt.connect(uri) as conn:
        with pytest.raises(aiovirt.StateDirError, match=r"vm\.log"):
            await (await conn.lookup("vm")).start()
        assert (await conn.lookup("vm")).state == S.SHUTOFF
        assert qemu_pids(str(state_root)) == set()
    log.unlink()

    lock = state_root / "lock"
    lock.unlink()
    lock.symlink_to(target)
    with pytest.raises(aiovirt.StateDirError, match="lock"):
        async with aiovirt.connect(uri):
            pass
    lock.unlink()

    domains = state_root / "domains"
    domains.rename(state_root / "domains.real")
    domains.symlink_to(outside)
    with pytest.raises(aiovirt.StateDirError, match="domains"):
        async with aiovirt.connect(uri):
            pass
    assert snapshot(outside) == before


# -- permissions and the lock -----------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


async def test_permissions_after_reattach_and_with_umask_0(
    anyio_backend: str, uri: str, state_root: Path
) -> None:
    for d in (state_root, state_root / "domains"):
        d.mkdir(mode=0o777)
        d.chmod(0o777)  # made by someone with a loose umask: tightened at connect
    old = os.umask(0)
    try:
        await held_controller_start(anyio_backend, uri)
        async with aiovirt.connect(uri) as conn:
            dom = await conn.lookup("perm")
            assert dom.state == S.RUNNING
            async with conn.run(none_config("mine")):
                for d in (state_root, state_root / "domains", state_root / "run", state_root / "log"):
                    assert _mode(d) == 0o700, d
                files = [
                    state_root / "lock",
                    state_root / "domains" / "perm.json",
                    state_root / "run" / "perm.json",  # rewritten by the reattach
                    state_root / "run" / "perm.qmp",
                    state_root / "run" / "mine.json",
                    state_root / "run" / "mine.qmp",
                    state_root / "log" / "perm.log",
                    state_root / "log" / "mine.log",
                    state_root / "log" / "mine.console",
                ]
                for f in files:
                    assert _mode(f) == 0o600, f
                assert stat.S_ISSOCK((state_root / "run" / "mine.qmp").lstat().st_mode)
            await dom.destroy()
    finally:
        os.umask(old)


async def held_controller_start(backend: str, uri: str) -> None:
    async with held_controller(backend, uri, "start", "perm") as (holder, _):
        os.kill(holder, signal.SIGKILL)


async def test_directory_of_another_user_is_refused(uri: str, state_root: Path) -> None:
    (state_root / "run").mkdir(parents=True)
    os.chown(state_root / "run", 65534, 65534)
    with pytest.raises(aiovirt.StateDirError, match="uid 65534"):
        async with aiovirt.connect(uri):
            pass


async def test_one_controller_per_state_directory(anyio_backend: str, uri: str) -> None:
    async with held_controller(anyio_backend, uri, "start") as (holder, _):
        with pytest.raises(aiovirt.StateDirLockedError) as info:
            async with aiovirt.connect(uri):
                pass
        assert info.value.pid == holder and str(holder) in str(info.value)
        os.kill(holder, signal.SIGKILL)
    async with aiovirt.connect(uri) as conn:  # the crashed holder's lock went with it
        assert conn.problems == []


async def test_lock_ends_with_the_controller(anyio_backend: str, uri: str) -> None:
    """A child that shares the controller's open files (as a QEMU does between fork and exec)
    does not keep the state directory locked once the controller is gone."""
    async with await anyio.open_process(controller_argv(anyio_backend, uri, "hold-fork")) as proc:
        assert proc.stdout is not None
        line = await read_line(BufferedByteReceiveStream(proc.stdout))
        _, holder, child = line.split()
        try:
            with pytest.raises(aiovirt.StateDirLockedError) as info:
                async with aiovirt.connect(uri):
                    pass
            assert info.value.pid == int(holder)
            proc.kill()
            await proc.wait()
            assert pid_alive(int(child))
            async with aiovirt.connect(uri) as conn:
                assert conn.problems == []
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(child), signal.SIGKILL)


async def test_stale_temporary_files_are_removed(uri: str, state_root: Path) -> None:
    """What a crash in the middle of a write leaves: the old record and a temporary file."""
    async with aiovirt.connect(uri) as conn:
        dom = await conn.define(none_config("vm"))
    definition = (state_root / "domains" / "vm.json").read_bytes()
    (state_root / "domains" / ".vm.json.999.1.tmp").write_bytes(definition[:10])
    (state_root / "run" / ".vm.json.999.2.tmp").write_bytes(b"")
    async with aiovirt.connect(uri) as conn:
        assert conn.problems == [] and (await conn.lookup("vm")).config == dom.config
        assert sorted(p.name for p in (state_root / "domains").iterdir()) == ["vm.json"]
        assert list((state_root / "run").iterdir()) == []


async def test_definitions_are_fsynced(uri: str, state_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """define() returns once the file and the directory entry are on disk (fsync of both)."""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    async with aiovirt.connect(uri) as conn:
        monkeypatch.setattr(os, "fsync", fsync)
        await conn.define(none_config("vm"))
        monkeypatch.undo()
    domains = str(state_root / "domains")
    assert len(synced) == 2 and synced[0].startswith(f"{domains}/.vm.json.") and synced[1] == domains


# -- SIGKILL at random instants ----------------------------------------------------------------------

_PR_SET_CHILD_SUBREAPER = 36


def _reap_qemu_zombies() -> None:
    """Reap the QEMUs reparented to us (we are their subreaper) that have exited."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        comm = data[data.index(b"(") + 1 : data.rindex(b")")]
        fields = data[data.rindex(b")") + 2 :].split()
        if comm.startswith(b"qemu-system") and fields[0] == b"Z" and int(fields[1]) == os.getpid():
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(entry), os.WNOHANG)


@pytest.fixture
def subreaper() -> Iterator[None]:
    """Orphaned QEMUs (their controller was killed) become our children, so we can reap them
    (the init of this machine does not reap orphans)."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        yield
    finally:
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        _reap_qemu_zombies()


def _arg(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def check_while_no_controller_runs(state_root: Path, where: str) -> None:
    """Every definition parses, nothing was set aside, and every QEMU has a runtime record.

    A temporary file may be left by a write that was cut short (the next controller removes it).
    """
    if not (state_root / "domains").exists():
        return  # killed before it made the state directory
    for path in (state_root / "domains").iterdir():
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            continue
        assert path.suffix == ".json", f"{where}: stray {path}"
        record = json.loads(path.read_bytes())
        config = aiovirt.DomainConfig.parse(record["config"])
        assert record["format"] == 1 and f"{config.name}.json" == path.name, where
    for pid in qemu_pids(str(state_root)):
        argv = read_cmdline(pid)
        if not pid_alive(pid) or not argv:
            continue
        name = _arg(argv, "-name").removeprefix("guest=")
        path = state_root / "run" / f"{name}.json"
        assert path.exists(), f"{where}: QEMU {pid} ({name}) runs without a record"
        record = json.loads(path.read_bytes())
        assert record["uuid"] == _arg(argv, "-uuid"), where
        assert record["pid"] in (None, pid), f"{where}: {name}'s record claims {record['pid']}, runs as {pid}"
    assert not list(state_root.rglob("*.corrupt")), where


def describe_qemu(pid: int) -> str:
    """What a QEMU is doing, for a failure message: each thread's state, kernel wait and system
    call (from /proc; nothing is signalled)."""
    threads = []
    try:
        for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
            task = f"/proc/{pid}/task/{tid}"
            with open(f"{task}/stat") as st, open(f"{task}/wchan") as wc, open(f"{task}/syscall") as sc:
                state = st.read().rsplit(")", 1)[1].split()[0]
                threads.append(f"{tid} {state} {wc.read().strip() or '-'} syscall {sc.read().split()[0]}")
    except OSError as exc:
        threads.append(f"({exc})")
    return f"QEMU {pid}: " + "; ".join(threads)


def unreachable_report(conn: aiovirt.Connection) -> str:
    lines = []
    for problem in conn.problems:
        lines.append(str(problem))
        found = re.search(r"QEMU (\d+)", problem.message)
        if problem.kind == "unreachable" and found:
            lines.append(describe_qemu(int(found.group(1))))
            with contextlib.suppress(OSError):
                lines.append("log: " + problem.path.read_text(errors="replace")[-2000:])
    return "\n".join(lines)


async def check_connected(conn: aiovirt.Connection, state_root: Path, where: str) -> None:
    """After a reconnect: every domain RUNNING/PAUSED and attached, or SHUTOFF; records match."""
    assert conn.problems == [], f"{where}: {unreachable_report(conn)}"
    active = {}
    for dom in await conn.list_domains():
        if dom.active:
            assert dom.state in (S.RUNNING, S.PAUSED) and dom.pid is not None, f"{where}: {dom!r}"
            status = (await dom.qmp("query-status"))["status"]
            assert status == ("running" if dom.state == S.RUNNING else "paused"), f"{where}: {dom!r} {status}"
            active[dom.name] = dom.pid
        else:
            assert (dom.state, dom.pid) == (S.SHUTOFF, None), f"{where}: {dom!r}"
            assert dom.persistent, f"{where}: stopped transient {dom!r} not forgotten"
    records = {p.stem: json.loads(p.read_bytes()) for p in (state_root / "run").glob("*.json")}
    assert set(records) == set(active), f"{where}: records {sorted(records)} vs active {sorted(active)}"
    for name, record in records.items():
        identity = read_identity(record["pid"])
        assert identity is not None, f"{where}: {name}'s record claims {record['pid']}, which is gone"
        assert (identity.pid, identity.start_time) == (active[name], record["start_time"]), where
    live = {p for p in qemu_pids(str(state_root)) if pid_alive(p)}
    assert live == set(active.values()), f"{where}: QEMUs {sorted(live)} vs domains {active}"
    definitions = {p.stem for p in (state_root / "domains").glob("*.json")}
    assert definitions == {d.name for d in await conn.list_domains() if d.persistent}, where
    assert not list(state_root.rglob(".*.tmp")), f"{where}: temporary files left"


def controller_log(logs: Path, round_: int, failure: str) -> str:
    """What the churn controllers of this round and the one before did to the domains a failure
    names (all of their lines if it names none), for its message."""
    names = set(re.findall(r"\bc\d\d\b", failure))
    lines = []
    for r in (round_ - 1, round_):
        with contextlib.suppress(OSError):
            lines.append(f"-- controller of round {r}:")
            lines += [
                line
                for line in (logs / f"err{r}").read_text(errors="replace").splitlines()
                if not names or names & set(re.findall(r"\bc\d\d\b", line)) or "Traceback" in line
            ][-400:]
    return "\n".join(lines)


ROUNDS = 24
DOMAINS = 30


@pytest.mark.slow
async def test_sigkill_controller_at_random_instants(
    anyio_backend: str, uri: str, state_root: Path, tmp_path: Path, subreaper: None
) -> None:
    """A controller defines, starts, suspends, destroys and undefines 30 domains (four tasks at
    once) and is SIGKILLed at a random instant, ROUNDS times: during its start-up, its connect and
    reattach, and its work. After each kill nothing is torn and every QEMU has a record; after each
    reconnect every domain is attached or SHUTOFF and no record claims a process that is gone.

    The seed is printed; ``AIOVIRT_CRASH_SEED=N`` replays the same kill delays.
    """
    seed = int(os.environ.get("AIOVIRT_CRASH_SEED") or random.randrange(1 << 32))
    print(f"AIOVIRT_CRASH_SEED={seed}")
    rng = random.Random(seed)
    after_connect = 0
    most_running = 0
    try:
        for round_ in range(ROUNDS):
            where = f"seed {seed} round {round_}"
            delay = rng.uniform(0.3, 2.0)
            out, err = tmp_path / f"out{round_}", tmp_path / f"err{round_}"
            argv = controller_argv(anyio_backend, uri, "churn", str(rng.randrange(1 << 32)), str(DOMAINS))
            with out.open("wb") as stdout, err.open("wb") as stderr:
                async with await anyio.open_process(argv, stdout=stdout, stderr=stderr) as proc:
                    await anyio.sleep(delay)
                    assert proc.returncode is None, f"{where}: the controller died: {err.read_text()[-8000:]}"
                    proc.kill()
                    await proc.wait()
            after_connect += out.read_text().startswith("ready")
            try:
                check_while_no_controller_runs(state_root, where)
                async with aiovirt.connect(uri) as conn:
                    await check_connected(conn, state_root, where)
                    most_running = max(most_running, len(await conn.list_domains(active=True)))
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{controller_log(tmp_path, round_, str(exc))}") from None
            _reap_qemu_zombies()
        print(f"{ROUNDS} kills, {after_connect} after connect, up to {most_running} domains running")
    finally:
        with anyio.CancelScope(shield=True):
            async with aiovirt.connect(uri) as conn:
                for dom in await conn.list_domains(active=True):
                    await dom.destroy(timeout=5)
        stray = {p for p in qemu_pids(str(state_root)) if pid_alive(p)}
        for pid in stray:
            os.kill(pid, signal.SIGKILL)
        assert not stray, f"seed {seed}: QEMUs left without a domain: {sorted(stray)}"
