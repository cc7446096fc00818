"""The config models: defaults, every rule, the errors they raise, and the JSON round trip."""

from __future__ import annotations

import json
import subprocess
import sys
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any
from uuid import UUID

import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiovirt._errors import AiovirtError, ConfigError
from aiovirt.config import Disk, DomainConfig, Nic, PortForward

UUID1 = UUID("6f1c2b0e-8d4a-4c57-9d8e-0a1b2c3d4e5f")


def make(**kw: Any) -> DomainConfig:
    """A DomainConfig from the minimum plus ``kw``."""
    data: dict[str, Any] = {"name": "vm", "memory_mib": 64}
    data.update(kw)
    return DomainConfig(**data)


def problems(exc: pytest.ExceptionInfo[ConfigError]) -> dict[str, str]:
    """The ConfigError's problems as {location: message}."""
    return dict(exc.value.errors)


def invalid(**kw: Any) -> dict[str, str]:
    """The problems of a DomainConfig made from the minimum plus ``kw`` (which must be invalid)."""
    with pytest.raises(ConfigError) as exc:
        make(**kw)
    return problems(exc)


# -- valid configs -----------------------------------------------------------------------------


def test_defaults() -> None:
    cfg = DomainConfig(name="vm", memory_mib=64)
    assert cfg.vcpus == 1
    assert cfg.machine == "pc"
    assert cfg.accel == "auto"
    assert (cfg.kernel, cfg.initrd, cfg.cmdline) == (None, None, None)
    assert cfg.disks == ()
    assert cfg.nics == ()
    assert cfg.console is True
    assert cfg.emulator == "qemu-system-x86_64"
    assert cfg.extra_args == ()
    assert cfg.uuid is None  # assigned by define/create


def test_uuid_kept_through_json() -> None:
    a = make(uuid=UUID1)
    assert DomainConfig.parse(a.model_dump(mode="json")).uuid == UUID1
    assert DomainConfig.parse(a.model_dump_json()).uuid == UUID1
    assert DomainConfig.parse(make().model_dump(mode="json")).uuid is None


def test_uuid_given_as_text() -> None:
    assert make(uuid=str(UUID1)).uuid == UUID1
    assert make(uuid=UUID1).uuid == UUID1
    assert invalid(uuid="not-a-uuid").keys() == {"uuid"}


def test_sub_model_defaults() -> None:
    disk = Disk(path="/img/a.raw")
    assert (disk.path, disk.format, disk.bus, disk.cache, disk.readonly) == (
        Path("/img/a.raw"),
        "raw",
        "virtio",
        "writeback",
        False,
    )
    nic = Nic()
    assert (nic.model, nic.mac, nic.forwards) == ("virtio", None, ())
    fwd = PortForward(host_port=2222, guest_port=22)
    assert (fwd.protocol, fwd.host_addr) == ("tcp", IPv4Address("127.0.0.1"))


def test_lists_become_tuples() -> None:
    cfg = make(
        disks=[Disk(path="/a"), {"path": "/b"}],
        nics=[{"forwards": [{"host_port": 1, "guest_port": 2}]}],
        extra_args=["-rtc", "base=utc"],
    )
    assert isinstance(cfg.disks, tuple)
    assert cfg.disks == (Disk(path="/a"), Disk(path="/b"))
    assert isinstance(cfg.nics, tuple)
    assert isinstance(cfg.nics[0].forwards, tuple)
    assert cfg.extra_args == ("-rtc", "base=utc")
    hash(cfg)  # frozen all the way down


def full_config() -> DomainConfig:
    return DomainConfig(
        name="web-1",
        uuid=UUID1,
        memory_mib=256,
        vcpus=2,
        machine="q35",
        accel="tcg",
        kernel="/boot/vmlinuz,x",
        initrd=Path("/boot/initrd.gz"),
        cmdline="console=ttyS0,115200 quiet",
        disks=[
            Disk(path="/srv/img/a b,snapshot=on.qcow2", format="qcow2", cache="none"),
            Disk(path="/srv/img/seed.raw", bus="ide", cache="writethrough"),
        ],
        nics=[
            Nic(
                mac="52:54:00:AB:CD:EF",
                forwards=[
                    PortForward(host_port=2222, guest_port=22),
                    PortForward(protocol="udp", host_addr="0.0.0.0", host_port=5353, guest_port=53),
                ],
            ),
            Nic(model="e1000"),
        ],
        console=False,
        emulator="/usr/bin/qemu-system-x86_64",
        extra_args=["-rtc", "base=utc"],
    )


