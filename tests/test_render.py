"""The argv renderer: golden argvs, quoting, and real QEMU 7.2 accepting what is rendered.

The real-QEMU tests start ``qemu-system-x86_64`` paused (``-S``: no guest code ever runs) with
the rendered argv, exactly as the driver does: the test binds the monitor's listening socket and
passes its fd, then asks QEMU over QMP what it understood (block nodes, chardevs, machine
properties). They are synchronous: a blocking socket with a timeout is all they need.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import struct
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiovirt.config import (
    CacheMode,
    Disk,
    DomainConfig,
    Nic,
    PortForward,
    qemu_opt_escape,
    render_command_line,
)
from aiovirt.config import render_argv as _render_argv
from aiovirt.config._render import CACHE_MODES

UUID1 = uuid.UUID("6f1c2b0e-8d4a-4c57-9d8e-0a1b2c3d4e5f")
U1 = str(UUID1)


def render_argv(config: DomainConfig, **kw: Any) -> list[str]:
    """The renderer, for a config that got its UUID as define/create would give it one."""
    if config.uuid is None:
        config = config.model_copy(update={"uuid": UUID1})
    return _render_argv(config, **kw)


def test_render_needs_a_uuid() -> None:
    with pytest.raises(ValueError, match="UUID"):
        _render_argv(DomainConfig(name="x", memory_mib=1), monitor_fd=3, console_path=None)


def qemu_opts_split(text: str) -> list[str]:
    """Split ``text`` as QEMU's option parser does: at single commas, with ``,,`` meaning ``,``."""
    parts, current, i = [], [], 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(text[i])
        i += 1
    parts.append("".join(current))
    return parts


def option_after(argv: list[str], flag: str) -> list[str]:
    """Every value that follows ``flag`` in ``argv``."""
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]


# -- golden argvs ------------------------------------------------------------------------------

COMMON_HEAD = ["-nodefaults", "-no-user-config", "-display", "none"]


def test_golden_machine_none() -> None:
    cfg = DomainConfig(name="idle", uuid=UUID1, machine="none", accel="tcg", memory_mib=16)
    argv = render_argv(cfg, monitor_fd=3, console_path="/var/lib/aiovirt/console/idle.log")
    assert argv == [
        "qemu-system-x86_64",
        "-name", "guest=idle",
        "-uuid", U1,
        "-machine", "none",
        "-accel", "tcg",
        "-m", "16",
        "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none",
        "-S",
        "-chardev", "socket,id=monitor,fd=3,server=on,wait=on",
        "-mon", "chardev=monitor,mode=control",
        "-chardev", "file,id=console0,path=/var/lib/aiovirt/console/idle.log",
        "-serial", "chardev:console0",
    ]  # fmt: skip


def test_golden_pc_with_one_disk() -> None:
    cfg = DomainConfig(
        name="web-1",
        uuid=UUID1,
        memory_mib=256,
        disks=[Disk(path="/srv/img/web-1.qcow2", format="qcow2")],
    )
    argv = render_argv(cfg, monitor_fd=7, console_path="/run/aiovirt/web-1.console")
    assert argv == [
        "qemu-system-x86_64",
        "-name", "guest=web-1",
        "-uuid", U1,
        "-machine", "pc",
        "-accel", "kvm", "-accel", "tcg",
        "-cpu", "qemu64",
        "-m", "256",
        "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none",
        "-audiodev", "none,id=noaudio",
        "-S",
        "-chardev", "socket,id=monitor,fd=7,server=on,wait=on",
        "-mon", "chardev=monitor,mode=control",
        "-chardev", "file,id=console0,path=/run/aiovirt/web-1.console",
        "-serial", "chardev:console0",
        "-blockdev",
        '{"driver":"file","filename":"/srv/img/web-1.qcow2","node-name":"disk0-file",'
        '"read-only":false,"cache":{"direct":false,"no-flush":false}}',
        "-blockdev",
        '{"driver":"qcow2","file":"disk0-file","node-name":"disk0-format",'
        '"read-only":false,"cache":{"direct":false,"no-flush":false}}',
        "-device", '{"driver":"virtio-blk-pci","id":"disk0","drive":"disk0-format","write-cache":"on"}',
    ]  # fmt: skip


