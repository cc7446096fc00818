"""Every verb of the ``aiovirt`` command, run as a subprocess against real QEMU (``qemu:///embed``):
its output for people, its exit status, and its ``--json`` shape."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aiovirt.config import from_libvirt_xml, parse_config
from aiovirt.testing import TinyGuest

from ._cli import REPO, aiovirt_argv, cleanup, cli_env, define_none, failing, ok, ok_json, run_cli
from .conftest import pid_alive

DOMAIN_KEYS = {"name", "uuid", "state", "reason", "pid", "persistent", "autostart", "memory_mib", "vcpus"}


@pytest.fixture
def cli_uri(uri: str) -> Iterator[str]:
    yield uri
    cleanup(uri)


def test_lifecycle_verbs(tmp_path: Path, cli_uri: str) -> None:
    uri = cli_uri
    path = define_none(tmp_path, uri, "vm1")

    # define again: a redefinition of the same domain (same UUID), with a JSON shape
    shape = ok_json("define", str(path), uri=uri)
    assert shape["action"] == "define" and shape["name"] == "vm1" and shape["updated"] is True
    assert shape["file"] == str(path) and shape["warnings"] == []
    uuid = shape["uuid"]

    # list: active only by default (nothing), --all shows it
    assert ok("list", uri=uri).stdout.count("vm1") == 0
    listing = ok("list", "--all", uri=uri).stdout
    assert "vm1" in listing and "shutoff" in listing and "Name" in listing
    assert ok("list", "--all", "--name", uri=uri).stdout == "vm1\n"
    data = ok_json("list", "--all", uri=uri)
    assert data["uri"] == uri and data["readonly"] is False and data["problems"] == []
    [dom] = data["domains"]
    assert set(dom) >= DOMAIN_KEYS and dom["state"] == "shutoff" and dom["pid"] is None
    assert dom["uuid"] == uuid and dom["memory_mib"] == 16 and dom["persistent"] is True

    # start
    assert ok("start", "vm1", uri=uri).stdout.startswith("Domain 'vm1' started (pid ")
    started = ok_json("domstate", "vm1", uri=uri)
    assert started == {"name": "vm1", "state": "running", "reason": started["reason"]}
    listed = ok_json("list", uri=uri)["domains"]
    assert [d["name"] for d in listed] == ["vm1"]
    pid = listed[0]["pid"]
    assert isinstance(pid, int) and pid_alive(pid)
    assert ok("list", "--state-running", "--name", uri=uri).stdout == "vm1\n"
    assert ok("list", "--state-shutoff", "--name", uri=uri).stdout == ""

    # dominfo
    text = ok("dominfo", "vm1", uri=uri).stdout
    assert "PID:" in text and str(pid) in text and "running" in text and "16 MiB" in text
    info = ok_json("dominfo", "vm1", uri=uri)
    assert set(info) >= DOMAIN_KEYS | {
        "cpu_time",
        "rss_bytes",
        "uptime",
        "machine",
        "log_path",
        "console_path",
    }
    assert info["pid"] == pid and info["machine"] == "none" and info["rss_bytes"] > 0
    assert info["console_path"].startswith(str(tmp_path))

    # suspend / resume / reset, each with its shape
    assert ok("suspend", "vm1", uri=uri).stdout == "Domain 'vm1' suspended\n"
    assert ok("domstate", "vm1", "--reason", uri=uri).stdout == "paused (user)\n"
    assert ok("list", "--state-paused", "--name", uri=uri).stdout == "vm1\n"
    resumed = ok_json("resume", "vm1", uri=uri)
    assert resumed == {
        "action": "resume",
        "name": "vm1",
        "state": "running",
        "reason": "unpaused",
        "pid": pid,
    }
    assert ok_json("reset", "vm1", uri=uri)["action"] == "reset"
    assert ok("domstate", "vm1", uri=uri).stdout == "running\n"

    # dumpconfig (TOML and JSON) and dumpxml read back to the same config
    toml_text = ok("dumpconfig", "vm1", uri=uri).stdout
    from_toml = parse_config(toml_text, "toml").config
    from_json = parse_config(ok("dumpconfig", "vm1", "--format", "json", uri=uri).stdout, "json").config
    assert ok_json("dumpconfig", "vm1", uri=uri) == json.loads(from_json.model_dump_json())
    xml = ok("dumpxml", "vm1", uri=uri).stdout
    assert xml.startswith("<domain type='qemu'>")
    assert from_libvirt_xml(xml).config == from_toml == from_json
    assert str(from_toml.uuid) == uuid
    assert ok_json("dumpxml", "vm1", uri=uri) == {"name": "vm1", "xml": xml}

    # autostart on and off
    assert ok_json("autostart", "vm1", uri=uri)["autostart"] is True
    assert ok_json("list", uri=uri)["domains"][0]["autostart"] is True
    assert "unmarked" in ok("autostart", "vm1", "--disable", uri=uri).stdout
    assert ok_json("list", uri=uri)["domains"][0]["autostart"] is False

    # console-log: machine=none prints nothing on its console
    assert ok("console-log", "vm1", uri=uri).stdout == ""
    log = ok_json("console-log", "vm1", uri=uri)
    assert log == {"name": "vm1", "path": info["console_path"], "text": ""}

    # shutdown: the press is taken; a guest with no OS ignores it, so --wait times out (status 1)
    assert ok("shutdown", "vm1", uri=uri).stdout == "Domain 'vm1' is being shutdown\n"
    proc = failing("shutdown", "vm1", "--timeout", "0.5", "--json", uri=uri)
    assert "did not shut off within 0.5 s" in proc.stderr
    assert json.loads(proc.stdout)["error"]["kind"] == "TimeoutError"
    assert pid_alive(pid)

    # destroy --graceful: SIGTERM is enough for QEMU; --remove-logs deletes its files
    logs = Path(info["log_path"])
    assert logs.exists()
    destroyed = ok_json("destroy", "vm1", "--graceful", "--remove-logs", uri=uri)
    assert destroyed["signal"] == "SIGTERM" and destroyed["state"] == "shutoff"
    assert destroyed["reason"] == "destroyed" and destroyed["logs_removed"] is True
    assert not pid_alive(pid) and not logs.exists()

    # start then destroy, the text form
    ok("start", "vm1", uri=uri)
    assert ok("destroy", "vm1", uri=uri).stdout == "Domain 'vm1' destroyed (SIGTERM)\n"

    # undefine
    assert ok("undefine", "vm1", uri=uri).stdout == "Domain 'vm1' has been undefined\n"
    assert ok_json("list", "--all", uri=uri)["domains"] == []


def test_define_formats_and_warnings(tmp_path: Path, cli_uri: str) -> None:
    """define takes JSON and libvirt XML as well as TOML; the XML's warnings go to stderr."""
    uri = cli_uri
    (tmp_path / "j.json").write_text(
        json.dumps({"name": "j", "memory_mib": 16, "machine": "none", "accel": "tcg"})
    )
    assert (
        ok("define", str(tmp_path / "j.json"), uri=uri).stdout
        == f"Domain 'j' defined from {tmp_path / 'j.json'}\n"
    )
    xml = ok("dumpxml", "j", uri=uri).stdout.replace("<name>j</name>", "<name>x</name>")
    xml = "\n".join(line for line in xml.splitlines() if "<uuid>" not in line)
    # libvirt's own elements that aiovirt runs differently: a memory balloon is warned about
    xml = xml.replace("</devices>", "<memballoon model='virtio'/></devices>")
    (tmp_path / "x.xml").write_text(xml)
    proc = ok("define", str(tmp_path / "x.xml"), "--json", uri=uri)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings and all(str(tmp_path / "x.xml") in w for w in warnings)
    assert any("memballoon" in w or "balloon" in w for w in warnings)
    assert json.loads(proc.stdout)["warnings"] and json.loads(proc.stdout)["updated"] is False
    assert ok("list", "--all", "--name", uri=uri).stdout == "j\nx\n"


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_event_verb_sees_a_qemu_stopped_from_outside(tmp_path: Path, cli_uri: str, backend: str) -> None:
    uri = cli_uri
    define_none(tmp_path, uri, "ev")
    ok("start", "ev", uri=uri)
    pid = ok_json("dominfo", "ev", uri=uri)["pid"]
    watcher = subprocess.Popen(
        aiovirt_argv("event", "--domain", "ev", "--loop", "--json", "--timeout", "60"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=cli_env(uri, backend),
        cwd=REPO,
    )
    try:
        assert watcher.stderr is not None and watcher.stdout is not None
        assert "waiting for events" in watcher.stderr.readline()
        os.kill(pid, signal.SIGTERM)  # as an administrator's kill: QEMU shuts down on its own
        events = [json.loads(watcher.stdout.readline()) for _ in range(2)]
        assert [(e["kind"], e["detail"]) for e in events] == [("shutdown", "host"), ("stopped", "shutdown")]
        assert all(e["name"] == "ev" and isinstance(e["timestamp"], float) for e in events)
        watcher.send_signal(signal.SIGINT)  # --loop ends with Ctrl-C: a normal end
        _, err = watcher.communicate(timeout=30)
        assert watcher.returncode == 0, err
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()


def test_event_without_loop_prints_one_event_or_times_out(tmp_path: Path, cli_uri: str) -> None:
    uri = cli_uri
    define_none(tmp_path, uri, "ev1")
    proc = failing("event", "--timeout", "0.3", uri=uri)
    assert "no event within 0.3 s" in proc.stderr and "events received: 0" in proc.stderr
    ok("start", "ev1", uri=uri)
    pid = ok_json("dominfo", "ev1", uri=uri)["pid"]
    watcher = subprocess.Popen(
        aiovirt_argv("event", "--timeout", "60"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=cli_env(uri),
        cwd=REPO,
    )
    try:
        assert watcher.stderr is not None
        assert "waiting for events" in watcher.stderr.readline()
        os.kill(pid, signal.SIGKILL)  # no SHUTDOWN event first: QEMU crashed, as far as anyone knows
        out, err = watcher.communicate(timeout=30)
        assert watcher.returncode == 0, err
        [line] = out.splitlines()
        assert line.endswith("ev1: stopped (crashed)") and "events received: 1" in err
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()


def test_console_log_follow_ends_when_the_domain_stops(tmp_path: Path, cli_uri: str) -> None:
    uri = cli_uri
    define_none(tmp_path, uri, "quiet")
    ok("start", "quiet", uri=uri)
    pid = ok_json("dominfo", "quiet", uri=uri)["pid"]
    follower = subprocess.Popen(
        aiovirt_argv("console-log", "quiet", "--follow"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=cli_env(uri),
        cwd=REPO,
    )
    try:
        assert follower.stderr is not None
        note = follower.stderr.readline()
        assert note.startswith("following ") and "quiet.console until the domain stops" in note
        os.kill(pid, signal.SIGTERM)  # stopped from outside: the follower sees it and ends
        out, err = follower.communicate(timeout=30)
        assert follower.returncode == 0, err
        assert out == ""  # machine=none prints nothing on its console
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()


@pytest.mark.slow
def test_a_real_guest_console_and_shutdown(tmp_path: Path, cli_uri: str, tiny_guest: TinyGuest) -> None:
    """The tiny Linux guest: console-log --follow shows its console as it boots; shutdown --wait
    returns once it powered itself off."""
    uri = cli_uri
    path = tmp_path / "linux.json"
    path.write_text(tiny_guest.domain_config("linux").model_dump_json())
    ok("define", str(path), uri=uri)
    ok("start", "linux", uri=uri)
    follower = subprocess.Popen(
        aiovirt_argv("console-log", "linux", "--follow"),
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=cli_env(uri),
        cwd=REPO,
    )
    try:
        assert follower.stdout is not None
        seen = b""
        while tiny_guest.ready_marker.encode() not in seen:
            chunk = follower.stdout.readline()
            assert chunk, f"console-log --follow ended before the guest was ready: {seen[-500:]!r}"
            seen += chunk
        follower.send_signal(signal.SIGINT)  # follow ends with Ctrl-C: a normal end
        assert follower.wait(timeout=30) == 0
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert tiny_guest.ready_marker in ok("console-log", "linux", uri=uri).stdout
    shape = ok_json("shutdown", "linux", "--wait", "--timeout", "60", uri=uri)
    assert shape["stopped"] is True and shape["state"] == "shutoff" and shape["reason"] == "shutdown"


def _shape(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    return dict(json.loads(proc.stdout)["error"])


def test_bad_input(tmp_path: Path, cli_uri: str) -> None:
    uri = cli_uri
    # an unknown domain (every verb is checked in-process on test:///, in test_cli_unit)
    for verb in ("start", "dominfo"):
        proc = failing(verb, "nope", "--json", uri=uri)
        assert proc.stderr.strip() == "error: domain 'nope' not found"
        assert _shape(proc) == {
            "kind": "DomainNotFoundError",
            "message": "domain 'nope' not found",
            "domain": "nope",
        }

    # a config file with a bad field: the error names the file and the field
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "b"\nmemory_mib = 0\nmachine = "none"\n')
    proc = failing("define", str(bad), "--json", uri=uri)
    assert proc.stderr.startswith(f"error: {bad}: memory_mib: ")
    err = _shape(proc)
    assert err["kind"] == "ConfigError" and err["fields"][0][0] == "memory_mib"
    missing = failing("define", str(tmp_path / "absent.toml"), uri=uri)
    assert "absent.toml: no such file" in missing.stderr
    assert ok_json("list", "--all", uri=uri)["domains"] == []

    # a URI that cannot be parsed is a usage error (2); one that cannot be opened an error (1)
    proc = failing("list", uri="qemu:///nowhere", code=2)
    assert "invalid connection URI 'qemu:///nowhere'" in proc.stderr
    assert failing("-c", "test:///nope", "list", uri=uri, code=2).stderr.startswith(
        "error: invalid connection URI"
    )
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = failing("list", "--json", uri=f"qemu:///embed?root={blocker}/state")
    assert str(blocker) in proc.stderr and _shape(proc)["kind"] == "StateDirError"

    # usage errors: exit 2 from argparse, with its usage line (more in test_cli_unit)
    proc = run_cli("destroy", "x", "--timeout", "-1", uri=uri)
    assert proc.returncode == 2 and "usage: aiovirt destroy" in proc.stderr

    # a state that forbids the operation
    define_none(tmp_path, uri, "off")
    proc = failing("suspend", "off", uri=uri)
    assert proc.stderr.startswith("error: cannot suspend domain 'off'")
    assert "Traceback" in run_cli("suspend", "off", "--debug", uri=uri).stderr

    # a definition that cannot be read: a warning on stderr and a problem in the JSON, and the
    # rest keeps working (last: every later connection reports the record set aside, too)
    (tmp_path / "state" / "domains" / "broken.json").write_text("{ not json")
    proc = ok("list", "--all", "--json", uri=uri)
    listed = json.loads(proc.stdout)
    assert [d["name"] for d in listed["domains"]] == ["off"]
    [problem] = listed["problems"]
    assert problem["kind"] == "definition" and "broken.json" in problem["path"]
    [warning] = proc.stderr.splitlines()  # said once (the library logs it; list does not repeat it)
    assert warning.startswith("warning: ") and "broken.json" in warning
