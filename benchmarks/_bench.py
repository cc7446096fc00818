"""Helpers shared by the benchmarks: process facts, cleanup, running workers, reporting.

Nothing here imports aiovirt: the raw baseline must not pay for it, and the orchestrators only
start workers (each backend runs in a fresh interpreter so that thread and memory figures are
its own).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
QEMU = "qemu-system-x86_64"
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

#: A result as it travels between worker, orchestrator and run_all.sh: plain JSON.
Result = dict[str, Any]


# -- facts about a process ---------------------------------------------------------------------


def proc_status(pid: int | str = "self") -> dict[str, str]:
    """``/proc/PID/status`` as a mapping (values as text, e.g. ``"Threads": "1"``)."""
    out: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def os_threads(pid: int | str = "self") -> int:
    """Threads of a process as the kernel counts them (not only Python's)."""
    return int(proc_status(pid)["Threads"])


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size right now (``/proc/PID/statm``)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


def kib(status_value: str) -> int:
    """``"1234 kB"`` -> 1234."""
    return int(status_value.split()[0])


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard one (1000 domains need > 2000 descriptors)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def check_nofile(needed: int) -> None:
    soft, _ = raise_nofile_limit()
    if soft < needed:
        sys.exit(f"the open-files limit is {soft} (hard limit included) but about {needed} are needed")


# -- never leave a QEMU behind -------------------------------------------------------------------


def _ppid_and_state(pid: int) -> tuple[int, str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    return int(fields[1]), fields[0].decode()


def children(pid: int | None = None) -> list[int]:
    """Direct children of ``pid`` (default: this process), zombies included."""
    parent = os.getpid() if pid is None else pid
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _ppid_and_state(int(entry))
            if info is not None and info[0] == parent:
                found.append(int(entry))
    return found


def kill_children(exclude: Iterable[int] = ()) -> list[int]:
    """SIGKILL and reap every child of this process except ``exclude``; return the live ones killed.

    A child's pid cannot be reused before we reap it, so this can only hit our own processes.
    Zombies are reaped without being counted.
    """
    skip = set(exclude)
    killed = []
    for pid in children():
        if pid in skip:
            continue
        info = _ppid_and_state(pid)
        if info is not None and info[1] not in ("Z", "X"):
            killed.append(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):  # someone else reaped it meanwhile
            os.waitpid(pid, 0)
    return killed


def become_subreaper(enable: bool = True) -> None:
    """Make QEMUs orphaned by a dying worker our children (so :func:`kill_children` finds them).

    Turn it off before running anything that daemonizes (libvirtd, and the QEMUs libvirtd
    double-forks): those would become our children, and we would neither reap them (libvirt
    then waits for a zombie) nor want :func:`kill_children` to kill them.
    """
    pr_set_child_subreaper = 36
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_child_subreaper, int(enable), 0, 0, 0) != 0:  # pragma: no cover - Linux >= 3.4
        print("warning: cannot change the child-subreaper flag", file=sys.stderr)


# -- running a worker in a fresh interpreter ---------------------------------------------------


def run_worker(
    argv: Sequence[str],
    *,
    sample_interval: float = 0.005,
    timeout: float | None = None,
    keep: Iterable[int] = (),
) -> Result:
    """Run a worker that prints one JSON object as its last stdout line; add external samples.

    While it runs, its thread count and RSS are sampled from outside (``/proc/PID/status``), so
    the worker pays nothing for them: ``peak_threads_sampled``, ``peak_rss_kib_sampled``.
    Orphaned QEMUs of a worker that died are killed and reported as ``orphans_killed`` (our own
    children listed in ``keep`` are left alone).
    """
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    peak_threads = 0
    peak_rss = 0
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while proc.poll() is None:
            try:
                st = proc_status(proc.pid)
                peak_threads = max(peak_threads, int(st["Threads"]))
                peak_rss = max(peak_rss, kib(st.get("VmRSS", "0 kB")))
            except (OSError, KeyError, ValueError):
                pass  # exiting
            if deadline is not None and time.monotonic() > deadline:
                proc.send_signal(signal.SIGINT)  # let it clean up, then it ends
                deadline = None
            time.sleep(sample_interval)
    except BaseException as exc:
        # Ctrl-C reaches the worker too (same process group); a SIGTERM to us alone does not, so
        # pass that on. Then give the worker time to stop its QEMUs (no second signal: it would
        # abort the worker's cleanup).
        if isinstance(exc, KeyboardInterrupt) and exc.args == ("SIGTERM",):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    finally:
        stdout = proc.stdout.read() if proc.stdout else b""
        if proc.stdout:
            proc.stdout.close()
        orphans = kill_children(exclude=keep)
    lines = [line for line in stdout.decode(errors="replace").splitlines() if line.strip()]
    result: Result
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        result = {"ok": False, "error": f"worker exited with {proc.returncode} and printed no result"}
    if proc.returncode != 0 and result.get("ok", True):
        result["ok"] = False
        result.setdefault("error", f"worker exited with {proc.returncode}")
    result["peak_threads_sampled"] = peak_threads
    result["peak_rss_kib_sampled"] = peak_rss
    if orphans:
        result["orphans_killed"] = len(orphans)
    return result


def describe(exc: BaseException) -> str:
    """One line for an error; for an exception group, its first leaf and how many there were."""
    if isinstance(getattr(exc, "exceptions", None), tuple):
        leaves = []
        stack: list[BaseException] = [exc]
        while stack:
            e = stack.pop()
            inner = getattr(e, "exceptions", None)
            if isinstance(inner, tuple):
                stack.extend(reversed(inner))
            else:
                leaves.append(e)
        first = leaves[0] if leaves else exc
        return f"{len(leaves)} errors, the first: {type(first).__name__}: {first}"
    return f"{type(exc).__name__}: {exc}"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt("SIGTERM")


def _sigint_self(signum: int, frame: object) -> None:
    os.kill(os.getpid(), signal.SIGINT)


def terminate_as_interrupt(*, event_loop: bool = False) -> None:
    """Make SIGTERM behave as Ctrl-C, so that every ``finally`` stops its QEMUs.

    With ``event_loop`` (a worker that runs asyncio or trio) SIGTERM becomes a real SIGINT, so
    that the event loop handles it as its own Ctrl-C (asyncio cancels the main task, trio raises
    KeyboardInterrupt where it is safe) instead of an exception raised inside the loop's internals.
    """
    signal.signal(signal.SIGTERM, _sigint_self if event_loop else _interrupt)


def emit(result: Result) -> None:
    """A worker's last word: one JSON line on stdout."""
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


# -- facts about the run -----------------------------------------------------------------------


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def qemu_version() -> str:
    try:
        out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"unavailable ({exc})"
    return out.splitlines()[0].removeprefix("QEMU emulator version ").strip()


def git_revision() -> str | None:
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("+dirty" if dirty else "")


def environment() -> Result:
    """What a reader needs to judge the numbers: versions, machine size and how busy it was."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "qemu": qemu_version(),
        "aiovirt": _version("aiovirt"),
        "aiovirt_git": git_revision(),
        "anyio": _version("anyio"),
        "trio": _version("trio"),
        "qemu.qmp": _version("qemu.qmp"),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": list(os.getloadavg()),
        "nofile_limit": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
    }


# -- reporting ---------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(c) for c in row) + " |")
    return "\n".join(lines)


def verdict(value: float | None, limit: float, *, below: bool = True) -> str:
    """``"met"`` / ``"missed"`` for a target (``value <= limit`` when ``below``), ``"-"`` if unknown."""
    if value is None:
        return "-"
    ok = value <= limit if below else value >= limit
    return "met" if ok else "missed"


def write_outputs(result: Mapping[str, Any], markdown: str, json_out: str | None, md_out: str | None) -> None:
    """Print the JSON object and the markdown; also write them to files when asked."""
    text = json.dumps(result, indent=2)
    print(text)
    print()
    print(markdown)
    if json_out:
        Path(json_out).write_text(text + "\n")
    if md_out:
        Path(md_out).write_text(markdown + "\n")


def paired_ratios(
    runs: Sequence[Mapping[str, Any]], who: str, name: str, base: str, field: str
) -> list[float]:
    """``field`` of ``name`` over ``base`` for each repeat both ran in (``run[who]`` names the
    backend or client, ``run["repeat"]`` the round): a ratio between runs made side by side."""
    bases = {r.get("repeat"): r for r in runs if r.get(who) == base and r.get("ok")}
    out = []
    for r in runs:
        b = bases.get(r.get("repeat"))
        if r.get(who) == name and r.get("ok") and b is not None:
            value = ratio(r.get(field), b.get(field))
            if value is not None:
                out.append(value)
    return out


def put_ratio(summary: dict[str, Any], key: str, ratios: Sequence[float]) -> None:
    """Store the median of ``ratios`` as ``key`` and their range as ``key_spread``."""
    if ratios:
        summary[key] = round(median(ratios), 3)
        summary[f"{key}_spread"] = [round(min(ratios), 3), round(max(ratios), 3)]


def with_spread(summary: Mapping[str, Any], key: str) -> str | None:
    """``median (min-max)`` of a ratio over the repeats; just the value after one run."""
    value, spread = summary.get(key), summary.get(f"{key}_spread")
    if value is None:
        return None
    if not spread or spread[0] == spread[1]:
        return fmt(value)
    return f"{fmt(value)} ({fmt(spread[0])}-{fmt(spread[1])})"
