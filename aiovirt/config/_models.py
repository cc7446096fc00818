"""The configuration of a domain: frozen pydantic models, validated as a whole.

Every model is frozen and rejects unknown fields; lists become tuples. Invalid input raises
:class:`aiovirt.ConfigError` listing every problem as ``(location, message)`` (see ``_base``).
Checks that need more than one field run once all fields are valid, so a config with a bad field
reports that field first and its combination problems once it is fixed.

What is deliberately *not* checked: whether files exist or are readable (QEMU reports that when
it starts, and the driver turns it into ``LaunchError``), and whether the host supports KVM.

The JSON form (``model_dump(mode="json")``) is plain and stable: fields in declaration order,
UUID and paths as strings, every field present. It is what the state directory stores, and
``DomainConfig.parse`` reads it back to an equal model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from ipaddress import IPv4Address
from pathlib import Path
from typing import Annotated, Literal
from uuid import UUID

from pydantic import AfterValidator, Field, model_validator
from typing_extensions import Self

from ._base import ConfigModel, CrossFieldErrors

__all__ = [
    "IDE_SLOTS",
    "MAX_MEMORY_MIB",
    "MAX_VCPUS",
    "SUPERVISION_BREAKING_OPTIONS",
    "CacheMode",
    "Disk",
    "DomainConfig",
    "Nic",
    "PortForward",
]

MAX_MEMORY_MIB = 1 << 22
"""The largest ``memory_mib`` accepted: 4 TiB."""

MAX_VCPUS = 255
"""The largest ``vcpus`` accepted (the ``pc`` machine's limit)."""

IDE_SLOTS = {"pc": 4, "q35": 6}
"""How many IDE disks each machine type can hold: ``pc`` has 2 buses of 2 units (``ide.0``,
``ide.1``), ``q35`` has 6 AHCI ports of 1 unit (``ide.0`` .. ``ide.5``). ``microvm`` and ``none``
have no IDE controller."""

CacheMode = Literal["none", "writeback", "writethrough", "directsync", "unsafe"]
"""QEMU's (and libvirt's) five cache modes; see ``_render.CACHE_MODES`` for what each one sets."""

_Loc = tuple[str | int, ...]

SUPERVISION_BREAKING_OPTIONS = {
    "daemonize": "QEMU would fork away from the process aiovirt supervises and outlive every destroy",
    "no-shutdown": "QEMU would not exit when the guest powers off, so the domain would never shut off",
    "uuid": "aiovirt sets -uuid itself: it is how a QEMU is recognised after a controller restart",
    "S": "aiovirt starts every QEMU paused itself and resumes it once its monitor is connected",
}
"""``extra_args`` options refused with :class:`ConfigError`, and why. Allowed on purpose:
``-pidfile`` (QEMU writes a file and stays our child), ``-runas`` and ``-chroot`` (QEMU drops
privileges or changes root after it has opened its files and the monitor aiovirt passed it; the
pidfd and signals keep working, and root can still signal it)."""


# -- checks of single values ------------------------------------------------------------------


def _check_text(value: str, *, newlines: bool = False) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL bytes")
    if not newlines and ("\n" in value or "\r" in value):
        raise ValueError("must not contain line breaks")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # A file name that is not UTF-8 decodes to lone surrogates: neither QEMU's JSON
        # parser nor the state directory's JSON can carry it.
        raise ValueError("must be valid Unicode text (a file name that is not UTF-8 can't be used)") from None
    return value


def _check_line(value: str) -> str:
    return _check_text(value)


def _check_arg(value: str) -> str:
    return _check_text(value, newlines=True)


def _check_absolute(value: Path) -> Path:
    _check_text(str(value))
    if not value.is_absolute():
        raise ValueError("must be an absolute path")
    return value


_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


def _check_name(value: str) -> str:
    if not 1 <= len(value) <= 64:
        raise ValueError(f"must be 1 to 64 characters long, not {len(value)}")
    bad = sorted(set(value) - _NAME_CHARS)
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        raise ValueError(f"may only contain ASCII letters, digits, '_', '.' and '-'; found {shown}")
    if value[0] in ".-":
        raise ValueError(f"must not start with {value[0]!r}")
    return value


_MAC_RE = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}")


