"""hypothesis strategies for valid DomainConfigs: every field, every machine, the cross-field rules kept."""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Any

from hypothesis import strategies as st

from aiovirt.config import Disk, DomainConfig, Nic, PortForward

names = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}", fullmatch=True)

# No control characters (XML 1.0 cannot carry most of them; line breaks are refused by the model
# anyway), no surrogates, no unassigned code points (U+FFFE and U+FFFF are among them).
text = st.text(st.characters(exclude_categories=("Cc", "Cs", "Cn")), max_size=12)
_segments = st.text(st.characters(exclude_categories=("Cc", "Cs", "Cn"), exclude_characters="/"), min_size=1)
# A "." segment would vanish in Path ("/." is "/"); libvirt's schema wants more than "/".
paths = st.lists(_segments.filter(lambda s: s != "."), min_size=1, max_size=3).map(
    lambda parts: "/" + "/".join(parts)
)

_macs = (
    st.lists(st.integers(0, 255), min_size=6, max_size=6)
    .map(lambda octets: ":".join(f"{b:02x}" for b in [octets[0] & 0xFE, *octets[1:]]))
    .filter(lambda mac: mac != "00:00:00:00:00:00")
)


@st.composite
def domain_configs(draw: st.DrawFn, *, forwards: bool = True) -> DomainConfig:
    """A valid DomainConfig. ``forwards=False`` gives NICs no port forwards."""
    machine = draw(st.sampled_from(["pc", "q35", "microvm", "none"]))
    fields: dict[str, Any] = {
        "name": draw(names),
        "uuid": draw(st.none() | st.uuids()),
        "memory_mib": draw(st.integers(1, 1 << 22)),
        "machine": machine,
        "accel": draw(st.sampled_from(["tcg", "kvm", "auto"])),
        "console": draw(st.booleans()),
        "emulator": draw(
            st.sampled_from(["qemu-system-x86_64", "kvm", "/usr/bin/qemu-system-x86_64"]) | paths
        ),
        "extra_args": draw(st.lists(text, max_size=3)),
    }
    if machine == "none":
        return DomainConfig(**fields)
    fields["vcpus"] = draw(st.integers(1, 255))
    if draw(st.booleans()):
        fields["kernel"] = draw(paths)
        fields["initrd"] = draw(st.none() | paths)
        fields["cmdline"] = draw(st.none() | text)
    ide_slots = {"pc": 4, "q35": 6}.get(machine, 0)
    disks: list[Disk] = []
    for i in range(draw(st.integers(0, 4))):
        ide = ide_slots > sum(d.bus == "ide" for d in disks) and draw(st.booleans())
        disks.append(
            Disk(
                path=f"{draw(paths)}-{i}",  # distinct: a writable image can be used once
                format=draw(st.sampled_from(["raw", "qcow2"])),
                bus="ide" if ide else "virtio",
                cache=draw(st.sampled_from(["none", "writeback", "writethrough", "directsync", "unsafe"])),
                readonly=False if ide else draw(st.booleans()),
            )
        )
    fields["disks"] = disks
    nic_macs = draw(st.lists(st.none() | _macs, max_size=3).filter(_distinct_macs))
    used_ports: set[tuple[str, int]] = set()
    nics: list[Nic] = []
    for mac in nic_macs:
        nic_forwards = []
        for _ in range(draw(st.integers(0, 3)) if forwards else 0):
            protocol = draw(st.sampled_from(["tcp", "udp"]))
            port = draw(st.integers(1, 65535).filter(_unused(used_ports, protocol)))
            used_ports.add((protocol, port))
            nic_forwards.append(
                PortForward(
                    protocol=protocol,
                    host_addr=IPv4Address(draw(st.sampled_from(["127.0.0.1", "0.0.0.0", "192.0.2.7"]))),
                    host_port=port,
                    guest_port=draw(st.integers(1, 65535)),
                )
            )
        model = "virtio" if machine == "microvm" else draw(st.sampled_from(["virtio", "e1000"]))
        nics.append(Nic(model=model, mac=mac, forwards=nic_forwards))
    fields["nics"] = nics
    return DomainConfig(**fields)


def _unused(used: set[tuple[str, int]], protocol: str) -> Callable[[int], bool]:
    return lambda port: (protocol, port) not in used


def _distinct_macs(macs: list[str | None]) -> bool:
    given = [m for m in macs if m is not None]
    return len(given) == len(set(given))
