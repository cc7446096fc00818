"""``aiovirt stop-all`` against real QEMU: the live display in a real pseudo-terminal, one line per
domain through a pipe (JSON lines with --json), and Ctrl-C (SIGINT) that stops escalating at once."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator

import pytest

from ._cli import REPO, aiovirt_argv, cleanup, cli_env, run_cli
from .conftest import pid_alive


@pytest.fixture
def cli_uri(uri: str) -> Iterator[str]:
    yield uri
    cleanup(uri)


_START = """
import json, sys, anyio, aiovirt

async def main():
    async with aiovirt.connect(sys.argv[1]) as conn:
        pids = {}
        for name in sys.argv[2:]:
            cfg = aiovirt.DomainConfig(name=name, memory_mib=16, machine="none", accel="tcg")
            dom = await conn.define(cfg)
            await dom.start()
            pids[name] = dom.pid
        print(json.dumps(pids))

anyio.run(main)
"""


def start_domains(uri: str, *names: str) -> dict[str, int]:
    """Define and start ``machine=none`` domains (they ignore the power button); their pids.

    In a process of their own, which exits: the QEMUs are nobody's children here, as after
    ``aiovirt start``, and whoever stops them sees their exit through their pidfds.
    """
    proc = subprocess.run(
        [sys.executable, "-c", _START, uri, *names],
        capture_output=True,
        text=True,
        check=True,
        env=cli_env(uri),
        cwd=REPO,
        stdin=subprocess.DEVNULL,
    )
    pids: dict[str, int] = json.loads(proc.stdout)
    return pids


def sigterm_pending(pid: int) -> bool:
    """True once SIGTERM is pending for ``pid`` (a stopped process keeps it pending)."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    pending = int(fields["ShdPnd"], 16) | int(fields["SigPnd"], 16)
    return bool(pending & (1 << (signal.SIGTERM - 1)))


_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


def test_stop_all_in_a_terminal_shows_live_progress_then_a_summary(cli_uri: str) -> None:
    pids = start_domains(cli_uri, "t1", "t2", "t3")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = cli_env(cli_uri, TERM="xterm-256color")
    proc = subprocess.Popen(
        aiovirt_argv("stop-all", "--acpi-timeout", "1", "--term-timeout", "10"),
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        env=env,
        cwd=REPO,
    )
    os.close(slave)
    chunks = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError as exc:  # EIO: the child closed the terminal
                if exc.errno != errno.EIO:
                    raise
                break
            if not data:
                break
            chunks.append(data)
        assert proc.wait(timeout=30) == 0
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    raw = b"".join(chunks).decode("utf-8", errors="replace")
    assert "\x1b[" in raw  # drawn with terminal controls: a live display, redrawn in place
    text = _ESCAPES.sub("", raw)
    # the live panel: domains per stage, stopped, failed, time left
    assert "Stopping 3 domains (ACPI, SIGTERM, SIGKILL)" in text
    assert re.search(r"ACPI power button +3\b", text), text
    assert re.search(r"stopped +0\b", text) and re.search(r"failed +0\b", text)
    assert re.search(r"at most [0-9.]+ s left \(no deadline\)", text)
    assert re.search(r"stopped +3\b", text) and "done in" in text
    # then the summary table, one row per domain
    assert re.search(r"Name +Result +Stage +Reason +Elapsed", text)
    for name in ("t1", "t2", "t3"):
        assert re.search(rf"{name} +stopped +sigterm +host-signal", text), text
    assert "Stopped 3 of 3 domains in" in text
    assert not any(pid_alive(p) for p in pids.values())


def test_stop_all_through_a_pipe_prints_a_line_per_domain(cli_uri: str) -> None:
    pids = start_domains(cli_uri, "p1", "p2", "stuck")
    # A QEMU that does not react to SIGTERM. Connect to its monitor only once while it is stopped:
    # QEMU listens with a backlog of 1, so queued connections soon fill it.
    os.kill(pids["stuck"], signal.SIGSTOP)
    try:
        proc = run_cli("stop-all", "--graceful", "--acpi-timeout", "0.5", "--term-timeout", "1", uri=cli_uri)
        assert proc.returncode == 1, proc.stderr  # "stuck" was not stopped
        lines = proc.stdout.splitlines()
        assert "\x1b" not in proc.stdout
        assert len(lines) == 4, lines
        by_name = {line.split(":", 1)[0]: line for line in lines[:3]}
        assert set(by_name) == {"p1", "p2", "stuck"}
        assert by_name["p1"].startswith("p1: stopped (sigterm, host-signal) in ")
        assert by_name["stuck"].startswith("stuck: NOT stopped after ")
        assert "did not exit within" in by_name["stuck"] and "sends no SIGKILL" in by_name["stuck"]
        assert lines[0].split(":")[0] != "stuck"  # in finishing order: the stuck one last
        assert lines[3].startswith("Stopped 2 of 3 domains in ")
        assert pid_alive(pids["stuck"])  # graceful: no SIGKILL
    finally:
        os.kill(pids["stuck"], signal.SIGCONT)  # its pending SIGTERM ends it
    wait_gone(pids["stuck"])

    # the same through a pipe with --json: one JSON line per domain, as each finishes
    pids = start_domains(cli_uri, "j1", "j2")
    proc = run_cli("stop-all", "--json", "--acpi-timeout", "0", "--term-timeout", "5", uri=cli_uri)
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert sorted(r["name"] for r in results) == ["j1", "j2"]
    for r in results:
        assert r["stopped"] is True and r["stage"] == "sigterm" and r["reason"] == "host-signal"
        assert r["interrupted"] is False and r["error"] is None and r["elapsed"] >= 0
    assert not any(pid_alive(p) for p in pids.values())


def wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 30
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(pid)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize(
    "graceful", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["graceful", "forced"]
)
def test_sigint_during_stop_all_sends_nothing_further(cli_uri: str, graceful: bool, backend: str) -> None:
    """Ctrl-C while a stopped QEMU ignores its SIGTERM: no SIGKILL follows, the process is still
    there after the command exited; the unfinished domain is reported, and the status is 130."""
    pids = start_domains(cli_uri, "frozen")
    pid = pids["frozen"]
    os.kill(pid, signal.SIGSTOP)
    flags = ["--graceful"] if graceful else []
    proc = subprocess.Popen(
        aiovirt_argv("stop-all", "--json", *flags, "--acpi-timeout", "0", "--term-timeout", "60"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=cli_env(cli_uri, backend),
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 60
        while not sigterm_pending(pid):  # SIGTERM sent: stop_all now waits up to 60 s
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert "Traceback" not in err
        [result] = [json.loads(line) for line in out.splitlines()]
        assert result["name"] == "frozen" and result["stopped"] is False and result["interrupted"] is True
        assert pid_alive(pid)  # no SIGKILL: it would end even a stopped process
        assert sigterm_pending(pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.kill(pid, signal.SIGCONT)  # the pending SIGTERM now ends it
    wait_gone(pid)