def test_golden_q35_with_everything() -> None:
    cfg = DomainConfig(
        name="q-1",
        uuid=UUID1,
        memory_mib=1024,
        vcpus=4,
        machine="q35",
        accel="kvm",
        kernel="/boot/vmlinuz",
        initrd="/boot/initrd.img",
        cmdline="console=ttyS0 root=/dev/vda",
        disks=[
            Disk(path="/img/root.qcow2", format="qcow2", cache="none"),
            Disk(path="/img/a.raw", bus="ide", cache="directsync"),
            Disk(path="/img/b.raw", bus="ide", cache="unsafe"),
            Disk(path="/img/seed.iso", readonly=True, cache="writethrough"),
        ],
        nics=[
            Nic(
                mac="52:54:00:00:00:01",
                forwards=[
                    PortForward(host_port=2222, guest_port=22),
                    PortForward(protocol="udp", host_addr="0.0.0.0", host_port=5353, guest_port=53),
                ],
            ),
            Nic(model="e1000"),
        ],
        emulator="/opt/qemu/bin/qemu-system-x86_64",
        extra_args=["-rtc", "base=utc"],
    )
    argv = render_argv(cfg, monitor_fd=5, console_path=None, paused=False)
    assert argv == [
        "/opt/qemu/bin/qemu-system-x86_64",
        "-name", "guest=q-1",
        "-uuid", U1,
        "-machine", "q35",
        "-accel", "kvm",
        "-cpu", "qemu64",
        "-m", "1024",
        "-smp", "4",
        "-nodefaults", "-no-user-config", "-display", "none",
        "-audiodev", "none,id=noaudio",
        "-chardev", "socket,id=monitor,fd=5,server=on,wait=on",
        "-mon", "chardev=monitor,mode=control",
        "-kernel", "/boot/vmlinuz",
        "-initrd", "/boot/initrd.img",
        "-append", "console=ttyS0 root=/dev/vda",
        "-blockdev",
        '{"driver":"file","filename":"/img/root.qcow2","node-name":"disk0-file",'
        '"read-only":false,"cache":{"direct":true,"no-flush":false}}',
        "-blockdev",
        '{"driver":"qcow2","file":"disk0-file","node-name":"disk0-format",'
        '"read-only":false,"cache":{"direct":true,"no-flush":false}}',
        "-device", '{"driver":"virtio-blk-pci","id":"disk0","drive":"disk0-format","write-cache":"on"}',
        "-blockdev",
        '{"driver":"file","filename":"/img/a.raw","node-name":"disk1-file",'
        '"read-only":false,"cache":{"direct":true,"no-flush":false}}',
        "-blockdev",
        '{"driver":"raw","file":"disk1-file","node-name":"disk1-format",'
        '"read-only":false,"cache":{"direct":true,"no-flush":false}}',
        "-device",
        '{"driver":"ide-hd","id":"disk1","drive":"disk1-format","bus":"ide.0","unit":0,"write-cache":"off"}',
        "-blockdev",
        '{"driver":"file","filename":"/img/b.raw","node-name":"disk2-file",'
        '"read-only":false,"cache":{"direct":false,"no-flush":true}}',
        "-blockdev",
        '{"driver":"raw","file":"disk2-file","node-name":"disk2-format",'
        '"read-only":false,"cache":{"direct":false,"no-flush":true}}',
        "-device",
        '{"driver":"ide-hd","id":"disk2","drive":"disk2-format","bus":"ide.1","unit":0,"write-cache":"on"}',
        "-blockdev",
        '{"driver":"file","filename":"/img/seed.iso","node-name":"disk3-file",'
        '"read-only":true,"cache":{"direct":false,"no-flush":false}}',
        "-blockdev",
        '{"driver":"raw","file":"disk3-file","node-name":"disk3-format",'
        '"read-only":true,"cache":{"direct":false,"no-flush":false}}',
        "-device", '{"driver":"virtio-blk-pci","id":"disk3","drive":"disk3-format","write-cache":"off"}',
        "-netdev", "user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=udp:0.0.0.0:5353-:53",
        "-device", '{"driver":"virtio-net-pci","id":"nic0","netdev":"net0","mac":"52:54:00:00:00:01"}',
        "-netdev", "user,id=net1",
        "-device", '{"driver":"e1000","id":"nic1","netdev":"net1"}',
        "-rtc", "base=utc",
    ]  # fmt: skip


