"""Config files: JSON, TOML and libvirt XML read by suffix or content, errors that name the file and
the field, and dump_config's output read back to an equal config."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from uuid import UUID

import pytest
from hypothesis import HealthCheck, given, settings

from aiovirt._errors import ConfigError
from aiovirt.config import (
    Disk,
    DomainConfig,
    Nic,
    PortForward,
    dump_config,
    load_config,
    parse_config,
    to_libvirt_xml,
)

from ._config_strategies import domain_configs

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DATA = Path(__file__).parent / "data"

CFG = DomainConfig(
    name="web-1",
    uuid=UUID("6f1c2b0e-8d4a-4c57-9d8e-0a1b2c3d4e5f"),
    memory_mib=256,
    machine="q35",
    accel="tcg",
    kernel="/boot/vmlinuz",
    cmdline="console=ttyS0",
    disks=[Disk(path="/img/web-1.qcow2", format="qcow2"), Disk(path="/img/seed.img", bus="ide")],
    nics=[
        Nic(mac="52:54:00:00:00:01", forwards=[PortForward(host_port=2222, guest_port=22)]),
        Nic(model="e1000"),
    ],
    extra_args=["-device", "pvpanic"],
)

TOML = """\
name = "web-1"
uuid = "6f1c2b0e-8d4a-4c57-9d8e-0a1b2c3d4e5f"
memory_mib = 256
vcpus = 1
machine = "q35"
accel = "tcg"
kernel = "/boot/vmlinuz"
cmdline = "console=ttyS0"
console = true
emulator = "qemu-system-x86_64"
extra_args = ["-device", "pvpanic"]

[[disks]]
path = "/img/web-1.qcow2"
format = "qcow2"
bus = "virtio"
cache = "writeback"
readonly = false
transient = false

[[disks]]
path = "/img/seed.img"
format = "raw"
bus = "ide"
cache = "writeback"
readonly = false
transient = false

[[nics]]
model = "virtio"
mac = "52:54:00:00:00:01"

[[nics.forwards]]
protocol = "tcp"
host_addr = "127.0.0.1"
host_port = 2222
guest_port = 22

