"""The physical-limit baseline: N QEMUs with plain ``subprocess``, one epoll loop, no framework.

Mirrors ``/work/shared/anchors/raw_fleet.py`` with two changes that only make the baseline
faster, so that "within 1.3x of raw" is a bound against the best a controller could do:

- the monitor is a unix socket that we bind and connect *before* spawning and hand to QEMU as a
  listening fd (``-chardev socket,fd=N,server=on,wait=off``, as libvirt and aiovirt do), so there
  is no connect-retry polling: "started" is the moment each QEMU's greeting was read, all greetings
  awaited together in one epoll loop (the listener is non-blocking, as aiovirt's, see ``run``);
- the exits are awaited through pidfds opened at spawn time; SIGTERM goes through the pidfd.

By default the argv comes from ``aiovirt.config.render_argv`` (same QEMU, same options as aiovirt
spawns, but not paused: the raw baseline sends no ``cont``), serial console included: a second
listening socket that we connect before the spawn and never read, logged to a file by QEMU, as
aiovirt's default ``console=True`` domains have; ``argv="anchor"`` uses the anchor's (no console).

With ``handshake=True`` (the ``raw-qmp`` backend) the baseline does the same protocol work per
domain as aiovirt's ``create``: QEMU starts paused (``-S``), and after the greeting each monitor
gets ``qmp_capabilities`` then ``cont``, "started" being the ``cont`` reply; still one epoll loop,
all domains in flight at once. This matters for ``machine=pc``: QEMU 7.2 greets from the
monitor's I/O thread while its main thread is still building the machine, and the first command
is answered only once that is done (about 15 ms later for ``pc`` here), so "greeting read"
understates what starting a ``pc`` domain costs.
"""

from __future__ import annotations

import contextlib
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

#: (index, monitor fd, (console fd, console log path) or None) -> argv
ArgvFactory = Callable[[int, int, "tuple[int, str] | None"], list[str]]


def anchor_argv(machine: str, memory_mib: int, *, paused: bool = False) -> ArgvFactory:
    """The anchor's argv (libvirt's shape), with the monitor given as a listening fd."""

    def make(i: int, fd: int, console: tuple[int, str] | None) -> list[str]:
        assert console is None, "the anchor's argv has no serial console"
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
        if paused:
            argv.append("-S")
        return argv

    return make


def aiovirt_argv(machine: str, memory_mib: int, *, paused: bool = False) -> ArgvFactory:
    """The argv aiovirt itself renders for the same config (paused only if we send ``cont``)."""
    from aiovirt.config import DomainConfig, render_argv

    def make(i: int, fd: int, console: tuple[int, str] | None) -> list[str]:
        cfg = DomainConfig(
            name=f"raw{i}",
            uuid=uuid.uuid4(),
            machine=machine,
            accel="tcg",
            memory_mib=memory_mib,
            console=console is not None,
        )
        console_fd, console_path = console if console is not None else (None, None)
        return list(
            render_argv(cfg, monitor_fd=fd, console_fd=console_fd, console_path=console_path, paused=paused)
        )

    return make


_CAPABILITIES = b'{"execute": "qmp_capabilities"}\n'
_CONT = b'{"execute": "cont"}\n'


class _Domain:
    __slots__ = ("buf", "index", "mon", "pidfd", "popen", "step")

    def __init__(self, index: int, popen: subprocess.Popen[bytes], pidfd: int, mon: socket.socket) -> None:
        self.index = index
        self.popen = popen
        self.pidfd = pidfd
        self.mon = mon
        self.buf = b""
        self.step = 0  # complete lines expected so far: greeting, capabilities reply, cont reply

    def feed(self, data: bytes, handshake: bool) -> bool:
        """Take bytes from the monitor; True once this domain counts as started."""
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            if self.step > 0 and b'"return"' not in line:
                if b'"error"' in line:
                    raise RuntimeError(f"QEMU {self.popen.pid} refused a command: {line[:200]!r}")
                continue  # an event (e.g. RESUME before cont's reply)
            self.step += 1
            if not handshake:
                return True
            if self.step == 1:
                self.mon.send(_CAPABILITIES)
            elif self.step == 2:
                self.mon.send(_CONT)
            else:
                return True
        return False


def describe_stuck(pid: int) -> str:
    """What a QEMU that does not answer is doing: each thread's kernel wait channel and syscall."""
    parts = []
    try:
        for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                wchan = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                syscall = f.read().split()[0]
            parts.append(f"{tid}:{wchan or '-'}/syscall {syscall}")
    except OSError as exc:
        parts.append(f"({exc})")
    return f"pid {pid} [{', '.join(parts)}]"