def test_golden_microvm() -> None:
    cfg = DomainConfig(
        name="micro",
        uuid=UUID1,
        memory_mib=128,
        machine="microvm",
        accel="tcg",
        kernel="/boot/vmlinuz",
        disks=[Disk(path="/img/root.raw")],
        nics=[Nic()],
        console=False,
    )
    argv = render_argv(cfg, monitor_fd=9, console_path="/ignored/because/console/is/false")
    assert argv == [
        "qemu-system-x86_64",
        "-name", "guest=micro",
        "-uuid", U1,
        "-machine", "microvm",
        "-accel", "tcg",
        "-cpu", "qemu64",
        "-m", "128",
        "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none",
        "-audiodev", "none,id=noaudio",
        "-S",
        "-chardev", "socket,id=monitor,fd=9,server=on,wait=on",
        "-mon", "chardev=monitor,mode=control",
        "-kernel", "/boot/vmlinuz",
        "-blockdev",
        '{"driver":"file","filename":"/img/root.raw","node-name":"disk0-file",'
        '"read-only":false,"cache":{"direct":false,"no-flush":false}}',
        "-blockdev",
        '{"driver":"raw","file":"disk0-file","node-name":"disk0-format",'
        '"read-only":false,"cache":{"direct":false,"no-flush":false}}',
        "-device", '{"driver":"virtio-blk-device","id":"disk0","drive":"disk0-format","write-cache":"on"}',
        "-netdev", "user,id=net0",
        "-device", '{"driver":"virtio-net-device","id":"nic0","netdev":"net0"}',
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("machine", "slots"), [("pc", [(0, 0), (0, 1), (1, 0), (1, 1)]), ("q35", [(i, 0) for i in range(6)])]
)
def test_ide_slots(machine: str, slots: list[tuple[int, int]]) -> None:
    disks = [Disk(path="/v0")] + [Disk(path=f"/d{i}", bus="ide") for i in range(len(slots))]
    argv = render_argv(
        DomainConfig(name="x", memory_mib=1, machine=machine, disks=disks), monitor_fd=3, console_path=None
    )
    devices = [json.loads(d) for d in option_after(argv, "-device")]
    assert devices[0]["driver"] == "virtio-blk-pci"
    assert [(d["bus"], d["unit"]) for d in devices[1:]] == [(f"ide.{b}", u) for b, u in slots]


# -- options in between ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accel", "expected"), [("tcg", ["tcg"]), ("kvm", ["kvm"]), ("auto", ["kvm", "tcg"])]
)
def test_accel(accel: str, expected: list[str]) -> None:
    argv = render_argv(DomainConfig(name="x", memory_mib=1, accel=accel), monitor_fd=3, console_path=None)
    assert option_after(argv, "-accel") == expected


def test_paused() -> None:
    cfg = DomainConfig(name="x", memory_mib=1)
    assert "-S" in render_argv(cfg, monitor_fd=3, console_path=None)
    assert "-S" in render_argv(cfg, monitor_fd=3, console_path=None, paused=True)
    assert "-S" not in render_argv(cfg, monitor_fd=3, console_path=None, paused=False)


def test_console_needs_both_a_path_and_the_flag() -> None:
    on, off = DomainConfig(name="x", memory_mib=1), DomainConfig(name="x", memory_mib=1, console=False)
    assert "-serial" in render_argv(on, monitor_fd=3, console_path="/c")
    assert "-serial" not in render_argv(on, monitor_fd=3, console_path=None)
    assert "-serial" not in render_argv(off, monitor_fd=3, console_path="/c")


@pytest.mark.parametrize("mode", ["none", "writeback", "writethrough", "directsync", "unsafe"])
def test_cache_modes(mode: str) -> None:
    cfg = DomainConfig(name="x", memory_mib=1, disks=[Disk(path="/d", cache=mode)])
    argv = render_argv(cfg, monitor_fd=3, console_path=None)
    file_node, format_node = (json.loads(b) for b in option_after(argv, "-blockdev"))
    (device,) = (json.loads(d) for d in option_after(argv, "-device"))
    direct, no_flush, write_cache = {
        "none": (True, False, "on"),
        "writeback": (False, False, "on"),
        "writethrough": (False, False, "off"),
        "directsync": (True, False, "off"),
        "unsafe": (False, True, "on"),
    }[mode]
    assert file_node["cache"] == format_node["cache"] == {"direct": direct, "no-flush": no_flush}
    assert device["write-cache"] == write_cache


