"""DomainConfig -> libvirt domain XML: what aiovirt runs, in libvirt's words. Pure: no I/O.

:func:`to_libvirt_xml` writes a document that libvirt's schema accepts (``virt-xml-validate``)
and that :func:`aiovirt.config.from_libvirt_xml` reads back to an equal config. The mapping:

=====================  ==============================================================================
DomainConfig           domain XML
=====================  ==============================================================================
accel                  ``<domain type=...>``: tcg -> ``qemu``, kvm -> ``kvm``, auto -> ``kvm`` (below)
name, uuid             ``<name>``, ``<uuid>`` (none when the config has no UUID yet)
memory_mib, vcpus      ``<memory unit='MiB'>``, ``<vcpu placement='static'>``
machine                ``<os><type arch='x86_64' machine=...>hvm</type>``: QEMU's alias (pc, q35,
                       microvm, none), which libvirt resolves to the emulator's newest version
kernel/initrd/cmdline  ``<os><kernel>``, ``<initrd>``, ``<cmdline>``
disks                  ``<disk type='file' device='disk'>`` with ``<driver name='qemu' type=FORMAT
                       cache=MODE>``, ``<source file>``, ``<target dev bus>``, ``<readonly/>``,
                       ``<transient shareBacking='yes'/>`` (its base is shared by every domain). IDE disks
                       are ``hda``..``hdd`` on pc, and ``bus='sata'`` ``sda``..``sdf`` on q35, where
                       aiovirt's ``ide`` disks sit on the ICH9 AHCI ports as libvirt's SATA disks do
nics                   ``<interface type='user'>`` with ``<mac>``, ``<model type='virtio'|'e1000'>``;
                       forwards as ``<portForward>`` (below)
console                ``<serial type='pty'>`` + ``<console type='pty'>`` (port 0)
emulator               ``<emulator>`` when it is an absolute path (libvirt wants one; a bare program
                       name is kept in aiovirt's metadata and libvirt uses its own default emulator)
extra_args             ``<qemu:commandline><qemu:arg value=.../>`` (libvirt's QEMU namespace)
=====================  ==============================================================================

And what aiovirt always runs, spelled out so that a libvirt daemon runs the same:
``<cpu>`` model qemu64 (``-cpu qemu64``), ``<features><acpi/>`` (QEMU's default; libvirt
disables ACPI without it), ``<clock offset='utc'/>``, no USB controller and no memory balloon
(``-nodefaults``), ``<audio type='none'/>`` (``-audiodev none``), and the lifecycle actions QEMU
has without ``-no-reboot``/``-no-shutdown``: poweroff destroys, reboot restarts, crash destroys
(aiovirt adds no pvpanic device, so a guest panic is never reported as a crash).

Two choices:

- ``accel='auto'`` (KVM if the host has it, else TCG) has no libvirt equivalent: a libvirt
  domain is either ``kvm`` or ``qemu`` (TCG). It is written as ``kvm`` because that is what auto
  runs wherever KVM exists, and on a host without KVM libvirt refuses to start the domain rather
  than silently running it ten times slower. An ``<aiovirt:accel>auto</aiovirt:accel>`` in
  ``<metadata>`` (libvirt keeps applications' metadata untouched) lets aiovirt read ``auto`` back.
- Port forwards: libvirt has ``<portForward>`` only for its passt backend (it refuses it for the
  default SLIRP one: "The <portForward> element can only be used with ... its 'passt' backend").
  A NIC with forwards is therefore written with ``<backend type='passt'/>``: a libvirt daemon
  forwards the same host ports to the same guest ports, through passt, whose guest gets the
  host's address instead of SLIRP's 10.0.2.15. aiovirt itself always runs SLIRP, and says so in
  a warning when it reads such an interface back. A NIC without forwards stays SLIRP. Note that
  libvirt 9.0.0 as packaged in Debian 12 refuses to parse ``<backend type='passt'/>`` ("Invalid
  value for attribute 'type' in element 'backend': 'passt'", libvirt issue 462) although its
  schema accepts it: there, a config with forwards can be validated but not defined.

XML 1.0 cannot carry most control characters (U+0001-U+001F but tab and line breaks), which
aiovirt allows in paths and arguments: such a config raises :class:`ConfigError` naming the field.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .._errors import ConfigError
from ._models import Disk, DomainConfig, Nic
from ._xml_tree import QEMU_NS

__all__ = ["AIOVIRT_NS", "DEFAULT_EMULATOR", "disk_target", "to_libvirt_xml"]

AIOVIRT_NS = "urn:aiovirt:domain:1"
"""The namespace of aiovirt's element in ``<metadata>``."""

