"""The examples, executed as a user runs them: each in a process of its own, against real QEMU.

- ``examples/fleet_shutdown.py``: the fleet is prepared by a controller that exits leaving its
  QEMUs running (``tests/_controller.py``), as a host's guests are when its shutdown script runs;
- ``examples/test_suite/``: a user's test suite, run by pytest with aiovirt's plugin loaded
  through its entry point.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from aiovirt.testing import TinyGuest

from ._entry_points import ROOT, child_env, write_checkout_metadata
from .conftest import pid_alive, qemu_pids

EXAMPLES = ROOT / "examples"
RUN_TIMEOUT = 300  # seconds for one example run (generous: TCG guests on a loaded machine)
GONE_TIMEOUT = 30  # seconds for a killed QEMU to disappear

BACKENDS = ["asyncio", "trio"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return child_env(write_checkout_metadata(tmp_path_factory.mktemp("entry-points")))


def start_fleet(env: dict[str, str], uri: str, mode: str, *names: str) -> dict[str, int]:
    """Start domains with a controller that then exits, leaving their QEMUs running; their pids."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "_controller.py"), "asyncio", uri, mode, *names],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    pids = {}
    for line in done.stdout.splitlines():
        word, name, pid = line.split()
        assert word == "started"
        pids[name] = int(pid)
    assert sorted(pids) == sorted(n.partition(":")[0] for n in names)
    return pids


def wait_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + GONE_TIMEOUT
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.fixture
def fleet_pids() -> Iterator[dict[str, int]]:
    """The test's QEMUs; any still alive at the end are killed (no controller supervises them)."""
    pids: dict[str, int] = {}
    yield pids
    alive = [p for p in pids.values() if pid_alive(p)]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    wait_gone(alive)


def fleet_shutdown(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(EXAMPLES / "fleet_shutdown.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    out, err = proc.communicate(timeout=RUN_TIMEOUT)
    return proc.returncode, out + err


@pytest.mark.parametrize("backend", BACKENDS)
def test_fleet_shutdown_stops_every_domain(
    env: dict[str, str], uri: str, state_root: Path, fleet_pids: dict[str, int], backend: str
) -> None:
    fleet_pids.update(start_fleet(env, uri, "start", "web-1", "web-2", "web-3:paused"))
    fleet_pids.update(start_fleet(env, uri, "create", "tmp-1"))
    # machine="none" ignores the ACPI button: its share of the deadline passes, then SIGTERM
    code, out = finish(fleet_shutdown(env, uri, "--deadline", "5", "--backend", backend))
    assert code == 0, out
    assert f"stopping 4 domain(s) of {uri} within 5 s (SIGKILL last)" in out
    for name in fleet_pids:
        assert f"\n{name}: stopped after sigterm in " in out, out
    assert "4 of 4 stopped in " in out
    wait_gone(list(fleet_pids.values()))
    assert not [p for p in fleet_pids.values() if pid_alive(p)]
    assert qemu_pids(str(state_root)) == set()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fleet_shutdown_streams_results_and_exits_nonzero_when_one_is_left_running(
    env: dict[str, str], uri: str, fleet_pids: dict[str, int], backend: str
) -> None:
    """Two QEMUs that SIGTERM cannot end (stopped with SIGSTOP, see FACTS) and two that it can.
    The quick ones' results come out while the stuck ones are still waited for: only once they
    are read does the test end ``stuck-1`` itself, which the script then reports as stopped (a
    script printing every result at the end could not see that). ``--graceful`` never kills
    ``stuck-2``: it is reported still running, and the exit status says so."""
    fleet_pids.update(start_fleet(env, uri, "start", "quick-1", "quick-2", "stuck-1", "stuck-2"))
    for name in ("stuck-1", "stuck-2"):
        os.kill(fleet_pids[name], signal.SIGSTOP)
    # no ACPI stage: SIGTERM at once, then 10 s (the deadline does not scale it down) for the stuck
    args = [uri, "--graceful", "--acpi-timeout", "0", "--deadline", "20", "--backend", backend]
    proc = fleet_shutdown(env, *args)
    assert proc.stdout is not None and proc.stderr is not None
    lines: queue.Queue[str] = queue.Queue()

    def read(stream: IO[str]) -> None:
        for line in stream:
            lines.put(line)

    reader = threading.Thread(target=read, args=(proc.stdout,), daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        while not all(any(s.startswith(f"quick-{i}: stopped after sigterm") for s in seen) for i in (1, 2)):
            seen.append(lines.get(timeout=RUN_TIMEOUT))
        assert not any(s.startswith("stuck-") for s in seen), seen
        os.kill(fleet_pids["stuck-1"], signal.SIGKILL)
        code = proc.wait(timeout=RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=RUN_TIMEOUT)
    while not lines.empty():
        seen.append(lines.get())
    out = "".join(seen)
    assert code == 1, out + proc.stderr.read()
    assert "\nstuck-1: stopped after sigterm in " in out
    assert "\nstuck-2: STILL RUNNING after " in out and "DestroyTimeoutError" in out
    assert "\n3 of 4 stopped in " in out and out.endswith("\nstill running: stuck-2\n"), out
    assert pid_alive(fleet_pids["stuck-2"])  # graceful: never SIGKILLed


def test_fleet_shutdown_refuses_bad_input(env: dict[str, str]) -> None:
    code, out = finish(fleet_shutdown(env, "qemu:///embed"))
    assert code == 2 and "qemu:///embed needs exactly one root=DIR" in out
    code, out = finish(fleet_shutdown(env, "test:///empty", "--deadline", "-1"))
    assert code == 2 and "not a positive number of seconds: '-1'" in out


def test_example_test_suite(env: dict[str, str], tiny_guest: TinyGuest) -> None:
    """A user's suite (its own pytest.ini and conftest.py): a real guest booted per test on both
    backends, through the plugin's fixtures."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"],
        cwd=EXAMPLES / "test_suite",
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env=env,
        check=False,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "aiovirt: qemu:///embed (a fresh root per test)" in out
    assert "rootdir: " + str(EXAMPLES / "test_suite") in out
    assert " 4 passed" in out, out