def test_extra_args_come_last_and_unchanged() -> None:
    extra = ["-device", "virtio-rng-pci,id=rng0", "-rtc", "base=utc,driftfix=slew"]
    argv = render_argv(
        DomainConfig(name="x", memory_mib=1, disks=[Disk(path="/d")], nics=[Nic()], extra_args=extra),
        monitor_fd=3,
        console_path="/c",
    )
    assert argv[-4:] == extra


def test_render_is_pure() -> None:
    cfg = DomainConfig(name="x", memory_mib=1, disks=[Disk(path="/d")], nics=[Nic()])
    dumped = cfg.model_dump()
    first = render_argv(cfg, monitor_fd=3, console_path="/c")
    first.append("mutated")
    assert render_argv(cfg, monitor_fd=3, console_path="/c") == first[:-1]
    assert cfg.model_dump() == dumped


@pytest.mark.parametrize("fd", [-1, True, "3", 3.0])
def test_monitor_fd_must_be_an_fd(fd: Any) -> None:
    with pytest.raises(ValueError, match="monitor_fd"):
        render_argv(DomainConfig(name="x", memory_mib=1), monitor_fd=fd, console_path=None)


def test_console_path_without_nul() -> None:
    with pytest.raises(ValueError, match="NUL"):
        render_argv(DomainConfig(name="x", memory_mib=1), monitor_fd=3, console_path="/a\x00b")


def test_render_command_line() -> None:
    argv = render_argv(
        DomainConfig(name="x", memory_mib=1, cmdline="a b", kernel="/k k", disks=[Disk(path="/it's.img")]),
        monitor_fd=3,
        console_path="/c d",
    )
    line = render_command_line(argv)
    assert shlex.split(line) == argv
    assert "\n" not in line


def test_cache_table_is_complete() -> None:
    assert set(CACHE_MODES) == {"none", "writeback", "writethrough", "directsync", "unsafe"}


# -- quoting -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "escaped"),
    [
        ("plain", "plain"),
        ("a,b", "a,,b"),
        ("a,,b", "a,,,,b"),
        (",", ",,"),
        ("k=v x", "k=v x"),
        ("", ""),
    ],
)
def test_qemu_opt_escape(value: str, escaped: str) -> None:
    assert qemu_opt_escape(value) == escaped


@given(st.text())
def test_escaped_values_split_back_exactly(value: str) -> None:
    assert qemu_opts_split(f"file,path={qemu_opt_escape(value)},append=on") == [
        "file",
        f"path={value}",
        "append=on",
    ]


def test_odd_disk_path_stays_one_file_name() -> None:
    path = "/srv/my vms/a.img,snapshot=on,file.locking=off=x"
    argv = render_argv(
        DomainConfig(name="x", memory_mib=1, disks=[Disk(path=path)]), monitor_fd=3, console_path=None
    )
    file_node = json.loads(option_after(argv, "-blockdev")[0])
    assert file_node["filename"] == path
    assert "snapshot" not in file_node


def test_odd_console_path_is_escaped() -> None:
    console = "/home/o'brien, jr/vms=1/console.log"
    argv = render_argv(DomainConfig(name="x", memory_mib=1), monitor_fd=3, console_path=console)
    (monitor, chardev) = option_after(argv, "-chardev")
    assert chardev == "file,id=console0,path=/home/o'brien,, jr/vms=1/console.log"
    assert qemu_opts_split(chardev) == ["file", "id=console0", f"path={console}"]
    assert qemu_opts_split(monitor) == ["socket", "id=monitor", "fd=3", "server=on", "wait=on"]


def test_kernel_initrd_append_are_not_escaped() -> None:
    """QEMU 7.2 takes -kernel/-initrd/-append as plain strings (checked by test_real_pc_* below)."""
    cfg = DomainConfig(
        name="x",
        memory_mib=1,
        kernel="/b,oot/vmlinuz",
        initrd="/b,oot/initrd",
        cmdline="console=ttyS0,115200",
    )
    argv = render_argv(cfg, monitor_fd=3, console_path=None)
    assert option_after(argv, "-kernel") == ["/b,oot/vmlinuz"]
    assert option_after(argv, "-initrd") == ["/b,oot/initrd"]
    assert option_after(argv, "-append") == ["console=ttyS0,115200"]


