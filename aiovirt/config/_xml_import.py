"""libvirt domain XML -> DomainConfig, for the subset aiovirt runs, with nothing silently dropped.

:func:`from_libvirt_xml` takes XML as libvirt writes it (``virsh dumpxml``, inactive or live) or
as people write it, parsed safely (see ``_xml_tree``). Every element of the document ends with
one of four outcomes, recorded in :attr:`ImportedConfig.elements`:

- **mapped** into the config (name, uuid, memory, vcpu, os, disks, user-mode interfaces, serial
  console, emulator, ``qemu:commandline``);
- **accepted**: it changes nothing aiovirt runs (PCI addresses, aliases, the controllers and
  PS/2 inputs libvirt adds by itself, lifecycle actions that match aiovirt's, ``qemu64``, ...);
- **warned**: aiovirt runs something different from what it asks (a memory balloon, a CPU model,
  a graphics card, a pinned machine version, a serial port on a pty, ...); each warning names
  the element and its line;
- **error**: aiovirt cannot honour it (a host device, a bridged or libvirt network, another
  architecture, a block or network disk, a CD-ROM, UEFI firmware, ...): :class:`ConfigError`
  listing every such element with its line.

An element this module does not know at all is warned about ("not understood"), never skipped.
What aiovirt runs is described in ``_xml`` (the export side), whose output reads back unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, ip_address
from typing import Any
from uuid import UUID

from .._errors import ConfigError
from ._models import DomainConfig
from ._xml import AIOVIRT_NS
from ._xml_tree import QEMU_NS, Node, Outcome, parse_xml

__all__ = ["ElementReport", "ImportedConfig", "from_libvirt_xml"]

MAX_FORWARDS = 1024
"""The most port forwards one document may ask for (``<range>`` can name thousands of ports)."""

_MiB = 1 << 20


@dataclass(frozen=True)
class ElementReport:
    """What became of one element of an imported document."""

    path: str
    """Where it is: ``/domain/devices/disk[2]/driver``."""
    line: int
    """The line of its start tag."""
    outcome: Outcome
    """``mapped``, ``accepted``, ``warned`` or ``error`` (see the module doc)."""
    note: str = ""
    """The warning for ``warned``; for an element inside an accepted or warned one, which one."""


@dataclass(frozen=True)
class ImportedConfig:
    """A config read from a file or a document, with what the reader had to say about it."""

    config: DomainConfig
    warnings: tuple[str, ...] = ()
    """One line each: where aiovirt runs something different from what the input asks."""
    elements: tuple[ElementReport, ...] = ()
    """For a domain XML: every element of the document and its outcome, in document order."""


# -- what is accepted or refused as a whole ------------------------------------------------------

_WARN_TOP = {
    "title": "aiovirt keeps no title",
    "description": "aiovirt keeps no description",
    "genid": "aiovirt adds no VM generation ID device",
    "maxMemory": "aiovirt makes no memory hot-pluggable (no maxmem slots)",
    "memoryBacking": "aiovirt backs guest memory with ordinary anonymous memory (no hugepages)",
    "memtune": "aiovirt applies no memory tuning",
    "blkiotune": "aiovirt applies no block I/O tuning",
    "cputune": "aiovirt applies no CPU tuning or pinning",
    "numatune": "aiovirt applies no NUMA placement",
    "iothreads": "aiovirt adds no I/O threads",
    "iothreadids": "aiovirt adds no I/O threads",
    "defaultiothread": "aiovirt adds no I/O threads",
    "vcpus": "aiovirt starts every vCPU online (no per-vCPU hotplug settings)",
    "sysinfo": "aiovirt passes no SMBIOS/sysinfo tables",
    "idmap": "aiovirt maps no user IDs",
    "perf": "aiovirt enables no perf events",
    "pm": "aiovirt sets no power-management (S3/S4) policy: QEMU's defaults apply",
    "on_lockfailure": "aiovirt uses no lock manager",
    "throttlegroups": "aiovirt applies no I/O throttling",
    "bootloader": "aiovirt runs no host-side bootloader",
    "bootloader_args": "aiovirt runs no host-side bootloader",
}
_ERROR_TOP = {
    "launchSecurity": "confidential guests (SEV/TDX/PV) are not supported by aiovirt",
    "keywrap": "aiovirt runs x86_64 guests only (keywrap is for s390)",
}
_WARN_QEMU = {
    "capabilities": "libvirt's QEMU capability overrides do not apply to aiovirt",
    "deprecation": "libvirt's QEMU deprecation behaviour does not apply to aiovirt",
}

_DEVICE_WARN = {
    "sound": "aiovirt adds no sound card",
    "graphics": "aiovirt runs QEMU with -display none: no graphical console",
    "channel": "aiovirt adds no channels (no guest agent or spice channel)",
    "rng": "aiovirt adds no random number generator device",
    "watchdog": "aiovirt adds no watchdog",
    "tpm": "aiovirt adds no TPM",
    "panic": "aiovirt adds no panic device",
    "smartcard": "aiovirt adds no smartcard",
    "hub": "aiovirt adds no USB hub",
    "redirdev": "aiovirt adds no USB redirection",
    "redirfilter": "aiovirt adds no USB redirection",
    "shmem": "aiovirt adds no shared memory device",
    "iommu": "aiovirt adds no IOMMU",
    "vsock": "aiovirt adds no vsock device",
    "crypto": "aiovirt adds no crypto device",
    "pstore": "aiovirt adds no pstore device",
    "parallel": "aiovirt adds no parallel port",
    "lease": "aiovirt uses no lock manager leases",
    "nvram": "aiovirt adds no nvram device",
}
_DEVICE_ERROR = {
    "hostdev": "aiovirt cannot pass host devices through",
    "filesystem": "aiovirt cannot share host directories with the guest",
    "memory": "aiovirt cannot add memory devices (DIMM, NVDIMM, virtio-mem)",
}

# libvirt adds these to any domain by itself; aiovirt (-nodefaults) adds none, and no device it
# runs needs them.
_QUIET_CONTROLLERS = {"usb", "pci", "ide", "sata", "fdc"}

# Features a live XML lists for the qemu64 model under TCG: qemu64 has them already.
_QEMU64_IMPLIED = {"hypervisor", "lahf_lm"}

# What a domain has at most one of (libvirt reads the first).
_SINGLE = {
    "name", "uuid", "memory", "currentMemory", "vcpu", "os", "features", "cpu", "clock",
    "on_poweroff", "on_reboot", "on_crash", "devices", "metadata",
}  # fmt: skip

_DISK_WARN = {"shareable", "serial", "wwn", "vendor", "product", "geometry", "blockio", "iotune", "boot"}
_INTERFACE_WARN = {"mtu", "boot", "rom", "driver", "bandwidth", "filterref", "coalesce", "tune", "acpi"}

_DISK_PREFIX_BUS = {"vd": "virtio", "hd": "ide", "sd": "scsi", "xvd": "xen", "ubd": "uml", "fd": "fdc"}

_UNIT_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}


def _scale(value: str, unit: str) -> int | None:
    """libvirt's ``virScaleInteger``: ``b``/``bytes``; ``k``/``KiB`` are 1024, ``KB`` is 1000."""
    if not re.fullmatch(r"[0-9]{1,20}", value):  # more digits than any size (and than int() takes)
        return None
    number = int(value)
    lowered = unit.lower()
    if lowered in ("b", "byte", "bytes"):
        return number
    if not lowered or lowered[0] not in _UNIT_POWERS or lowered[1:] not in ("", "b", "ib"):
        return None
    base = 1000 if lowered[1:] == "b" else 1024
    return number * base ** _UNIT_POWERS[lowered[0]]  # type: ignore[no-any-return]


