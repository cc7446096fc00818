"""Domain, the one place that applies the lifecycle, and DomainTable, the domains of one connection.

State comes from what the driver reports, never from what we asked for: PAUSED after QEMU's STOP,
SHUTOFF only once the process exit was seen. A :class:`Domain` turns the driver's happenings into
states, reasons and events through :mod:`aiovirt._lifecycle`; nothing else sets a domain's state.

The table owns what spans domains: names and UUIDs (indexed, so no operation scans every domain),
persistence, and the one lock that orders every change of a definition. Lock order: the table's
lock, then a domain's; a start holds only its domain's lock.
"""

from __future__ import annotations

import logging
import signal
import time
import uuid as uuid_mod
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

from ._broadcast import Broadcaster, Subscription
from ._console import Console
from ._errors import (
    AiovirtError,
    ConfigError,
    ConnectionClosedError,
    ConnectionLostError,
    DestroyTimeoutError,
    DomainExistsError,
    DomainNotFoundError,
    InvalidStateError,
    LaunchError,
    ProcessBusyError,
    ReadOnlyError,
)
from ._lifecycle import Happening, Lifecycle, Operation, Transition
from ._states import DomainEvent, DomainState, EventDetail, EventKind, StateReason
from .config import DomainConfig
from .drivers._base import Driver, Machine, StateProblem, StoredDomain
from .qmp._codec import Event

__all__ = ["Domain", "DomainInfo", "DomainTable"]

logger = logging.getLogger("aiovirt")

#: After a process was seen dead outside its supervisor (a zombie), how long its supervisor may
#: take to report the exit. It is already readable on the pidfd: this bounds a pathological case.
_SETTLE_TIMEOUT = 5.0


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


class _Run:
    """One run of a domain: its machine (once it exists) and the event of its observed exit."""

    def __init__(self) -> None:
        self.machine: Machine | None = None
        self.exited = anyio.Event()
        self.killing = False  # SIGKILL was asked for (sent at once if the machine exists yet)


class _Observer:
    """The driver's view of a domain (:class:`~aiovirt.drivers._base.MachineObserver`)."""

    def __init__(self, dom: Domain, run: _Run) -> None:
        self._dom = dom
        self._run = run

    def attached(self, machine: Machine) -> None:
        self._dom._attached(self._run, machine)

    def happened(self, happening: Happening, *, shutdown_reason: str | None = None) -> None:
        self._dom._happened(self._run, happening, shutdown_reason)

    def reachable(self, problem: str | None) -> None:
        self._dom._reachable(problem)


