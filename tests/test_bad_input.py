"""Bad input gets a clear error, and loses nothing: no process, no half-written file, no lost definition."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

import aiovirt
from aiovirt import DomainState as S
from aiovirt import StateReason as R

from .conftest import none_config, qemu_pids

pytestmark = pytest.mark.anyio


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_socket()}


async def _assert_failed_start(
    conn: aiovirt.Connection, state_root: Path, cfg: aiovirt.DomainConfig, expect: str
) -> aiovirt.LaunchError:
    dom = await conn.define(cfg)
    definition = (state_root / "domains" / f"{cfg.name}.json").read_bytes()
    before = qemu_pids(str(state_root))
    with pytest.raises(aiovirt.LaunchError) as info:
        await dom.start()
    assert expect in info.value.message, info.value.message
    assert (dom.state, dom.reason) == (S.SHUTOFF, R.FAILED)
    assert dom.pid is None
    assert qemu_pids(str(state_root)) - before == set()
    assert not (state_root / "run" / f"{cfg.name}.json").exists()
    assert not (state_root / "run" / f"{cfg.name}.qmp").exists()
    assert (state_root / "domains" / f"{cfg.name}.json").read_bytes() == definition
    assert not [p for p in _files(state_root) if p.endswith(".tmp")]
    return info.value


async def test_missing_kernel(conn: aiovirt.Connection, state_root: Path, tmp_path: Path) -> None:
    cfg = aiovirt.DomainConfig(
        name="nokernel", machine="pc", accel="tcg", memory_mib=32, kernel=tmp_path / "nope"
    )
    err = await _assert_failed_start(conn, state_root, cfg, str(tmp_path / "nope"))
    assert err.returncode == 1
    assert err.log_path is not None and "nope" in Path(err.log_path).read_text()


async def test_missing_disk(conn: aiovirt.Connection, state_root: Path, tmp_path: Path) -> None:
    disk = aiovirt.Disk(path=tmp_path / "missing, with comma.img", format="raw")
    cfg = aiovirt.DomainConfig(name="nodisk", machine="pc", accel="tcg", memory_mib=32, disks=[disk])
    await _assert_failed_start(conn, state_root, cfg, "missing, with comma.img")


async def test_unknown_machine(conn: aiovirt.Connection, state_root: Path) -> None:
    cfg = none_config("badmachine", extra_args=["-machine", "no-such-machine"])
    await _assert_failed_start(conn, state_root, cfg, "unsupported machine type")


async def test_missing_emulator(conn: aiovirt.Connection, state_root: Path) -> None:
    cfg = none_config("noemu", emulator="/nonexistent/qemu-system-x86_64")
    err = await _assert_failed_start(conn, state_root, cfg, "cannot execute")
    assert err.argv[0] == "/nonexistent/qemu-system-x86_64"


async def test_failed_start_can_be_retried(conn: aiovirt.Connection, state_root: Path) -> None:
    await _assert_failed_start(conn, state_root, none_config("retry", extra_args=["-bogus"]), "-bogus")
    dom = await conn.lookup("retry")
    await conn.define(none_config("retry", uuid=dom.uuid))
    await dom.start()
    assert dom.state == S.RUNNING
    await dom.destroy()


async def test_failed_create_forgets_the_transient_domain(conn: aiovirt.Connection) -> None:
    with pytest.raises(aiovirt.LaunchError):
        await conn.create(none_config("tmpfail", extra_args=["-bogus"]))
    with pytest.raises(aiovirt.DomainNotFoundError):
        await conn.lookup("tmpfail")


async def test_invalid_config_via_model_copy_is_rejected(conn: aiovirt.Connection, state_root: Path) -> None:
    good = none_config("good")
    bad = good.model_copy(update={"name": "../evil,x"})  # model_copy skips validation
    before = _files(state_root)
    with pytest.raises(aiovirt.ConfigError):
        await conn.define(bad)
    with pytest.raises(aiovirt.ConfigError):
        await conn.create(bad)
    assert _files(state_root) == before
    assert not (state_root.parent / "evil,x.json").exists()


async def test_names_and_uuids_are_unique(conn: aiovirt.Connection) -> None:
    a = await conn.define(none_config("a"))
    with pytest.raises(aiovirt.DomainExistsError):
        await conn.define(none_config("a", uuid=uuid.uuid4()))  # same name, another UUID
    with pytest.raises(aiovirt.DomainExistsError):
        await conn.define(none_config("b", uuid=a.uuid))  # same UUID, another name
    with pytest.raises(aiovirt.DomainExistsError):
        await conn.create(none_config("a", uuid=a.uuid))
    updated = await conn.define(none_config("a", uuid=a.uuid, memory_mib=32))
    assert updated is a and a.config.memory_mib == 32
    # Without a UUID, a config names the domain of that name (libvirt's redefine)...
    assert await conn.define(none_config("a", memory_mib=48)) is a and a.config.memory_mib == 48
    # ...and a copy under a new name is a new domain with a new UUID.
    tmp = await conn.create(none_config("a").model_copy(update={"name": "tmp-a"}))
    assert tmp.uuid != a.uuid
    await tmp.destroy()


async def test_lookup_list_undefine(conn: aiovirt.Connection, state_root: Path, uri: str) -> None:
    with pytest.raises(aiovirt.DomainNotFoundError):
        await conn.lookup("nobody")
    x = await conn.define(none_config("x"))
    y = await conn.define(none_config("y"))
    await y.start()
    assert await conn.list_domains() == [x, y]
    assert await conn.list_domains(active=True) == [y]
    assert await conn.list_domains(active=False) == [x]
    record = json.loads((state_root / "domains" / "x.json").read_text())
    assert (
        record["format"] == 1 and record["config"]["name"] == "x" and record["config"]["uuid"] == str(x.uuid)
    )

    await x.undefine()
    assert not (state_root / "domains" / "x.json").exists()
    with pytest.raises(aiovirt.DomainNotFoundError):
        await conn.lookup("x")
    with pytest.raises(aiovirt.DomainNotFoundError):
        await x.start()  # a stale object

    await y.undefine()  # running: becomes transient, gone once stopped
    assert await conn.lookup("y") is y and not y.persistent
    await y.destroy()
    with pytest.raises(aiovirt.DomainNotFoundError):
        await conn.lookup("y")


async def test_definitions_survive_reconnect(uri: str) -> None:
    async with aiovirt.connect(uri) as conn:
        dom = await conn.define(none_config("keep", memory_mib=24))
        cfg = dom.config
        assert cfg.uuid is not None
    async with aiovirt.connect(uri) as conn:
        assert (await conn.lookup("keep")).config == cfg


@pytest.mark.parametrize(
    "bad",
    [
        "http:///x",
        "qemu://host/system",
        "qemu:///nowhere",
        "qemu:///embed",
        "qemu:///embed?root=rel/dir",
        "qemu:///embed?root=/a&root=/b",
        "qemu:///session?x=1",
        "",
    ],
)
def test_bad_uris(bad: str) -> None:
    with pytest.raises(aiovirt.InvalidURIError):
        aiovirt.parse_uri(bad)


def test_default_uri(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("AIOVIRT_DEFAULT_URI", raising=False)
    expected = "system" if os.geteuid() == 0 else "session"
    assert aiovirt.parse_uri().driver == expected
    monkeypatch.setenv("AIOVIRT_DEFAULT_URI", f"qemu:///embed?root={tmp_path}")
    assert aiovirt.parse_uri().root == tmp_path
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "st"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "rt"))
    session = aiovirt.parse_uri("qemu:///session")
    assert (session.root, session.run) == (tmp_path / "st" / "aiovirt", tmp_path / "rt" / "aiovirt")
