"""How a QEMU is spawned: it gets the fds it is passed and no other, closed the cheap way.

CPython's child closes the fds it does not keep with ``close_range`` between the kept ones; two
adjacent kept fds make that fail with EINVAL and the child falls back to listing
``/proc/self/fd`` and closing each fd (see ``spaced_copies``). With thousands of fds open that made
every spawn and every reap cost O(open fds): the 1,000-domain destroy took 4x raw. These tests
watch the system calls of a real spawn (strace), in a controller with many fds open.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

_CHILD = r"""
import json, os, socket, sys
import anyio
from aiovirt.drivers.qemu._process import Process, spaced_copies

mode, report = sys.argv[1], sys.argv[2]
held = [socket.socket() for _ in range(300)]  # a controller with many fds open
a, b = socket.socket(), socket.socket()  # as a monitor and a console listener bound in turn
assert b.fileno() == a.fileno() + 1, (a.fileno(), b.fileno())
# The spawned program reports which fds it was given (after its exec, so not a pre-exec listing).
probe = (
    "import json, os, sys; "
    "json.dump(sorted(map(int, os.listdir('/proc/self/fd'))), open(sys.argv[1], 'w'))"
)
with open(os.devnull, "wb") as out:
    if mode == "spaced":
        with spaced_copies([a.fileno(), b.fileno()]) as fds:
            proc = Process.spawn([sys.executable, "-c", probe, report], output_fd=out.fileno(), pass_fds=fds)
    else:
        fds = [a.fileno(), b.fileno()]
        proc = Process.spawn([sys.executable, "-c", probe, report], output_fd=out.fileno(), pass_fds=fds)
anyio.run(proc.wait)
print(json.dumps({"kept": fds, "returncode": proc.returncode}))
"""

_LINE = re.compile(r"^(\d+) +(.*)$")


def _spawn_traced(tmp_path: Path, mode: str) -> tuple[dict[str, object], list[int], list[str]]:
    """Run the child under strace; return its report, the fds the program had, and the system
    calls that the spawned process made before its exec."""
    trace = tmp_path / f"{mode}.trace"
    report = tmp_path / f"{mode}.json"
    proc = subprocess.run(
        [
            *("strace", "-f", "-qq", "-e", "trace=execve,openat,close_range", "-o", str(trace)),
            *(sys.executable, "-c", _CHILD, mode, str(report)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    by_pid: dict[str, list[str]] = defaultdict(list)
    first_pid = None
    execed: set[str] = set()
    for raw in trace.read_text().splitlines():
        m = _LINE.match(raw)
        assert m, raw
        pid, call = m.groups()
        first_pid = first_pid or pid
        if pid in execed:
            continue
        if call.startswith("execve(") and pid != first_pid:
            execed.add(pid)  # the spawned program runs from here on
            continue
        by_pid[pid].append(call)
    children = [pid for pid in execed if pid != first_pid]
    assert len(children) == 1, execed
    return json.loads(proc.stdout), json.loads(report.read_text()), by_pid[children[0]]


@pytest.fixture(autouse=True)
def _need_strace() -> None:
    # scripts/setup.sh installs strace; without it the test fails rather than skips.
    assert shutil.which("strace"), "strace is missing: run scripts/setup.sh"


def test_spaced_copies_let_the_child_close_with_close_range(tmp_path: Path) -> None:
    result, program_fds, before_exec = _spawn_traced(tmp_path, "spaced")
    kept = result["kept"]
    assert isinstance(kept, list)
    assert result["returncode"] == 0
    # Exactly stdin/out/err, the two kept fds and the fd the probe's listing itself opens.
    assert set(kept) <= set(program_fds)
    assert len(program_fds) == 3 + len(kept) + 1, program_fds
    assert [c for c in before_exec if "EINVAL" in c] == []
    assert [c for c in before_exec if "/proc/self/fd" in c] == []
    assert any(c.startswith("close_range(") for c in before_exec)


def test_adjacent_fds_make_the_child_list_every_fd(tmp_path: Path) -> None:
    """The control: without the copies, this Python's child takes the slow path.

    If this fails, CPython no longer falls back on adjacent kept fds and ``spaced_copies`` can go.
    """
    result, program_fds, before_exec = _spawn_traced(tmp_path, "plain")
    assert result["returncode"] == 0
    assert len(program_fds) == 3 + 2 + 1, program_fds  # the slow path closes the same fds
    assert any("EINVAL" in c for c in before_exec if c.startswith("close_range("))
    assert any("/proc/self/fd" in c for c in before_exec)
