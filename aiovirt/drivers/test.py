"""The in-memory ``test:///`` driver: hosts and guests that exist only in this process.

For the test suites of code that uses aiovirt (libvirt gives them ``test:///default``): the same
states, reasons, events, errors and ``stop_all`` stages as the QEMU driver, with no process, no
file and no wait that is not asked for.

- ``test:///default`` is one host for the whole process: every connection to it sees the same
  domains, and it starts with one running domain named ``test`` (as libvirt's does).
- ``test:///empty`` is a fresh, empty host for each connection.

By default a guest behaves like a healthy one: it takes the ACPI button at once and its "process"
honours SIGTERM. :class:`GuestBehaviour` scripts a domain otherwise (set it with
:func:`aiovirt.testing.script_guest`); every delay is an ``anyio.sleep``, so under trio's
``MockClock(autojump_threshold=0)`` a 60-second ACPI timeout costs no wall time. While no
connection to a host is open its guests' clocks stand still (nothing supervises them).

A guest whose config has ``console`` on has a serial console (``dom.console()``) that plays the
:class:`ConsoleScript` of its behaviour: what it prints once booted, the prompt, and what it
answers to each line typed; its output is kept for the run (later connections see it too).

Monitor commands answered: ``query-status``, ``query-name``, ``query-uuid``, ``system_powerdown``,
``stop``, ``cont``, ``system_reset``; any other is a :class:`~aiovirt.CommandError`
(``CommandNotFound``), as QEMU answers an unknown command.
"""

from __future__ import annotations

import itertools
import signal
import time
import uuid as uuid_mod
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import anyio.abc
import anyio.lowlevel

from .._broadcast import Broadcaster, Subscription
from .._console import ConsolePort
from .._errors import CommandError, ConnectionLostError, LaunchError
from .._lifecycle import Happening
from .._uri import ParsedURI
from ..config import DomainConfig
from ..qmp._codec import Event
from ._base import Driver, Machine, MachineObserver, StateProblem, StoredDomain

__all__ = ["ConsoleScript", "GuestBehaviour", "TestDriver", "TestHost"]

_BACKSPACES = (0x08, 0x7F)


@dataclass(frozen=True)
class ConsoleScript:
    """What a test guest's serial console does: a line-based pretend shell.

    ::

        ConsoleScript(boot=b"Linux booting\r\nlogin ok\r\n", prompt=b"# ",
                      answers={b"uname": b"Linux\r\n"}, unknown=b"sh: not found\r\n")

    The guest prints ``boot`` then ``prompt`` as it boots (before ``start()`` returns). Each
    line typed (ended by ``\r``, ``\n`` or ``\r\n``) is looked up in ``answers``; the guest
    prints the answer (``unknown`` for a line not there), then ``prompt`` again. With ``echo``,
    what is typed is echoed as a terminal does (line ends as ``\r\n``; backspace erases).
    """

    boot: bytes = b""
    prompt: bytes = b""
    answers: Mapping[bytes, bytes] = field(default_factory=dict)
    unknown: bytes = b""
    echo: bool = True


@dataclass(frozen=True)
class GuestBehaviour:
    """How a test guest (and its pretend QEMU process) behaves. Times are seconds of anyio's clock."""

    acpi: Literal["honour", "ignore"] = "honour"
    """``honour``: the guest powers off ``acpi_delay`` after a press; ``ignore``: nothing happens
    (like a guest with no OS)."""
    acpi_delay: float = 0.0
    sigterm: Literal["honour", "ignore"] = "honour"
    """``ignore``: the process neither reacts to SIGTERM nor answers its monitor (a ``kill -STOP``ped
    QEMU). SIGKILL still ends it unless ``sigkill="ignore"``."""
    sigkill: Literal["honour", "ignore"] = "honour"
    """``ignore``: even SIGKILL does not end it (uninterruptible sleep:
    :class:`~aiovirt.ProcessBusyError`)."""
    crash_after: float | None = None
    """The process dies this long after the start (STOPPED/crashed)."""
    start_error: str | None = None
    """The start fails with this message (:class:`~aiovirt.LaunchError`), as QEMU refusing its config."""
    boot_delay: float = 0.0
    """How long the start takes (the domain is PAUSED/starting_up meanwhile)."""
    console: ConsoleScript = field(default_factory=ConsoleScript)
    """What its serial console prints and answers (when its config has ``console`` on)."""