def _listen(path: str) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(8)
        # As aiovirt does: a blocking listener can wedge QEMU 7.2's main thread in accept4()
        # (its main loop and monitor I/O thread race for the queued connection).
        listener.setblocking(False)
    except BaseException:
        listener.close()
        raise
    return listener


def _spawn(i: int, workdir: Path, make_argv: ArgvFactory, consoles: list[socket.socket] | None) -> _Domain:
    """Spawn QEMU number ``i`` with its monitor connected (queued in the backlog) and, when
    ``consoles`` is a list, a serial console socket connected and appended to it."""
    path = str(workdir / f"{i}.qmp")
    listener = _listen(path)
    con_listener = _listen(str(workdir / f"{i}.serial")) if consoles is not None else None
    try:
        mon = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        mon.connect(path)  # queued in the backlog; QEMU accepts it when it is up
        mon.setblocking(False)
        kept = [listener.fileno()]
        console_arg = None
        if con_listener is not None and consoles is not None:
            con = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            con.connect(str(workdir / f"{i}.serial"))  # QEMU waits for it (wait=on)
            consoles.append(con)  # held open, never read (a guest that prints little)
            kept.append(con_listener.fileno())
            console_arg = (con_listener.fileno(), str(workdir / f"{i}.console"))
        popen = subprocess.Popen(
            make_argv(i, listener.fileno(), console_arg),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=kept,
            start_new_session=True,
        )
    finally:
        listener.close()
        if con_listener is not None:
            con_listener.close()
    return _Domain(i, popen, os.pidfd_open(popen.pid), mon)


def _clean_up(doms: list[_Domain], consoles: list[socket.socket]) -> None:
    for dom in doms:
        if dom.popen.returncode is None:
            dom.popen.kill()
            dom.popen.wait()
        os.close(dom.pidfd)
        dom.mon.close()
    for con in consoles:
        con.close()


