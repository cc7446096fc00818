"""One QEMU process and its monitor: the supervisor that owns both until the process exits.

Each running domain has one supervisor task (in the driver's task group): it is the only waiter on
the pidfd and owns the monitor (read by a callback of the driver's readers), and it reports what
it sees (QMP events, the exit) to the domain as happenings. QMP's event names become happenings
here and nowhere else.
"""

from __future__ import annotations

import logging
import signal
import socket
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.lowlevel

from ..._broadcast import Subscription
from ..._console import ConsolePort
from ..._errors import AiovirtError, ConnectionLostError, ProtocolError, ReadOnlyError, StateDirError
from ..._lifecycle import Happening
from ...config import DomainConfig
from ...qmp._client import QMPClient
from ...qmp._codec import Event
from .._base import Machine, MachineObserver
from ._overlay import remove_overlays, transient_disks
from ._process import Process, proc_state
from ._serial import SerialConsole

if TYPE_CHECKING:
    from ._driver import QemuDriver

__all__ = ["QemuMachine", "ReadOnlyMachine"]

logger = logging.getLogger("aiovirt")

#: How long a failed launch may take to exit on its own before it is killed.
_LAUNCH_EXIT_WAIT = 5.0
#: Bound on every cleanup that runs shielded from cancellation.
_CLEANUP_TIMEOUT = 30.0
#: After the process exit, how long to wait for the monitor's last events (they are already in
#: the socket buffer; this only bounds a pathological case).
_DRAIN_TIMEOUT = 5.0
#: Taking back a QEMU: how long its monitor may take to answer before it is marked unreachable,
#: and the longest pause between later attempts.
_ADOPT_HANDSHAKE_TIMEOUT = 10.0
_RETRY_MAX = 30.0
#: Before it is marked unreachable, that timeout is shared by this many connections. QEMU 7.2 can
#: spoil the first connection after a controller vanished (it greets twice, or never; see
#: ``_statedir``'s listener note) while a fresh connection answers at once.
_ADOPT_ATTEMPTS = 3

_STATUS_HAPPENING = {
    "running": Happening.ADOPTED_RUNNING,
    "paused": Happening.ADOPTED_PAUSED,
    "shutdown": Happening.ADOPTED_SHUTDOWN,
}
_SHUTDOWN_BY: dict[object, Happening] = {True: Happening.SHUTDOWN_GUEST, False: Happening.SHUTDOWN_HOST}


