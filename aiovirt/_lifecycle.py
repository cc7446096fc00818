"""The lifecycle of a domain as one pure state machine: every (phase, happening) pair in one table.

Like h11's ``_state.py`` holds all of HTTP's, this module holds all of a domain's: what each thing
that happens to a domain (a start asked for, QEMU's monitor saying STOP, the process exiting...)
does to its state, with which reason, and which lifecycle event it emits. No I/O, no anyio, no
driver: :class:`~aiovirt.Domain` is the only thing that applies it, drivers only report happenings.

Two kinds of input:

- **Requests** (:class:`Operation`) are what a caller asks for. Each is allowed in some phases and
  refused with :class:`~aiovirt.InvalidStateError` in the others. Only ``START`` and ``DESTROY``
  change anything here: a start enters ``STARTING``, a destroy marks the run as being destroyed
  (so its exit is reported ``destroyed``). Every other change of state comes from what the
  hypervisor reports afterwards, never from what was asked (a suspend is PAUSED once QEMU said STOP).
- **Happenings** (:class:`Happening`) are what the driver observed. Each pair maps to a
  :class:`Transition`, to :data:`IGNORED` (an observation that changes nothing in this phase, e.g.
  QEMU's STOP while it shuts down), or is impossible (:class:`~aiovirt.LocalProtocolError`: a
  driver bug, never the caller's).

The phases are libvirt's states plus ``STARTING``, which the public API shows as libvirt does
during a start: PAUSED with reason ``starting_up`` (QEMU exists, paused with ``-S``, the guest has
not run yet). That keeps a starting domain active, so a destroy or a fleet stop reaches it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from ._errors import InvalidStateError, LocalProtocolError
from ._states import DomainState, EventDetail, EventKind, StateReason

__all__ = [
    "ALLOWED",
    "IGNORED",
    "TABLE",
    "Happening",
    "Lifecycle",
    "Operation",
    "Phase",
    "Transition",
]


class Phase(enum.Enum):
    """Where a domain is in its lifecycle (the public state is :data:`PUBLIC_STATE` of it)."""

    SHUTOFF = "shutoff"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"  # the guest is shutting down (QEMU sent SHUTDOWN, the process still lives)


PUBLIC_STATE: Final = {
    Phase.SHUTOFF: DomainState.SHUTOFF,
    Phase.STARTING: DomainState.PAUSED,
    Phase.RUNNING: DomainState.RUNNING,
    Phase.PAUSED: DomainState.PAUSED,
    Phase.SHUTDOWN: DomainState.SHUTDOWN,
}


class Operation(enum.Enum):
    """What a caller asks of a domain. The value is the verb of its InvalidStateError message."""

    START = "start"
    SHUTDOWN = "shut down"
    SUSPEND = "suspend"
    RESUME = "resume"
    RESET = "reset"
    DESTROY = "destroy"
    COMMAND = "send a command to"
    CONSOLE = "open the console of"


_ACTIVE: Final = frozenset({Phase.STARTING, Phase.RUNNING, Phase.PAUSED, Phase.SHUTDOWN})
_BOOTED: Final = frozenset({Phase.RUNNING, Phase.PAUSED, Phase.SHUTDOWN})

ALLOWED: Final[dict[Operation, frozenset[Phase]]] = {
    Operation.START: frozenset({Phase.SHUTOFF}),
    # A paused domain is refused, as libvirt does: QEMU would queue the press and fire it at resume.
    Operation.SHUTDOWN: frozenset({Phase.RUNNING, Phase.SHUTDOWN}),
    Operation.SUSPEND: frozenset({Phase.RUNNING}),
    Operation.RESUME: frozenset({Phase.PAUSED}),  # not STARTING: resuming is the start's own business
    Operation.RESET: _BOOTED,
    Operation.DESTROY: _ACTIVE,  # also STARTING: a start never outlives a destroy
    Operation.COMMAND: _BOOTED,  # a starting domain's monitor belongs to the start
    Operation.CONSOLE: _ACTIVE,
}


class Happening(enum.Enum):
    """What a driver observed (or, for ``ABORTED``, what a start gave up on before any process)."""

    BOOTED = "booted"  # the start completed: CPUs running
    ABORTED = "aborted"  # the start failed before any process existed: left as it was
    PAUSED = "paused"  # the CPUs stopped (QMP STOP)
    RESUMED = "resumed"  # the CPUs run again (QMP RESUME)
    SHUTDOWN_GUEST = "shutdown-guest"  # the guest is shutting down on its own or by ACPI
    SHUTDOWN_HOST = "shutdown-host"  # the host asked (SIGTERM, QMP quit)
    SHUTDOWN_UNKNOWN = "shutdown-unknown"  # QEMU did not say who
    EXITED = "exited"  # the process exit was seen
    # Taking back a process found running by a new connection (its status, once known):
    ADOPTED_RUNNING = "adopted-running"
    ADOPTED_PAUSED = "adopted-paused"
    ADOPTED_SHUTDOWN = "adopted-shutdown"
    ADOPTED_UNKNOWN = "adopted-unknown"  # alive, identity checked, but its monitor does not answer
    ADOPTED_BOOTED = "adopted-booted"  # the last controller died during the start; we finished it
    GONE = "gone"  # its process exited while no controller watched


@dataclass(frozen=True)
class Transition:
    """The outcome of one happening: the next phase, its reason, and the event to emit (if any)."""

    phase: Phase
    reason: StateReason
    event: tuple[EventKind, EventDetail] | None = None

    @property
    def state(self) -> DomainState:
        return PUBLIC_STATE[self.phase]


IGNORED: Final = None
"""A happening that changes nothing in this phase (see :data:`TABLE`)."""

_SHUTOFF_GONE = Transition(Phase.SHUTOFF, StateReason.DAEMON, (EventKind.STOPPED, EventDetail.FAILED))
_DESTROYED = Transition(Phase.SHUTOFF, StateReason.DESTROYED, (EventKind.STOPPED, EventDetail.DESTROYED))
_CRASHED = Transition(Phase.SHUTOFF, StateReason.CRASHED, (EventKind.STOPPED, EventDetail.CRASHED))


def _shutting_down(detail: EventDetail) -> Transition:
    return Transition(Phase.SHUTDOWN, StateReason.USER, (EventKind.SHUTDOWN, detail))


_SHUTDOWNS = {
    Happening.SHUTDOWN_GUEST: _shutting_down(EventDetail.GUEST),
    Happening.SHUTDOWN_HOST: _shutting_down(EventDetail.HOST),
    # libvirt's detail when QEMU does not say who asked (before QEMU 2.10).
    Happening.SHUTDOWN_UNKNOWN: _shutting_down(EventDetail.FINISHED),
}

_ADOPTED = {
    Happening.ADOPTED_RUNNING: Transition(Phase.RUNNING, StateReason.UNKNOWN),
    Happening.ADOPTED_PAUSED: Transition(Phase.PAUSED, StateReason.USER),
    Happening.ADOPTED_SHUTDOWN: Transition(Phase.SHUTDOWN, StateReason.USER),
    Happening.ADOPTED_UNKNOWN: Transition(Phase.RUNNING, StateReason.UNKNOWN),
    Happening.ADOPTED_BOOTED: Transition(
        Phase.RUNNING, StateReason.BOOTED, (EventKind.STARTED, EventDetail.BOOTED)
    ),
    Happening.GONE: _SHUTOFF_GONE,
}

TABLE: Final[dict[tuple[Phase, Happening], Transition | None]] = {
    # -- a start ---------------------------------------------------------------------------------
    (Phase.STARTING, Happening.BOOTED): Transition(
        Phase.RUNNING, StateReason.BOOTED, (EventKind.STARTED, EventDetail.BOOTED)
    ),
    # ABORTED restores the reason the domain had before the start (see Lifecycle.happen).
    (Phase.STARTING, Happening.ABORTED): Transition(Phase.SHUTOFF, StateReason.UNKNOWN),
    (Phase.STARTING, Happening.EXITED): Transition(
        Phase.SHUTOFF, StateReason.FAILED, (EventKind.STOPPED, EventDetail.FAILED)
    ),
    # The start's own "cont" (RESUME), and anything QEMU says before it is running, are its business.
    (Phase.STARTING, Happening.PAUSED): IGNORED,
    (Phase.STARTING, Happening.RESUMED): IGNORED,
    **{(Phase.STARTING, h): IGNORED for h in _SHUTDOWNS},
    # -- running ---------------------------------------------------------------------------------
    (Phase.RUNNING, Happening.PAUSED): Transition(
        Phase.PAUSED, StateReason.USER, (EventKind.SUSPENDED, EventDetail.PAUSED)
    ),
    (Phase.RUNNING, Happening.RESUMED): IGNORED,
    **{(Phase.RUNNING, h): t for h, t in _SHUTDOWNS.items()},
    (Phase.RUNNING, Happening.EXITED): _CRASHED,
    # -- paused ----------------------------------------------------------------------------------
    (Phase.PAUSED, Happening.PAUSED): IGNORED,
    (Phase.PAUSED, Happening.RESUMED): Transition(
        Phase.RUNNING, StateReason.UNPAUSED, (EventKind.RESUMED, EventDetail.UNPAUSED)
    ),
    **{(Phase.PAUSED, h): t for h, t in _SHUTDOWNS.items()},
    (Phase.PAUSED, Happening.EXITED): _CRASHED,
    # -- shutting down ---------------------------------------------------------------------------
    # QEMU stops the CPUs as it shuts down; a reset after SHUTDOWN runs them again: the guest is
    # still on its way out as far as the lifecycle goes.
    (Phase.SHUTDOWN, Happening.PAUSED): IGNORED,
    (Phase.SHUTDOWN, Happening.RESUMED): IGNORED,
    **{(Phase.SHUTDOWN, h): t for h, t in _SHUTDOWNS.items()},
    (Phase.SHUTDOWN, Happening.EXITED): Transition(
        Phase.SHUTOFF, StateReason.SHUTDOWN, (EventKind.STOPPED, EventDetail.SHUTDOWN)
    ),
    # -- taking back a running process -----------------------------------------------------------
    **{(Phase.SHUTOFF, h): t for h, t in _ADOPTED.items()},
}
"""Every possible (phase, happening) pair. A pair that is not here cannot happen (a driver bug)."""

#: An exit after a destroy was asked for (of this run) is ``destroyed``, whatever the phase.
_EXIT_AFTER_DESTROY = _DESTROYED


class Lifecycle:
    """The state machine of one domain: its phase, reason, and whether its run is being destroyed.

    Pure: callers apply what it returns (set the state, emit the event). ``name`` is only for the
    errors it raises.
    """

    def __init__(self, name: str, reason: StateReason = StateReason.UNKNOWN) -> None:
        self.name = name
        self.phase = Phase.SHUTOFF
        self.reason = reason
        #: A destroy was asked for during this run: its exit is reported ``destroyed``.
        self.destroying = False
        self._reason_before_start = reason

    @property
    def state(self) -> DomainState:
        return PUBLIC_STATE[self.phase]

    @property
    def active(self) -> bool:
        return self.phase is not Phase.SHUTOFF

    def check(self, operation: Operation) -> None:
        """Raise :class:`~aiovirt.InvalidStateError` unless ``operation`` is allowed now."""
        if self.phase not in ALLOWED[operation]:
            raise InvalidStateError(self.name, operation.value, self.state, self.reason)

    def request(self, operation: Operation) -> Transition | None:
        """Check ``operation`` and apply what it changes here: the transition (START), else None."""
        self.check(operation)
        if operation is Operation.START:
            self._reason_before_start = self.reason
            self.destroying = False
            return self._enter(Transition(Phase.STARTING, StateReason.STARTING_UP))
        if operation is Operation.DESTROY:
            self.destroying = True
        return None

    def happen(self, happening: Happening) -> Transition | None:
        """Apply what a driver observed. Returns the transition made, or None when it changes nothing.

        Raises :class:`~aiovirt.LocalProtocolError` for a pair that cannot happen.
        """
        key = (self.phase, happening)
        if key not in TABLE:
            raise LocalProtocolError(
                f"domain {self.name!r}: {happening.value!r} cannot happen while {self.phase.value}"
            )
        transition = TABLE[key]
        if transition is None:
            return None
        if happening is Happening.EXITED and self.destroying:
            transition = _EXIT_AFTER_DESTROY
        elif happening is Happening.ABORTED:
            transition = Transition(Phase.SHUTOFF, self._reason_before_start)
        return self._enter(transition)

    def _enter(self, transition: Transition) -> Transition:
        self.phase, self.reason = transition.phase, transition.reason
        if transition.phase is Phase.SHUTOFF:
            self.destroying = False
        return transition
