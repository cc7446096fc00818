"""Connection URIs: where each one keeps its state, who may use it, and clear errors for bad ones.

(The basic cases are in test_bad_input.py; these are the rest of the issue's URI requirements.)
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import aiovirt

from .conftest import none_config

pytestmark = pytest.mark.anyio


@pytest.fixture
def xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[Path, Path]:
    """A private $XDG_STATE_HOME and $XDG_RUNTIME_DIR."""
    state, runtime = tmp_path / "xdg-state", tmp_path / "xdg-runtime"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    return state, runtime


def test_session_without_xdg_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    parsed = aiovirt.parse_uri("qemu:///session")
    assert parsed.root == tmp_path / ".local" / "state" / "aiovirt"
    assert parsed.run == parsed.root / "run"
    monkeypatch.setenv("XDG_STATE_HOME", "")  # empty counts as unset (the XDG rule)
    assert aiovirt.parse_uri("qemu:///session").root == tmp_path / ".local" / "state" / "aiovirt"


def test_system_paths_and_default_for_a_user(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed = aiovirt.parse_uri("qemu:///system")
    assert (parsed.driver, parsed.root, parsed.run) == (
        "system",
        Path("/var/lib/aiovirt"),
        Path("/run/aiovirt"),
    )
    monkeypatch.delenv("AIOVIRT_DEFAULT_URI", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert aiovirt.parse_uri().driver == "session"
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert aiovirt.parse_uri().driver == "system"


async def test_system_is_for_root_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(aiovirt.StateDirError, match="needs root"):
        async with aiovirt.connect("qemu:///system"):
            pass


async def test_session_keeps_state_and_runtime_apart(xdg: tuple[Path, Path]) -> None:
    state, runtime = xdg
    async with aiovirt.connect("qemu:///session") as conn:
        dom = await conn.define(none_config("sess"))
        await dom.start()
        try:
            assert stat.S_ISSOCK((runtime / "aiovirt" / "sess.qmp").lstat().st_mode)
            assert (runtime / "aiovirt" / "sess.json").exists()
            assert (state / "aiovirt" / "domains" / "sess.json").exists()
            assert (state / "aiovirt" / "log" / "sess.log").exists()
            assert not (state / "aiovirt" / "run").exists()
            for d in (state / "aiovirt", runtime / "aiovirt"):
                assert stat.S_IMODE(d.stat().st_mode) == 0o700
        finally:
            await dom.destroy()
    async with aiovirt.connect("qemu:///session") as conn:
        assert (await conn.lookup("sess")).state == aiovirt.DomainState.SHUTOFF


async def test_default_uri_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AIOVIRT_DEFAULT_URI", f"qemu:///embed?root={tmp_path / 'env'}")
    async with aiovirt.connect() as conn:
        assert conn.uri == f"qemu:///embed?root={tmp_path / 'env'}"
    assert (tmp_path / "env" / "lock").exists()
    monkeypatch.setenv("AIOVIRT_DEFAULT_URI", "qemu:///nowhere")
    with pytest.raises(aiovirt.InvalidURIError, match="nowhere"):
        async with aiovirt.connect():
            pass


@pytest.mark.parametrize(
    "bad",
    [
        "qemu",
        "qemu:",
        "qemu://",
        "qemu:///",
        "qemu:///system/",
        "qemu:////system",
        "qemu:///system?root=/x",
        "qemu:///embed?root=",
        "qemu:///embed?root=/x&",
        "qemu:///embed?root=/x&root",
        "qemu:///embed?root=/x&foo=1",
        "qemu+ftp://host/system",
        "qemu+unix://host/system",
        "qemu+tcp:///system",
        "qemu+ssh://host/embed",
        "xen+ssh://host/system",
        "qemu+unix:///system?keyfile=/k",
        "qemu+ssh://host:notaport/system",
        "qemu+unix:///system?socket=/a&socket=/b",
    ],
)
async def test_malformed_uri_is_a_clear_error(bad: str) -> None:
    with pytest.raises(aiovirt.InvalidURIError) as info:
        async with aiovirt.connect(bad):
            pass
    assert info.value.uri == bad and bad in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("bad", ["qemu:///embed?root=/tmp/a%00b", "qemu:///system#fragment"])
def test_uri_with_nul_or_fragment(bad: str) -> None:
    with pytest.raises(aiovirt.InvalidURIError):
        aiovirt.parse_uri(bad)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("qemu+unix:///system", ("qemu", "unix", "", None, "", (), "qemu:///system")),
        (
            "test+unix:///default?socket=/tmp/s/libvirt-sock",
            ("test", "unix", "", None, "", (("socket", "/tmp/s/libvirt-sock"),), "test:///default"),
        ),
        ("qemu+tcp://h1:16509/system", ("qemu", "tcp", "h1", 16509, "", (), "qemu:///system")),
        (
            "qemu+tls://h2/system?no_verify=1",
            ("qemu", "tls", "h2", None, "", (("no_verify", "1"),), "qemu:///system"),
        ),
        (
            "qemu+ssh://bob@h3:2222/session?keyfile=/k%2Bk",
            ("qemu", "ssh", "h3", 2222, "bob", (("keyfile", "/k+k"),), "qemu:///session"),
        ),
    ],
)
def test_daemon_uris(uri: str, expected: tuple[object, ...]) -> None:
    p = aiovirt.parse_uri(uri)
    assert p.scheme == "remote"
    assert (p.driver, p.transport, p.host, p.port, p.user, p.params, p.name) == expected