def _short(value: object) -> str:
    """``repr(value)``, cut short: values come from untrusted documents and messages are one line."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _machine(value: str) -> tuple[str, str | None] | None:
    """(aiovirt machine, warning or None) for libvirt's machine name, or None if unknown."""
    if value in ("pc", "q35", "microvm", "none"):
        return value, None
    for pattern, alias in ((r"pc-i440fx-(.+)|pc-([0-9].*)", "pc"), (r"pc-q35-(.+)", "q35")):
        match = re.fullmatch(pattern, value)
        if match:
            version = next(g for g in match.groups() if g is not None)
            same = f"QEMU {version}" if re.fullmatch(r"[0-9.]+", version) else "that version"
            return alias, (
                f"aiovirt runs machine {_short(alias)}, the emulator's newest version of it: "
                f"the same as {_short(value)} only when the emulator is {same}"
            )
    return None


def _letters_index(letters: str) -> int | None:
    """libvirt's ``virDiskNameToIndex`` for the part after the prefix: ``a`` -> 0, ``aa`` -> 26."""
    if not letters or not letters.isascii() or not letters.isalpha() or not letters.islower():
        return None
    index = 0
    for char in letters:
        index = index * 26 + (ord(char) - ord("a") + 1)
    return index - 1


class _Reader:
    def __init__(self, root: Node) -> None:
        self.root = root
        self.warnings: list[tuple[int, str]] = []  # (line, text): reported in document order
        self.errors: list[tuple[str, str]] = []
        self.data: dict[str, Any] = {}
        self.where: dict[str, Node] = {}
        self.machine = "pc"
        self.meta_accel: tuple[Node, str] | None = None
        self.meta_emulator: tuple[Node, str] | None = None

    # -- outcomes ------------------------------------------------------------------------------

    def _set(self, node: Node, outcome: Outcome, whole: bool, note: str = "") -> None:
        node.outcome = outcome
        node.covers_children = whole
        node.note = note

    def mapped(self, node: Node) -> None:
        self._set(node, "mapped", whole=False)

    def accept(self, node: Node, *, whole: bool = True) -> None:
        self._set(node, "accepted", whole)

    def warn(self, node: Node, message: str, *, whole: bool = True) -> None:
        self._set(node, "warned", whole, message)
        self.warnings.append((node.line, f"line {node.line}: {node.tag}: {message}"))

    def note(self, node: Node, message: str) -> None:
        """A warning about a mapped element's detail (an attribute): the element stays mapped."""
        self.warnings.append((node.line, f"line {node.line}: {node.tag}: {message}"))

    def error(self, node: Node, message: str) -> None:
        self._set(node, "error", True, message)
        self.errors.append((node.path, f"line {node.line}: {node.tag}: {message}"))

    def attrs(self, node: Node, known: set[str]) -> None:
        """Warn about every attribute of ``node`` that is not in ``known``."""
        for name in node.attrs:
            if name not in known:
                value = node.attrs[name]
                self.note(node, f"attribute {name}={_short(value)} is not understood by aiovirt: ignored")

    def text(self, node: Node) -> str:
        return node.text.strip()

    def put(self, key: str, value: Any, node: Node) -> None:
        self.data[key] = value
        self.where[key] = node

    # -- the document --------------------------------------------------------------------------

    def read(self) -> None:
        root = self.root
        if root.ns != "" or root.name != "domain":
            self.error(root, "not a libvirt domain XML (the root element must be <domain>)")
            return
        self.mapped(root)
        self.data["console"] = False  # no <serial> or <console>: no serial port
        self._domain_attrs(root)
        for node in root.find("metadata")[:1]:
            self._metadata(node)
        os_nodes = root.find("os")
        if not os_nodes:
            self.note(root, "no <os>: libvirt needs one; aiovirt runs an x86_64 'pc' machine")
        for node in os_nodes[:1]:
            self._os(node)
        handlers: dict[str, Callable[[Node], None]] = {
            "name": self._name,
            "uuid": self._uuid,
            "memory": self._memory,
            "currentMemory": self._current_memory,
            "vcpu": self._vcpu,
            "features": self._features,
            "cpu": self._cpu,
            "clock": self._clock,
            "on_poweroff": self._lifecycle,
            "on_reboot": self._lifecycle,
            "on_crash": self._lifecycle,
            "devices": self._devices,
            "resource": self._resource,
            "seclabel": self._seclabel,
        }
        seen: set[str] = set()
        for node in root.children:
            if node.ns == "" and node.name in _SINGLE:
                if node.name in seen:
                    self.warn(node, f"a second <{node.name}>: libvirt reads the first one; ignored")
                    continue
                seen.add(node.name)
            if node.outcome is not None:
                continue
            if node.ns == QEMU_NS:
                self._qemu(node)
            elif node.ns:
                self.warn(node, f"element in namespace {_short(node.ns)} outside <metadata>: ignored")
            elif node.name in handlers:
                handlers[node.name](node)
            elif node.name in _WARN_TOP:
                self.warn(node, _WARN_TOP[node.name])
            elif node.name in _ERROR_TOP:
                self.error(node, _ERROR_TOP[node.name])
        if "name" not in self.data:
            self.errors.append(("/domain/name", "no <name>: a domain needs one"))
        if "memory_mib" not in self.data:
            self.errors.append(("/domain/memory", "no <memory>: a domain needs its memory size"))
        self._accel()
        self._emulator_default()
        self._acpi()
        self._leftovers()

    def _domain_attrs(self, root: Node) -> None:
        self.attrs(root, {"type", "id"})
        kind = root.attrs.get("type")
        if kind not in ("qemu", "kvm"):
            self.errors.append(
                (
                    root.path,
                    f"line {root.line}: {root.tag}: aiovirt runs QEMU guests: the domain type must be "
                    f"'qemu' (TCG) or 'kvm', not {_short(kind)}",
                )
            )
            root.outcome, root.note = "error", "domain type"

    def _accel(self) -> None:
        kind = self.root.attrs.get("type")
        accel = {"qemu": "tcg", "kvm": "kvm"}.get(kind or "")
        if accel is None:
            return
        if self.meta_accel is not None:
            node, value = self.meta_accel
            if value == "auto" and kind == "kvm":
                accel = "auto"  # written so by aiovirt: KVM where it exists, else TCG
            elif {"tcg": "qemu", "kvm": "kvm"}.get(value) != kind:
                self.warn(node, f"accel {_short(value)} ignored: the domain type {_short(kind)} decides")
        self.put("accel", accel, self.root)

    def _leftovers(self) -> None:
        def visit(node: Node) -> None:
            if node.outcome is None:
                self.warn(node, "not understood by aiovirt: ignored")
            if node.covers_children:
                return
            for child in node.children:
                visit(child)

        visit(self.root)

    # -- identity and sizes --------------------------------------------------------------------

    def _name(self, node: Node) -> None:
        self.mapped(node)
        self.put("name", node.text, node)

    def _uuid(self, node: Node) -> None:
        try:
            value = UUID(self.text(node))
        except ValueError:
            self.error(node, f"{_short(self.text(node))} is not a UUID")
            return
        self.mapped(node)
        self.put("uuid", value, node)

    def _bytes(self, node: Node) -> int | None:
        self.attrs(node, {"unit", "dumpCore"} if node.name == "memory" else {"unit"})
        unit = node.attrs.get("unit", "KiB")
        value = _scale(self.text(node), unit)
        if value is None:
            self.error(node, f"{_short(self.text(node))} {_short(unit)} is not a memory size")
        return value

    def _memory(self, node: Node) -> None:
        size = self._bytes(node)
        if size is None:
            return
        self.mapped(node)
        mib = -(-size // _MiB)
        if mib * _MiB != size:
            self.note(node, f"{size} bytes is not a whole number of MiB: aiovirt gives the guest {mib} MiB")
        if "dumpCore" in node.attrs:
            self.note(node, "dumpCore: aiovirt does not exclude guest memory from core dumps")
        self.put("memory_mib", mib, node)

    def _current_memory(self, node: Node) -> None:
        current = self._bytes(node)
        memory = self.root.find("memory")
        total = self._peek_bytes(memory[0]) if memory else None
        if current is None:
            return
        if total is not None and current < total:
            self.warn(
                node,
                "less than <memory>: aiovirt has no balloon to hold memory back; "
                "the guest gets all of <memory>",
            )
        else:
            self.accept(node)

    def _peek_bytes(self, node: Node) -> int | None:
        return _scale(self.text(node), node.attrs.get("unit", "KiB"))

    def _vcpu(self, node: Node) -> None:
        self.attrs(node, {"placement", "cpuset", "current"})
        text = self.text(node)
        if not re.fullmatch(r"[0-9]{1,9}", text):
            self.error(node, f"{_short(text)} is not a number of vCPUs")
            return
        self.mapped(node)
        self.put("vcpus", int(text), node)
        if node.attrs.get("placement", "static") != "static":
            self.note(node, f"placement {_short(node.attrs['placement'])}: aiovirt places no vCPUs")
        if "cpuset" in node.attrs:
            self.note(node, "cpuset: aiovirt pins no vCPUs to host CPUs")
        current = node.attrs.get("current")
        if current is not None and current.strip() != text:
            self.note(node, f"current={_short(current)}: aiovirt starts all {text} vCPUs online")

    # -- os, features, cpu, clock, lifecycle -----------------------------------------------------

    def _os(self, node: Node) -> None:
        self.mapped(node)
        self.attrs(node, {"firmware"})
        firmware = node.attrs.get("firmware")
        if firmware not in (None, "bios"):
            self.error(node, f"firmware {_short(firmware)}: aiovirt boots QEMU's default BIOS (SeaBIOS)")
        booted = False
        for child in node.children:
            name = child.name if child.ns == "" else None
            if name == "type":
                self._os_type(child)
            elif name in ("kernel", "initrd"):
                self.mapped(child)
                self.put(name, child.text, child)
            elif name == "cmdline":
                self.mapped(child)
                self.put("cmdline", child.text, child)
            elif name == "boot":
                dev = child.attrs.get("dev")
                if dev == "hd" and not booted:
                    self.accept(child)
                else:
                    message = (
                        f"boot device {_short(dev)}: aiovirt sets no boot order (the BIOS tries the disks)"
                    )
                    self.warn(child, message)
                booted = True
            elif name in ("loader", "nvram"):
                self.error(child, "UEFI or other firmware: aiovirt boots QEMU's default BIOS (SeaBIOS)")
            elif name in ("bootmenu", "bios", "smbios", "acpi", "initarg", "initenv", "init"):
                self.warn(child, "aiovirt passes no such boot option: QEMU's default applies")
            elif name == "dtb":
                self.error(child, "aiovirt loads no device tree")

    def _os_type(self, node: Node) -> None:
        self.attrs(node, {"arch", "machine"})
        if self.text(node) != "hvm":
            self.error(node, f"os type {_short(self.text(node))}: aiovirt runs full-system guests (hvm) only")
            return
        arch = node.attrs.get("arch", "x86_64")
        if arch != "x86_64":
            self.error(node, f"architecture {_short(arch)}: aiovirt runs x86_64 guests only")
            return
        value = node.attrs.get("machine", "pc")
        found = _machine(value)
        if found is None:
            self.error(node, f"machine {_short(value)}: aiovirt runs pc (i440FX), q35, microvm or none")
            return
        self.machine, warning = found
        self.mapped(node)
        self.put("machine", self.machine, node)
        if warning is not None:
            self.note(node, warning)

    def _features(self, node: Node) -> None:
        self.accept(node, whole=False)
        self.attrs(node, set())
        for child in node.children:
            if child.name == "acpi" and not child.children:
                self.accept(child)  # aiovirt always runs ACPI (see _acpi for its absence)
            elif child.name in ("apic", "pae") and not child.attrs and not child.children:
                self.accept(child)  # x86_64 guests on pc/q35 have both under QEMU's defaults
            else:
                self.warn(child, "aiovirt sets no such feature: QEMU's default applies")

    def _acpi(self) -> None:
        if self.machine == "none":
            return
        features = self.root.find("features")
        if not any(f.find("acpi") for f in features):
            where = features[0] if features else self.root
            self.note(
                where,
                "no <acpi/>: libvirt runs such a guest without ACPI; aiovirt runs it with ACPI "
                "(its shutdown presses the ACPI power button)",
            )

    def _cpu(self, node: Node) -> None:
        if self.machine == "none":
            self.accept(node)  # machine none runs no guest CPU: aiovirt passes no -cpu
            return
        mode = node.attrs.get("mode", "custom")
        if mode != "custom":
            self.warn(node, f"mode {_short(mode)}: aiovirt runs the qemu64 CPU model, not the host's")
            return
        self.accept(node, whole=False)
        self.attrs(node, {"mode", "match", "check", "migratable"})
        for child in node.children:
            if child.name == "model" and not child.children:
                model = self.text(child)
                if model == "qemu64":
                    self.accept(child)
                    self.attrs(child, {"fallback"})
                else:
                    self.warn(child, f"CPU model {_short(model)}: aiovirt runs qemu64")
            elif (
                child.name == "feature"
                and child.attrs.get("name") in _QEMU64_IMPLIED
                and child.attrs.get("policy") == "require"
            ):
                self.accept(child)
            elif child.name == "feature":
                feature, policy = (
                    _short(child.attrs.get("name")),
                    _short(child.attrs.get("policy", "require")),
                )
                self.warn(child, f"CPU feature {feature} ({policy}): aiovirt runs qemu64 unchanged")
            else:
                self.warn(child, "aiovirt runs qemu64 with QEMU's default topology and no extra CPU settings")

    def _clock(self, node: Node) -> None:
        offset = node.attrs.get("offset", "utc")
        if offset == "utc":
            self.accept(node, whole=False)  # QEMU's RTC runs in UTC by default
            self.attrs(node, {"offset"})
        else:
            self.warn(node, f"offset {_short(offset)}: aiovirt runs the guest's clock in UTC", whole=False)
        for timer in node.children:
            name = timer.attrs.get("name")
            self.warn(timer, f"timer {_short(name)}: aiovirt sets no timers: QEMU's defaults apply")

    _LIFECYCLE = {
        "on_poweroff": ("destroy", "aiovirt ends the domain when the guest powers off"),
        "on_reboot": ("restart", "aiovirt lets QEMU reset the guest when it reboots"),
        "on_crash": ("destroy", "aiovirt has no crash action (it adds no pvpanic device)"),
    }

    def _lifecycle(self, node: Node) -> None:
        expected, what = self._LIFECYCLE[node.name]
        value = self.text(node)
        if value == expected:
            self.accept(node)
        else:
            self.warn(node, f"{_short(value)}: {what}")

    def _resource(self, node: Node) -> None:
        partitions = [self.text(p) for p in node.find("partition")]
        if partitions == ["/machine"] and len(node.children) == 1:
            self.accept(node)  # libvirt's default cgroup partition
        else:
            self.warn(node, "aiovirt places QEMU in no cgroup partition of its own")

    def _seclabel(self, node: Node) -> None:
        if node.attrs.get("type") == "none":
            self.accept(node)
        else:
            self.warn(node, "aiovirt applies no security label: QEMU runs as the calling user, unconfined")

    # -- metadata and the qemu namespace -------------------------------------------------------

    def _metadata(self, node: Node) -> None:
        self.mapped(node)
        for child in node.children:
            if child.ns == AIOVIRT_NS and child.name == "domain":
                self.mapped(child)
                for entry in child.children:
                    accel = self.text(entry)
                    if entry.ns == AIOVIRT_NS and entry.name == "accel" and accel in ("auto", "kvm", "tcg"):
                        self.mapped(entry)
                        self.meta_accel = (entry, self.text(entry))
                    elif entry.ns == AIOVIRT_NS and entry.name == "emulator":
                        self.mapped(entry)
                        self.meta_emulator = (entry, entry.text)
            else:
                self.warn(
                    child, f"metadata in namespace {_short(child.ns or '(none)')}: aiovirt does not keep it"
                )

    def _emulator_default(self) -> None:
        if self.meta_emulator is None:
            return
        node, value = self.meta_emulator
        if "emulator" in self.data:
            self.warn(node, "ignored: <devices><emulator> names the emulator")
        else:
            self.put("emulator", value, node)

    def _qemu(self, node: Node) -> None:
        if node.name == "commandline":
            self.mapped(node)
            args: list[str] = []
            for child in node.children:
                if child.ns == QEMU_NS and child.name == "arg" and "value" in child.attrs:
                    self.mapped(child)
                    self.where[f"extra_args.{len(args)}"] = child
                    args.append(child.attrs["value"])
                elif child.ns == QEMU_NS and child.name == "env":
                    self.error(child, "aiovirt sets no environment variables for QEMU")
            self.data["extra_args"] = [*self.data.get("extra_args", []), *args]
        elif node.name in _WARN_QEMU:
            self.warn(node, _WARN_QEMU[node.name])
        else:
            self.error(node, "aiovirt cannot apply libvirt's QEMU overrides")

    # -- devices -------------------------------------------------------------------------------

    def _devices(self, node: Node) -> None:
        self.mapped(node)
        disks: list[dict[str, Any]] = []
        nics: list[dict[str, Any]] = []
        serials = [c for c in node.children if c.ns == "" and c.name == "serial"]
        for child in node.children:
            name = child.name if child.ns == "" else ""
            if name == "emulator" and "emulator" not in self.data:
                self.mapped(child)
                self.put("emulator", child.text, child)
            elif name == "emulator":
                self.warn(child, "a second <emulator>: libvirt reads the first one; ignored")
            elif name == "disk":
                self._disk(child, disks)
            elif name == "interface":
                self._interface(child, nics)
            elif name == "controller":
                self._controller(child)
            elif name == "serial":
                self._serial(child, first=child is serials[0])
            elif name == "console":
                self._console(child, has_serial=bool(serials))
            elif name == "input":
                self._input(child)
            elif name == "audio":
                if child.attrs.get("type") == "none":
                    self.accept(child)  # aiovirt passes -audiodev none, as libvirt does
                else:
                    self.warn(child, "aiovirt passes -audiodev none: no host audio backend")
            elif name == "video":
                models = [m.attrs.get("type") for m in child.find("model")]
                if models == ["none"]:
                    self.accept(child)
                else:
                    self.warn(child, "aiovirt adds no video card")
            elif name == "memballoon":
                if child.attrs.get("model") == "none":
                    self.accept(child)
                else:
                    self.warn(child, "aiovirt adds no memory balloon: the guest always has all of its memory")
            elif name in _DEVICE_WARN:
                self.warn(child, _DEVICE_WARN[name])
            elif name in _DEVICE_ERROR:
                self.error(child, _DEVICE_ERROR[name])
        self.data["disks"] = disks
        self.data["nics"] = nics
        consoles = [c for c in node.children if c.ns == "" and c.name == "console" and c.outcome != "warned"]
        self.data["console"] = bool(serials or consoles)

    def _controller(self, node: Node) -> None:
        kind = node.attrs.get("type")
        if kind in _QUIET_CONTROLLERS:
            self.accept(node)
        else:
            self.warn(node, f"aiovirt adds no {kind} controller")

    def _input(self, node: Node) -> None:
        kind, bus = node.attrs.get("type"), node.attrs.get("bus", "ps2")
        if kind in ("mouse", "keyboard") and bus == "ps2":
            self.accept(node)  # the PS/2 controller is part of the pc and q35 machines
        else:
            self.warn(node, f"aiovirt adds no {kind} ({bus}) input device")

    # disks

    def _disk(self, node: Node, disks: list[dict[str, Any]]) -> None:
        kind = node.attrs.get("type", "file")
        device = node.attrs.get("device", "disk")
        if kind != "file":
            self.error(node, f"disk type {_short(kind)}: aiovirt attaches image files only (type='file')")
            return
        if device != "disk":
            self.error(node, f"device {_short(device)}: aiovirt attaches hard disks only")
            return
        self.mapped(node)
        self.attrs(node, {"type", "device"})
        disk: dict[str, Any] = {}
        bus: str | None = None
        target: Node | None = None
        for child in node.children:
            name = child.name if child.ns == "" else ""
            if name == "driver":
                self._disk_driver(child, disk)
            elif name == "source":
                if "file" not in child.attrs:
                    self.error(child, "no file: aiovirt cannot attach an empty drive")
                    continue
                self.mapped(child)
                self.attrs(child, {"file", "index"})
                if "startupPolicy" in child.attrs:
                    self.note(child, "startupPolicy: aiovirt fails to start when an image is missing")
                disk["path"] = child.attrs["file"]
            elif name == "target":
                target = child
                bus = self._disk_target(child)
                if bus is None:
                    return
            elif name == "readonly":
                self.mapped(child)
                disk["readonly"] = True
            elif name in ("address", "alias", "backingStore"):
                self.accept(child)  # where libvirt put it; the backing chain QEMU reads from the image
            elif name == "transient":
                if child.attrs.get("shareBacking") != "yes":
                    self.error(
                        child,
                        "a transient disk whose base is not shared: aiovirt's transient disks always "
                        "share their base image with other domains (<transient shareBacking='yes'/>)",
                    )
                    continue
                self.mapped(child)
                self.attrs(child, {"shareBacking"})
                disk["transient"] = True
            elif name == "encryption":
                self.error(child, "aiovirt cannot open encrypted images")
            elif name in _DISK_WARN:
                self.warn(child, "aiovirt does not apply this disk setting")
        if "path" not in disk:
            if not node.find("source"):
                self.error(node, "no <source file=...>: aiovirt needs an image file")
            return
        if target is None or bus is None:
            self.error(node, "no <target dev=... bus=...>")
            return
        disk["bus"] = bus
        self._disk_slot(node, target, bus, disks)
        self.where[f"disks.{len(disks)}"] = node
        disks.append(disk)

    def _disk_driver(self, node: Node, disk: dict[str, Any]) -> None:
        name = node.attrs.get("name", "qemu")
        if name != "qemu":
            self.error(node, f"driver {_short(name)}: aiovirt opens images with QEMU itself")
            return
        fmt = node.attrs.get("type", "raw")
        if fmt not in ("raw", "qcow2"):
            self.error(node, f"image format {_short(fmt)}: aiovirt opens raw and qcow2 images only")
            return
        self.mapped(node)
        disk["format"] = fmt
        cache = node.attrs.get("cache", "default")
        # libvirt's "default" is QEMU's default: writeback, aiovirt's default too.
        disk["cache"] = "writeback" if cache == "default" else cache
        for attr in node.attrs:
            if attr not in ("name", "type", "cache"):
                value = node.attrs[attr]
                self.note(node, f"{attr}={_short(value)}: aiovirt does not apply it (QEMU's default applies)")

    def _disk_target(self, node: Node) -> str | None:
        dev = node.attrs.get("dev", "")
        prefix = next((p for p in ("xvd", "ubd", "vd", "hd", "sd", "fd") if dev.startswith(p)), "")
        bus = node.attrs.get("bus") or _DISK_PREFIX_BUS.get(prefix)
        self.attrs(node, {"dev", "bus"})
        if bus == "virtio":
            self.mapped(node)
            return "virtio"
        if bus == "ide" or (bus == "sata" and self.machine == "q35"):
            # aiovirt's IDE disks on q35 sit on the ICH9 AHCI ports, which are libvirt's SATA.
            self.mapped(node)
            return "ide"
        if bus == "sata" and self.machine == "pc":
            self.mapped(node)
            self.note(node, "aiovirt attaches it to the machine's IDE controller, not to an AHCI (SATA) one")
            return "ide"
        self.error(node, f"bus {_short(bus)}: aiovirt attaches virtio and IDE/SATA disks only")
        return None

    def _disk_slot(self, disk: Node, target: Node, bus: str, disks: list[dict[str, Any]]) -> None:
        """Warn when an IDE/SATA disk asks for another slot than aiovirt gives it (in order)."""
        if bus != "ide":
            return
        index = sum(1 for d in disks if d["bus"] == "ide")
        dev = target.attrs.get("dev", "")
        asked = _letters_index(re.sub(r"^(hd|sd)", "", dev)) if re.match(r"(hd|sd)", dev) else None
        per_bus = 6 if self.machine == "q35" else 2
        for address in disk.find("address"):
            if address.attrs.get("type") == "drive":
                try:
                    numbers = [int(address.attrs.get(k, "0"), 0) for k in ("controller", "bus", "unit")]
                except ValueError:
                    continue
                controller, bus_number, unit = numbers
                asked = controller * 6 + unit if self.machine == "q35" else bus_number * per_bus + unit
        if asked is not None and asked != index:
            self.note(
                target,
                f"{_short(dev)} asks for IDE/SATA slot {asked}; aiovirt attaches IDE disks in order: "
                f"this is slot {index}",
            )

    # interfaces

    def _interface(self, node: Node, nics: list[dict[str, Any]]) -> None:
        kind = node.attrs.get("type")
        if kind != "user":
            self.error(node, f"interface type {_short(kind)}: aiovirt runs user-mode (SLIRP) networking only")
            return
        self.mapped(node)
        self.attrs(node, {"type"})
        nic: dict[str, Any] = {}
        forwards: list[dict[str, Any]] = []
        has_model = False
        for child in node.children:
            name = child.name if child.ns == "" else ""
            if name == "mac":
                self.mapped(child)
                self.attrs(child, {"address"})
                nic["mac"] = child.attrs.get("address")
            elif name == "model":
                has_model = True
                model = child.attrs.get("type")
                if model in ("virtio", "e1000"):
                    self.mapped(child)
                    nic["model"] = model
                else:
                    self.error(child, f"model {_short(model)}: aiovirt emulates virtio and e1000 cards only")
            elif name == "backend":
                if child.attrs.get("type", "default") == "default" and len(child.attrs) <= 1:
                    self.accept(child)
                else:
                    self.warn(
                        child,
                        "aiovirt runs QEMU's built-in SLIRP, not passt: the guest gets 10.0.2.15, not the "
                        "host's address (port forwards are kept)",
                    )
            elif name == "portForward":
                self._port_forward(child, forwards, len(nics))
            elif name == "link":
                if child.attrs.get("state", "up") == "up":
                    self.accept(child)
                else:
                    self.warn(child, "aiovirt starts every card with its link up")
            elif name in ("address", "alias", "target"):
                self.accept(child)  # where libvirt put it; a host-side name user networking has no use for
            elif name in ("ip", "route"):
                self.warn(child, "aiovirt's SLIRP network is always 10.0.2.0/24 (the guest is 10.0.2.15)")
            elif name in _INTERFACE_WARN:
                self.warn(child, "aiovirt does not apply this interface setting")
        if not has_model:
            self.note(node, "no <model>: libvirt's default is rtl8139; aiovirt adds a virtio card")
        if forwards:
            nic["forwards"] = forwards
        self.where[f"nics.{len(nics)}"] = node
        nics.append(nic)

    def _port_forward(self, node: Node, forwards: list[dict[str, Any]], nic: int) -> None:
        proto = node.attrs.get("proto")
        if proto not in ("tcp", "udp"):
            self.error(node, f"proto {_short(proto)}: aiovirt forwards tcp and udp only")
            return
        if "dev" in node.attrs:
            self.error(node, "dev: aiovirt cannot bind a forward to a host interface")
            return
        address = node.attrs.get("address", "0.0.0.0")  # none: every address, as 0.0.0.0 is for QEMU
        try:
            host_addr = ip_address(address)
        except ValueError:
            self.error(node, f"address {_short(address)} is not an IP address")
            return
        if not isinstance(host_addr, IPv4Address):
            self.error(node, f"address {_short(address)}: aiovirt forwards IPv4 host addresses only")
            return
        self.mapped(node)
        self.attrs(node, {"proto", "address"})
        ranges: list[tuple[int, int, int | None]] = []
        excluded: set[int] = set()
        for child in node.children:
            if child.name != "range" or child.ns:
                continue
            try:
                start = int(child.attrs["start"])
                end = int(child.attrs.get("end", start))
                to = int(child.attrs["to"]) if "to" in child.attrs else None
            except (KeyError, ValueError):
                self.error(child, "start, end and to must be port numbers (start is required)")
                continue
            if end < start or (to is not None and to + (end - start) > 65535):
                self.error(child, f"ports {start}-{end} to {to}: not a range of ports")
                continue
            if end - start >= MAX_FORWARDS:
                self.error(child, f"{end - start + 1} ports: aiovirt forwards at most {MAX_FORWARDS}")
                continue
            self.mapped(child)
            self.attrs(child, {"start", "end", "to", "exclude"})
            if child.attrs.get("exclude") == "yes":
                excluded.update(range(start, end + 1))
            else:
                ranges.append((start, end, to))
        for start, end, to in ranges:
            for port in range(start, end + 1):
                if port in excluded:
                    continue
                if len(forwards) >= MAX_FORWARDS:
                    self.error(node, f"more than {MAX_FORWARDS} forwarded ports")
                    return
                guest = port if to is None else to + (port - start)
                self.where[f"nics.{nic}.forwards.{len(forwards)}"] = node
                forwards.append(
                    {"protocol": proto, "host_addr": str(host_addr), "host_port": port, "guest_port": guest}
                )

    # serial ports and consoles

    def _serial(self, node: Node, *, first: bool) -> None:
        if not first:
            self.warn(node, "aiovirt gives the guest one serial port (the first one)")
            return
        kind = node.attrs.get("type", "pty")
        if kind == "pty":
            self.mapped(node)
        else:
            self.warn(
                node,
                f"type {_short(kind)}: aiovirt writes the first serial port to the domain's console log "
                "(Domain.console_path)",
                whole=False,
            )
        self._serial_children(node)

    def _serial_children(self, node: Node) -> None:
        for child in node.children:
            name = child.name if child.ns == "" else ""
            if name == "target":
                kind, port = child.attrs.get("type", "isa-serial"), child.attrs.get("port", "0")
                models = [m.attrs.get("name") for m in child.find("model")]
                if kind in ("isa-serial", "serial") and port == "0" and models in ([], ["isa-serial"]):
                    self.accept(child)
                else:
                    self.warn(child, "aiovirt gives the guest an ISA serial port at COM1")
            elif name in ("source", "alias", "address", "protocol"):
                self.accept(child)  # the host side, which aiovirt replaces by the console log
            elif name == "log":
                self.warn(child, "aiovirt logs the console to Domain.console_path only")

    def _console(self, node: Node, *, has_serial: bool) -> None:
        target = node.find("target")
        kind = target[0].attrs.get("type", "serial") if target else "serial"
        if kind != "serial":
            self.warn(node, f"aiovirt has no {kind} console (the console is the first serial port)")
        elif has_serial:
            self.accept(node)  # libvirt's second name for the first serial port
        else:
            self._serial(node, first=True)


def from_libvirt_xml(text: str | bytes) -> ImportedConfig:
    """Read a libvirt domain XML into a :class:`DomainConfig` (see the module doc for the rules).

    Raises :class:`ConfigError` for unsafe or malformed XML, for what aiovirt cannot honour
    (every such element, with its line), and for values the config refuses (naming the element
    and the config field).
    """
    root = parse_xml(text)
    reader = _Reader(root)
    reader.read()
    if reader.errors:
        raise _failure([message for _, message in reader.errors], reader.errors)
    try:
        config = DomainConfig(**reader.data)
    except ConfigError as exc:
        problems = [(loc, _locate(reader, loc, message)) for loc, message in exc.errors]
        raise _failure([message for _, message in problems], problems) from None
    warnings = tuple(text for _, text in sorted(reader.warnings, key=lambda item: item[0]))
    return ImportedConfig(config=config, warnings=warnings, elements=_reports(root))


def _locate(reader: _Reader, loc: str, message: str) -> str:
    parts = loc.split(".")
    for size in range(len(parts), 0, -1):
        node = reader.where.get(".".join(parts[:size]))
        if node is not None:
            return f"line {node.line}: {node.tag} ({loc}): {message}"
    return f"{loc}: {message}" if loc else message


def _failure(messages: list[str], problems: list[tuple[str, str]]) -> ConfigError:
    if len(messages) == 1:
        return ConfigError(f"invalid domain XML: {messages[0]}", problems)
    return ConfigError(f"invalid domain XML ({len(messages)} problems): " + "; ".join(messages), problems)


def _reports(root: Node) -> tuple[ElementReport, ...]:
    reports: list[ElementReport] = []

    def visit(node: Node, cover: Node | None) -> None:
        if cover is not None:
            assert cover.outcome is not None
            reports.append(ElementReport(node.path, node.line, cover.outcome, f"inside {cover.path}"))
        else:
            assert node.outcome is not None  # _leftovers gave every element an outcome
            reports.append(ElementReport(node.path, node.line, node.outcome, node.note))
            if node.covers_children:
                cover = node
        for child in node.children:
            visit(child, cover)

    visit(root, None)
    return tuple(reports)