@dataclass
class _Run:
    """A guest that is running on the host (plain data: it outlives connections and event loops)."""

    config: DomainConfig
    behaviour: GuestBehaviour
    status: Literal["running", "paused", "shutdown"] = "running"
    started_at: float = field(default_factory=time.time)
    pending_term: bool = False  # a SIGTERM it ignored (delivered if it is ever "continued")
    console_output: bytearray = field(default_factory=bytearray)  # the console's scrollback
    console_line: bytearray = field(default_factory=bytearray)  # what was typed since the last line end
    console_after_cr: bool = False  # the last byte typed was a \r (a \n right after it ends no line)


@dataclass
class TestHost:
    """One in-memory host: definitions, running guests and their scripts."""

    definitions: dict[str, tuple[DomainConfig, bool]] = field(
        default_factory=dict
    )  # name -> (config, autostart)
    runs: dict[str, _Run] = field(default_factory=dict)
    behaviours: dict[str, GuestBehaviour] = field(default_factory=dict)

    def script(self, name: str, behaviour: GuestBehaviour) -> None:
        """How the domain ``name`` behaves from its next start on."""
        self.behaviours[name] = behaviour

    @classmethod
    def default(cls) -> TestHost:
        host = cls()
        config = DomainConfig(
            name="test",
            uuid=uuid_mod.UUID("6695eb01-f6a4-8304-79aa-97f2502e193f"),
            memory_mib=8,
            machine="none",
        )
        host.definitions["test"] = (config, False)
        host.runs["test"] = _Run(config, GuestBehaviour())
        return host


_DEFAULT_HOST: TestHost | None = None


def default_host() -> TestHost:
    """The host of ``test:///default``, shared by every connection of this process."""
    global _DEFAULT_HOST
    if _DEFAULT_HOST is None:
        _DEFAULT_HOST = TestHost.default()
    return _DEFAULT_HOST


