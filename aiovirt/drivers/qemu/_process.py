"""QEMU processes: spawn, wait through a pidfd, signal through the pidfd, check identity.

No thread per process on either backend: the exit is awaited with ``anyio.wait_readable(pidfd)``
(a pidfd turns readable when its process exits), which works on asyncio (Python 3.11 included,
where asyncio's own child watcher would start a thread per child) and on trio, and works for a
QEMU that an earlier controller started and that therefore is not our child. Signals go through
``pidfd_send_signal`` so they can never reach a process that reused the pid.

This module knows nothing of QMP, configs or domains.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import select
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import anyio

from ..._fds import FdWaits

__all__ = [
    "Process",
    "ProcessIdentity",
    "find_processes_with_arg",
    "proc_state",
    "read_identity",
    "spaced_copies",
]

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ProcessIdentity:
    """What makes a process unique over time: its pid and its start time (clock ticks after boot)."""

    pid: int
    start_time: int


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat from field 3 on (the command name may hold spaces and parens)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return data[data.rindex(b")") + 2 :].decode().split()


def read_identity(pid: int) -> ProcessIdentity | None:
    """The identity of the live process ``pid`` (None when there is none, or only a zombie)."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return ProcessIdentity(pid, int(fields[19]))  # field 22 overall: starttime


def proc_state(pid: int) -> str:
    """The kernel's one-letter state of ``pid`` (``R``, ``S``, ``D``, ``T``, ``Z``...), or ``"gone"``."""
    fields = _stat_fields(pid)
    return "gone" if fields is None else fields[0]


def read_cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [a.decode(errors="surrogateescape") for a in raw.split(b"\0")[:-1]]


def _has_arg_pair(argv: Sequence[str], flag: str, value: str) -> bool:
    return any(a == flag and b == value for a, b in itertools.pairwise(argv))


def find_processes_with_arg(flag: str, value: str) -> Iterator[int]:
    """Pids of live processes whose command line holds ``flag value`` (e.g. ``-uuid U``).

    Used after a controller crash between spawning QEMU and recording its pid.
    """
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _has_arg_pair(read_cmdline(int(entry)), flag, value):
            yield int(entry)


#: How many of the lowest free fd numbers to leave to Popen's own fds (/dev/null for stdin and
#: its two-fd error pipe, plus one to spare).
_POPEN_OWN_FDS = 4


@contextmanager
def spaced_copies(fds: Sequence[int]) -> Iterator[list[int]]:
    """Copies of ``fds``, numbered so that the child can close every other fd with ``close_range``.

    CPython's ``_posixsubprocess`` (3.10 to 3.13 at least) closes the fds between the ones it
    keeps (``pass_fds`` and its own error pipe) with ``close_range(lo, keep - 1)``. When two kept
    fds are adjacent that is ``close_range(k, k - 1)``, which fails with EINVAL, and the child
    falls back to reading ``/proc/self/fd`` and closing every fd one by one. A monitor and a
    console listener bound one after the other are always adjacent. With thousands of fds open
    the fallback costs the spawn O(open fds), and the ``/proc/PID/fd`` entries the listing
    created are invalidated when we reap the QEMU: measured 1.6 ms per reap with 3,000 fds, on
    the event loop. So the copies are placed above the lowest free numbers (where Popen's own
    fds land) with a gap on each side. Open nothing between this and the spawn; a miss costs
    only speed. Use the copies' numbers in the argv and ``pass_fds``; they are closed on exit.
    """
    copies: list[int] = []
    try:
        with suppress(OSError):  # near the fd limit: the fds as they are (a slower spawn)
            copies = _spread(fds)
        yield copies or list(fds)
    finally:
        for fd in copies:
            os.close(fd)


def _spread(fds: Sequence[int]) -> list[int]:
    if not fds:
        return []
    probes: list[int] = []
    copies: list[int] = []
    try:
        for _ in range(_POPEN_OWN_FDS):
            probes.append(os.dup(fds[0]))  # the lowest free numbers, in order
        floor = max(probes) + 2
        for fd in probes:
            os.close(fd)
        probes = []
        for fd in fds:
            copies.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor))
            floor = copies[-1] + 2
    except OSError:
        for fd in probes + copies:
            os.close(fd)
        raise
    return copies


def _boot_time() -> float:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return float(line.split()[1])
    raise RuntimeError("no btime in /proc/stat")  # pragma: no cover - every Linux has it


