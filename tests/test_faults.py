"""Faults of the host under the controller: a full disk while a record is written.

The state directory's RUN is a small tmpfs of its own, mounted by the test (as root) and filled.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

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
