"""What a hypervisor backend provides to :class:`~aiovirt.Domain` and :class:`~aiovirt.Connection`.

A *driver* is one opened backend (a local QEMU state directory, an in-memory test host, a libvirt
daemon). A *machine* is one run of one domain on it (a QEMU process, a scripted test guest): it
exists from the spawn to the observed exit. Drivers know nothing of states, reasons or events:
they report what they observe to a :class:`MachineObserver` (the domain), which applies the
lifecycle table (:mod:`aiovirt._lifecycle`). That is the whole seam:

- the driver stores and loads definitions (:meth:`Driver.load`, :meth:`Driver.save_definition`);
- it launches a machine for a config, or adopts one an earlier connection left running, reporting
  ``observer.attached(machine)`` as soon as a machine exists and then its happenings;
- a machine takes signals (SIGTERM, SIGKILL: the destroy primitives), the power button, pause,
  resume, reset, and monitor commands, and tells whether its process is gone;
- a machine whose config has ``console`` on offers its serial console as a
  :class:`~aiovirt._console.ConsolePort` (:meth:`Machine.console`): the driver feeds it the guest's
  output and writes the guest's input; :class:`~aiovirt._console.Console` does the rest.

Every driver keeps the same errors: :class:`~aiovirt.LaunchError` when a start fails,
:class:`~aiovirt.ConnectionLostError` when a machine's monitor cannot be reached,
:class:`~aiovirt.CommandError` when it refuses a command.
"""

from __future__ import annotations

import abc
import signal
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .._broadcast import Subscription
from .._console import ConsolePort
from .._errors import ConnectionLostError
from .._lifecycle import Happening
from ..config import DomainConfig
from ..qmp._codec import Event

__all__ = ["Driver", "Machine", "MachineObserver", "StateProblem", "StoredDomain"]


@dataclass(frozen=True)
class StateProblem:
    """Something of the backend's state that could not be used; ``path`` is where it is now."""

    path: Path
    kind: str  # "definition", "runtime", "autostart" or "unreachable"
    message: str

    def __str__(self) -> str:
        return f"{self.kind} {self.path}: {self.message}"


@dataclass(frozen=True)
class StoredDomain:
    """A domain the driver found at :meth:`Driver.load`.

    ``runtime`` is the driver's own record of a machine that may still run (opaque to everyone
    else), handed back to :meth:`Driver.adopt`; None when the domain has no machine.
    """

    config: DomainConfig
    persistent: bool
    autostart: bool
    runtime: object | None = None


class MachineObserver(Protocol):
    """What a driver tells about one machine. Implemented by the domain; called in the driver's tasks."""

    def attached(self, machine: Machine) -> None:
        """``machine`` exists now (spawned or found): it can be signalled from here on."""

    def happened(self, happening: Happening, *, shutdown_reason: str | None = None) -> None:
        """The driver observed ``happening`` (``shutdown_reason``: QEMU's reason, with a SHUTDOWN)."""

    def reachable(self, problem: str | None) -> None:
        """The machine's monitor answers again (None) or cannot be reached (why)."""


class Machine(abc.ABC):
    """One run of one domain. Created by :meth:`Driver.launch` or :meth:`Driver.adopt`."""

    @property
    @abc.abstractmethod
    def pid(self) -> int | None:
        """The host process, where there is one the caller may know of."""

    @abc.abstractmethod
    def send_signal(self, sig: signal.Signals) -> bool:
        """Send SIGTERM or SIGKILL to the machine's process. False when it is gone already."""

    @abc.abstractmethod
    def poll_exited(self) -> bool:
        """True once the process is gone (a zombie counts: it is dead); never blocks."""

    @abc.abstractmethod
    def process_state(self) -> str:
        """The kernel's one-letter state of the process (``D`` for uninterruptible), or ``gone``."""

    @abc.abstractmethod
    async def command(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run a monitor command (QMP's, or the driver's emulation of it) and return its result."""

    @abc.abstractmethod
    def monitor_events(self, max_buffer: int) -> AbstractContextManager[Subscription[Event]]:
        """The monitor's own events (QMP's names and data) while the block is open."""

    async def powerdown(self) -> None:
        """Press the ACPI power button."""
        await self.command("system_powerdown")

    async def pause(self) -> None:
        await self.command("stop")

    async def resume(self) -> None:
        await self.command("cont")

    async def reset(self) -> None:
        await self.command("system_reset")

    async def console(self) -> ConsolePort:
        """The serial console of this run (only asked of a machine whose config has ``console``).

        Raises :class:`~aiovirt.ConnectionLostError` when it cannot be reached (e.g. a machine
        taken back from a controller that did not serve consoles).
        """
        raise ConnectionLostError(f"{type(self).__name__} has no serial console")

    @abc.abstractmethod
    def stats(self) -> tuple[float, int, float]:
        """``(cpu seconds, resident bytes, uptime seconds)`` of the machine's process."""

    def set_persistent(self, persistent: bool) -> None:  # noqa: B027 - most drivers keep no such record
        """The domain's persistence changed (define or undefine while running): update any record."""


class Driver(abc.ABC):
    """One opened backend. :func:`aiovirt.connect` opens it and closes it with :meth:`aclose`."""

    uri: str
    readonly: bool = False

    @abc.abstractmethod
    async def load(self) -> list[StoredDomain]:
        """Every domain the backend knows of, with the runtime record of those that may run."""

    @property
    @abc.abstractmethod
    def problems(self) -> Sequence[StateProblem]:
        """What of the backend's state could not be used, now (kept, never deleted)."""

    @abc.abstractmethod
    async def save_definition(self, config: DomainConfig, *, autostart: bool) -> None:
        """Store the persistent definition durably (replacing the old one atomically)."""

    @abc.abstractmethod
    async def remove_definition(self, name: str) -> None: ...

    @abc.abstractmethod
    async def launch(self, config: DomainConfig, observer: MachineObserver, *, persistent: bool) -> None:
        """Start a machine for ``config`` and return once its CPUs run.

        Reports ``observer.attached(machine)`` as soon as the machine exists, then BOOTED (or
        EXITED, after which it raises :class:`~aiovirt.LaunchError`). A failure before any
        machine existed raises without reporting anything. A cancelled launch ends the machine.
        """

    @abc.abstractmethod
    async def adopt(self, stored: StoredDomain, observer: MachineObserver) -> None:
        """Take back the machine ``stored.runtime`` describes, if it still is that machine.

        Reports ``attached`` then one ADOPTED_* happening, or GONE when it no longer runs (then
        nothing was ever signalled). Never ends a machine whose identity checks pass.
        """

    def definition_path(self, name: str) -> Path | None:
        """Where the persistent definition is stored, if in a file."""
        return None

    def log_path(self, name: str) -> Path | None:
        """Where the machine's own output goes, if the driver keeps it."""
        return None

    def console_path(self, name: str) -> Path | None:
        """Where the serial console is logged, if the driver keeps it."""
        return None

    def remove_logs(self, name: str) -> None:  # noqa: B027 - a driver without logs has none to remove
        """Delete the domain's logs (``destroy(remove_logs=True)``)."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop supervising (machines keep running where the backend allows) and release the backend."""