FULL_JSON = {
    "name": "web-1",
    "uuid": "6f1c2b0e-8d4a-4c57-9d8e-0a1b2c3d4e5f",
    "memory_mib": 256,
    "vcpus": 2,
    "machine": "q35",
    "accel": "tcg",
    "kernel": "/boot/vmlinuz,x",
    "initrd": "/boot/initrd.gz",
    "cmdline": "console=ttyS0,115200 quiet",
    "disks": [
        {
            "path": "/srv/img/a b,snapshot=on.qcow2",
            "format": "qcow2",
            "bus": "virtio",
            "cache": "none",
            "readonly": False,
            "transient": False,
        },
        {
            "path": "/srv/img/seed.raw",
            "format": "raw",
            "bus": "ide",
            "cache": "writethrough",
            "readonly": False,
            "transient": False,
        },
    ],
    "nics": [
        {
            "model": "virtio",
            "mac": "52:54:00:ab:cd:ef",
            "forwards": [
                {"protocol": "tcp", "host_addr": "127.0.0.1", "host_port": 2222, "guest_port": 22},
                {"protocol": "udp", "host_addr": "0.0.0.0", "host_port": 5353, "guest_port": 53},
            ],
        },
        {"model": "e1000", "mac": None, "forwards": []},
    ],
    "console": False,
    "emulator": "/usr/bin/qemu-system-x86_64",
    "extra_args": ["-rtc", "base=utc"],
}


def test_json_form_is_plain_and_stable() -> None:
    dumped = full_config().model_dump(mode="json")
    assert dumped == FULL_JSON
    assert list(dumped) == list(FULL_JSON)  # field order is declaration order
    json.dumps(dumped)  # plain JSON types only


def test_json_round_trip_is_exact() -> None:
    cfg = full_config()
    for data in (cfg.model_dump(mode="json"), cfg.model_dump_json(), cfg.model_dump_json().encode()):
        back = DomainConfig.parse(data)
        assert back == cfg
        assert back.model_dump(mode="json") == FULL_JSON
    # through a file, as the state directory stores it
    text = json.dumps(cfg.model_dump(mode="json"), indent=2)
    assert DomainConfig.parse(json.loads(text)) == cfg


def test_paths_are_paths() -> None:
    cfg = full_config()
    assert cfg.kernel == Path("/boot/vmlinuz,x")
    assert isinstance(cfg.disks[0].path, Path)
    assert DomainConfig.parse(cfg.model_dump(mode="json")).disks[0].path == Path(
        "/srv/img/a b,snapshot=on.qcow2"
    )


def test_model_validate_also_raises_config_error() -> None:
    with pytest.raises(ConfigError):
        DomainConfig.model_validate({"name": "x"})
    with pytest.raises(ConfigError):
        DomainConfig.model_validate_json('{"name": "x"}')
    with pytest.raises(ConfigError):
        Disk.parse({"path": "relative"})


# -- parse -------------------------------------------------------------------------------------


def test_parse_rejects_bad_json() -> None:
    with pytest.raises(ConfigError) as exc:
        DomainConfig.parse("{not json")
    assert list(problems(exc)) == [""]
    assert "JSON" in str(exc.value)


def test_parse_rejects_non_mapping() -> None:
    with pytest.raises(ConfigError) as exc:
        DomainConfig.parse([("name", "x")])  # type: ignore[arg-type]
    assert "mapping" in str(exc.value)
    with pytest.raises(ConfigError):
        DomainConfig.parse('["name", "x"]')


def test_parse_revalidates_a_model_copy() -> None:
    """model_copy(update=...) skips validation; parse(model_dump) is the driver's check."""
    bad = make().model_copy(update={"name": "a,b", "vcpus": 0})
    with pytest.raises(ConfigError) as exc:
        DomainConfig.parse(bad.model_dump(mode="json"))
    assert problems(exc).keys() == {"name", "vcpus"}


# -- the error itself --------------------------------------------------------------------------