def _check_mac(value: str) -> str:
    if not _MAC_RE.fullmatch(value):
        raise ValueError("must be six hexadecimal octets separated by ':', like 52:54:00:12:34:56")
    value = value.lower()
    if int(value[:2], 16) & 1:
        raise ValueError("must be a unicast address (the lowest bit of the first octet is set: multicast)")
    if value == "00:00:00:00:00:00":
        raise ValueError("must not be all zeros (QEMU would replace it with its own default)")
    return value


def _check_emulator(value: str) -> str:
    _check_text(value)
    if not value.strip():
        raise ValueError("must not be empty")
    if "/" in value and not value.startswith("/"):
        raise ValueError("must be a program name (looked up on PATH) or an absolute path")
    return value


_Port = Annotated[int, Field(strict=True, ge=1, le=65535)]
_Line = Annotated[str, Field(strict=True), AfterValidator(_check_line)]
_AbsolutePath = Annotated[Path, AfterValidator(_check_absolute)]
_Flag = Annotated[bool, Field(strict=True)]


# -- the models -------------------------------------------------------------------------------


class PortForward(ConfigModel):
    """A host port forwarded into the guest by QEMU's user-mode network (``hostfwd``)."""

    protocol: Literal["tcp", "udp"] = "tcp"
    """The transport protocol."""

    host_addr: IPv4Address = IPv4Address("127.0.0.1")
    """The host address QEMU listens on; ``0.0.0.0`` listens on every address."""

    host_port: _Port
    """The host port QEMU listens on (1-65535)."""

    guest_port: _Port
    """The guest port connections are forwarded to, on the guest's DHCP address (10.0.2.15)."""

    def overlaps(self, other: PortForward) -> bool:
        """Whether both would listen on the same host socket (``0.0.0.0`` overlaps any address)."""
        any_addr = IPv4Address("0.0.0.0")
        return (
            self.protocol == other.protocol
            and self.host_port == other.host_port
            and (self.host_addr == other.host_addr or any_addr in (self.host_addr, other.host_addr))
        )


def _forward_clashes(forwards: Sequence[tuple[_Loc, PortForward]]) -> list[tuple[_Loc, str]]:
    problems: list[tuple[_Loc, str]] = []
    for j, (loc, fwd) in enumerate(forwards):
        for earlier_loc, earlier in forwards[:j]:
            if fwd.overlaps(earlier):
                where = ".".join(str(p) for p in earlier_loc)
                problems.append(
                    (
                        loc,
                        f"host {fwd.protocol} port {fwd.host_addr}:{fwd.host_port} is already forwarded "
                        f"by {where} ({earlier.host_addr}:{earlier.host_port})",
                    )
                )
                break
    return problems


class Nic(ConfigModel):
    """A network card on QEMU's user-mode network (``-netdev user``): outbound NAT plus port forwards."""

    model: Literal["virtio", "e1000"] = "virtio"
    """The emulated card: ``virtio`` (virtio-net) or ``e1000`` (needs a PCI bus: not on microvm)."""

    mac: Annotated[str, Field(strict=True), AfterValidator(_check_mac)] | None = None
    """The MAC address, ``aa:bb:cc:dd:ee:ff`` (stored lower-case, unicast); None lets QEMU pick
    (52:54:00:12:34:56 for the first card, counting up)."""

    forwards: tuple[PortForward, ...] = ()
    """Host ports forwarded to the guest."""

    @model_validator(mode="after")
    def _check_forwards(self) -> Self:
        problems = _forward_clashes([(("forwards", k), fwd) for k, fwd in enumerate(self.forwards)])
        if problems:
            raise CrossFieldErrors(problems)
        return self


