"""A pure function from a DomainConfig to QEMU's argv. No I/O: nothing is opened, probed or checked here.

The argv, in this order (each part always in the same place, so logs and golden tests are stable)::

    EMULATOR
    -name guest=NAME
    -uuid UUID
    -machine TYPE                                   pc | q35 | microvm | none
    -accel tcg | -accel kvm | -accel kvm -accel tcg (auto: QEMU tries KVM, then TCG)
    -cpu qemu64                                     not for machine none (7.2 exits: apic-id not initialized)
    -m MIB
    -smp N
    -nodefaults -no-user-config -display none
    -audiodev none,id=noaudio                       not for machine none
    -S                                              when paused
    -chardev socket,id=monitor,fd=FD,server=on,wait=on  -mon chardev=monitor,mode=control
    -chardev socket,id=console0,fd=FD,server=on,wait=on,logfile=PATH -serial chardev:console0
                                                    when console_fd and config.console (logfile= when
                                                    console_path); else, with only console_path:
    -chardev file,id=console0,path=PATH -serial chardev:console0
    -kernel PATH -initrd PATH -append CMDLINE       each when set
    per disk i:  -blockdev {"node-name": "diskI-file", ...} -blockdev {"node-name": "diskI-format", ...}
                 -device {"id": "diskI", "drive": "diskI-format", ...}
                 a transient disk first gets its base, read-only: -blockdev {"node-name": "diskI-base-file"}
                 -blockdev {"node-name": "diskI-base", ...}; then diskI-file is its overlay and
                 diskI-format the qcow2 node over it, with "backing": "diskI-base"
    per nic i:   -netdev user,id=netI[,hostfwd=...] -device {"id": "nicI", "netdev": "netI", ...}
    EXTRA_ARGS

Why these choices (checked with QEMU 7.2):

- ``-cpu qemu64`` pins the guest CPU model (it is also 7.2's default for these machines) so that
  a newer QEMU's default cannot change what the guest sees. ``-audiodev none`` is what libvirt
  passes when a guest has no sound card: QEMU never probes a host audio backend.
- The monitor is a listening unix socket that the driver binds (0600, in the state directory)
  and passes to QEMU as file descriptor ``FD``: a socket path is limited to 107 bytes, the
  state directory's path is not (libvirt does the same). The serial console is one too, with
  ``logfile=`` so that QEMU itself logs every byte the guest prints, whether a client is
  connected or not (QEMU >= 5.2 logs output it could not send). ``wait=on``: QEMU accepts the
  controller's already-queued connection while it starts, so nothing the guest prints is missed.
- A transient disk's base is a node of its own, read-only, given to the overlay's qcow2 node as
  ``backing``: QEMU never opens the backing file named inside the overlay, and QEMU's image
  locking refuses any writer of the base while a domain uses it.
- Quoting. QEMU reads most options as ``key=value,key=value`` (QemuOpts/keyval), where a ``,``
  inside a value is written ``,,``. Every value that lands there goes through
  :func:`qemu_opt_escape`: the console path does (a user's state directory may contain a comma).
  Disks and NIC devices use ``-blockdev``/``-device`` JSON instead (QEMU 7.2 accepts JSON for
  both), whose strings are quoted by ``json.dumps``: an image named ``a.img,snapshot=on``
  reaches QEMU as that file name, never as an extra option.
- ``-kernel``, ``-initrd`` and ``-append`` are NOT option syntax: QEMU 7.2 stores each argument
  as one plain string in the machine's options (``kernel``, ``initrd``, ``append`` properties).
  Checked: ``-kernel '/d/nok,,x'`` fails with "could not open kernel file '/d/nok,,x'" (the
  commas are not unescaped), and a kernel named ``vmlinuz,snapshot=on x`` with an initrd
  ``initrd,a=b`` and ``-append 'console=ttyS0,115200 a=b,,c'`` read back through QMP
  (``qom-get /machine kernel|initrd|append``) exactly as given. So they are passed unescaped;
  escaping them would break names with commas. (One exception QEMU has: a *multiboot* kernel's
  ``-initrd`` is a comma-separated module list; aiovirt boots Linux kernels.)
- Cache modes map to the node options and the guest-visible write cache as in QEMU's own
  ``-drive cache=`` table (see :data:`CACHE_MODES`); the same cache options are set on the
  file and format nodes, as libvirt does.
- IDE disks get explicit slots (``bus``/``unit``): QEMU 7.2 does not find a free IDE slot by
  itself beyond the first bus. ``pc``: ``ide.0`` units 0-1, ``ide.1`` units 0-1; ``q35``:
  ``ide.0`` .. ``ide.5`` unit 0 (one device per AHCI port).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ._models import CacheMode, Disk, DomainConfig, Nic

__all__ = ["CACHE_MODES", "qemu_opt_escape", "render_argv", "render_command_line"]

CACHE_MODES: dict[CacheMode, tuple[bool, bool, bool]] = {
    # mode:          (cache.direct, cache.no-flush, device write-cache)
    "writeback": (False, False, True),
    "none": (True, False, True),
    "writethrough": (False, False, False),
    "directsync": (True, False, False),
    "unsafe": (False, True, True),
}
"""QEMU's cache modes: ``direct`` bypasses the host page cache (O_DIRECT), ``no-flush`` ignores
the guest's flushes, ``write-cache`` off makes every guest write synchronous (writethrough)."""

