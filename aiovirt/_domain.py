"""Domain: the one place that combines a config, a QEMU process, its monitor and the state machine.

State comes from what QEMU and the kernel report, never from what we asked for: PAUSED after the
monitor's STOP event, SHUTOFF only once the process exit was seen through its pidfd. Each running
domain has one supervisor task (in the connection's task group) that owns the process and the
monitor: it is the only waiter on the pidfd and the only reader of the monitor, and everyone else
waits on what it reports.
"""

from __future__ import annotations

import logging
import signal
import socket
import time
import uuid as uuid_mod
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from ._broadcast import Broadcaster, Subscription
from ._errors import (
    ConnectionLostError,
    DestroyTimeoutError,
    InvalidStateError,
    LaunchError,
    ProcessBusyError,
)
from ._fleet import StopPolicy, StopResult, stop_domain
from ._process import Process, proc_state
from ._states import DomainEvent, DomainState, EventDetail, EventKind, StateReason
from .config import DomainConfig
from .qmp._client import QMPClient
from .qmp._codec import Event

if TYPE_CHECKING:
    from ._connection import Connection

__all__ = ["Domain", "DomainInfo"]

logger = logging.getLogger("aiovirt")

#: How long a failed launch may take to exit on its own before it is killed.
_LAUNCH_EXIT_WAIT = 5.0
#: Bound on every cleanup that runs shielded from cancellation.
_CLEANUP_TIMEOUT = 30.0
#: After the process exit, how long to wait for the monitor's last events (they are already in
#: the socket buffer; this only bounds a pathological case).
_DRAIN_TIMEOUT = 5.0


@dataclass(frozen=True)
class DomainInfo:
    """A snapshot of a domain, as ``virDomainGetInfo`` gives it."""

    state: DomainState
    reason: StateReason
    pid: int | None
    memory_mib: int
    vcpus: int
    cpu_time: float  # seconds of CPU used by the QEMU process
    rss_bytes: int  # resident memory of the QEMU process
    uptime: float  # seconds since the QEMU process started