class _TestMachine(Machine):
    def __init__(
        self, driver: TestDriver, run: _Run, observer: MachineObserver, tg: anyio.abc.TaskGroup
    ) -> None:
        self._driver = driver
        self._run = run
        self._observer = observer
        self._tg = tg
        self._events: Broadcaster[Event] = Broadcaster()
        self._exited = False
        self.exit_seen = anyio.Event()
        self._killed = False
        self._booted = False
        self._deaf = anyio.Event()  # never set: a stopped process's monitor never answers
        self._console = ConsolePort(run.config.name, self._typed, scrollback=run.console_output)
        driver.machines.add(self)

    @property
    def pid(self) -> int | None:
        return None  # no process: a made-up pid could be mistaken for a real one

    def _event(self, name: str, **data: Any) -> None:
        self._events.publish(Event(name, data, time.time()))

    def _exit(self) -> None:
        if self._exited:
            return
        self._exited = True
        self.exit_seen.set()
        self._driver.host.runs.pop(self._run.config.name, None)
        self._driver.machines.discard(self)
        self._events.close()
        self._console.close("the domain stopped")
        self._observer.happened(Happening.EXITED)

    def _shutdown(self, *, guest: bool) -> None:
        reason = "guest-shutdown" if guest else "host-signal"
        self._run.status = "shutdown"
        self._event("SHUTDOWN", guest=guest, reason=reason)
        if self._booted:
            happening = Happening.SHUTDOWN_GUEST if guest else Happening.SHUTDOWN_HOST
            self._observer.happened(happening, shutdown_reason=reason)

    def send_signal(self, sig: signal.Signals) -> bool:
        if self._exited:
            return False
        behaviour = self._run.behaviour
        if sig == signal.SIGKILL:
            self._killed = True
            if behaviour.sigkill == "honour":
                self._tg.start_soon(self._exit_soon)
        elif sig == signal.SIGTERM:
            if behaviour.sigterm == "ignore":
                self._run.pending_term = True
            else:
                self._shutdown(guest=False)
                self._tg.start_soon(self._exit_soon)
        return True

    async def _exit_soon(self) -> None:
        await anyio.lowlevel.checkpoint()  # a real process exits after the signal call returns
        self._exit()

    def poll_exited(self) -> bool:
        return self._exited

    def process_state(self) -> str:
        if self._exited:
            return "gone"
        if self._killed:
            return "D"
        return "T" if self._run.behaviour.sigterm == "ignore" else "S"

    async def command(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        if self._exited:
            raise ConnectionLostError(
                f"domain {self._run.config.name!r}: its monitor is gone", command=command
            )
        if self._run.behaviour.sigterm == "ignore":
            await self._deaf.wait()  # a stopped process never reads its monitor
        run = self._run
        if command == "query-status":
            return {"status": run.status, "running": run.status == "running", "singlestep": False}
        if command == "query-name":
            return {"name": run.config.name}
        if command == "query-uuid":
            return {"UUID": str(run.config.uuid)}
        if command == "system_powerdown":
            self._event("POWERDOWN")
            if run.behaviour.acpi == "honour":
                self._tg.start_soon(self._power_off, run.behaviour.acpi_delay)
            return {}
        if command == "stop":
            if run.status == "running":
                run.status = "paused"
                self._event("STOP")
                self._observer.happened(Happening.PAUSED)
            return {}
        if command == "cont":
            if run.status == "paused":
                run.status = "running"
                self._event("RESUME")
                self._observer.happened(Happening.RESUMED)
            return {}
        if command == "system_reset":
            self._event("RESET", guest=False, reason="host-qmp-system-reset")
            return {}
        raise CommandError(command, arguments, "CommandNotFound", f"The command {command} has not been found")

    async def _power_off(self, delay: float) -> None:
        await anyio.sleep(delay)
        if not self._exited and self._run.status == "running":
            self._shutdown(guest=True)
            await anyio.lowlevel.checkpoint()
            self._exit()

    async def crash_after(self, delay: float) -> None:
        await anyio.sleep(delay)
        self._exit()

    def monitor_events(self, max_buffer: int) -> AbstractContextManager[Subscription[Event]]:
        return self._events.subscribe(max_buffer)

    async def console(self) -> ConsolePort:
        await anyio.lowlevel.checkpoint()
        return self._console

    def boot_console(self) -> None:
        script = self._run.behaviour.console
        self._console.feed(script.boot + script.prompt)

    def close_console(self) -> None:
        self._console.close("the connection was closed")

    async def _typed(self, data: bytes) -> None:
        """What a console sends: the guest's tty echoes it and its pretend shell answers lines."""
        await anyio.lowlevel.checkpoint()
        run = self._run
        if self._exited:
            raise ConnectionLostError(f"domain {run.config.name!r}: its console is gone")
        if run.behaviour.sigterm == "ignore":
            return  # a stopped process reads nothing
        script = run.behaviour.console
        out = bytearray()
        for byte in data:
            if byte in b"\r\n":
                after_cr, run.console_after_cr = run.console_after_cr, byte == ord("\r")
                if byte == ord("\n") and after_cr:
                    continue  # the \n of a \r\n
                line = bytes(run.console_line)
                run.console_line.clear()
                out += (b"\r\n" if script.echo else b"") + script.answers.get(line, script.unknown)
                out += script.prompt
                continue
            run.console_after_cr = False
            if byte in _BACKSPACES:
                if run.console_line:
                    del run.console_line[-1]
                    if script.echo:
                        out += b"\b \b"
            else:
                run.console_line.append(byte)
                if script.echo:
                    out.append(byte)
        self._console.feed(bytes(out))

    def stats(self) -> tuple[float, int, float]:
        return 0.0, 0, max(0.0, time.time() - self._run.started_at)


class TestDriver(Driver):
    """A connection's view of a :class:`TestHost`."""

    __test__ = False  # not a pytest test class

    def __init__(
        self, uri: ParsedURI, host: TestHost, tg: anyio.abc.TaskGroup, *, readonly: bool = False
    ) -> None:
        self.uri = uri.uri
        self.readonly = readonly
        self.host = host
        self._tg = tg
        self._counter = itertools.count(1)
        #: Machines with a live run, whose consoles end when this connection closes.
        self.machines: set[_TestMachine] = set()

    @classmethod
    @asynccontextmanager
    async def open(cls, uri: ParsedURI, *, readonly: bool = False) -> AsyncIterator[TestDriver]:
        host = default_host() if uri.driver == "default" else TestHost()
        async with anyio.create_task_group() as tg:
            driver = cls(uri, host, tg, readonly=readonly)
            try:
                yield driver
            finally:
                tg.cancel_scope.cancel()
                for machine in list(driver.machines):
                    machine.close_console()

    async def aclose(self) -> None:
        self._tg.cancel_scope.cancel()

    @property
    def problems(self) -> Sequence[StateProblem]:
        return ()

    async def load(self) -> list[StoredDomain]:
        stored = []
        names = sorted(set(self.host.definitions) | set(self.host.runs))
        for name in names:
            run = self.host.runs.get(name)
            if name in self.host.definitions:
                config, autostart = self.host.definitions[name]
                stored.append(StoredDomain(config, True, autostart, run))
            elif run is not None:
                stored.append(StoredDomain(run.config, False, False, run))
        return stored

    async def save_definition(self, config: DomainConfig, *, autostart: bool) -> None:
        await anyio.lowlevel.checkpoint()
        self.host.definitions[config.name] = (config, autostart)

    async def remove_definition(self, name: str) -> None:
        await anyio.lowlevel.checkpoint()
        self.host.definitions.pop(name, None)

    async def launch(self, config: DomainConfig, observer: MachineObserver, *, persistent: bool) -> None:
        behaviour = self.host.behaviours.get(config.name, GuestBehaviour())
        run = _Run(config, behaviour)
        machine = _TestMachine(self, run, observer, self._tg)
        self.host.runs[config.name] = run
        observer.attached(machine)
        if machine.poll_exited():
            raise LaunchError(config.name, "destroyed while starting")
        try:
            if behaviour.start_error is not None:
                await anyio.lowlevel.checkpoint()
                machine._exit()
                raise LaunchError(config.name, behaviour.start_error)
            with anyio.move_on_after(behaviour.boot_delay):
                await machine.exit_seen.wait()  # a destroy during the start ends it
            if machine.poll_exited():
                raise LaunchError(config.name, "the guest exited while starting")
        except BaseException:
            if not machine.poll_exited():
                machine._exit()  # a cancelled start ends its guest
            raise
        machine._booted = True
        machine.boot_console()
        observer.happened(Happening.BOOTED)
        if behaviour.crash_after is not None:
            self._tg.start_soon(machine.crash_after, behaviour.crash_after)

    async def adopt(self, stored: StoredDomain, observer: MachineObserver) -> None:
        run = stored.runtime
        assert isinstance(run, _Run)
        machine = _TestMachine(self, run, observer, self._tg)
        machine._booted = True
        observer.attached(machine)
        happening = {
            "running": Happening.ADOPTED_RUNNING,
            "paused": Happening.ADOPTED_PAUSED,
            "shutdown": Happening.ADOPTED_SHUTDOWN,
        }[run.status]
        observer.happened(happening)
