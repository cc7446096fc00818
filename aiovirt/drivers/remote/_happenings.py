"""libvirt's lifecycle events as aiovirt's happenings: one pure function, tested as a table.

A libvirt daemon reports what happened to a domain with lifecycle events (``remote_protocol.x``:
event type + detail). aiovirt's domains take *happenings* (:mod:`aiovirt._lifecycle`). The
translation needs the run's libvirt state before the event, because libvirt does not send every
step aiovirt's lifecycle expects:

- STOPPED/SHUTDOWN without a SHUTDOWN event first (libvirt's test driver powers off at once):
  ``SHUTDOWN_UNKNOWN`` is reported first, so the exit is SHUTOFF/shutdown, not crashed.
- STOPPED/DESTROYED (or SAVED, MIGRATED, FROM_SNAPSHOT) that this connection did not ask for:
  the host ended the run, so ``SHUTDOWN_HOST`` then ``EXITED`` (SHUTOFF/shutdown, as the QEMU
  driver reports a QEMU that someone else sent SIGTERM). aiovirt's lifecycle has no happening for
  "destroyed by someone else"; crashed would be wrong.
- After a destroy of this connection (``destroying``) an exit is just ``EXITED``: the lifecycle
  reports it ``destroyed`` whatever came before.
- SHUTDOWN's detail names who asked: GUEST -> ``SHUTDOWN_GUEST`` (reason ``guest-shutdown``),
  HOST -> ``SHUTDOWN_HOST`` (``host-signal``), FINISHED -> ``SHUTDOWN_UNKNOWN``. libvirt does not
  forward QEMU's own reason; these are QEMU's words for what libvirt's detail says.
- STARTED, DEFINED, UNDEFINED, PMSUSPENDED and CRASHED (a guest panic kept by on_crash=preserve)
  change nothing aiovirt models for a run.

Stdlib and aiovirt's lifecycle names only: no I/O.
"""

from __future__ import annotations

import enum
from typing import Final

from ..._lifecycle import Happening

__all__ = ["RunState", "state_from_libvirt", "stopped_detail_from_reason", "translate"]


class RunState(enum.Enum):
    """libvirt's state of one run, as far as this connection has seen it."""

    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"
    SHUTOFF = "shutoff"


# virDomainEventType numbers (remote_protocol.x / libvirt-domain.h).
_SUSPENDED, _RESUMED, _STOPPED, _SHUTDOWN = 3, 4, 5, 6
# virDomainEventStoppedDetailType.
STOPPED_SHUTDOWN: Final = 0
STOPPED_DESTROYED: Final = 1
STOPPED_CRASHED: Final = 2
STOPPED_FAILED: Final = 5
_STOPPED_BY_HOST: Final = frozenset({STOPPED_DESTROYED, 3, 4, 6})  # destroyed, migrated, saved, from snapshot
# virDomainEventShutdownDetailType -> what aiovirt calls it, and QEMU's word for the reason.
_SHUTDOWN_DETAIL: Final[dict[int, tuple[Happening, str | None]]] = {
    0: (Happening.SHUTDOWN_UNKNOWN, None),
    1: (Happening.SHUTDOWN_GUEST, "guest-shutdown"),
    2: (Happening.SHUTDOWN_HOST, "host-signal"),
}

Report = tuple[Happening, str | None]


def state_from_libvirt(state: int) -> RunState:
    """A virDomainState number as the run's state (NOSTATE, BLOCKED, CRASHED, PMSUSPENDED: running)."""
    return {3: RunState.PAUSED, 4: RunState.SHUTDOWN, 5: RunState.SHUTOFF}.get(state, RunState.RUNNING)


def translate(
    event: int, detail: int, state: RunState, *, destroying: bool
) -> tuple[RunState, tuple[Report, ...]]:
    """The run's next state and the happenings to report (with QEMU's shutdown reason) for one event.

    ``destroying``: this connection asked for the run to end (a destroy), so an exit needs no
    explanation. An event for a run already SHUTOFF changes nothing.
    """
    if state is RunState.SHUTOFF:
        return state, ()
    if event == _SUSPENDED:
        return (state if state is RunState.SHUTDOWN else RunState.PAUSED), ((Happening.PAUSED, None),)
    if event == _RESUMED:
        return (state if state is RunState.SHUTDOWN else RunState.RUNNING), ((Happening.RESUMED, None),)
    if event == _SHUTDOWN:
        return RunState.SHUTDOWN, (_SHUTDOWN_DETAIL.get(detail, (Happening.SHUTDOWN_UNKNOWN, None)),)
    if event == _STOPPED:
        before: tuple[Report, ...] = ()
        if state is not RunState.SHUTDOWN and not destroying:
            if detail == STOPPED_SHUTDOWN:
                before = ((Happening.SHUTDOWN_UNKNOWN, None),)
            elif detail in _STOPPED_BY_HOST:
                before = ((Happening.SHUTDOWN_HOST, None),)
        return RunState.SHUTOFF, (*before, (Happening.EXITED, None))
    return state, ()  # STARTED, DEFINED, UNDEFINED, PMSUSPENDED, CRASHED


def stopped_detail_from_reason(reason: int) -> int:
    """A SHUTOFF state's reason (virDomainShutoffReason) as the STOPPED detail that would have said it,
    for a stop this connection missed the event of (seen only by asking for the state)."""
    return {
        1: STOPPED_SHUTDOWN,
        2: STOPPED_DESTROYED,
        3: STOPPED_CRASHED,
        4: 3,  # migrated
        5: 4,  # saved
        6: STOPPED_FAILED,
        7: 6,  # from snapshot
    }.get(reason, STOPPED_DESTROYED)  # unknown, daemon: the host ended it, somehow