class Disk(ConfigModel):
    """A disk image attached to the guest. The file is not checked here: QEMU opens it at start.

    A *transient* disk (``transient=True``, libvirt's ``<transient shareBacking='yes'/>``) is a
    throwaway copy of ``path``: at every start the driver creates a qcow2 overlay whose backing
    image is ``path``, in its own state (``qemu:///``: ``ROOT/overlays/NAME.diskI.qcow2``); the
    guest reads the base through it and writes only to it, and it is deleted when the run ends,
    however it ends. The base is opened read-only and never written, so any number of domains
    (and transient disks) may share one base. A base that is missing, or not an image of
    ``format``, fails the start with :class:`~aiovirt.LaunchError` and leaves nothing behind.
    """

    path: _AbsolutePath
    """The image file, an absolute path (of a transient disk: its base image). Any character but
    NUL and line breaks is allowed: the file name reaches QEMU exactly (a ``,`` does not start a
    new option)."""

    format: Literal["raw", "qcow2"] = "raw"
    """The image format; never probed from the file's contents."""

    bus: Literal["virtio", "ide"] = "virtio"
    """How the guest sees it: ``virtio`` (virtio-blk) or ``ide`` (an IDE hard disk; pc and q35 only)."""

    cache: CacheMode = "writeback"
    """QEMU's cache mode (host page cache, flushes, guest-visible write cache)."""

    readonly: _Flag = False
    """Open the image read-only and show the guest a read-only disk (virtio only: QEMU cannot
    attach a read-only image to an IDE hard disk)."""

    transient: _Flag = False
    """Give the guest a throwaway copy-on-write overlay of ``path`` for each run (see above); the
    image at ``path`` is never written. Not with ``readonly`` (a read-only disk has nothing to
    throw away)."""

    @model_validator(mode="after")
    def _check_transient(self) -> Self:
        if self.transient and self.readonly:
            raise CrossFieldErrors(
                [(("transient",), "a read-only disk is never written: it needs no throwaway overlay")]
            )
        return self

    @property
    def writes_image(self) -> bool:
        """Whether the guest writes the image at ``path`` (neither read-only nor transient)."""
        return not (self.readonly or self.transient)