class Domain:
    """A virtual machine of a :class:`~aiovirt.Connection` (from ``define``, ``create`` or ``lookup``)."""

    def __init__(
        self, table: DomainTable, config: DomainConfig, *, persistent: bool, autostart: bool = False
    ) -> None:
        self._table = table
        self._driver = table.driver
        self._config = config
        self._running_config: DomainConfig | None = None
        self._persistent = persistent
        self._autostart = autostart
        self._lifecycle = Lifecycle(config.name)
        self._run: _Run | None = None
        self._lock = anyio.Lock()
        self._events: Broadcaster[DomainEvent] = Broadcaster()
        self._state_waiters: list[tuple[DomainState, anyio.Event]] = []
        self._shutdown_reason: str | None = None  # QMP's SHUTDOWN reason, e.g. "guest-shutdown"
        self._unreachable: str | None = None
        self._gone = False  # undefined (persistent) or stopped (transient): the object is stale

    # -- identity and state ---------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._config.name

    @property
    def uuid(self) -> uuid_mod.UUID:
        uuid = self._config.uuid
        assert uuid is not None  # the table assigns one before a Domain exists
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
        return self._lifecycle.state

    @property
    def reason(self) -> StateReason:
        return self._lifecycle.reason

    @property
    def active(self) -> bool:
        return self._lifecycle.active

    @property
    def pid(self) -> int | None:
        """The QEMU process while the domain is active (None before it is spawned and once it is gone)."""
        machine = self._run.machine if self._run is not None and self.active else None
        return machine.pid if machine is not None else None

    @property
    def shutdown_reason(self) -> str | None:
        """QEMU's reason for the last shutdown (``"guest-shutdown"``, ``"host-signal"``...), if any."""
        return self._shutdown_reason

    @property
    def reachable(self) -> bool:
        """False while the monitor of a running domain cannot be reached (see ``conn.problems``).

        Such a domain refuses monitor commands (:class:`ConnectionLostError`) but can be destroyed
        (its process is signalled directly); the connection keeps trying to reach it.
        """
        return self._unreachable is None

    @property
    def log_path(self) -> Path | None:
        return self._driver.log_path(self.name)

    @property
    def console_path(self) -> Path | None:
        return self._driver.console_path(self.name) if self.config.console else None

    def __repr__(self) -> str:
        return f"<Domain {self.name!r} {self.state.value}/{self.reason.value} pid={self.pid}>"

    async def wait_for_state(self, state: DomainState) -> None:
        """Return once the domain is (or has passed through) ``state``. Bound it with ``anyio.fail_after``.

        A transition that happens while waiting is never missed, even if the domain moves on at once.
        Raises :class:`ConnectionClosedError` if the connection is (or gets) closed meanwhile.
        """
        self._check_open("wait for a state of")
        if self.state == state:
            return
        event = anyio.Event()
        self._state_waiters.append((state, event))
        try:
            await event.wait()
        finally:
            if not event.is_set():
                self._state_waiters.remove((state, event))
        self._check_open("wait for a state of")

    @asynccontextmanager
    async def subscribe(self, max_buffer: int = 256) -> AsyncIterator[Subscription[DomainEvent]]:
        """Lifecycle events of this domain while the block is open (see :mod:`aiovirt._broadcast` for the
        overflow policy). The subscription ends once the connection is closed."""
        with self._events.subscribe(max_buffer) as sub:
            yield sub

    async def info(self) -> DomainInfo:
        self._check_open("get the info of")
        machine = self._run.machine if self._run is not None else None
        cfg = self.config
        cpu, rss, uptime = machine.stats() if machine is not None else (0.0, 0, 0.0)
        return DomainInfo(self.state, self.reason, self.pid, cfg.memory_mib, cfg.vcpus, cpu, rss, uptime)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start QEMU and return once it runs the guest (monitor connected, CPUs started).

        While it starts the domain is PAUSED with reason ``starting_up`` (as libvirt shows it), so
        a destroy from another task reaches it: the start then raises :class:`LaunchError` saying it
        was destroyed. Raises :class:`InvalidStateError` if it is already active and
        :class:`LaunchError` (with QEMU's own message) if QEMU exits or cannot be executed; then the
        domain is SHUTOFF with reason ``failed`` and no process is left. A failure before any
        process existed (its runtime record cannot be written, say) leaves the domain as it was.
        If the caller is cancelled, the half-started QEMU is killed and reaped (shielded, bounded)
        before the cancellation propagates.
        """
        self._check_writable("start")
        async with self._lock:
            self._check_usable("start")
            transition = self._lifecycle.request(Operation.START)
            assert transition is not None
            run = self._run = _Run()
            self._shutdown_reason = None
            self._running_config = self._config
            self._entered(transition)
            try:
                await self._driver.launch(self._config, _Observer(self, run), persistent=self._persistent)
            except BaseException as exc:
                if run.machine is None and self._run is run and self.active:
                    self._happened(run, Happening.ABORTED, None)  # nothing was spawned: as it was
                if (
                    isinstance(exc, LaunchError)
                    and run.exited.is_set()
                    and self.reason is StateReason.DESTROYED
                ):
                    raise LaunchError(
                        self.name,
                        "destroyed while starting",
                        returncode=exc.returncode,
                        log_path=exc.log_path,
                        argv=exc.argv,
                    ) from exc
                raise

    async def shutdown(self) -> None:
        """Press the ACPI power button (QMP ``system_powerdown``). Returns once QEMU took the request.

        Whether and when the guest obeys is up to the guest: use ``wait_for_state(SHUTOFF)``. A paused
        domain is refused, as libvirt does: the press would be queued and fire at resume.
        """
        await self._machine_for(Operation.SHUTDOWN).powerdown()

    async def suspend(self) -> None:
        """Pause the CPUs (QMP ``stop``). The state is PAUSED when this returns."""
        await self._machine_for(Operation.SUSPEND).pause()

    async def resume(self) -> None:
        """Resume the CPUs (QMP ``cont``). The state is RUNNING when this returns."""
        await self._machine_for(Operation.RESUME).resume()

    async def reset(self) -> None:
        """Hard-reset the machine (QMP ``system_reset``); the domain stays in its state."""
        await self._machine_for(Operation.RESET).reset()

    def monitor_events(self, max_buffer: int = 256) -> AbstractContextManager[Subscription[Event]]:
        """The monitor's own events (QMP's ``POWERDOWN``, ``STOP``, ...) while the block is open.

        The escape hatch beside :meth:`qmp`: lifecycle events (:meth:`subscribe`) are the API;
        these show what QEMU itself reported, e.g. a button press that a guest ignored.
        """
        return self._machine_for(Operation.COMMAND).monitor_events(max_buffer)

    @asynccontextmanager
    async def console(
        self, *, replay: bool = True, max_buffer: int = 256, writer: bool = False
    ) -> AsyncIterator[Console]:
        """The guest's serial console while the block is open: ``async with dom.console() as con:``.

        A :class:`~aiovirt._console.Console`: an anyio byte stream (``receive``, ``send``) plus
        ``await con.expect(pattern)`` and what it saw (``con.seen``, ``con.text``). It starts with
        what the guest printed in this run before it was opened (the controller keeps the last
        64 KiB; after a controller restart, what was printed since), unless ``replay`` is false.
        Every open console reads every byte (each through its own buffer of ``max_buffer``
        chunks); one at a time may write: the first to send, or the one opened with ``writer``
        (another's send, or its open with ``writer``, raises :class:`ConsoleBusyError`). The
        stream ends (``EndOfStream``) when the domain stops or the connection closes. The driver
        logs the console too (:attr:`console_path`), whether a console is open or not.

        Raises :class:`InvalidStateError` unless the domain is active and its config has
        ``console`` on, :class:`ConnectionLostError` if the console cannot be reached, and
        :class:`ReadOnlyError` on a read-only connection (the console belongs to the controller).
        """
        operation = Operation.CONSOLE
        self._check_writable(operation.value)
        self._lifecycle.check(operation)
        if not self.config.console:
            raise InvalidStateError(self.name, operation.value, "configured with console=False")
        machine = self._run.machine if self._run is not None else None
        if machine is None:  # a start that has not spawned its machine yet
            raise InvalidStateError(self.name, operation.value, self.state, self.reason)
        port = await machine.console()
        async with port.open(replay=replay, max_buffer=max_buffer, writer=writer) as con:
            yield con

    async def qmp(self, command: str, **arguments: Any) -> Any:
        """Run any QMP command and return its ``return`` value (the escape hatch).

        Raises :class:`CommandError` with QEMU's error class and text when QEMU refuses it.
        """
        return await self._machine_for(Operation.COMMAND).command(command, arguments or None)

    async def destroy(
        self,
        graceful: bool = False,
        timeout: float = 10.0,
        *,
        kill_timeout: float = 30.0,
        remove_logs: bool = False,
    ) -> signal.Signals:
        """Stop QEMU at once, as ``virDomainDestroy`` does: SIGTERM, then SIGKILL unless ``graceful``.

        SIGTERM makes QEMU flush its disks and exit (graceful for QEMU, not for the guest). If the
        process outlives ``timeout`` seconds: with ``graceful`` raise :class:`DestroyTimeoutError` and
        send nothing more (the domain keeps its state; destroy again, with or without ``graceful``);
        without it send SIGKILL and wait up to ``kill_timeout``, then raise :class:`ProcessBusyError`
        (the process is stuck in the kernel). No polling: the exit is awaited through the pidfd.

        Cancellation: a call whose scope is already cancelled sends nothing; one cancelled while it
        waits sends no further signal. A destroy during a start ends the start. On success the
        domain is SHUTOFF/destroyed and the last signal sent is returned (SIGTERM or SIGKILL);
        ``remove_logs`` then deletes its log and console files.
        """
        await anyio.lowlevel.checkpoint_if_cancelled()
        self._check_writable("destroy")
        self._lifecycle.request(Operation.DESTROY)
        run = self._run
        assert run is not None  # active
        sent = await self._terminate(run, graceful, timeout, kill_timeout)
        if remove_logs:
            self._driver.remove_logs(self.name)
        return sent

    async def _terminate(
        self, run: _Run, graceful: bool, timeout: float, kill_timeout: float
    ) -> signal.Signals:
        if run.machine is not None:
            run.machine.send_signal(signal.SIGTERM)
        # else: the start has not spawned yet; it sends SIGTERM as soon as it has (_attached)
        if await self._wait_exit(run, timeout):
            return signal.SIGTERM
        if graceful:
            raise DestroyTimeoutError(self.name, self.pid, timeout)
        run.killing = True
        if run.machine is not None:
            run.machine.send_signal(signal.SIGKILL)
        if await self._wait_exit(run, kill_timeout):
            return signal.SIGKILL
        state = run.machine.process_state() if run.machine is not None else "not started"
        raise ProcessBusyError(self.name, self.pid, state, kill_timeout)

    async def _wait_exit(self, run: _Run, timeout: float) -> bool:
        """Wait up to ``timeout`` for ``run``'s exit to be observed. A process found dead (a zombie)
        is dead whatever the timeout: then wait, bounded, for its supervisor to report it."""
        with anyio.move_on_after(timeout):
            await run.exited.wait()
        if not run.exited.is_set() and run.machine is not None and run.machine.poll_exited():
            with anyio.move_on_after(_SETTLE_TIMEOUT):
                await run.exited.wait()
        return run.exited.is_set()

    async def undefine(self) -> None:
        """Remove the persistent definition. A running domain keeps running as a transient one."""
        self._check_writable("undefine")
        await self._table.undefine(self)

    async def set_autostart(self, autostart: bool) -> None:
        """Start this domain whenever a connection to its state directory opens (libvirt's autostart)."""
        self._check_writable("set autostart on")
        await self._table.set_autostart(self, autostart)

    # -- what the table and the driver tell ------------------------------------------------------

    def _check_open(self, operation: str) -> None:
        if self._table.closed:
            raise ConnectionClosedError(self._table.uri, f"{operation} domain {self.name!r}")

    def _check_writable(self, operation: str) -> None:
        self._check_open(operation)
        if self._driver.readonly:
            raise ReadOnlyError(self._table.uri, f"{operation} domain {self.name!r}")

    def _check_usable(self, operation: str) -> None:
        self._check_open(operation)
        if self._gone or not self._table.holds(self):
            raise DomainNotFoundError(self.name)

    def _machine_for(self, operation: Operation) -> Machine:
        self._check_writable(operation.value)
        self._lifecycle.check(operation)
        machine = self._run.machine if self._run is not None else None
        assert machine is not None  # every allowed phase but STARTING has a machine
        if self._unreachable is not None:
            raise ConnectionLostError(
                f"domain {self.name!r}: its monitor cannot be reached ({self._unreachable})",
                command=operation.value,
            )
        return machine

    def _attached(self, run: _Run, machine: Machine) -> None:
        run.machine = machine
        if self._lifecycle.destroying:  # destroyed before the machine existed: ends the start now
            machine.send_signal(signal.SIGKILL if run.killing else signal.SIGTERM)

    def _happened(self, run: _Run, happening: Happening, shutdown_reason: str | None) -> None:
        if run is not self._run:
            return  # a report about a run that has ended (cannot happen; harmless)
        if shutdown_reason is not None:
            self._shutdown_reason = shutdown_reason
        transition = self._lifecycle.happen(happening)
        if transition is not None:
            self._entered(transition)

    def _reachable(self, problem: str | None) -> None:
        self._unreachable = problem
        self._table.report_unreachable(self, problem)

    def _entered(self, transition: Transition) -> None:
        run = self._run
        if not self._lifecycle.active:
            self._running_config = None
            self._unreachable = None
            self._table.report_unreachable(self, None)
        waiters, self._state_waiters = self._state_waiters, []
        for wanted, event in waiters:
            if wanted == transition.state:
                event.set()
            else:
                self._state_waiters.append((wanted, event))
        if not self._lifecycle.active and run is not None:
            run.exited.set()
        if transition.event is not None:
            self._emit(*transition.event)
        if not self._lifecycle.active:
            self._table.stopped(self)

    def _emit(self, kind: EventKind, detail: EventDetail) -> None:
        event = DomainEvent(kind, detail, self.name, self.uuid, time.time())
        self._events.publish(event)
        self._table.publish(event)

    def _close(self) -> None:
        """The connection closed: end subscriptions, wake every waiter (they raise closed)."""
        self._events.close()
        waiters, self._state_waiters = self._state_waiters, []
        for _, event in waiters:
            event.set()


def validate_config(config: DomainConfig) -> DomainConfig:
    """Re-validate a config at the API boundary (``model_copy(update=...)`` skips validation)."""
    if not isinstance(config, DomainConfig):
        raise ConfigError(f"expected a DomainConfig, got {type(config).__name__}")
    return DomainConfig.parse(config.model_dump(mode="json"))


class DomainTable:
    """The domains of one connection, by name and by UUID, and what changes them."""

    def __init__(self, driver: Driver, uri: str) -> None:
        self.driver = driver
        self.uri = uri
        self.closed = False
        self.events: Broadcaster[DomainEvent] = Broadcaster()
        #: Events of ``connect()`` itself (reattach, autostart), emitted before anyone could subscribe.
        self.startup_events: list[DomainEvent] = []
        self._connecting = True
        self._by_name: dict[str, Domain] = {}
        self._by_uuid: dict[uuid_mod.UUID, Domain] = {}
        self._unreachable: dict[str, StateProblem] = {}
        self._failed_autostarts: list[StateProblem] = []
        # Serialises every change of a definition or of the table (define writes a file between
        # check and insert); taken before any domain's lock.
        self._lock = anyio.Lock()

    # -- reading --------------------------------------------------------------------------------

    def holds(self, dom: Domain) -> bool:
        return self._by_name.get(dom.name) is dom

    def lookup(self, name: str) -> Domain:
        self.check_open("look up a domain")
        try:
            return self._by_name[name]
        except KeyError:
            raise DomainNotFoundError(name) from None

    def domains(self, active: bool | None = None) -> list[Domain]:
        self.check_open("list domains")
        doms = sorted(self._by_name.values(), key=lambda d: d.name)
        return doms if active is None else [d for d in doms if d.active == active]

    @property
    def problems(self) -> list[StateProblem]:
        return [*self.driver.problems, *self._failed_autostarts, *self._unreachable.values()]

    def check_open(self, operation: str) -> None:
        if self.closed:
            raise ConnectionClosedError(self.uri, operation)

    def check_writable(self, operation: str) -> None:
        self.check_open(operation)
        if self.driver.readonly:
            raise ReadOnlyError(self.uri, operation)

    # -- changing -------------------------------------------------------------------------------

    def _complete(self, config: DomainConfig) -> DomainConfig:
        """Validate, and give a config without a UUID the one of its name's domain, or a new one."""
        config = validate_config(config)
        if config.uuid is None:
            existing = self._by_name.get(config.name)
            config = config.model_copy(update={"uuid": existing.uuid if existing else uuid_mod.uuid4()})
        return config

    def _check_unique(self, config: DomainConfig) -> Domain | None:
        """The existing domain this config redefines, if any; raise if it clashes with another."""
        existing = self._by_name.get(config.name)
        if existing is not None and existing.uuid != config.uuid:
            raise DomainExistsError(config.name, f"it has UUID {existing.uuid}")
        assert config.uuid is not None
        other = self._by_uuid.get(config.uuid)
        if other is not None and other.name != config.name:
            raise DomainExistsError(other.name, f"UUID {config.uuid} is already used by it")
        return existing

    def _add(self, dom: Domain) -> None:
        self._by_name[dom.name] = dom
        self._by_uuid[dom.uuid] = dom

    def _forget(self, dom: Domain) -> None:
        dom._gone = True
        if self._by_name.get(dom.name) is dom:
            del self._by_name[dom.name]
            del self._by_uuid[dom.uuid]

    async def define(self, config: DomainConfig) -> Domain:
        self.check_writable("define a domain")
        async with self._lock:
            config = self._complete(config)
            existing = self._check_unique(config)
            autostart = existing.autostart if existing is not None else False
            if existing is not None:
                # Persistent before the write: a transient run that ends meanwhile must not be
                # forgotten while its definition is being stored.
                was_persistent, existing._persistent = existing._persistent, True
            try:
                await self.driver.save_definition(config, autostart=autostart)
            except BaseException:
                if existing is not None:
                    existing._persistent = was_persistent
                raise
            if existing is None:
                dom = Domain(self, config, persistent=True)
                self._add(dom)
                dom._emit(EventKind.DEFINED, EventDetail.ADDED)
                return dom
            existing._config = config
            run = existing._run
            if existing.active and run is not None and run.machine is not None:
                run.machine.set_persistent(True)
            existing._emit(EventKind.DEFINED, EventDetail.UPDATED)
            return existing

    async def create(self, config: DomainConfig) -> Domain:
        self.check_writable("create a domain")
        async with self._lock:
            config = self._complete(config)
            if self._check_unique(config) is not None:
                raise DomainExistsError(config.name)
            dom = Domain(self, config, persistent=False)
            self._add(dom)
        try:
            await dom.start()
        except BaseException:
            if not dom.active:
                # Not run, so not forgotten by its exit (the start was refused or cancelled): gone,
                # unless another task defined it meanwhile; then its definition keeps it.
                self.stopped(dom)
            raise
        return dom

    async def undefine(self, dom: Domain) -> None:
        async with self._lock:
            dom._check_usable("undefine")
            if not dom._persistent:
                raise InvalidStateError(dom.name, "undefine", "transient")
            await self.driver.remove_definition(dom.name)
            dom._persistent = dom._autostart = False
            run = dom._run
            if dom.active and run is not None and run.machine is not None:
                run.machine.set_persistent(False)
            elif not dom.active:
                self._forget(dom)
            dom._emit(EventKind.UNDEFINED, EventDetail.REMOVED)

    async def set_autostart(self, dom: Domain, autostart: bool) -> None:
        async with self._lock:
            dom._check_usable("set autostart on")
            if not dom._persistent:
                raise InvalidStateError(dom.name, "set autostart on", "transient")
            await self.driver.save_definition(dom._config, autostart=autostart)
            dom._autostart = autostart

    def stopped(self, dom: Domain) -> None:
        """A domain lost its machine: a transient one is gone with it."""
        if not dom._persistent:
            self._forget(dom)

    def publish(self, event: DomainEvent) -> None:
        if self._connecting:
            self.startup_events.append(event)
        self.events.publish(event)

    def report_unreachable(self, dom: Domain, problem: str | None) -> None:
        if problem is None:
            self._unreachable.pop(dom.name, None)
        else:
            path = dom.log_path or Path(dom.name)
            self._unreachable[dom.name] = StateProblem(path, "unreachable", problem)
            logger.warning("domain %r: monitor unreachable: %s", dom.name, problem)

    # -- opening and closing --------------------------------------------------------------------

    async def load(self, stored: Sequence[StoredDomain], *, autostart: bool = True) -> None:
        """Fill the table from the driver's records, take back running machines (concurrently, so
        a connection costs one monitor timeout, not one per domain), then autostart (unless not)."""
        adopt: list[tuple[Domain, StoredDomain]] = []
        for entry in stored:
            dom = Domain(self, entry.config, persistent=entry.persistent, autostart=entry.autostart)
            self._add(dom)
            if entry.runtime is not None:
                adopt.append((dom, entry))

        async def take_back(dom: Domain, entry: StoredDomain) -> None:
            run = dom._run = _Run()
            await self.driver.adopt(entry, _Observer(dom, run))

        async with anyio.create_task_group() as tg:
            for dom, entry in adopt:
                tg.start_soon(take_back, dom, entry)
        async with anyio.create_task_group() as tg:
            for dom in list(self._by_name.values()) if autostart and not self.driver.readonly else ():
                if dom.autostart and not dom.active:
                    tg.start_soon(self._autostart, dom)
        self._connecting = False

    async def _autostart(self, dom: Domain) -> None:
        try:
            await dom.start()
        except AiovirtError as exc:
            path = self.driver.definition_path(dom.name) or Path(dom.name)
            self._failed_autostarts.append(StateProblem(path, "autostart", str(exc)))
            logger.warning("domain %r: autostart failed: %s", dom.name, exc)

    def close(self) -> None:
        self.closed = True
        self.events.close()
        for dom in self._by_name.values():
            dom._close()