class Domain:
    """A virtual machine of a :class:`~aiovirt.Connection` (from ``define``, ``create`` or ``lookup``)."""

    def __init__(
        self, conn: Connection, config: DomainConfig, *, persistent: bool, autostart: bool = False
    ) -> None:
        self._conn = conn
        self._config = config
        self._running_config: DomainConfig | None = None
        self._persistent = persistent
        self._autostart = autostart
        self._state = DomainState.SHUTOFF
        self._reason = StateReason.UNKNOWN
        self._process: Process | None = None
        self._qmp: QMPClient | None = None
        self._exited: anyio.Event | None = None
        self._lock: anyio.Lock | None = None
        self._events: Broadcaster[DomainEvent] = Broadcaster()
        self._state_waiters: list[tuple[DomainState, anyio.Event]] = []
        self._shutdown_reason: str | None = None  # QMP's SHUTDOWN reason, e.g. "guest-shutdown"
        self._term_sent = False
        self._starting = False
        self._gone = False  # undefined (persistent) or stopped (transient): the object is stale

    # -- identity and state ---------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._config.name

    @property
    def uuid(self) -> uuid_mod.UUID:
        uuid = self._config.uuid
        assert uuid is not None  # the connection assigns one before a Domain exists
        return uuid

    @property
    def config(self) -> DomainConfig:
        """The definition; while running, the config QEMU was started with."""
        return self._running_config or self._config

    @property
    def persistent(self) -> bool:
        return self._persistent

    @property
    def autostart(self) -> bool:
        return self._autostart

    @property
    def state(self) -> DomainState:
        return self._state

    @property
    def reason(self) -> StateReason:
        return self._reason

    @property
    def active(self) -> bool:
        return self._state.active

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def shutdown_reason(self) -> str | None:
        """QEMU's reason for the last shutdown (``"guest-shutdown"``, ``"host-signal"``...), if any."""
        return self._shutdown_reason

    @property
    def log_path(self) -> Path:
        return self._conn._statedir.log_path(self.name)

    @property
    def console_path(self) -> Path | None:
        return self._conn._statedir.console_path(self.name) if self.config.console else None

    def __repr__(self) -> str:
        return f"<Domain {self.name!r} {self._state.value}/{self._reason.value} pid={self.pid}>"

    def _require(self, operation: str, *allowed: DomainState) -> tuple[Process, QMPClient]:
        proc = self._require_process(operation, *allowed)
        if self._qmp is None:
            raise ConnectionLostError(f"domain {self.name!r}: its monitor is gone", command=operation)
        return proc, self._qmp

    def _require_process(self, operation: str, *allowed: DomainState) -> Process:
        if self._state not in allowed or self._process is None:
            raise InvalidStateError(self.name, operation, self._state, self._reason)
        return self._process

    def _set_state(self, state: DomainState, reason: StateReason) -> None:
        self._state, self._reason = state, reason
        waiters, self._state_waiters = self._state_waiters, []
        for wanted, event in waiters:
            if wanted == state:
                event.set()
            else:
                self._state_waiters.append((wanted, event))

    def _emit(self, kind: EventKind, detail: EventDetail) -> None:
        event = DomainEvent(kind, detail, self.name, self.uuid, time.time())
        self._events.publish(event)
        self._conn._publish(event)

    async def wait_for_state(self, state: DomainState) -> None:
        """Return once the domain is (or has passed through) ``state``. Bound it with ``anyio.fail_after``.

        A transition that happens while waiting is never missed, even if the domain moves on at once.
        """
        if self._state == state:
            return
        event = anyio.Event()
        self._state_waiters.append((state, event))
        try:
            await event.wait()
        finally:
            if not event.is_set():
                self._state_waiters.remove((state, event))

    @asynccontextmanager
    async def subscribe(self, max_buffer: int = 256) -> AsyncIterator[Subscription[DomainEvent]]:
        """Lifecycle events of this domain while the block is open (see :mod:`aiovirt._broadcast` for the
        overflow policy)."""
        with self._events.subscribe(max_buffer) as sub:
            yield sub

    async def info(self) -> DomainInfo:
        proc = self._process
        cfg = self.config
        return DomainInfo(
            state=self._state,
            reason=self._reason,
            pid=proc.pid if proc else None,
            memory_mib=cfg.memory_mib,
            vcpus=cfg.vcpus,
            cpu_time=proc.cpu_time() if proc else 0.0,
            rss_bytes=proc.rss_bytes() if proc else 0,
            uptime=proc.uptime() if proc else 0.0,
        )

    # -- lifecycle ------------------------------------------------------------------------------

    def _get_lock(self) -> anyio.Lock:
        if self._lock is None:
            self._lock = anyio.Lock()
        return self._lock

    async def start(self) -> None:
        """Start QEMU and return once it runs the guest (monitor connected, CPUs started).

        Raises :class:`InvalidStateError` if it is already active and :class:`LaunchError` (with
        QEMU's own message) if QEMU exits or cannot be executed; then the domain is SHUTOFF with
        reason ``failed`` and no process is left. If the caller is cancelled, the half-started QEMU
        is killed and reaped (shielded, bounded) before the cancellation propagates.
        """
        async with self._get_lock():
            self._conn._check_usable(self)
            if self.active:
                raise InvalidStateError(self.name, "start", self._state, self._reason)
            await self._conn._launch(self)

    async def shutdown(self) -> None:
        """Press the ACPI power button (QMP ``system_powerdown``). Returns once QEMU took the request.

        Whether and when the guest obeys is up to the guest: use ``wait_for_state(SHUTOFF)``. A paused
        domain is refused, as libvirt does: the press would be queued and fire at resume.
        """
        _, qmp = self._require("shut down", DomainState.RUNNING, DomainState.SHUTDOWN)
        await qmp.execute("system_powerdown")

    async def suspend(self) -> None:
        """Pause the CPUs (QMP ``stop``). The state is PAUSED when this returns."""
        _, qmp = self._require("suspend", DomainState.RUNNING)
        await qmp.execute("stop")

    async def resume(self) -> None:
        """Resume the CPUs (QMP ``cont``). The state is RUNNING when this returns."""
        _, qmp = self._require("resume", DomainState.PAUSED)
        await qmp.execute("cont")

    async def reset(self) -> None:
        """Hard-reset the machine (QMP ``system_reset``); the domain stays in its state."""
        _, qmp = self._require("reset", DomainState.RUNNING, DomainState.PAUSED, DomainState.SHUTDOWN)
        await qmp.execute("system_reset")

    async def qmp(self, command: str, **arguments: Any) -> Any:
        """Run any QMP command and return its ``return`` value (the escape hatch).

        Raises :class:`CommandError` with QEMU's error class and text when QEMU refuses it.
        """
        _, qmp = self._require(f"run {command!r} on", *_ACTIVE_STATES)
        return await qmp.execute(command, arguments or None)

    async def destroy(
        self,
        graceful: bool = False,
        timeout: float = 10.0,
        *,
        kill_timeout: float = 30.0,
        remove_logs: bool = False,
    ) -> None:
        """Stop QEMU at once, as ``virDomainDestroy`` does: SIGTERM, then SIGKILL unless ``graceful``.

        SIGTERM makes QEMU flush its disks and exit (graceful for QEMU, not for the guest). If the
        process outlives ``timeout`` seconds: with ``graceful`` raise :class:`DestroyTimeoutError` and
        send nothing more (the domain keeps its state; destroy again, with or without ``graceful``);
        without it send SIGKILL and wait up to ``kill_timeout``, then raise :class:`ProcessBusyError`
        (the process is stuck in the kernel). No polling: the exit is awaited through the pidfd. If the
        caller is cancelled, no further signal is sent. On success the domain is SHUTOFF/destroyed;
        ``remove_logs`` then deletes its log and console files.
        """
        await self._terminate(graceful, timeout, kill_timeout)
        if remove_logs:
            self._conn._statedir.remove_logs(self.name)

    async def _terminate(self, graceful: bool, timeout: float, kill_timeout: float) -> bool:
        """SIGTERM, wait, then SIGKILL unless graceful (see :meth:`destroy`). True if SIGKILL was needed."""
        proc = self._require_process("destroy", *_ACTIVE_STATES)
        exited = self._exited
        assert exited is not None
        self._term_sent = True
        proc.send_signal(signal.SIGTERM)
        with anyio.move_on_after(timeout):
            await exited.wait()
        if exited.is_set():
            return False
        if graceful:
            raise DestroyTimeoutError(self.name, proc.pid, timeout)
        proc.send_signal(signal.SIGKILL)
        with anyio.move_on_after(kill_timeout):
            await exited.wait()
        if not exited.is_set():
            raise ProcessBusyError(self.name, proc.pid, proc_state(proc.pid), kill_timeout)
        return True

    async def stop(self, policy: StopPolicy | None = None) -> StopResult:
        """Stop this domain in stages (ACPI, SIGTERM, SIGKILL unless graceful): see :class:`StopPolicy`.

        Failures are reported in the result, not raised. Same code as ``Connection.stop_all``.
        """
        return await stop_domain(self, policy or StopPolicy(), anyio.CapacityLimiter(1), anyio.current_time())

    async def undefine(self) -> None:
        """Remove the persistent definition. A running domain keeps running as a transient one."""
        async with self._get_lock():
            self._conn._check_usable(self)
            if not self._persistent:
                raise InvalidStateError(self.name, "undefine", "transient")
            await self._conn._undefine(self)

    async def set_autostart(self, autostart: bool) -> None:
        """Start this domain whenever a connection to its state directory opens (libvirt's autostart)."""
        async with self._get_lock():
            self._conn._check_usable(self)
            if not self._persistent:
                raise InvalidStateError(self.name, "set autostart on", "transient")
            await self._conn._statedir.write_definition(
                self.name, self._conn._definition_record(self._config, autostart=autostart)
            )
            self._autostart = autostart

    # -- supervision (called by the connection) -------------------------------------------------

    def _on_qmp_event(self, event: Event) -> None:
        # Runs in the monitor's reader task, in QEMU's order. RESUME during start is the launch's own.
        if event.name == "STOP" and not self._starting and self._state == DomainState.RUNNING:
            self._set_state(DomainState.PAUSED, StateReason.USER)
            self._emit(EventKind.SUSPENDED, EventDetail.PAUSED)
        elif event.name == "RESUME" and not self._starting and self._state == DomainState.PAUSED:
            self._set_state(DomainState.RUNNING, StateReason.UNPAUSED)
            self._emit(EventKind.RESUMED, EventDetail.UNPAUSED)
        elif event.name == "SHUTDOWN":
            reason = event.data.get("reason")
            self._shutdown_reason = reason if isinstance(reason, str) else None
            self._set_state(DomainState.SHUTDOWN, StateReason.USER)
            # Who asked: libvirt's detail is "finished" when QEMU does not say (before QEMU 2.10).
            details: dict[object, EventDetail] = {True: EventDetail.GUEST, False: EventDetail.HOST}
            self._emit(EventKind.SHUTDOWN, details.get(event.data.get("guest"), EventDetail.FINISHED))

    def _attach(self, proc: Process, qmp: QMPClient, config: DomainConfig) -> None:
        self._process, self._qmp, self._running_config = proc, qmp, config
        self._term_sent = False
        self._shutdown_reason = None

    async def _supervise(
        self,
        proc: Process,
        sock: socket.socket,
        on_ready: Callable[[QMPClient], Any],
        on_failure: Callable[[BaseException], Any],
        *,
        launching: bool = True,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Own ``proc`` and its monitor until the process exits or the connection closes.

        ``on_ready(qmp)`` runs once the monitor answers (it finishes the launch or the reattach and
        may raise); ``on_failure(exc)`` turns an error before that point into the one to raise,
        after the process was killed (it must not run unmanaged). A cancellation before that point
        kills a QEMU being launched but leaves one being reattached alone (the record stays for the
        next connection). Nothing escapes into the connection's task group once ready.
        """
        ready = False
        try:
            async with QMPClient.open(sock, on_event=self._on_qmp_event) as qmp:
                await on_ready(qmp)
                ready = True
                task_status.started()
                await proc.wait()
                with anyio.move_on_after(_DRAIN_TIMEOUT):
                    await qmp.wait_closed()
        except anyio.get_cancelled_exc_class():
            if not ready and launching:
                # A cancelled start: the paused QEMU will never exit on its own.
                with anyio.move_on_after(_CLEANUP_TIMEOUT, shield=True):
                    await self._kill_failed_launch(proc, grace=0.0)
            raise  # the connection is closing (QEMU lives on) or the start was cancelled
        except Exception as exc:
            if not ready:
                # QEMU refused its config (it is exiting, with its reason in the log) or its monitor
                # cannot be used: then it must not run unmanaged, as libvirt decides on reconnect.
                with anyio.move_on_after(_CLEANUP_TIMEOUT, shield=True):
                    await self._kill_failed_launch(proc, grace=_LAUNCH_EXIT_WAIT)
                raise on_failure(exc) from exc
            # The monitor broke while QEMU lives on (it should not happen): keep watching the process.
            logger.warning("domain %r: monitor failed: %r; watching the process only", self.name, exc)
            self._qmp = None
            await proc.wait()
        finally:
            if proc.exited:
                self._on_exit(failed=not ready, launching=launching)
            proc.close()

    async def _kill_failed_launch(self, proc: Process, *, grace: float) -> None:
        """Let ``proc`` exit on its own for ``grace`` seconds, then SIGKILL it; return once it is gone."""
        if grace > 0:
            with anyio.move_on_after(grace):
                await proc.wait()
        if not proc.exited:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()

    def _on_exit(self, *, failed: bool, launching: bool) -> None:
        if failed and not launching:
            reason, detail = StateReason.DAEMON, EventDetail.FAILED  # we killed what we could not take back
        elif failed:
            reason, detail = StateReason.FAILED, EventDetail.FAILED
        elif self._term_sent:
            reason, detail = StateReason.DESTROYED, EventDetail.DESTROYED
        elif self._state == DomainState.SHUTDOWN:
            reason, detail = StateReason.SHUTDOWN, EventDetail.SHUTDOWN
        else:
            reason, detail = StateReason.CRASHED, EventDetail.CRASHED
        self._shut_off(reason, detail)

    def _shut_off(self, reason: StateReason, detail: EventDetail) -> None:
        """The domain has no QEMU (any more): forget the process, record and say so."""
        self._process, self._qmp, self._running_config = None, None, None
        self._conn._statedir.remove_runtime(self.name)
        self._set_state(DomainState.SHUTOFF, reason)
        if self._exited is not None:
            self._exited.set()
        self._emit(EventKind.STOPPED, detail)
        self._conn._on_domain_stopped(self)

    def _launch_error(
        self, exc: BaseException, proc: Process, log_offset: int, argv: list[str]
    ) -> LaunchError:
        log = self._conn._statedir.read_log(self.name, log_offset)
        # QEMU's own notice that it waits for the monitor client (us) is not part of its complaint.
        message = "\n".join(
            line for line in log.splitlines() if not line.startswith("info: QEMU waiting for connection")
        ).strip()
        if not message:
            closed = isinstance(exc, ConnectionLostError) and not isinstance(exc.__cause__, TimeoutError)
            message = "QEMU closed its monitor" if closed else str(exc)
        return LaunchError(
            self.name, message, returncode=proc.returncode, log_path=str(self.log_path), argv=argv
        )


_ACTIVE_STATES = tuple(s for s in DomainState if s.active)