DEFAULT_EMULATOR = "qemu-system-x86_64"
"""DomainConfig's default emulator: also the program libvirt picks when ``<emulator>`` is absent."""

ACCEL_TO_TYPE = {"tcg": "qemu", "kvm": "kvm", "auto": "kvm"}


# -- a minimal writer ------------------------------------------------------------------------
# ElementTree would need its global namespace registry for the qemu: prefix; this writer is
# small enough to own, writes libvirt's style (single quotes, two-space indent) and escapes
# tab and line breaks in attributes so that a parser reads them back unchanged.


@dataclass
class _E:
    tag: str
    attrs: dict[str, str] = field(default_factory=dict)
    children: list[_E] = field(default_factory=list)
    text: str | None = None

    def add(self, tag: str, text: str | None = None, /, **attrs: str) -> _E:
        child = _E(tag, attrs, text=text)
        self.children.append(child)
        return child


_ATTR_ESCAPES = str.maketrans(
    {"&": "&amp;", "<": "&lt;", ">": "&gt;", "'": "&apos;", "\t": "&#9;", "\n": "&#10;", "\r": "&#13;"}
)
_TEXT_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "\r": "&#13;"})


def _write(element: _E, depth: int, out: list[str]) -> None:
    pad = "  " * depth
    attrs = "".join(f" {key}='{value.translate(_ATTR_ESCAPES)}'" for key, value in element.attrs.items())
    if element.children:
        out.append(f"{pad}<{element.tag}{attrs}>\n")
        for child in element.children:
            _write(child, depth + 1, out)
        out.append(f"{pad}</{element.tag}>\n")
    elif element.text is not None:
        out.append(f"{pad}<{element.tag}{attrs}>{element.text.translate(_TEXT_ESCAPES)}</{element.tag}>\n")
    else:
        out.append(f"{pad}<{element.tag}{attrs}/>\n")


# -- checks ----------------------------------------------------------------------------------


def _xml_problem(value: str) -> str | None:
    for char in value:
        code = ord(char)
        if (code < 0x20 and char not in "\t\n\r") or code in (0xFFFE, 0xFFFF) or 0xD800 <= code <= 0xDFFF:
            return f"contains U+{code:04X}, which XML 1.0 cannot carry: this config has no libvirt XML form"
    return None


def _texts(cfg: DomainConfig) -> Iterator[tuple[str, str]]:
    yield "name", cfg.name
    for key in ("kernel", "initrd", "cmdline"):
        value = getattr(cfg, key)
        if value is not None:
            yield key, str(value)
    for i, disk in enumerate(cfg.disks):
        yield f"disks.{i}.path", str(disk.path)
    yield "emulator", cfg.emulator
    for i, arg in enumerate(cfg.extra_args):
        yield f"extra_args.{i}", arg


def _check_xml_safe(cfg: DomainConfig) -> None:
    problems = [(loc, p) for loc, value in _texts(cfg) if (p := _xml_problem(value)) is not None]
    if problems:
        shown = "; ".join(f"{loc}: {p}" for loc, p in problems)
        raise ConfigError(f"cannot write DomainConfig {cfg.name!r} as libvirt XML: {shown}", problems)


# -- the mapping -----------------------------------------------------------------------------


def disk_target(prefix: str, index: int) -> str:
    """libvirt's disk name for the ``index``-th disk (from 0) of a bus: ``vda``, ..., ``vdz``, ``vdaa``."""
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("a") + rest) + letters
    return prefix + letters


def _disk_bus(machine: str, disk: Disk) -> tuple[str, str]:
    """(libvirt bus, target prefix) for ``disk`` on ``machine``."""
    if disk.bus == "virtio":
        return "virtio", "vd"
    return ("sata", "sd") if machine == "q35" else ("ide", "hd")