path_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00\n\r"), min_size=1)


@given(tail=path_text)
def test_any_disk_path_reaches_json_exactly(tail: str) -> None:
    disk = Disk(path="/" + tail)
    argv = render_argv(DomainConfig(name="x", memory_mib=1, disks=[disk]), monitor_fd=3, console_path=None)
    assert json.loads(option_after(argv, "-blockdev")[0])["filename"] == str(disk.path)


@given(tail=path_text)
def test_any_console_path_splits_back_exactly(tail: str) -> None:
    console = "/" + tail
    argv = render_argv(DomainConfig(name="x", memory_mib=1), monitor_fd=3, console_path=console)
    assert qemu_opts_split(option_after(argv, "-chardev")[1])[2] == f"path={console}"


# -- real QEMU ---------------------------------------------------------------------------------


class QMPFailure(AssertionError):
    pass


class Monitor:
    """A minimal blocking QMP client (one command at a time, events skipped)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = sock.makefile("rwb")

    def read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise EOFError("monitor closed")
        message: dict[str, Any] = json.loads(line)
        return message

    def cmd(self, command: str, **arguments: Any) -> Any:
        self.file.write(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\n")
        self.file.flush()
        while True:
            message = self.read()
            if "return" in message:
                return message["return"]
            if "error" in message:
                raise QMPFailure(f"{command}: {message['error']}")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    monitor: Monitor
    log: Path

    def cmd(self, command: str, **arguments: Any) -> Any:
        return self.monitor.cmd(command, **arguments)

    def qom(self, path: str, prop: str) -> Any:
        return self.cmd("qom-get", path=path, property=prop)

    def quit(self) -> None:
        self.cmd("quit")
        assert self.proc.wait(timeout=30) == 0


@dataclass
class Launcher:
    tmp_path: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    monitors: list[Monitor] = field(default_factory=list)

    def spawn(
        self, cfg: DomainConfig, console: Path | None, paused: bool = True
    ) -> tuple[subprocess.Popen[bytes], socket.socket, Path]:
        # The driver binds a path in its state directory; an abstract socket (no path, no
        # 107-byte limit, nothing to clean up) serves the test as well: QEMU only gets the fd.
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(f"\0aiovirt-test-{os.getpid()}-{uuid.uuid4().hex}")
            listener.listen(1)
            argv = render_argv(
                cfg,
                monitor_fd=listener.fileno(),
                console_path=None if console is None else str(console),
                paused=paused,
            )
            log = self.tmp_path / f"{cfg.name}.qemu.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    pass_fds=[listener.fileno()],
                    start_new_session=True,
                )
            self.procs.append(proc)
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.settimeout(60)
            client.connect(listener.getsockname())  # queued in the backlog until QEMU accepts
            return proc, client, log
        finally:
            listener.close()

    def start(self, cfg: DomainConfig, console: Path | None = None, *, paused: bool = True) -> Running:
        proc, client, log = self.spawn(cfg, console, paused)
        monitor = Monitor(client)
        self.monitors.append(monitor)
        try:
            greeting = monitor.read()
            # QEMU may greet before its machine is set up and still exit (a bad -kernel): only a
            # reply, which its main loop sends, shows that the whole command line was accepted.
            monitor.cmd("qmp_capabilities")
        except (EOFError, OSError) as exc:
            proc.wait(timeout=30)
            raise AssertionError(f"QEMU did not start (status {proc.returncode}): {log.read_text()}") from exc
        assert greeting["QMP"]["version"]["qemu"]["major"] >= 7
        return Running(proc, monitor, log)

    def fail(self, cfg: DomainConfig) -> tuple[int, str]:
        """Start ``cfg`` expecting QEMU to refuse it: its exit status and its message."""
        proc, client, log = self.spawn(cfg, None)
        client.close()
        return proc.wait(timeout=60), log.read_text()

    def close(self) -> None:
        for monitor in self.monitors:
            monitor.close()
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=60)


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launcher]:
    launcher = Launcher(tmp_path)
    try:
        yield launcher
    finally:
        launcher.close()


def qemu_img_create(path: Path, fmt: str, size: str = "16M") -> Path:
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", fmt, str(path), size], check=True, stdin=subprocess.DEVNULL
    )
    return path


def raw_image(path: Path, size: int = 1 << 20) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def fake_kernel(path: Path) -> Path:
    """A file that QEMU's x86 loader accepts as a bzImage (protocol 2.15 header, nothing else).

    With ``-S`` no guest code ever runs, so a header is all a kernel needs to be to show how
    QEMU reads ``-kernel``/``-initrd``/``-append``.
    """
    image = bytearray(8192)
    image[0x1F1] = 4  # setup sectors
    image[0x1FE:0x200] = b"\x55\xaa"
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, 0x020F)  # boot protocol version
    image[0x211] = 0x01  # loadflags: LOADED_HIGH
    struct.pack_into("<I", image, 0x22C, 0x37FFFFFF)  # initrd_addr_max
    struct.pack_into("<I", image, 0x238, 2047)  # cmdline_size
    path.write_bytes(bytes(image))
    return path


def block_devices(vm: Running) -> dict[str, dict[str, Any]]:
    """``query-block`` by device id (``qdev`` is the id, or a QOM path for virtio devices)."""
    found = {}
    for block in vm.cmd("query-block"):
        qdev = block["qdev"]
        if qdev.startswith("/machine/peripheral/"):  # e.g. /machine/peripheral/disk0/virtio-backend
            qdev = qdev.split("/")[3]
        found[qdev] = block["inserted"]
    return found


def chardevs(vm: Running) -> dict[str, dict[str, Any]]:
    return {c["label"]: c for c in vm.cmd("query-chardev")}


def assert_prelaunch(vm: Running) -> None:
    status = vm.cmd("query-status")
    assert (status["status"], status["running"]) == ("prelaunch", False)


def test_real_pc_qcow2_disk_named_like_an_option(launch: Launcher, tmp_path: Path) -> None:
    """A file named ``...,snapshot=on`` is opened as that file, with no snapshot overlay; the
    kernel, initrd and command line with commas reach QEMU unchanged; the console file is created
    under a directory with a comma."""
    state = tmp_path / "state, with=comma"
    state.mkdir()
    image = qemu_img_create(tmp_path / "disk.qcow2,snapshot=on", "qcow2")
    kernel = fake_kernel(tmp_path / "vmlinuz,snapshot=on x")
    initrd = tmp_path / "initrd,a=b"
    initrd.write_bytes(b"\0" * 1024)
    cmdline = "console=ttyS0,115200 a=b,,c 'q'"
    console = state / "console,0.log"
    cfg = DomainConfig(
        name="pc-qcow2",
        machine="pc",
        accel="tcg",
        memory_mib=32,
        kernel=kernel,
        initrd=initrd,
        cmdline=cmdline,
        disks=[Disk(path=image, format="qcow2")],
    )
    vm = launch.start(cfg, console)
    assert_prelaunch(vm)
    blocks = block_devices(vm)
    assert list(blocks) == ["disk0"]
    disk = blocks["disk0"]
    assert disk["file"] == str(image)
    assert disk["image"]["filename"] == str(image)
    assert (disk["drv"], disk["node-name"], disk["ro"], disk["backing_file_depth"]) == (
        "qcow2",
        "disk0-format",
        False,
        0,
    )
    # snapshot=on would have put a temporary overlay (an unnamed node) above our format node
    assert sorted(n["node-name"] for n in vm.cmd("query-named-block-nodes")) == ["disk0-file", "disk0-format"]
    assert vm.qom("/machine", "kernel") == str(kernel)
    assert vm.qom("/machine", "initrd") == str(initrd)
    assert vm.qom("/machine", "append") == cmdline
    assert vm.qom("/machine/peripheral/disk0", "type") == "virtio-blk-pci"
    devs = chardevs(vm)
    assert devs["console0"]["frontend-open"] is True
    assert devs["monitor"]["frontend-open"] is True
    assert console.exists()
    vm.quit()


def test_real_pc_ide_disks_and_a_readonly_virtio_disk(launch: Launcher, tmp_path: Path) -> None:
    modes: list[CacheMode] = ["writethrough", "writeback", "unsafe", "writethrough"]
    ide = [
        Disk(path=raw_image(tmp_path / f"ide{i}.raw"), bus="ide", cache=mode) for i, mode in enumerate(modes)
    ]
    seed = Disk(path=raw_image(tmp_path / "seed, ro.raw"), readonly=True)
    cfg = DomainConfig(name="pc-ide", machine="pc", accel="tcg", memory_mib=32, disks=[*ide, seed])
    vm = launch.start(cfg)
    assert_prelaunch(vm)
    blocks = block_devices(vm)
    assert list(blocks) == ["disk0", "disk1", "disk2", "disk3", "disk4"]
    for i, mode in enumerate(modes):
        direct, no_flush, write_cache = CACHE_MODES[mode]
        assert blocks[f"disk{i}"]["file"] == str(ide[i].path)
        assert blocks[f"disk{i}"]["ro"] is False
        assert blocks[f"disk{i}"]["cache"] == {
            "direct": direct,
            "no-flush": no_flush,
            "writeback": write_cache,
        }
        assert vm.qom(f"/machine/peripheral/disk{i}", "type") == "ide-hd"
        assert vm.qom(f"/machine/peripheral/disk{i}", "unit") == i % 2
    assert blocks["disk4"]["file"] == str(seed.path)
    assert blocks["disk4"]["ro"] is True
    assert blocks["disk4"]["drv"] == "raw"
    vm.quit()


def direct_io_works(directory: Path) -> bool:
    probe = directory / "o_direct.probe"
    probe.write_bytes(b"")
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("mode", ["none", "writeback", "writethrough", "directsync", "unsafe"])
def test_real_cache_modes(launch: Launcher, tmp_path: Path, mode: CacheMode) -> None:
    direct, no_flush, write_cache = CACHE_MODES[mode]
    if direct and not direct_io_works(tmp_path):
        pytest.skip(f"{tmp_path} does not support O_DIRECT (tmpfs?)")
    cfg = DomainConfig(
        name=f"cache-{mode}",
        machine="pc",
        accel="tcg",
        memory_mib=32,
        disks=[Disk(path=qemu_img_create(tmp_path / "c.qcow2", "qcow2"), format="qcow2", cache=mode)],
    )
    vm = launch.start(cfg)
    (node,) = block_devices(vm).values()
    assert node["cache"] == {"direct": direct, "no-flush": no_flush, "writeback": write_cache}
    nodes = {n["node-name"]: n for n in vm.cmd("query-named-block-nodes")}
    assert nodes["disk0-file"]["cache"]["direct"] is direct
    assert nodes["disk0-file"]["cache"]["no-flush"] is no_flush
    vm.quit()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_real_nics_with_forwards(launch: Launcher) -> None:
    port = free_port()
    cfg = DomainConfig(
        name="pc-net",
        machine="pc",
        accel="tcg",
        memory_mib=32,
        nics=[
            Nic(
                mac="52:54:00:AB:CD:01",
                forwards=[
                    PortForward(host_port=port, guest_port=22),
                    PortForward(protocol="udp", host_port=port, guest_port=53),
                ],
            ),
            Nic(model="e1000", mac="52:54:00:ab:cd:02"),
        ],
    )
    vm = launch.start(cfg)
    assert_prelaunch(vm)
    assert vm.qom("/machine/peripheral/nic0", "type") == "virtio-net-pci"
    assert vm.qom("/machine/peripheral/nic0", "mac") == "52:54:00:ab:cd:01"
    assert vm.qom("/machine/peripheral/nic1", "type") == "e1000"
    assert vm.qom("/machine/peripheral/nic1", "mac") == "52:54:00:ab:cd:02"
    usernet = vm.cmd("human-monitor-command", **{"command-line": "info usernet"})
    forwards = [line.split() for line in usernet.splitlines() if "HOST_FORWARD" in line]
    assert sorted((f[0], f[2], f[3], f[5]) for f in forwards) == [
        ("TCP[HOST_FORWARD]", "127.0.0.1", str(port), "22"),
        ("UDP[HOST_FORWARD]", "127.0.0.1", str(port), "53"),
    ]
    with socket.create_connection(("127.0.0.1", port), timeout=30):
        pass  # QEMU listens on the forwarded host port
    vm.quit()


def test_real_microvm(launch: Launcher, tmp_path: Path) -> None:
    kernel = fake_kernel(tmp_path / "vmlinuz")
    console = tmp_path / "micro.console"
    cfg = DomainConfig(
        name="micro",
        machine="microvm",
        accel="tcg",
        memory_mib=32,
        kernel=kernel,
        cmdline="console=ttyS0",
        disks=[Disk(path=raw_image(tmp_path / "root,snapshot=on.raw"), cache="unsafe")],
        nics=[Nic(forwards=[PortForward(host_port=free_port(), guest_port=22)])],
    )
    vm = launch.start(cfg, console)
    assert_prelaunch(vm)
    assert block_devices(vm)["disk0"]["file"] == str(tmp_path / "root,snapshot=on.raw")
    assert vm.qom("/machine/peripheral/disk0", "type") == "virtio-blk-device"
    assert vm.qom("/machine/peripheral/nic0", "type") == "virtio-net-device"
    assert vm.qom("/machine", "kernel") == str(kernel)
    assert chardevs(vm)["console0"]["frontend-open"] is True
    assert console.exists()
    vm.quit()


def test_real_q35(launch: Launcher, tmp_path: Path) -> None:
    ide = [Disk(path=raw_image(tmp_path / f"ide{i}.raw"), bus="ide") for i in range(6)]
    root = Disk(path=qemu_img_create(tmp_path / "root.qcow2", "qcow2"), format="qcow2", cache="writethrough")
    cfg = DomainConfig(
        name="q35",
        machine="q35",
        accel="tcg",
        memory_mib=64,
        vcpus=2,
        disks=[root, *ide],
        nics=[Nic(model="e1000"), Nic()],
    )
    vm = launch.start(cfg, tmp_path / "q35.console")
    assert_prelaunch(vm)
    blocks = block_devices(vm)
    assert list(blocks) == [f"disk{i}" for i in range(7)]
    assert blocks["disk0"]["drv"] == "qcow2"
    assert [vm.qom(f"/machine/peripheral/disk{i}", "type") for i in range(7)] == ["virtio-blk-pci"] + [
        "ide-hd"
    ] * 6
    assert vm.qom("/machine/peripheral/nic0", "type") == "e1000"
    assert vm.qom("/machine/peripheral/nic1", "type") == "virtio-net-pci"
    assert len(vm.cmd("query-cpus-fast")) == 2
    vm.quit()


def test_real_machine_none(launch: Launcher, tmp_path: Path) -> None:
    console = tmp_path / "none, console.log"
    vm = launch.start(DomainConfig(name="none", machine="none", accel="tcg", memory_mib=16), console)
    assert_prelaunch(vm)
    assert vm.cmd("query-block") == []
    devs = chardevs(vm)
    assert set(devs) == {"monitor", "console0"}
    assert console.exists()  # accepted by QEMU 7.2, though machine 'none' has no serial port to use it
    vm.quit()


def test_real_accel_auto_and_running(launch: Launcher) -> None:
    """``auto`` (``-accel kvm -accel tcg``) starts with or without KVM; ``paused=False`` runs at once."""
    cfg = DomainConfig(name="auto", machine="none", accel="auto", memory_mib=16, console=False)
    vm = launch.start(cfg)
    assert_prelaunch(vm)
    assert chardevs(vm).keys() == {"monitor"}
    vm.quit()


def test_real_running_when_not_paused(launch: Launcher) -> None:
    vm = launch.start(DomainConfig(name="run", machine="none", accel="tcg", memory_mib=16), paused=False)
    assert vm.cmd("query-status")["running"] is True
    vm.quit()


def test_real_qemu_refuses_a_readonly_ide_disk(launch: Launcher, tmp_path: Path) -> None:
    """Why DomainConfig refuses ``readonly`` on IDE: QEMU 7.2 cannot attach a read-only node to ide-hd."""
    disk = Disk(path=raw_image(tmp_path / "ro.raw"), bus="ide", readonly=True)
    bypass = DomainConfig.model_construct(
        name="ro-ide", uuid=UUID1, machine="pc", accel="tcg", memory_mib=32, disks=(disk,)
    )
    status, message = launch.fail(bypass)
    assert status == 1
    assert "Block node is read-only" in message


def test_real_qemu_reports_a_missing_kernel_by_its_exact_name(launch: Launcher, tmp_path: Path) -> None:
    """``-kernel`` is a plain string: ``,,`` is not unescaped, the name is used as given."""
    missing = tmp_path / "no,,such kernel"
    cfg = DomainConfig(name="nokernel", machine="pc", accel="tcg", memory_mib=32, kernel=missing)
    status, message = launch.fail(cfg)
    assert status == 1
    assert f"could not open kernel file '{missing}'" in message