def test_config_error_lists_every_problem() -> None:
    with pytest.raises(ConfigError) as exc:
        DomainConfig(name=".x", memory_mib=0, vcpus=0, machine="sparc", bogus=1)  # type: ignore[call-arg]
    err = exc.value
    assert isinstance(err, ValueError)
    assert isinstance(err, AiovirtError)
    assert not isinstance(err, pydantic.ValidationError)
    assert isinstance(err.__cause__, pydantic.ValidationError)
    assert [loc for loc, _ in err.errors] == ["name", "memory_mib", "vcpus", "machine", "bogus"]
    text = str(err)
    assert text.startswith("invalid DomainConfig (5 problems): ")
    assert "pydantic" not in text
    assert "name: must not start with '.'" in text
    assert "memory_mib: Input should be greater than or equal to 1 (got 0)" in text


def test_single_problem_message() -> None:
    with pytest.raises(ConfigError) as exc:
        make(vcpus=256)
    assert (
        str(exc.value) == "invalid DomainConfig: vcpus: Input should be less than or equal to 255 (got 256)"
    )
    assert exc.value.errors == (("vcpus", "Input should be less than or equal to 255 (got 256)"),)


def test_missing_fields() -> None:
    with pytest.raises(ConfigError) as exc:
        DomainConfig()  # type: ignore[call-arg]
    assert problems(exc) == {"name": "Field required", "memory_mib": "Field required"}


def test_nested_locations() -> None:
    found = invalid(
        disks=[{"path": "/ok"}, {"path": "rel", "size": 3}],
        nics=[{"forwards": [{"host_port": 0, "guest_port": 22}]}],
    )
    assert found.keys() == {"disks.1.path", "disks.1.size", "nics.0.forwards.0.host_port"}
    assert found["disks.1.path"] == "must be an absolute path (got 'rel')"


def test_sub_models_raise_config_error_on_their_own() -> None:
    with pytest.raises(ConfigError) as exc:
        Disk(path="rel", format="vmdk")
    assert problems(exc).keys() == {"path", "format"}
    assert str(exc.value).startswith("invalid Disk (2 problems): ")
    with pytest.raises(ConfigError) as exc:
        PortForward(host_port=65536, guest_port=0)
    assert problems(exc).keys() == {"host_port", "guest_port"}


# -- frozen, no extra fields -------------------------------------------------------------------


def test_frozen() -> None:
    cfg = full_config()
    with pytest.raises(ConfigError) as exc:
        cfg.name = "other"  # type: ignore[misc]
    assert list(problems(exc)) == ["name"]
    assert "frozen" in str(exc.value)
    with pytest.raises(ConfigError):
        cfg.disks[0].readonly = True  # type: ignore[misc]
    with pytest.raises(ConfigError):
        del cfg.vcpus
    assert cfg == full_config()


@pytest.mark.parametrize(
    ("model", "data"),
    [
        (DomainConfig, {"name": "vm", "memory_mib": 1, "cpus": 2}),
        (Disk, {"path": "/a", "size": 1}),
        (Nic, {"netdev": "tap"}),
        (PortForward, {"host_port": 1, "guest_port": 1, "guest_addr": "10.0.2.15"}),
    ],
)
def test_extra_fields_forbidden(model: type[pydantic.BaseModel], data: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as exc:
        model(**data)
    ((loc, message),) = exc.value.errors
    assert loc in data
    assert message.startswith("Extra inputs are not permitted")


# -- name --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "A", "0", "_", "web-1", "a.b_c-D9", "x" * 64, "a..b", "a-"])
def test_valid_names(name: str) -> None:
    assert make(name=name).name == name


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "must be 1 to 64 characters long, not 0"),
        ("x" * 65, "must be 1 to 64 characters long, not 65"),
        (".hidden", "must not start with '.'"),
        ("-opt", "must not start with '-'"),
        ("a/b", "may only contain ASCII letters, digits, '_', '.' and '-'; found '/'"),
        ("a,b", "found ','"),
        ("a b", "found ' '"),
        ("a=b", "found '='"),
        ("café", "found 'é'"),
        ("ａ", "found 'ａ'"),  # noqa: RUF001 (a fullwidth letter: not ASCII)
        ("a\nb", "found '\\n'"),
        ("a\x00", "found '\\x00'"),
        ("..", "must not start with '.'"),
    ],
)
def test_invalid_names(name: str, message: str) -> None:
    found = invalid(name=name)
    assert found.keys() == {"name"}
    assert message in found["name"]


