"""Read-only connections (libvirt's virConnectOpenReadOnly): beside a running controller, no lock,
no signal, no monitor, no write; every change refused with ReadOnlyError."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest

import aiovirt
from aiovirt import DomainState as S

from .conftest import none_config, pid_alive
from .test_reattach import held_controller

pytestmark = pytest.mark.anyio


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and modification time: what a write would change."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


async def test_read_only_beside_a_controller(anyio_backend: str, uri: str, state_root: Path) -> None:
    async with held_controller(anyio_backend, uri, "start", "a", "p:paused") as (holder, lines):
        pids = {line.split()[1]: int(line.split()[2]) for line in lines if line.startswith("started")}
        with pytest.raises(aiovirt.StateDirLockedError) as locked:
            async with aiovirt.connect(uri):
                pass
        assert locked.value.pid == holder
        before = _tree(state_root)
        async with aiovirt.connect(uri, readonly=True) as ro, aiovirt.connect(uri, readonly=True) as ro2:
            doms = await ro.list_domains()
            assert [(d.name, d.state, d.pid) for d in doms] == [
                ("a", S.RUNNING, pids["a"]),
                ("p", S.RUNNING, pids["p"]),  # paused, but only its monitor could tell: a snapshot
            ]
            assert len(await ro2.list_domains(active=True)) == 2
            a = await ro.lookup("a")
            assert (await a.info()).pid == pids["a"]
            refused: dict[str, Callable[[], Awaitable[object]]] = {
                "destroy": lambda: a.destroy(),
                "shutdown": a.shutdown,
                "suspend": a.suspend,
                "qmp": lambda: a.qmp("query-status"),
                "start": a.start,
                "undefine": a.undefine,
                "autostart": lambda: a.set_autostart(True),
                "define": lambda: ro.define(none_config("new")),
                "create": lambda: ro.create(none_config("new")),
                "stop_all": lambda: ro.stop_all(),
            }
            for what, call in refused.items():
                with pytest.raises(aiovirt.ReadOnlyError, match="read-only"):
                    await call()
                assert what in refused
            with pytest.raises(aiovirt.ReadOnlyError):
                a.monitor_events()
        assert _tree(state_root) == before  # nothing written, renamed or removed
        assert pid_alive(holder) and all(pid_alive(p) for p in pids.values())
    async with aiovirt.connect(uri) as conn:
        for dom in await conn.list_domains(active=True):
            await dom.destroy()


async def test_read_only_of_a_missing_directory_creates_nothing(tmp_path: Path) -> None:
    root = tmp_path / "nothing-here"
    async with aiovirt.connect(f"qemu:///embed?root={root}", readonly=True) as ro:
        assert await ro.list_domains() == []
    assert not root.exists()


async def test_read_only_reports_a_corrupt_record_and_keeps_it(uri: str, state_root: Path) -> None:
    async with aiovirt.connect(uri) as conn:
        await conn.define(none_config("fine"))
    bad = state_root / "domains" / "bad.json"
    bad.write_text("{")
    async with aiovirt.connect(uri, readonly=True) as ro:
        assert [d.name for d in await ro.list_domains()] == ["fine"]
        assert [(p.kind, p.path) for p in ro.problems] == [("definition", bad)]
    assert bad.read_text() == "{"  # not renamed: a read-only connection writes nothing


async def test_read_only_sees_a_qemu_that_is_gone_as_shutoff(uri: str) -> None:
    async with aiovirt.connect(uri) as conn:
        dom = await conn.define(none_config("gone"))
        await dom.start()
        pid = dom.pid
    assert pid is not None
    os.kill(pid, 9)
    with anyio.fail_after(10):
        while pid_alive(pid):
            await anyio.sleep(0.05)
    async with aiovirt.connect(uri, readonly=True) as ro:
        assert (await ro.lookup("gone")).state == S.SHUTOFF
    async with aiovirt.connect(uri) as conn:  # the controller then cleans up
        assert (await conn.lookup("gone")).state == S.SHUTOFF


async def test_read_only_test_driver() -> None:
    async with aiovirt.connect("test:///default", readonly=True) as ro:
        dom = await ro.lookup("test")
        with pytest.raises(aiovirt.ReadOnlyError):
            await dom.destroy()