def _disks(cfg: DomainConfig, devices: _E) -> None:
    counts: dict[str, int] = {}
    for disk in cfg.disks:
        bus, prefix = _disk_bus(cfg.machine, disk)
        index = counts.get(bus, 0)
        counts[bus] = index + 1
        element = devices.add("disk", type="file", device="disk")
        element.add("driver", name="qemu", type=disk.format, cache=disk.cache)
        element.add("source", file=str(disk.path))
        element.add("target", dev=disk_target(prefix, index), bus=bus)
        if disk.readonly:
            element.add("readonly")
        if disk.transient:
            element.add("transient", shareBacking="yes")


def _nic(nic: Nic, devices: _E) -> None:
    element = devices.add("interface", type="user")
    if nic.mac is not None:
        element.add("mac", address=nic.mac)
    element.add("model", type=nic.model)
    if nic.forwards:
        element.add("backend", type="passt")
    for fwd in nic.forwards:
        attrs: dict[str, str] = {"proto": fwd.protocol}
        if str(fwd.host_addr) != "0.0.0.0":  # no address: every address, as 0.0.0.0 is for QEMU
            attrs["address"] = str(fwd.host_addr)
        forward = element.add("portForward", **attrs)
        forward.add("range", start=str(fwd.host_port), to=str(fwd.guest_port))


def _metadata(cfg: DomainConfig) -> _E | None:
    entries: list[_E] = []
    if cfg.accel == "auto":
        entries.append(_E("aiovirt:accel", text="auto"))
    if not _is_absolute(cfg.emulator) and cfg.emulator != DEFAULT_EMULATOR:
        entries.append(_E("aiovirt:emulator", text=cfg.emulator))
    if not entries:
        return None
    return _E("metadata", children=[_E("aiovirt:domain", {"xmlns:aiovirt": AIOVIRT_NS}, entries)])


def _is_absolute(program: str) -> bool:
    return program.startswith("/")


def _os(cfg: DomainConfig, root: _E) -> None:
    os_element = root.add("os")
    os_element.add("type", "hvm", arch="x86_64", machine=cfg.machine)
    if cfg.kernel is not None:
        os_element.add("kernel", str(cfg.kernel))
    if cfg.initrd is not None:
        os_element.add("initrd", str(cfg.initrd))
    if cfg.cmdline is not None:
        os_element.add("cmdline", cfg.cmdline)


def _children(pairs: Iterable[tuple[str, str]]) -> list[_E]:
    return [_E(tag, text=text) for tag, text in pairs]


def to_libvirt_xml(cfg: DomainConfig) -> str:
    """The libvirt domain XML that describes what aiovirt runs for ``cfg`` (see the module doc).

    Raises :class:`ConfigError` when a path or argument holds a character XML cannot carry.
    """
    _check_xml_safe(cfg)
    system = cfg.machine != "none"
    root = _E("domain", {"type": ACCEL_TO_TYPE[cfg.accel]})
    if cfg.extra_args:
        root.attrs["xmlns:qemu"] = QEMU_NS
    root.add("name", cfg.name)
    if cfg.uuid is not None:
        root.add("uuid", str(cfg.uuid))
    metadata = _metadata(cfg)
    if metadata is not None:
        root.children.append(metadata)
    root.add("memory", str(cfg.memory_mib), unit="MiB")
    root.add("vcpu", str(cfg.vcpus), placement="static")
    _os(cfg, root)
    if system:
        root.add("features").add("acpi")
        cpu = root.add("cpu", mode="custom", match="exact", check="none")
        cpu.add("model", "qemu64", fallback="forbid")
    root.add("clock", offset="utc")
    root.children += _children(
        [("on_poweroff", "destroy"), ("on_reboot", "restart"), ("on_crash", "destroy")]
    )
    devices = root.add("devices")
    if _is_absolute(cfg.emulator):
        devices.add("emulator", cfg.emulator)
    _disks(cfg, devices)
    devices.add("controller", type="usb", index="0", model="none")
    for nic in cfg.nics:
        _nic(nic, devices)
    if cfg.console:
        devices.add("serial", type="pty").add("target", port="0")
        devices.add("console", type="pty").add("target", type="serial", port="0")
    if system:
        devices.add("audio", id="1", type="none")
    devices.add("memballoon", model="none")
    if cfg.extra_args:
        commandline = root.add("qemu:commandline")
        for arg in cfg.extra_args:
            commandline.add("qemu:arg", value=arg)
    out: list[str] = []
    _write(root, 0, out)
    return "".join(out)
