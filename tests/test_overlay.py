"""Transient disks: a qcow2 overlay per run over a shared base image that is never written.

Real QEMU and qemu-img, every test on asyncio and trio. The writes come from QEMU itself: HMP's
``qemu-io`` on the guest's disk device (``pc`` with no OS: no guest needed to write), and what an
overlay holds is read back from the host with ``qemu-io -U -r``, through the overlay's backing chain.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import anyio
import pytest

import aiovirt
from aiovirt.config import render_argv

from .conftest import qemu_pids

pytestmark = pytest.mark.anyio

DEVICE = "/machine/peripheral/disk0/virtio-backend"  # disk 0's BlockBackend, for HMP's qemu-io -d


def make_base(path: Path, fmt: str = "qcow2") -> Path:
    """A 16 MiB image whose first MiB is 0x11."""
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), "16M"], check=True)
    subprocess.run(
        ["qemu-io", "-f", fmt, "-c", "write -P 0x11 0 1M", str(path)], check=True, capture_output=True
    )
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def disk_config(name: str, base: Path, fmt: str = "qcow2", **kw: Any) -> aiovirt.DomainConfig:
    """A ``pc`` with no OS (SeaBIOS idles) and a transient disk over ``base``."""
    disks = kw.pop("disks", [aiovirt.Disk(path=base, format=fmt, transient=True)])
    return aiovirt.DomainConfig(name=name, machine="pc", accel="tcg", memory_mib=16, disks=disks, **kw)


async def qemu_io(dom: aiovirt.Domain, command: str) -> None:
    # HMP's qemu-io prints its results on QEMU's stdout (the domain's log), not in the reply.
    assert (
        await dom.qmp("human-monitor-command", **{"command-line": f'qemu-io -d {DEVICE} "{command}"'}) == ""
    )


def host_read(overlay: Path, pattern: int, offset: str = "0", length: str = "64k") -> bool:
    """Whether ``overlay`` (with its backing chain) reads ``pattern`` there; shared, read-only."""
    done = subprocess.run(
        ["qemu-io", "-U", "-r", "-f", "qcow2", "-c", f"read -P {pattern:#x} {offset} {length}", str(overlay)],
        capture_output=True,
        text=True,
        check=True,
    )
    return "Pattern verification failed" not in done.stdout


def image_info(path: Path) -> dict[str, Any]:
    done = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)], capture_output=True, check=True
    )
    info: dict[str, Any] = json.loads(done.stdout)
    return info


def kill_and_reap(pid: int) -> None:
    """SIGKILL a QEMU this process spawned (through a connection that is closed now) and reap it."""
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def overlays(state_root: Path) -> list[str]:
    return sorted(os.listdir(state_root / "overlays"))


async def test_base_is_never_written_by_many_domains(
    conn: aiovirt.Connection, tmp_path: Path, state_root: Path
) -> None:
    base = make_base(tmp_path / "base.qcow2")
    before = sha256(base)
    count = 20
    doms: list[aiovirt.Domain] = []
    try:
        async with anyio.create_task_group() as tg:

            async def start(i: int) -> None:
                doms.append(await conn.create(disk_config(f"w{i:02d}", base)))

            for i in range(count):
                tg.start_soon(start, i)
        assert len(overlays(state_root)) == count
        for i, dom in enumerate(sorted(doms, key=lambda d: d.name)):
            pattern = 0x20 + i
            await qemu_io(dom, f"write -P {pattern:#x} 0 64k")
            await qemu_io(dom, "write -P 0x99 8M 1M")  # past what the base holds
            await qemu_io(dom, "flush")
            overlay = state_root / "overlays" / f"{dom.name}.disk0.qcow2"
            assert host_read(overlay, pattern)  # its own write, in its own overlay
            assert host_read(overlay, 0x11, "64k", "960k")  # the base shows through the rest
        info = image_info(state_root / "overlays" / "w00.disk0.qcow2")
        assert (info["format"], info["backing-filename"], info["backing-filename-format"]) == (
            "qcow2",
            str(base),
            "qcow2",
        )
        assert oct((state_root / "overlays" / "w00.disk0.qcow2").stat().st_mode & 0o777) == "0o600"
    finally:
        for dom in doms:
            if dom.active:
                await dom.destroy(timeout=5)
    assert sha256(base) == before
    assert overlays(state_root) == []


async def test_a_raw_base_and_two_transient_disks_of_one_base(
    conn: aiovirt.Connection, tmp_path: Path, state_root: Path
) -> None:
    base = make_base(tmp_path / "base.raw", "raw")
    before = sha256(base)
    disks = [aiovirt.Disk(path=base, format="raw", transient=True) for _ in range(2)]
    async with conn.run(disk_config("two", base, disks=disks)) as dom:
        assert overlays(state_root) == ["two.disk0.qcow2", "two.disk1.qcow2"]
        await qemu_io(dom, "write -P 0x42 0 1M")
        await qemu_io(dom, "flush")
        assert host_read(state_root / "overlays" / "two.disk0.qcow2", 0x42, length="1M")
        assert host_read(state_root / "overlays" / "two.disk1.qcow2", 0x11, length="1M")  # untouched
    assert sha256(base) == before
    assert overlays(state_root) == []


@pytest.mark.parametrize("how", ["destroyed", "crashed", "cancelled", "failed"])
async def test_the_overlay_goes_when_a_transient_domain_ends(
    conn: aiovirt.Connection, tmp_path: Path, state_root: Path, how: str
) -> None:
    base = make_base(tmp_path / "base.qcow2")
    # "failed": QEMU itself refuses the config after the overlay was made (an unknown option).
    extra = ["-no-such-option"] if how == "failed" else []

    async def run_and_end() -> None:
        async with conn.run(disk_config("gone", base, extra_args=extra)) as dom:
            assert overlays(state_root) == ["gone.disk0.qcow2"]
            if how == "crashed":
                pid = dom.pid
                assert pid is not None
                async with dom.subscribe() as events:
                    os.kill(pid, signal.SIGKILL)
                    with anyio.fail_after(30):
                        await dom.wait_for_state(aiovirt.DomainState.SHUTOFF)
                    assert dom.reason == aiovirt.StateReason.CRASHED
                    assert (await events.receive()).detail == aiovirt.EventDetail.CRASHED
            elif how == "cancelled":
                scope.cancel()
                await anyio.sleep_forever()

    with anyio.CancelScope() as scope:
        if how == "failed":
            with pytest.raises(aiovirt.LaunchError, match="no-such-option"):
                await run_and_end()
        else:
            await run_and_end()
    assert scope.cancelled_caught == (how == "cancelled")
    assert overlays(state_root) == []
    assert not await conn.list_domains()


async def test_a_persistent_domain_starts_from_the_base_every_time(
    conn: aiovirt.Connection, tmp_path: Path, state_root: Path
) -> None:
    base = make_base(tmp_path / "base.qcow2")
    dom = await conn.define(disk_config("again", base))
    assert overlays(state_root) == []
    await dom.start()
    await qemu_io(dom, "write -P 0x77 0 64k")
    await qemu_io(dom, "flush")
    overlay = state_root / "overlays" / "again.disk0.qcow2"
    assert host_read(overlay, 0x77)
    await dom.destroy()
    assert overlays(state_root) == []
    await dom.start()
    assert host_read(overlay, 0x11)  # a fresh overlay: the last run's writes are gone
    await dom.destroy()
    assert overlays(state_root) == []


async def test_overlays_of_runs_that_ended_unwatched_are_removed(
    uri: str, tmp_path: Path, state_root: Path
) -> None:
    base = make_base(tmp_path / "base.qcow2")
    async with aiovirt.connect(uri) as conn:
        dom = await conn.create(disk_config("unwatched", base))
        pid = dom.pid
        assert pid is not None
    # The controller is gone (QEMU lives on with its overlay); then QEMU dies unwatched.
    assert overlays(state_root) == ["unwatched.disk0.qcow2"]
    kill_and_reap(pid)  # our child: it was spawned by this process's earlier connection
    # And an overlay whose run never got a runtime record (a crash between qemu-img and the spawn).
    (state_root / "overlays" / "ghost.disk3.qcow2").write_bytes(b"")
    async with aiovirt.connect(uri) as conn:
        assert not await conn.list_domains()  # the transient domain ended: gone, and its overlay too
        assert overlays(state_root) == []


@pytest.mark.parametrize(
    ("make", "fmt", "expected"),
    [
        ("missing", "qcow2", "does not exist|No such file"),
        ("directory", "raw", "is a directory, not a disk image"),
        ("fifo", "raw", "neither a regular file nor a block device"),
        ("text", "qcow2", "Image is not in qcow2 format"),
    ],
)
async def test_a_bad_base_is_a_clear_error_and_leaves_nothing(
    conn: aiovirt.Connection, tmp_path: Path, state_root: Path, make: str, fmt: str, expected: str
) -> None:
    base = tmp_path / "base"
    if make == "directory":
        base.mkdir()
    elif make == "fifo":
        os.mkfifo(base)
    elif make == "text":
        base.write_text("not a disk image\n")
    before = qemu_pids(str(state_root))
    with pytest.raises(aiovirt.LaunchError, match=expected) as raised:
        await conn.create(disk_config("bad", base, fmt))
    assert str(base) in str(raised.value) and "disks.0" in str(raised.value)
    assert not await conn.list_domains()
    assert overlays(state_root) == []
    assert not (state_root / "run" / "bad.json").exists()
    assert qemu_pids(str(state_root)) == before
    # A persistent domain is left as it was (never started: SHUTOFF, reason unknown).
    dom = await conn.define(disk_config("bad", base, fmt))
    with pytest.raises(aiovirt.LaunchError, match=expected):
        await dom.start()
    assert (dom.state, dom.reason) == (aiovirt.DomainState.SHUTOFF, aiovirt.StateReason.UNKNOWN)
    assert overlays(state_root) == []


async def test_a_writer_of_a_base_in_use_is_refused(
    conn: aiovirt.Connection, tmp_path: Path, state_root: Path
) -> None:
    base = make_base(tmp_path / "base.qcow2")
    before = sha256(base)
    async with conn.run(disk_config("reader", base)):
        writable = [aiovirt.Disk(path=base, format="qcow2")]
        with pytest.raises(aiovirt.LaunchError, match="lock"):
            await conn.create(disk_config("writer", base, disks=writable))
    assert sha256(base) == before


def test_render_a_transient_disk() -> None:
    cfg = aiovirt.DomainConfig(
        name="r",
        uuid="00000000-0000-4000-8000-000000000001",
        memory_mib=64,
        disks=[aiovirt.Disk(path="/img/a,b.qcow2", format="qcow2", cache="none", transient=True)],
    )
    argv = render_argv(cfg, monitor_fd=3, console_path=None, overlays={0: "/s/overlays/r.disk0.qcow2"})
    blockdevs = [json.loads(argv[i + 1]) for i, arg in enumerate(argv) if arg == "-blockdev"]
    cache = {"direct": True, "no-flush": False}
    assert blockdevs == [
        {
            "driver": "file",
            "filename": "/img/a,b.qcow2",
            "node-name": "disk0-base-file",
            "read-only": True,
            "cache": cache,
        },
        {
            "driver": "qcow2",
            "file": "disk0-base-file",
            "node-name": "disk0-base",
            "read-only": True,
            "cache": cache,
        },
        {
            "driver": "file",
            "filename": "/s/overlays/r.disk0.qcow2",
            "node-name": "disk0-file",
            "read-only": False,
            "cache": cache,
        },
        {
            "driver": "qcow2",
            "file": "disk0-file",
            "backing": "disk0-base",
            "node-name": "disk0-format",
            "read-only": False,
            "cache": cache,
        },
    ]
    with pytest.raises(ValueError, match="overlay of transient disk 0"):
        render_argv(cfg, monitor_fd=3, console_path=None)
    with pytest.raises(ValueError, match="overlay of transient disk 0"):
        render_argv(cfg, monitor_fd=3, console_path=None, overlays={0: "relative.qcow2"})


def test_transient_disks_are_validated_and_mapped_to_libvirt() -> None:
    with pytest.raises(aiovirt.ConfigError, match="transient: a read-only disk is never written"):
        aiovirt.Disk(path="/a", readonly=True, transient=True)
    with pytest.raises(aiovirt.ConfigError, match="a writable image can be used only once"):
        aiovirt.DomainConfig(
            name="x", memory_mib=8, disks=[aiovirt.Disk(path="/a"), aiovirt.Disk(path="/a", transient=True)]
        )
    shared = [aiovirt.Disk(path="/a", transient=True), aiovirt.Disk(path="/a", readonly=True)]
    cfg = aiovirt.DomainConfig(name="x", memory_mib=8, disks=shared)
    xml = aiovirt.config.to_libvirt_xml(cfg)
    assert "<transient shareBacking='yes'/>" in xml
    assert aiovirt.config.from_libvirt_xml(xml).config == cfg
