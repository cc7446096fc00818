"""The physical-limit baseline: N QEMUs with plain ``subprocess``, one epoll loop, no framework.

Mirrors ``/work/shared/anchors/raw_fleet.py`` with two changes that only make the baseline
faster, so that "within 1.3x of raw" is a bound against the best a controller could do:

- the monitor is a unix socket that we bind and connect *before* spawning and hand to QEMU as a
  listening fd (``-chardev socket,fd=N,server=on,wait=off``, as libvirt and aiovirt do), so there
  is no connect-retry polling: "started" is the moment each QEMU's greeting was read, all greetings
  awaited together in one epoll loop;
- the exits are awaited through pidfds opened at spawn time; SIGTERM goes through the pidfd.

By default the argv comes from ``aiovirt.config.render_argv`` (same QEMU, same options as aiovirt
spawns, but not paused: the raw baseline sends no ``cont``); ``argv="anchor"`` uses the anchor's.
"""

from __future__ import annotations

import gc
import os
import select
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from _bench import QEMU, Result, open_fds, os_threads, rss_bytes

ArgvFactory = Callable[[int, int], list[str]]  # (index, monitor fd) -> argv


def anchor_argv(machine: str, memory_mib: int) -> ArgvFactory:
    """The anchor's argv (libvirt's shape), with the monitor given as a listening fd."""

    def make(i: int, fd: int) -> list[str]:
        argv = [
            QEMU,
            "-name",
            f"guest=raw{i}",
            "-machine",
            machine,
            "-accel",
            "tcg",
            "-m",
            str(memory_mib),
            "-smp",
            "1",
            "-display",
            "none",
            "-no-user-config",
            "-nodefaults",
            "-chardev",
            f"socket,id=mon,fd={fd},server=on,wait=off",
            "-mon",
            "chardev=mon,mode=control",
        ]
        if machine != "none":
            argv += ["-cpu", "qemu64", "-audiodev", "none,id=audio1"]
        return argv

    return make


def aiovirt_argv(machine: str, memory_mib: int) -> ArgvFactory:
    """The argv aiovirt itself renders for the same config (not paused: nobody sends ``cont``)."""
    from aiovirt.config import DomainConfig, render_argv

    def make(i: int, fd: int) -> list[str]:
        cfg = DomainConfig(
            name=f"raw{i}", uuid=uuid.uuid4(), machine=machine, accel="tcg", memory_mib=memory_mib
        )
        return list(render_argv(cfg, monitor_fd=fd, console_path=None, paused=False))

    return make


class _Domain:
    __slots__ = ("buf", "mon", "pidfd", "popen")

    def __init__(self, popen: subprocess.Popen[bytes], pidfd: int, mon: socket.socket) -> None:
        self.popen = popen
        self.pidfd = pidfd
        self.mon = mon
        self.buf = b""


def run(n: int, workdir: Path, make_argv: ArgvFactory) -> Result:
    """Start ``n`` QEMUs, wait for every greeting, SIGTERM all, wait for every exit. Always cleans up."""
    doms: list[_Domain] = []
    ep = select.epoll()
    gc.collect()
    threads_before = os_threads()
    rss_before = rss_bytes()
    fds_before = open_fds()
    try:
        t0 = time.perf_counter()
        by_fd: dict[int, _Domain] = {}
        for i in range(n):
            path = str(workdir / f"{i}.qmp")
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                listener.bind(path)
                listener.listen(1)
                mon = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                mon.connect(path)  # queued in the backlog; QEMU accepts it when it is up
                mon.setblocking(False)
                popen = subprocess.Popen(
                    make_argv(i, listener.fileno()),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    pass_fds=(listener.fileno(),),
                    start_new_session=True,
                )
            finally:
                listener.close()
            dom = _Domain(popen, os.pidfd_open(popen.pid), mon)
            doms.append(dom)
            by_fd[mon.fileno()] = dom
            ep.register(mon.fileno(), select.EPOLLIN)
        ready_at: list[float] = []
        waiting = n
        while waiting:
            for fd, _ in ep.poll():
                dom = by_fd[fd]
                data = dom.mon.recv(4096)
                if not data:
                    raise RuntimeError(f"QEMU {dom.popen.pid} closed its monitor before the greeting")
                dom.buf += data
                if b"\n" in dom.buf:
                    ep.unregister(fd)
                    ready_at.append(time.perf_counter() - t0)
                    waiting -= 1
        t1 = time.perf_counter()
        gc.collect()
        rss_running = rss_bytes()
        threads_running = os_threads()
        fds_running = open_fds()

        by_pidfd = {d.pidfd: d for d in doms}
        t2 = time.perf_counter()
        for dom in doms:
            signal.pidfd_send_signal(dom.pidfd, signal.SIGTERM)
            ep.register(dom.pidfd, select.EPOLLIN)
        left = n
        while left:
            for fd, _ in ep.poll():
                ep.unregister(fd)
                os.waitid(os.P_PIDFD, fd, os.WEXITED)
                by_pidfd[fd].popen.returncode = 0  # reaped above
                left -= 1
        t3 = time.perf_counter()
    finally:
        for dom in doms:
            if dom.popen.returncode is None:
                dom.popen.kill()
                dom.popen.wait()
            os.close(dom.pidfd)
            dom.mon.close()
        ep.close()
    ready_at.sort()
    return {
        "start_s": round(t1 - t0, 4),
        "start_p50_s": round(ready_at[len(ready_at) // 2], 4) if ready_at else None,
        "destroy_s": round(t3 - t2, 4),
        "threads_before": threads_before,
        "threads_running": threads_running,
        "rss_before_kib": rss_before // 1024,
        "rss_running_kib": rss_running // 1024,
        "fds_before": fds_before,
        "fds_running": fds_running,
    }