def test_name_must_be_text() -> None:
    assert invalid(name=5).keys() == {"name"}
    assert invalid(name=b"vm").keys() == {"name"}


name_strategy = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}", fullmatch=True)


@given(name=name_strategy)
def test_any_valid_name_round_trips(name: str) -> None:
    cfg = DomainConfig(name=name, memory_mib=1, uuid=UUID1)
    assert cfg.name == name
    assert DomainConfig.parse(cfg.model_dump_json()) == cfg


@given(
    name=name_strategy,
    bad=st.characters(exclude_characters="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-"),
)
def test_any_foreign_character_is_refused(name: str, bad: str) -> None:
    with pytest.raises(ConfigError) as exc:
        DomainConfig(name=(name + bad)[-64:], memory_mib=1)
    assert list(problems(exc)) == ["name"]


# -- numbers and choices -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("memory_mib", 0),
        ("memory_mib", -1),
        ("memory_mib", (1 << 22) + 1),
        ("memory_mib", "256"),
        ("memory_mib", 256.0),
        ("memory_mib", True),
        ("vcpus", 0),
        ("vcpus", 256),
        ("vcpus", "2"),
        ("machine", "isapc"),
        ("machine", "PC"),
        ("accel", "hvf"),
        ("console", "yes"),
        ("console", 1),
    ],
)
def test_invalid_scalars(field: str, value: object) -> None:
    assert invalid(**{field: value}).keys() == {field}


def test_numbers_at_their_limits() -> None:
    assert make(memory_mib=1 << 22, vcpus=255).vcpus == 255
    assert make(memory_mib=1).memory_mib == 1


@pytest.mark.parametrize("machine", ["pc", "q35", "microvm", "none"])
@pytest.mark.parametrize("accel", ["tcg", "kvm", "auto"])
def test_machines_and_accels(machine: str, accel: str) -> None:
    cfg = make(machine=machine, accel=accel)
    assert (cfg.machine, cfg.accel) == (machine, accel)


# -- paths and text ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("kernel", "vmlinuz", "must be an absolute path"),
        ("kernel", "", "must be an absolute path"),
        ("kernel", "/boot/vm\x00linuz", "must not contain NUL bytes"),
        ("initrd", "./initrd.gz", "must be an absolute path"),
        ("initrd", "/boot/a\nb", "must not contain line breaks"),
        ("kernel", "/boot/\udcff", "must be valid Unicode text"),
        ("cmdline", "console=ttyS0\nquiet", "must not contain line breaks"),
        ("cmdline", "a\rb", "must not contain line breaks"),
        ("cmdline", "a\x00b", "must not contain NUL bytes"),
        ("emulator", "", "must not be empty"),
        ("emulator", "./qemu", "must be a program name (looked up on PATH) or an absolute path"),
        ("emulator", "bin/qemu", "or an absolute path"),
        ("emulator", "qemu\x00", "must not contain NUL bytes"),
    ],
)
def test_invalid_text(field: str, value: str, message: str) -> None:
    kw: dict[str, Any] = {field: value}
    if field in ("initrd", "cmdline"):
        kw["kernel"] = "/boot/vmlinuz"
    found = invalid(**kw)
    assert found.keys() == {field}
    assert message in found[field]


@pytest.mark.parametrize("emulator", ["qemu-system-x86_64", "/opt/qemu 9/bin/qemu-system-x86_64", "kvm"])
def test_valid_emulators(emulator: str) -> None:
    assert make(emulator=emulator).emulator == emulator


def test_paths_keep_odd_characters() -> None:
    odd = "/srv/a b/c,snapshot=on=x'\"$(id).img"
    assert str(Disk(path=odd).path) == odd
    assert str(make(kernel=odd, initrd=odd).kernel) == odd


def test_disk_path_rules() -> None:
    with pytest.raises(ConfigError) as exc:
        Disk(path="disk.img")
    assert problems(exc) == {"path": "must be an absolute path (got 'disk.img')"}
    with pytest.raises(ConfigError) as exc:
        Disk(path="/a\x00b")
    assert "path" in problems(exc)