_MONITOR_ID = "monitor"
_CONSOLE_ID = "console0"


def qemu_opt_escape(value: str) -> str:
    """Quote ``value`` for QEMU's ``key=value,...`` option syntax: every ``,`` becomes ``,,``.

    That is the whole of QEMU's quoting there: ``=`` and spaces need none inside a value.
    """
    return value.replace(",", ",,")


def _opts(*parts: str, **values: str) -> str:
    """``part,part,key=value,...`` with every value escaped (keys and bare parts are ours)."""
    return ",".join([*parts, *(f"{key}={qemu_opt_escape(v)}" for key, v in values.items())])


def _json(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _accel(accel: str) -> list[str]:
    if accel == "auto":
        return ["-accel", "kvm", "-accel", "tcg"]
    return ["-accel", accel]


def _disk_args(config: DomainConfig, overlays: Mapping[int, str]) -> Iterable[str]:
    ide_index = 0
    for i, disk in enumerate(config.disks):
        direct, no_flush, write_cache = CACHE_MODES[disk.cache]
        cache = {"direct": direct, "no-flush": no_flush}
        file_node, format_node = f"disk{i}-file", f"disk{i}-format"
        image, image_format, backing = str(disk.path), disk.format, None
        if disk.transient:
            backing = f"disk{i}-base"
            yield from _image_nodes(str(disk.path), disk.format, f"{backing}-file", backing, True, cache)
            image, image_format = overlays[i], "qcow2"
        yield from _image_nodes(image, image_format, file_node, format_node, disk.readonly, cache, backing)
        device: dict[str, Any] = {
            "driver": _disk_driver(config, disk),
            "id": f"disk{i}",
            "drive": format_node,
        }
        if disk.bus == "ide":
            device.update(_ide_slot(config.machine, ide_index))
            ide_index += 1
        device["write-cache"] = "on" if write_cache else "off"
        yield "-device"
        yield _json(device)


def _image_nodes(
    filename: str,
    image_format: str,
    file_node: str,
    format_node: str,
    readonly: bool,
    cache: dict[str, bool],
    backing: str | None = None,
) -> Iterable[str]:
    yield "-blockdev"
    yield _json(
        {
            "driver": "file",
            "filename": filename,
            "node-name": file_node,
            "read-only": readonly,
            "cache": cache,
        }
    )
    node: dict[str, Any] = {"driver": image_format, "file": file_node}
    if backing is not None:
        node["backing"] = backing
    node.update({"node-name": format_node, "read-only": readonly, "cache": cache})
    yield "-blockdev"
    yield _json(node)


def _disk_driver(config: DomainConfig, disk: Disk) -> str:
    if disk.bus == "ide":
        return "ide-hd"
    return "virtio-blk-device" if config.machine == "microvm" else "virtio-blk-pci"


def _ide_slot(machine: str, index: int) -> dict[str, Any]:
    if machine == "q35":
        return {"bus": f"ide.{index}", "unit": 0}
    return {"bus": f"ide.{index // 2}", "unit": index % 2}


def _nic_args(config: DomainConfig) -> Iterable[str]:
    for i, nic in enumerate(config.nics):
        netdev = f"net{i}"
        # One hostfwd= per forward (QEMU collects the repeated key into a list); values are
        # validated addresses and numbers, escaped all the same.
        forwards = [
            "hostfwd=" + qemu_opt_escape(f"{fwd.protocol}:{fwd.host_addr}:{fwd.host_port}-:{fwd.guest_port}")
            for fwd in nic.forwards
        ]
        yield "-netdev"
        yield ",".join(["user", f"id={netdev}", *forwards])
        device: dict[str, Any] = {"driver": _nic_driver(config, nic), "id": f"nic{i}", "netdev": netdev}
        if nic.mac is not None:
            device["mac"] = nic.mac
        yield "-device"
        yield _json(device)


def _nic_driver(config: DomainConfig, nic: Nic) -> str:
    if nic.model == "e1000":
        return "e1000"
    return "virtio-net-device" if config.machine == "microvm" else "virtio-net-pci"


def render_argv(
    config: DomainConfig,
    *,
    monitor_fd: int,
    console_path: str | None,
    paused: bool = True,
    console_fd: int | None = None,
    overlays: Mapping[int, str] | None = None,
) -> list[str]:
    """QEMU's argv for ``config``; ``argv[0]`` is ``config.emulator``.

    ``monitor_fd`` is a listening unix socket's file descriptor, inherited by QEMU, that becomes
    the QMP monitor. ``console_fd``, another such socket, becomes the first serial port, logged
    to ``console_path`` if given; without ``console_fd`` the serial port is written to the file
    ``console_path``. With neither, or with ``config.console`` false, the guest has no serial
    port. ``overlays`` maps the index of each transient disk to the path of its overlay (made
    beforehand). ``paused`` adds ``-S``: the guest CPUs wait for QMP ``cont``.

    The order of the arguments is documented in this module's docstring and never depends on
    anything but the arguments: the same inputs give the same argv.
    """
    for what, fd in (("monitor_fd", monitor_fd), ("console_fd", console_fd)):
        if fd is None and what == "console_fd":
            continue
        if isinstance(fd, bool) or not isinstance(fd, int) or fd < 0:
            raise ValueError(f"{what} must be a file descriptor number, not {fd!r}")
    overlays = dict(overlays or {})
    for i, disk in enumerate(config.disks):
        if disk.transient and ("\x00" in overlays.get(i, "\x00") or not overlays[i].startswith("/")):
            raise ValueError(f"render_argv needs the absolute path of the overlay of transient disk {i}")
    if config.uuid is None:
        raise ValueError("render_argv needs a config with a UUID (define/create assign one)")
    if console_path is not None and "\x00" in console_path:
        raise ValueError("console_path must not contain NUL bytes")
    system = config.machine != "none"
    argv = [
        config.emulator,
        "-name",
        _opts(guest=config.name),
        "-uuid",
        str(config.uuid),
        "-machine",
        config.machine,
        *_accel(config.accel),
        *(["-cpu", "qemu64"] if system else []),
        "-m",
        str(config.memory_mib),
        "-smp",
        str(config.vcpus),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        *(["-audiodev", "none,id=noaudio"] if system else []),
        *(["-S"] if paused else []),
        "-chardev",
        # wait=on: QEMU accepts our already-queued connection while it starts, before its monitor
        # I/O thread exists. With wait=off both threads watch the listener during set-up, a race
        # (fixed upstream in QEMU 11.0) that hangs or crashes QEMU 7.2 under load.
        _opts("socket", id=_MONITOR_ID, fd=str(monitor_fd), server="on", wait="on"),
        "-mon",
        f"chardev={_MONITOR_ID},mode=control",
    ]
    if console_fd is not None and config.console:
        log = {"logfile": console_path} if console_path is not None else {}
        chardev = _opts("socket", id=_CONSOLE_ID, fd=str(console_fd), server="on", wait="on", **log)
        argv += ["-chardev", chardev, "-serial", f"chardev:{_CONSOLE_ID}"]
    elif console_path is not None and config.console:
        argv += [
            "-chardev",
            _opts("file", id=_CONSOLE_ID, path=console_path),
            "-serial",
            f"chardev:{_CONSOLE_ID}",
        ]
    # Plain strings, not option syntax: no escaping (see the module docstring).
    if config.kernel is not None:
        argv += ["-kernel", str(config.kernel)]
    if config.initrd is not None:
        argv += ["-initrd", str(config.initrd)]
    if config.cmdline is not None:
        argv += ["-append", config.cmdline]
    argv += _disk_args(config, overlays)
    argv += _nic_args(config)
    argv += config.extra_args
    return argv


def render_command_line(argv: Sequence[str]) -> str:
    """``argv`` as one shell-quoted line, for logs and for pasting into a shell."""
    return shlex.join(argv)
