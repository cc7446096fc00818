"""Shared fixtures. Every async test runs on asyncio and on trio (anyio's pytest plugin)."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import aiovirt
from aiovirt.testing import TinyGuest, ensure_tiny_guest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def qemu_pids(marker: str = "") -> set[int]:
    """QEMU processes on this machine (only those with ``marker`` in their command line, if given)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read()
        except OSError:
            continue
        if argv.split(b"\0", 1)[0].endswith(b"qemu-system-x86_64") and marker.encode() in argv:
            pids.add(int(entry))
    return pids


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rindex(b")") + 2 :].split()[0] not in (b"Z", b"X")


@pytest.fixture(autouse=True)
def no_leaked_qemu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every test must leave no QEMU behind: a leak fails the test (and is killed).

    Our QEMUs are those whose command line names this session's temporary directory (their
    console file lives there), so QEMUs of other programs on the machine are not counted.
    """
    marker = str(tmp_path_factory.getbasetemp())
    before = qemu_pids(marker)
    yield
    leaked = {p for p in qemu_pids(marker) - before if pid_alive(p)}
    for pid in leaked:
        os.kill(pid, signal.SIGKILL)
    assert not leaked, f"test leaked QEMU processes {sorted(leaked)}"


@pytest.fixture
def state_root(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def uri(state_root: Path) -> str:
    return f"qemu:///embed?root={state_root}"


@pytest.fixture
async def conn(uri: str) -> AsyncIterator[aiovirt.Connection]:
    """A connection whose domains are all destroyed at teardown."""
    async with aiovirt.connect(uri) as c:
        try:
            yield c
        finally:
            for dom in await c.list_domains(active=True):
                if dom.pid is not None:
                    os.kill(dom.pid, signal.SIGCONT)  # in case a test left it stopped
                await dom.destroy(timeout=5)


@pytest.fixture(scope="session")
def tiny_guest() -> TinyGuest:
    """A Linux guest that honours the ACPI power button (built once, cached between runs)."""
    return ensure_tiny_guest()


def none_config(name: str = "vm", **kw: Any) -> aiovirt.DomainConfig:
    """A domain with no guest at all (``-machine none``): cheap, and it ignores ACPI."""
    fields: dict[str, Any] = {"name": name, "machine": "none", "accel": "tcg", "memory_mib": 16, **kw}
    return aiovirt.DomainConfig(**fields)