def test_extra_args() -> None:
    assert make(extra_args=("-rtc", "base=utc", "")).extra_args == ("-rtc", "base=utc", "")
    assert make(extra_args=["multi\nline"]).extra_args == ("multi\nline",)
    found = invalid(extra_args=["ok", "bad\x00"])
    assert found.keys() == {"extra_args.1"}
    assert "NUL" in found["extra_args.1"]
    assert invalid(extra_args="-S").keys() == {"extra_args"}  # a string is not a list of arguments
    assert invalid(extra_args=[1]).keys() == {"extra_args.0"}


# -- NICs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mac", "stored"),
    [
        ("52:54:00:12:34:56", "52:54:00:12:34:56"),
        ("52:54:00:AB:cD:Ef", "52:54:00:ab:cd:ef"),
        ("02:00:00:00:00:00", None),
    ],
)
def test_valid_macs(mac: str, stored: str | None) -> None:
    assert Nic(mac=mac).mac == (stored or mac)


@pytest.mark.parametrize(
    ("mac", "message"),
    [
        ("52:54:00:12:34", "six hexadecimal octets"),
        ("52-54-00-12-34-56", "six hexadecimal octets"),
        ("525400123456", "six hexadecimal octets"),
        ("52:54:00:12:34:5g", "six hexadecimal octets"),
        ("52:54:00:12:34:56\n", "six hexadecimal octets"),
        (" 52:54:00:12:34:56", "six hexadecimal octets"),
        ("01:00:5e:00:00:01", "unicast"),
        ("ff:ff:ff:ff:ff:ff", "unicast"),
        ("00:00:00:00:00:00", "all zeros"),
    ],
)
def test_invalid_macs(mac: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        Nic(mac=mac)
    assert problems(exc).keys() == {"mac"}
    assert message in problems(exc)["mac"]


@pytest.mark.parametrize(
    ("data", "loc"),
    [
        ({"protocol": "sctp"}, "protocol"),
        ({"host_port": 0}, "host_port"),
        ({"host_port": 65536}, "host_port"),
        ({"guest_port": 0}, "guest_port"),
        ({"guest_port": "22"}, "guest_port"),
        ({"host_addr": "localhost"}, "host_addr"),
        ({"host_addr": "::1"}, "host_addr"),
        ({"host_addr": "127.0.0.1,restrict=on"}, "host_addr"),
    ],
)
def test_invalid_forwards(data: dict[str, Any], loc: str) -> None:
    with pytest.raises(ConfigError) as exc:
        PortForward(**{"host_port": 8080, "guest_port": 80, **data})
    assert problems(exc).keys() == {loc}


def test_port_limits() -> None:
    fwd = PortForward(protocol="udp", host_addr="0.0.0.0", host_port=65535, guest_port=1)
    assert fwd.host_addr == IPv4Address("0.0.0.0")


def test_duplicate_forwards_in_one_nic() -> None:
    with pytest.raises(ConfigError) as exc:
        Nic(forwards=[PortForward(host_port=8080, guest_port=80), PortForward(host_port=8080, guest_port=81)])
    assert problems(exc).keys() == {"forwards.1"}
    assert "host tcp port 127.0.0.1:8080 is already forwarded by forwards.0" in str(exc.value)
    found = invalid(
        nics=[{"forwards": [{"host_port": 1, "guest_port": 2}, {"host_port": 1, "guest_port": 3}]}]
    )
    assert found.keys() == {"nics.0.forwards.1"}


def test_duplicate_forwards_across_nics() -> None:
    found = invalid(
        nics=[
            {"forwards": [{"host_port": 2222, "guest_port": 22}]},
            {"forwards": [{"host_port": 80, "guest_port": 80}, {"host_port": 2222, "guest_port": 22}]},
        ]
    )
    assert found == {
        "nics.1.forwards.1": "host tcp port 127.0.0.1:2222 is already forwarded by nics.0.forwards.0 "
        "(127.0.0.1:2222)"
    }


def test_any_address_overlaps_every_address() -> None:
    found = invalid(
        nics=[
            {"forwards": [{"host_addr": "127.0.0.1", "host_port": 80, "guest_port": 80}]},
            {"forwards": [{"host_addr": "0.0.0.0", "host_port": 80, "guest_port": 80}]},
        ]
    )
    assert found.keys() == {"nics.1.forwards.0"}


def test_forwards_that_do_not_clash() -> None:
    cfg = make(
        nics=[
            {
                "forwards": [
                    {"host_port": 80, "guest_port": 80},
                    {"protocol": "udp", "host_port": 80, "guest_port": 80},  # other protocol
                    {"host_addr": "127.0.0.2", "host_port": 80, "guest_port": 80},  # other address
                    {"host_port": 81, "guest_port": 80},  # same guest port is fine
                ]
            }
        ]
    )
    assert len(cfg.nics[0].forwards) == 4


def test_duplicate_macs() -> None:
    found = invalid(nics=[{"mac": "52:54:00:00:00:01"}, {}, {"mac": "52:54:00:00:00:01".upper()}])
    assert found == {"nics.2.mac": "same MAC address as nics.0"}
    assert len(make(nics=[{}, {}]).nics) == 2  # QEMU numbers its default MACs


# -- combinations ------------------------------------------------------------------------------


def test_initrd_and_cmdline_need_a_kernel() -> None:
    assert invalid(initrd="/boot/initrd") == {"initrd": "needs a kernel"}
    assert invalid(cmdline="quiet") == {"cmdline": "needs a kernel"}
    assert invalid(initrd="/i", cmdline="quiet").keys() == {"initrd", "cmdline"}
    cfg = make(kernel="/boot/vmlinuz", initrd="/boot/initrd", cmdline="")
    assert cfg.cmdline == ""


def test_machine_none_has_nothing_to_run() -> None:
    found = invalid(
        machine="none",
        vcpus=2,
        kernel="/boot/vmlinuz",
        disks=[{"path": "/a"}],
        nics=[{}],
    )
    assert found == {
        "vcpus": "machine 'none' has exactly 1 vCPU",
        "kernel": "machine 'none' cannot boot a kernel",
        "disks": "machine 'none' cannot have disks",
        "nics": "machine 'none' cannot have network cards",
    }
    cfg = make(machine="none", accel="kvm", console=True, memory_mib=16)
    assert cfg.machine == "none"


def test_microvm_has_no_ide_and_no_pci() -> None:
    found = invalid(
        machine="microvm", disks=[{"path": "/a"}, {"path": "/b", "bus": "ide"}], nics=[{"model": "e1000"}]
    )
    assert found.keys() == {"disks.1.bus", "nics.0.model"}
    cfg = make(machine="microvm", disks=[{"path": "/a"}], nics=[{}], kernel="/k")
    assert cfg.machine == "microvm"


@pytest.mark.parametrize(("machine", "slots"), [("pc", 4), ("q35", 6)])
def test_ide_slots(machine: str, slots: int) -> None:
    ide = [{"path": f"/d{i}", "bus": "ide"} for i in range(slots)]
    assert len(make(machine=machine, disks=[{"path": "/v"}, *ide]).disks) == slots + 1
    found = invalid(machine=machine, disks=[*ide, {"path": "/v"}, {"path": "/x", "bus": "ide"}])
    assert found == {f"disks.{slots + 1}.bus": f"machine {machine!r} has only {slots} IDE slots"}


def test_ide_cannot_be_readonly() -> None:
    found = invalid(disks=[{"path": "/a", "bus": "ide", "readonly": True}])
    assert found == {"disks.0.readonly": "QEMU cannot attach a read-only image to an IDE hard disk"}
    assert make(disks=[{"path": "/a", "readonly": True}]).disks[0].readonly


def test_image_used_twice() -> None:
    assert invalid(disks=[{"path": "/a"}, {"path": "/a", "readonly": True}]) == {
        "disks.1.path": "same image as disks.0: a writable image can be used only once"
    }
    assert invalid(disks=[{"path": "/a", "readonly": True}, {"path": "/b/../a"}, {"path": "/a/"}]).keys() == {
        "disks.2.path"  # paths compare as paths ('/a/' is '/a'); nothing is resolved on disk
    }
    shared = make(disks=[{"path": "/a", "readonly": True}, {"path": "/a", "readonly": True}])
    assert len(shared.disks) == 2


def test_combination_checks_wait_for_valid_fields() -> None:
    """A field error is reported alone; the combination is checked once every field is valid."""
    assert invalid(vcpus=0, initrd="/i").keys() == {"vcpus"}


# -- the package -------------------------------------------------------------------------------


def test_import_loads_no_anyio() -> None:
    code = "import sys, aiovirt.config; assert 'anyio' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_field_documentation() -> None:
    for model in (DomainConfig, Disk, Nic, PortForward):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} is undocumented"