def run(
    n: int,
    workdir: Path,
    make_argv: ArgvFactory,
    *,
    handshake: bool = False,
    console: bool = False,
    greeting_timeout: float = 60.0,
) -> Result:
    """Start ``n`` QEMUs, wait for every greeting (``handshake``: and the replies to
    ``qmp_capabilities`` and ``cont``), SIGTERM all, wait for every exit. Always cleans up.

    With ``console`` each QEMU also gets a serial console socket (connected, never read) and log."""
    doms: list[_Domain] = []
    consoles: list[socket.socket] = []
    ep = select.epoll()
    gc.collect()
    threads_before = os_threads()
    rss_before = rss_bytes()
    fds_before = open_fds()
    try:
        t0 = time.perf_counter()
        c0 = time.process_time()  # the controller's own CPU
        by_fd: dict[int, _Domain] = {}
        for i in range(n):
            dom = _spawn(i, workdir, make_argv, consoles if console else None)
            doms.append(dom)
            mon = dom.mon
            by_fd[mon.fileno()] = dom
            ep.register(mon.fileno(), select.EPOLLIN)
        ready_at: list[float] = []
        waiting = n
        deadline = time.monotonic() + greeting_timeout
        while waiting:
            events = ep.poll(1.0)
            if not events and time.monotonic() > deadline:
                stuck = [d for d in doms if d.step == 0]
                raise RuntimeError(
                    f"{len(stuck)} of {n} QEMUs did not answer within {greeting_timeout:g} s: "
                    + "; ".join(describe_stuck(d.popen.pid) for d in stuck[:5])
                )
            for fd, _ in events:
                dom = by_fd[fd]
                data = dom.mon.recv(4096)
                if not data:
                    raise RuntimeError(f"QEMU {dom.popen.pid} closed its monitor while starting")
                if dom.feed(data, handshake):
                    ep.unregister(fd)
                    ready_at.append(time.perf_counter() - t0)
                    waiting -= 1
        t1 = time.perf_counter()
        c1 = time.process_time()
        gc.collect()
        rss_running = rss_bytes()
        threads_running = os_threads()
        fds_running = open_fds()

        by_pidfd = {d.pidfd: d for d in doms}
        t2 = time.perf_counter()
        c2 = time.process_time()
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
        c3 = time.process_time()
    finally:
        _clean_up(doms, consoles)
        ep.close()
    ready_at.sort()
    return {
        "start_s": round(t1 - t0, 4),
        "start_p50_s": round(ready_at[len(ready_at) // 2], 4) if ready_at else None,
        "destroy_s": round(t3 - t2, 4),
        "start_cpu_s": round(c1 - c0, 4),
        "destroy_cpu_s": round(c3 - c2, 4),
        "threads_before": threads_before,
        "threads_running": threads_running,
        "rss_before_kib": rss_before // 1024,
        "rss_running_kib": rss_running // 1024,
        "fds_before": fds_before,
        "fds_running": fds_running,
    }


def run_tasks(
    n: int,
    workdir: Path,
    make_argv: ArgvFactory,
    *,
    backend: str,
    console: bool = False,
    duties: bool = False,
) -> Result:
    """The floor of a controller built on anyio: what ``run`` does, with one task per domain.

    Each domain's task spawns its QEMU exactly as ``run`` does and awaits its greeting with
    ``anyio.wait_readable``; at destroy each task sends SIGTERM through the pidfd, awaits the
    pidfd with ``anyio.wait_readable`` and reaps with ``waitid``. Nothing else: no QMP beyond
    the greeting, no records, no events, no console reading. The distance from ``run`` is what
    the event loop and one task per domain cost; aiovirt cannot come closer to raw than this.

    With ``duties`` the task also does, in the fewest steps, what aiovirt must do at a destroy
    beyond that: it reads the monitor to its EOF (QEMU's SHUTDOWN event comes before it), closes
    the monitor and console sockets and removes the runtime record (a small file written once
    the greeting is read) and both socket files.
    """
    import anyio

    doms: list[_Domain] = []
    consoles: list[socket.socket] = []
    ready_at: list[float] = []

    async def start(i: int, t0: float) -> None:
        dom = _spawn(i, workdir, make_argv, consoles if console else None)
        doms.append(dom)
        mon, popen = dom.mon, dom.popen
        while True:
            await anyio.wait_readable(mon)
            data = mon.recv(4096)
            if not data:
                raise RuntimeError(f"QEMU {popen.pid} closed its monitor while starting")
            if dom.feed(data, False):
                break
        if duties:
            fd = os.open(workdir / f"{dom.index}.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.write(fd, b'{"pid": %d}' % popen.pid)
            os.close(fd)
        ready_at.append(time.perf_counter() - t0)

    async def destroy(dom: _Domain) -> None:
        signal.pidfd_send_signal(dom.pidfd, signal.SIGTERM)
        if duties:
            while True:
                await anyio.wait_readable(dom.mon)
                if not dom.mon.recv(4096):
                    break
        await anyio.wait_readable(dom.pidfd)
        os.waitid(os.P_PIDFD, dom.pidfd, os.WEXITED)  # noqa: ASYNC222  (it has exited: no wait)
        dom.popen.returncode = 0  # reaped above
        if duties:
            dom.mon.close()
            if console:
                consoles[dom.index].close()
            for suffix in ("json", "qmp", "serial"):
                with contextlib.suppress(FileNotFoundError):  # QEMU removes its sockets' files
                    os.unlink(workdir / f"{dom.index}.{suffix}")

    async def main() -> Result:
        gc.collect()
        out: Result = {
            "threads_before": os_threads(),
            "rss_before_kib": rss_bytes() // 1024,
            "fds_before": open_fds(),
        }
        t0 = time.perf_counter()
        c0 = time.process_time()  # the controller's own CPU
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(n):
                    tg.start_soon(start, i, t0)
        t1 = time.perf_counter()
        c1 = time.process_time()
        gc.collect()
        out.update(rss_running_kib=rss_bytes() // 1024, threads_running=os_threads(), fds_running=open_fds())
        await anyio.sleep(0.02)
        t2 = time.perf_counter()
        c2 = time.process_time()
        async with anyio.create_task_group() as tg:
            for dom in doms:
                tg.start_soon(destroy, dom)
        t3 = time.perf_counter()
        c3 = time.process_time()
        ready_at.sort()
        out.update(
            start_s=round(t1 - t0, 4),
            start_p50_s=round(ready_at[len(ready_at) // 2], 4) if ready_at else None,
            destroy_s=round(t3 - t2, 4),
            start_cpu_s=round(c1 - c0, 4),
            destroy_cpu_s=round(c3 - c2, 4),
        )
        return out

    try:
        return anyio.run(main, backend=backend)
    finally:
        _clean_up(doms, consoles)