class QemuMachine(Machine):
    """A QEMU process of one domain, signalled through its pidfd, commanded through its monitor."""

    def __init__(
        self,
        driver: QemuDriver,
        config: DomainConfig,
        proc: Process,
        observer: MachineObserver,
        *,
        transient: bool,
    ) -> None:
        self._driver = driver
        self.config = config
        self._name = config.name
        self._proc = proc
        self._observer = observer
        self._qmp: QMPClient | None = None
        self._unreachable: str | None = None
        self.transient = transient
        # A QEMU being taken back has no state yet: its events before its status is known (the
        # "cont" that finishes an interrupted start, say) are not news.
        self._reporting = True
        self._serial: SerialConsole | None = None

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def process(self) -> Process:
        return self._proc

    def send_signal(self, sig: signal.Signals) -> bool:
        return self._proc.send_signal(sig)

    def poll_exited(self) -> bool:
        # A zombie leader may show before its pidfd turns readable (QEMU's other threads are
        # still exiting): it is dead all the same.
        return self._proc.poll() or proc_state(self._proc.pid) in ("Z", "X", "gone")

    def process_state(self) -> str:
        return proc_state(self._proc.pid)

    async def command(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        qmp = self._qmp
        if qmp is None:
            why = self._unreachable or "it is gone"
            raise ConnectionLostError(
                f"domain {self._name!r}: its monitor cannot be used ({why})", command=command
            )
        return await qmp.execute(command, arguments)

    def monitor_events(self, max_buffer: int) -> AbstractContextManager[Subscription[Event]]:
        if self._qmp is None:
            raise ConnectionLostError(f"domain {self._name!r}: its monitor cannot be used")
        return self._qmp.subscribe(max_buffer)

    def stats(self) -> tuple[float, int, float]:
        return self._proc.cpu_time(), self._proc.rss_bytes(), self._proc.uptime()

    def serve_console(self, sock: socket.socket) -> None:
        """Read the console through ``sock`` (connected to QEMU's console socket) from now on."""
        self._serial = SerialConsole(self._name, sock, self._driver.readers)

    async def console(self) -> ConsolePort:
        serial = self._serial
        if serial is None or (serial.port.closed and not self._proc.poll()):
            # Taken back from a controller that did not serve this console, or QEMU dropped us.
            try:
                sock = self._driver.statedir.connect_console(self._name)
            except (OSError, StateDirError) as exc:
                raise ConnectionLostError(
                    f"domain {self._name!r}: its console cannot be reached ({exc})"
                ) from exc
            self.serve_console(sock)
            serial = self._serial
            assert serial is not None
        await anyio.lowlevel.checkpoint()
        return serial.port

    def set_persistent(self, persistent: bool) -> None:
        self.transient = not persistent
        self._driver.write_running_record(self)

    # -- supervision --------------------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        # Runs where the monitor is read (a reader callback, or on trio a caller waiting for its
        # reply), in QEMU's order.
        if not self._reporting:
            return
        if event.name == "STOP":
            self._observer.happened(Happening.PAUSED)
        elif event.name == "RESUME":
            self._observer.happened(Happening.RESUMED)
        elif event.name == "SHUTDOWN":
            reason = event.data.get("reason")
            happening = _SHUTDOWN_BY.get(event.data.get("guest"), Happening.SHUTDOWN_UNKNOWN)
            self._observer.happened(happening, shutdown_reason=reason if isinstance(reason, str) else None)

    def _exited(self) -> None:
        self._driver.statedir.remove_runtime(self._name)
        remove_overlays(self._driver.statedir, self._name, transient_disks(self.config))
        self._observer.happened(Happening.EXITED)

    async def supervise_launch(
        self,
        sock: socket.socket,
        on_ready: Callable[[QMPClient], Awaitable[None]],
        on_failure: Callable[[BaseException], BaseException],
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Own a QEMU being launched until it exits or the connection closes.

        ``on_ready(qmp)`` finishes the launch once the monitor answers (and may raise);
        ``on_failure(exc)`` turns an error before that point into the one to raise, after the
        process was killed (it must not run unmanaged). A cancellation before that point kills the
        paused QEMU. Nothing escapes into the driver's task group once ready.
        """
        proc = self._proc
        ready = False
        try:
            async with QMPClient.open(sock, on_event=self._on_event, readers=self._driver.readers) as qmp:
                await on_ready(qmp)
                self._qmp = qmp
                ready = True
                task_status.started()
                await proc.wait()
                if not qmp.closed:  # usually it is: QEMU closes its monitor before it is reaped
                    with anyio.move_on_after(_DRAIN_TIMEOUT):
                        await qmp.wait_closed()
        except anyio.get_cancelled_exc_class():
            if not ready:
                # A cancelled start: the paused QEMU will never exit on its own.
                with anyio.move_on_after(_CLEANUP_TIMEOUT, shield=True):
                    await self._kill(grace=0.0)
            raise  # the connection is closing (QEMU lives on) or the start was cancelled
        except Exception as exc:
            if not ready:
                # QEMU refused its config (it is exiting, with its reason in the log) or its monitor
                # cannot be used: then it must not run unmanaged.
                with anyio.move_on_after(_CLEANUP_TIMEOUT, shield=True):
                    await self._kill(grace=_LAUNCH_EXIT_WAIT)
                raise on_failure(exc) from exc
            await self._monitor_broke(exc)
        finally:
            self._qmp = None
            self._close_console()
            if proc.exited:
                self._exited()
            proc.close()

    def _close_console(self) -> None:
        # Supervision ends (the process exited, or the connection closes): so does the console's
        # (QEMU serves it to the next controller).
        if self._serial is not None:
            self._serial.close()

    async def _monitor_broke(self, exc: BaseException) -> None:
        # The monitor failed while QEMU lives on (it should not happen): keep watching the process.
        logger.warning("domain %r: monitor failed: %r; watching the process only", self._name, exc)
        self._qmp = None
        self._unreachable = f"the monitor failed: {exc}"
        self._observer.reachable(self._unreachable)
        await self._proc.wait()

    async def _kill(self, *, grace: float) -> None:
        """Let the process exit on its own for ``grace`` seconds, then SIGKILL it; return once gone."""
        proc = self._proc
        if grace > 0:
            with anyio.move_on_after(grace):
                await proc.wait()
        if not proc.exited:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()

    async def supervise_adopted(
        self, phase: str, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Own a QEMU an earlier controller started, until it exits or the connection closes.

        Its identity was checked: it is never signalled here. ``started`` comes once its status is
        known, or once its monitor failed to answer within one handshake timeout (shared by up to
        ``_ADOPT_ATTEMPTS`` connections, for a QEMU that spoils one): then the domain is marked
        unreachable and the monitor is tried again in the background, with backoff.
        ``phase`` is the recorded phase (``starting``: the last controller died during the start,
        which is finished here).
        """
        proc = self._proc
        announced = False
        self._reporting = False
        delay = 1.0
        spare_attempts = _ADOPT_ATTEMPTS - 1
        try:
            async with anyio.create_task_group() as tg:

                async def watch_exit() -> None:
                    await proc.wait()
                    qmp = self._qmp
                    if qmp is not None and not qmp.closed:
                        with anyio.move_on_after(_DRAIN_TIMEOUT):
                            await qmp.wait_closed()
                    tg.cancel_scope.cancel()

                tg.start_soon(watch_exit)
                while True:
                    try:
                        sock = self._driver.statedir.connect_monitor(self._name)
                        limit = _ADOPT_HANDSHAKE_TIMEOUT / (1 if announced else _ADOPT_ATTEMPTS)
                        async with QMPClient.open(
                            sock,
                            on_event=self._on_event,
                            handshake_timeout=limit,
                            readers=self._driver.readers,
                        ) as qmp:
                            status = (await qmp.execute("query-status"))["status"]
                            booted = status == "prelaunch" or (phase == "starting" and status == "running")
                            if status == "prelaunch":
                                await qmp.execute("cont")
                            # Always rewritten: the record may have been set aside, or lack the pid.
                            self._driver.write_running_record(self)
                            self._qmp = qmp
                            if self._unreachable is not None:
                                self._unreachable = None
                                self._observer.reachable(None)
                            if not announced:
                                happening = (
                                    Happening.ADOPTED_BOOTED
                                    if booted
                                    else _STATUS_HAPPENING.get(status, Happening.ADOPTED_PAUSED)
                                )
                                self._observer.happened(happening)
                                announced = self._reporting = True
                                task_status.started()
                            elif status == "paused":
                                self._observer.happened(Happening.PAUSED)
                            elif status == "shutdown":
                                self._observer.happened(Happening.SHUTDOWN_UNKNOWN)
                            delay = 1.0
                            await qmp.wait_closed()
                        self._qmp = None
                    except (AiovirtError, OSError, KeyError, TypeError) as exc:
                        self._qmp = None
                        problem = f"monitor of QEMU {proc.pid} does not answer: {exc}"
                        if proc.poll():
                            await anyio.sleep_forever()  # exiting: watch_exit reports it
                        if (
                            not announced
                            and spare_attempts
                            and isinstance(exc, ProtocolError | ConnectionLostError)
                        ):
                            # It listens but this connection went wrong: try a fresh one now. (Not
                            # after an OSError: nobody listens, or a stopped QEMU's backlog is full.)
                            spare_attempts -= 1
                            await anyio.sleep(0.05)
                            continue
                        if self._unreachable is None:
                            self._unreachable = problem
                            self._observer.reachable(problem)
                        if not announced:
                            self._observer.happened(Happening.ADOPTED_UNKNOWN)
                            announced = self._reporting = True
                            task_status.started()
                    await anyio.sleep(delay)
                    delay = min(delay * 2, _RETRY_MAX)
        finally:
            self._qmp = None
            self._close_console()
            if proc.exited:
                if not announced:
                    # Gone before we could tell its status: it exited while nobody watched.
                    self._driver.statedir.remove_runtime(self._name)
                    remove_overlays(self._driver.statedir, self._name, transient_disks(self.config))
                    self._observer.happened(Happening.GONE)
                    task_status.started()
                else:
                    self._exited()
            proc.close()


class ReadOnlyMachine(Machine):
    """A QEMU seen by a read-only connection: identity checked, never signalled nor commanded.

    The domain refuses every such request before it gets here (:class:`~aiovirt.ReadOnlyError`);
    these refusals are the second wall.
    """

    def __init__(self, driver: QemuDriver, proc: Process) -> None:
        self._driver = driver
        self._proc = proc

    @property
    def pid(self) -> int:
        return self._proc.pid

    def send_signal(self, sig: signal.Signals) -> bool:
        raise ReadOnlyError(self._driver.uri, f"send {sig.name}")

    def poll_exited(self) -> bool:
        return self._proc.poll()

    def process_state(self) -> str:
        return proc_state(self._proc.pid)

    async def command(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        raise ReadOnlyError(self._driver.uri, f"run {command!r}")

    def monitor_events(self, max_buffer: int) -> AbstractContextManager[Subscription[Event]]:
        raise ReadOnlyError(self._driver.uri, "watch the monitor")

    async def console(self) -> ConsolePort:
        raise ReadOnlyError(self._driver.uri, "open the console")  # it belongs to the controller

    def stats(self) -> tuple[float, int, float]:
        return self._proc.cpu_time(), self._proc.rss_bytes(), self._proc.uptime()