class Process:
    """One QEMU process, watched through a pidfd.

    Only one task may call :meth:`wait` (the domain's supervisor); others wait on what it reports.
    """

    def __init__(self, identity: ProcessIdentity, pidfd: int) -> None:
        self.identity = identity
        self._pidfd: int | None = pidfd
        self._waits = FdWaits(pidfd)
        self.exited = False
        #: Exit status once known: only for our own children (negative: killed by that signal).
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        return self.identity.pid

    @classmethod
    def spawn(cls, argv: Sequence[str], *, output_fd: int, pass_fds: Sequence[int] = ()) -> Process:
        """Start ``argv`` in a new session, stdin from /dev/null, stdout and stderr to ``output_fd``.

        Every other descriptor is closed in the child. Raises ``OSError`` when it cannot be executed.
        """
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=output_fd,
            stderr=output_fd,
            pass_fds=tuple(pass_fds),
            close_fds=True,
            start_new_session=True,  # outlives the controller; a Ctrl-C to our group does not reach it
        )
        # We reap through the pidfd (waitid P_PIDFD). Popen would otherwise reap the child behind
        # our back (its __del__ and subprocess._cleanup) and warn when we leave QEMU running on
        # purpose, so take the process out of Popen's bookkeeping.
        popen.returncode = 0
        pidfd = os.pidfd_open(popen.pid)
        identity = read_identity(popen.pid)
        if identity is None:
            # It died already (exec succeeded, then QEMU exited at once): the stat of a zombie
            # still has its start time, which is all we need.
            fields = _stat_fields(popen.pid)
            identity = ProcessIdentity(popen.pid, int(fields[19]) if fields else 0)
        return cls(identity, pidfd)

    @classmethod
    def attach(cls, identity: ProcessIdentity, *, uuid: str) -> Process | None:
        """Take over a running QEMU started by an earlier controller, if it still is that QEMU.

        The same pid is not enough (pids are reused): the start time must match and ``-uuid UUID``
        must be on its command line. Returns None, having signalled nothing, when it is not.
        """
        if read_identity(identity.pid) != identity:
            return None
        if not _has_arg_pair(read_cmdline(identity.pid), "-uuid", uuid):
            return None
        try:
            pidfd = os.pidfd_open(identity.pid)
        except ProcessLookupError:
            return None
        # The pidfd now pins whatever process holds the pid; check that it still is ours.
        if read_identity(identity.pid) != identity:
            os.close(pidfd)
            return None
        return cls(identity, pidfd)

    def send_signal(self, sig: signal.Signals) -> bool:
        """Send ``sig`` through the pidfd. False when the process has already exited."""
        if self.exited or self._pidfd is None:
            return False
        try:
            signal.pidfd_send_signal(self._pidfd, sig)
        except ProcessLookupError:
            return False
        return True

    def poll(self) -> bool:
        """True once the process has exited (and, for our child, has been reaped)."""
        if not self.exited and self._pidfd is not None:
            try:
                readable = bool(_poll_readable(self._pidfd))
            except OSError:  # pragma: no cover - a closed fd
                readable = False
            if readable:
                self._reap()
        return self.exited

    async def wait(self) -> None:
        """Wait until the process has exited; reap it when it is our child."""
        while not self.poll():
            if self._pidfd is None:
                raise anyio.ClosedResourceError
            await self._waits.readable()

    def _reap(self) -> None:
        self.exited = True
        assert self._pidfd is not None
        try:
            info = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            return  # not our child (started by an earlier controller): its parent reaps it
        if info is not None:
            self.returncode = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status

    def close(self) -> None:
        """Release the pidfd (the process itself is left alone). Idempotent."""
        if self._pidfd is not None:
            fd, self._pidfd = self._pidfd, None
            self._waits.notify_closing()
            os.close(fd)

    # -- facts about the running process, for Domain.info() ---------------------------------------

    def cpu_time(self) -> float:
        """User + system CPU seconds used so far (0.0 once gone)."""
        fields = _stat_fields(self.pid)
        if fields is None:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK

    def rss_bytes(self) -> int:
        try:
            with open(f"/proc/{self.pid}/statm") as f:
                return int(f.read().split()[1]) * _PAGE_SIZE
        except (FileNotFoundError, ProcessLookupError):
            return 0

    def uptime(self) -> float:
        """Seconds since the process started (from the kernel's start time, so also after reattach)."""
        return max(0.0, time.time() - (_boot_time() + self.identity.start_time / _CLK_TCK))


def _poll_readable(fd: int) -> int:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return len(p.poll(0))