[[nics]]
model = "e1000"
forwards = []
"""


def test_dump_toml_reads_as_people_write_it() -> None:
    assert dump_config(CFG, "toml") == TOML
    assert DomainConfig.parse(tomllib.loads(TOML)) == CFG


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("vm.toml", TOML),
        ("vm.json", dump_config(CFG, "json")),
        ("vm.xml", to_libvirt_xml(CFG)),
        # No suffix that says: the first character does.
        ("vm.conf", TOML),
        ("vm", "\n\n" + dump_config(CFG, "json")),
        ("vm.cfg", "\ufeff" + to_libvirt_xml(CFG)),
    ],
)
def test_load_by_suffix_or_content(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    result = load_config(path)
    assert result.config == CFG
    if "<domain" in text:
        # The XML names the one thing aiovirt runs differently: the passt backend of the forwards.
        assert len(result.warnings) == 1 and "not passt" in result.warnings[0]
        assert result.elements
    else:
        assert (result.warnings, result.elements) == ((), ())


def test_format_can_be_forced(tmp_path: Path) -> None:
    path = tmp_path / "vm.txt"
    path.write_text('name = "vm"\nmemory_mib = 8\n')
    assert load_config(path, format="toml").config == DomainConfig(name="vm", memory_mib=8)
    with pytest.raises(ConfigError, match=r"vm\.txt: invalid JSON at line 1, column 1"):
        load_config(path, format="json")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "vm.toml",
            'name = "vm"\nmemory_mib = 0\n',
            "vm.toml: memory_mib: Input should be greater than or equal to 1",
        ),
        (
            "vm.json",
            '{"name": "vm", "memory_mib": 0}',
            "vm.json: memory_mib: Input should be greater than or equal to 1",
        ),
        ("vm.toml", 'name = "vm"\n', "vm.toml: memory_mib: Field required"),
        (
            "vm.toml",
            'name = "vm"\nmemory_mib = 8\ncpus = 2\n',
            "vm.toml: cpus: Extra inputs are not permitted",
        ),
        (
            "vm.toml",
            'name = "vm"\nmemory_mib = 8\n[[disks]]\npath = "relative.img"\n',
            "vm.toml: disks.0.path: must be an absolute path",
        ),
        (
            "vm.toml",
            'name = "a b"\nmemory_mib = "8"\n',
            "vm.toml: name: may only contain ASCII letters, digits, '_', '.' and '-'; found ' ' (got 'a b'); "
            "memory_mib: Input should be a valid integer",
        ),
        ("vm.json", "[1, 2]", "vm.json: expected a mapping or JSON text, got list"),
        (
            "vm.json",
            '{"name": "vm",\n "memory_mib": }',
            "vm.json: invalid JSON at line 2, column 16: Expecting value",
        ),
        (
            "vm.json",
            '{"name": "a", "name": "b", "memory_mib": 8}',
            "vm.json: invalid JSON: duplicate key 'name'",
        ),
        ("vm.json", '{"name": "vm", "memory_mib": NaN}', "vm.json: invalid JSON: NaN is not a JSON number"),
        (
            "vm.toml",
            'name = "vm\nmemory_mib = 8\n',
            "vm.toml: invalid TOML: Illegal character '\\n' (at line 1, column 11)",
        ),
        (
            "vm.toml",
            'name = "vm"\nname = "x"\n',
            "vm.toml: invalid TOML: Cannot overwrite a value (at line 2, column 11)",
        ),
        (
            "vm.xml",
            "<domain type='qemu'><name>vm</name><memory>65536</memory>"
            "<devices><hostdev type='pci'/></devices></domain>",
            "vm.xml: domain XML: line 1: <hostdev type='pci'>: aiovirt cannot pass host devices through",
        ),
        ("vm.xml", "<domain>", "vm.xml: domain XML: malformed XML at line 1, column 9: no element found"),
    ],
)
def test_errors_name_the_file_and_the_field(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).replace(str(tmp_path) + os.sep, "").startswith(message)
    assert "\n" not in str(info.value)


def test_field_errors_keep_their_locations(tmp_path: Path) -> None:
    path = tmp_path / "vm.toml"
    path.write_text('name = "vm"\nmemory_mib = 0\nvcpus = 0\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [loc for loc, _ in info.value.errors] == ["memory_mib", "vcpus"]


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^.*/missing\.toml: no such file$"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match=r"is a directory, not a config file$"):
        load_config(tmp_path)
    (tmp_path / "plain").write_text("")
    with pytest.raises(ConfigError, match=r"plain/vm\.toml: cannot be read: Not a directory$"):
        load_config(tmp_path / "plain" / "vm.toml")
    (tmp_path / "latin1.toml").write_bytes(b'name = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=r"latin1\.toml: not UTF-8 text \(byte 0xe9 at offset 11\)$"):
        load_config(tmp_path / "latin1.toml")


def test_a_huge_file_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    path = tmp_path / "huge.json"
    with open(path, "wb") as f:
        f.truncate(1 << 30)  # sparse: a GiB of zeros that costs no disk
    with pytest.raises(ConfigError, match=r"huge\.json: larger than 4194304 bytes: not a config file$"):
        load_config(path)


def test_parse_config_from_text() -> None:
    assert parse_config(TOML, "toml").config == CFG
    with pytest.raises(ConfigError, match=r"^<stdin>: memory_mib: Field required$"):
        parse_config(b'name = "vm"', "toml", source="<stdin>")


def test_dump_json_is_the_stable_form() -> None:
    assert json.loads(dump_config(CFG, "json")) == CFG.model_dump(mode="json")
    assert dump_config(CFG, "xml") == to_libvirt_xml(CFG)
    with pytest.raises(ValueError, match="unknown config format 'yaml'"):
        dump_config(CFG, "yaml")  # type: ignore[arg-type]


def test_toml_strings_with_every_kind_of_character() -> None:
    tricky = "a\"b\\c\td\ne\x01f\x7fg\u00e9\U0001f600 'h'"
    cfg = DomainConfig(name="vm", memory_mib=8, extra_args=[tricky, ""], disks=[Disk(path='/x\x1by/"z"')])
    text = dump_config(cfg, "toml")
    assert DomainConfig.parse(tomllib.loads(text)) == cfg


FEW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FEW
@given(domain_configs())
def test_dump_and_parse_round_trip(cfg: DomainConfig) -> None:
    for fmt in ("toml", "json", "xml"):
        assert parse_config(dump_config(cfg, fmt), fmt).config == cfg
