"""The ``aiovirt`` command beside a running controller: while another process holds the state
directory, ``-r`` and the verbs that only read show a read-only view, and the verbs that change
something fail naming the holder's pid."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ._cli import REPO, cleanup, cli_env, define_none, failing, ok, ok_json, run_cli
from .conftest import pid_alive

_HOLDER = """
import sys, anyio, aiovirt

async def main():
    async with aiovirt.connect(sys.argv[1]) as conn:
        dom = await conn.lookup("held")
        await dom.start()
        print(dom.pid, flush=True)
        await anyio.sleep(600)

anyio.run(main)
"""


@pytest.fixture
def holder(tmp_path: Path, uri: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A controller process holding the state directory, with one running domain ``held``, and
    an inactive one ``idle``; yields the process and the QEMU's pid."""
    define_none(tmp_path, uri, "held")
    define_none(tmp_path, uri, "idle")
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, uri],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=cli_env(uri),
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip().isdigit(), f"the holder did not start its domain: {line!r}"
        yield proc, int(line)
    finally:
        proc.terminate()  # leaving connect() on the signal: the lock is released, QEMU keeps running
        proc.wait(timeout=30)
        cleanup(uri)


def test_read_only_list_beside_a_controller(uri: str, holder: tuple[subprocess.Popen[str], int]) -> None:
    proc, qemu_pid = holder
    # -r: no lock asked for, no notice
    listed = run_cli("-r", "list", "--all", "--json", uri=uri)
    assert listed.returncode == 0, listed.stderr
    shape = json.loads(listed.stdout)
    assert shape["readonly"] is True
    domains = {d["name"]: d for d in shape["domains"]}
    assert domains["held"]["state"] == "running" and domains["held"]["pid"] == qemu_pid
    assert domains["idle"]["state"] == "shutoff"
    assert listed.stderr == ""
    text = ok("-r", "list", uri=uri).stdout
    assert "held" in text and str(qemu_pid) in text and "idle" not in text

    # no -r: a verb that only reads falls back to the read-only view and says so, with the pid
    fallback = ok("list", "--json", uri=uri)
    assert json.loads(fallback.stdout)["readonly"] is True
    assert fallback.stderr.startswith("note: ") and f"held by process {proc.pid}" in fallback.stderr
    for argv in (["dominfo", "held"], ["domstate", "held"], ["dumpxml", "held"], ["console-log", "idle"]):
        shown = ok(*argv, uri=uri)
        assert f"process {proc.pid}" in shown.stderr, argv
    assert ok_json("-r", "dominfo", "held", uri=uri)["pid"] == qemu_pid
    assert pid_alive(qemu_pid)


def test_mutating_verbs_fail_naming_the_holder(uri: str, holder: tuple[subprocess.Popen[str], int]) -> None:
    proc, qemu_pid = holder
    for argv in (["start", "idle"], ["destroy", "held"], ["stop-all"], ["event", "--timeout", "1"]):
        failed = failing(*argv, "--json", uri=uri)
        assert f"locked by process {proc.pid}" in failed.stderr, argv
        assert "aiovirt -r list" in failed.stderr  # the way that still works
        error = json.loads(failed.stdout)["error"]
        assert error["kind"] == "StateDirLockedError" and error["pid"] == proc.pid
    # asked read-only: refused without touching anything
    refused = failing("-r", "destroy", "held", "--json", uri=uri)
    assert "read-only" in refused.stderr
    assert json.loads(refused.stdout)["error"]["kind"] == "ReadOnlyError"
    assert pid_alive(qemu_pid) and proc.poll() is None