class DomainConfig(ConfigModel):
    """Everything needed to start a QEMU process for one domain."""

    name: Annotated[str, Field(strict=True), AfterValidator(_check_name)]
    """The domain's name: 1-64 of ``A-Z a-z 0-9 _ . -``, not starting with ``.`` or ``-``."""

    uuid: UUID | None = None
    """The domain's UUID. When absent, ``define``/``create`` generate one (UUID4), or keep the UUID of
    the domain of the same name that a ``define`` updates; the stored definition always has it.
    So ``cfg.model_copy(update={"name": "tmp-1"})`` of a config without a UUID is a new domain."""

    memory_mib: Annotated[int, Field(strict=True, ge=1, le=MAX_MEMORY_MIB)]
    """Guest RAM in MiB."""

    vcpus: Annotated[int, Field(strict=True, ge=1, le=MAX_VCPUS)] = 1
    """Number of virtual CPUs (machine ``none`` has exactly 1)."""

    machine: Literal["pc", "q35", "microvm", "none"] = "pc"
    """QEMU's machine type: ``pc`` (i440FX), ``q35``, ``microvm`` (no PCI, no IDE) or ``none``
    (no CPU running code, no devices: a QEMU process with a monitor, useful for tests)."""

    accel: Literal["tcg", "kvm", "auto"] = "auto"
    """The accelerator: ``auto`` is QEMU's own fallback (KVM, else TCG). A nested KVM may accept
    a guest and then hang it: choose ``tcg`` explicitly where that happens."""

    kernel: _AbsolutePath | None = None
    """A Linux kernel to boot directly (``-kernel``), an absolute path."""

    initrd: _AbsolutePath | None = None
    """An initial ramdisk for ``kernel`` (``-initrd``), an absolute path."""

    cmdline: _Line | None = None
    """The kernel command line for ``kernel`` (``-append``), one line."""

    disks: tuple[Disk, ...] = ()
    """Disks, in the order the guest sees them."""

    nics: tuple[Nic, ...] = ()
    """Network cards, in the order the guest sees them."""

    console: _Flag = True
    """Give the guest a serial port (ttyS0): logged to a file the driver chooses, and readable
    and writable while the domain runs as a stream (``dom.console()``)."""

    emulator: Annotated[str, Field(strict=True), AfterValidator(_check_emulator)] = "qemu-system-x86_64"
    """The QEMU program: a name looked up on PATH, or an absolute path (libvirt's ``<emulator>``)."""

    extra_args: tuple[Annotated[str, Field(strict=True), AfterValidator(_check_arg)], ...] = ()
    """Arguments appended, unchanged and last, to QEMU's command line: an explicit escape hatch
    that aiovirt does not interpret, except that options which break supervision are refused
    (:data:`SUPERVISION_BREAKING_OPTIONS`)."""

    @model_validator(mode="after")
    def _check_combination(self) -> Self:
        problems: list[tuple[_Loc, str]] = []
        for i, arg in enumerate(self.extra_args):
            why = SUPERVISION_BREAKING_OPTIONS.get(arg.lstrip("-")) if arg.startswith("-") else None
            if why is not None:
                problems.append((("extra_args", i), f"{arg} is not allowed: {why}"))
            elif arg.lstrip("-") == "action" and i + 1 < len(self.extra_args):
                actions = self.extra_args[i + 1].split(",")
                if "shutdown=pause" in actions:
                    why = SUPERVISION_BREAKING_OPTIONS["no-shutdown"]
                    problems.append((("extra_args", i + 1), f"-action shutdown=pause is not allowed: {why}"))
        if self.kernel is None:
            if self.initrd is not None:
                problems.append((("initrd",), "needs a kernel"))
            if self.cmdline is not None:
                problems.append((("cmdline",), "needs a kernel"))
        if self.machine == "none":
            if self.vcpus != 1:
                problems.append((("vcpus",), "machine 'none' has exactly 1 vCPU"))
            if self.kernel is not None:
                problems.append((("kernel",), "machine 'none' cannot boot a kernel"))
            if self.disks:
                problems.append((("disks",), "machine 'none' cannot have disks"))
            if self.nics:
                problems.append((("nics",), "machine 'none' cannot have network cards"))
        if self.machine == "microvm":
            for i, disk in enumerate(self.disks):
                if disk.bus == "ide":
                    problems.append((("disks", i, "bus"), "machine 'microvm' has no IDE controller"))
            for i, nic in enumerate(self.nics):
                if nic.model == "e1000":
                    problems.append((("nics", i, "model"), "machine 'microvm' has no PCI bus for an e1000"))
        slots = IDE_SLOTS.get(self.machine, 0)
        ide = [i for i, disk in enumerate(self.disks) if disk.bus == "ide"]
        if self.machine in IDE_SLOTS and len(ide) > slots:
            problems.append(
                (("disks", ide[slots], "bus"), f"machine {self.machine!r} has only {slots} IDE slots")
            )
        for i in ide:
            if self.disks[i].readonly:
                problems.append(
                    (("disks", i, "readonly"), "QEMU cannot attach a read-only image to an IDE hard disk")
                )
        first_use: dict[Path, int] = {}
        for j, disk in enumerate(self.disks):
            i = first_use.setdefault(disk.path, j)
            if i != j and (disk.writes_image or self.disks[i].writes_image):
                problems.append(
                    (("disks", j, "path"), f"same image as disks.{i}: a writable image can be used only once")
                )
        macs: dict[str, int] = {}
        for j, nic in enumerate(self.nics):
            if nic.mac is not None:
                i = macs.setdefault(nic.mac, j)
                if i != j:
                    problems.append((("nics", j, "mac"), f"same MAC address as nics.{i}"))
        problems += _forward_clashes(
            [
                (("nics", i, "forwards", k), fwd)
                for i, nic in enumerate(self.nics)
                for k, fwd in enumerate(nic.forwards)
            ]
        )
        if problems:
            raise CrossFieldErrors(problems)
        return self
