"""libvirt's state, reason and event numbers as aiovirt's enums (stdlib only).

aiovirt's enums carry libvirt's names but only the members aiovirt's own driver produces. A libvirt
number with an exact aiovirt counterpart maps to it; a reason aiovirt does not name maps to
``StateReason.UNKNOWN`` (libvirt's own "unknown" reason, so nothing false is claimed); a lifecycle
event whose kind or detail aiovirt does not name (PMSUSPENDED and CRASHED events, details such as
MIGRATED, RESTORED, FROM_SNAPSHOT, SAVED, RENAMED) maps to None: the caller decides whether to
drop or log it.
"""

from __future__ import annotations

from typing import Final

from .._states import DomainEvent, DomainState, EventDetail, EventKind, StateReason
from ._protocol import LifecycleEvent

__all__ = ["domain_event", "domain_state", "state_reason"]

_S = DomainState
_R = StateReason
_K = EventKind
_D = EventDetail

# virDomainState
_STATES: Final = (
    _S.NOSTATE,
    _S.RUNNING,
    _S.BLOCKED,
    _S.PAUSED,
    _S.SHUTDOWN,
    _S.SHUTOFF,
    _S.CRASHED,
    _S.PMSUSPENDED,
)

# virDomain<State>Reason, per state: libvirt's number -> aiovirt's reason (exact names only).
_REASONS: Final[dict[DomainState, dict[int, StateReason]]] = {
    _S.RUNNING: {1: _R.BOOTED, 5: _R.UNPAUSED},
    _S.PAUSED: {1: _R.USER, 5: _R.IOERROR, 8: _R.SHUTTING_DOWN, 10: _R.CRASHED, 11: _R.STARTING_UP},
    _S.SHUTDOWN: {1: _R.USER},
    _S.SHUTOFF: {1: _R.SHUTDOWN, 2: _R.DESTROYED, 3: _R.CRASHED, 6: _R.FAILED, 8: _R.DAEMON},
}

# virDomainEventType -> (aiovirt's kind, {virDomainEvent<Kind>DetailType -> aiovirt's detail}).
_EVENTS: Final[dict[int, tuple[EventKind, dict[int, EventDetail]]]] = {
    0: (_K.DEFINED, {0: _D.ADDED, 1: _D.UPDATED}),
    1: (_K.UNDEFINED, {0: _D.REMOVED}),
    2: (_K.STARTED, {0: _D.BOOTED}),
    3: (_K.SUSPENDED, {0: _D.PAUSED, 2: _D.IOERROR}),
    4: (_K.RESUMED, {0: _D.UNPAUSED}),
    5: (_K.STOPPED, {0: _D.SHUTDOWN, 1: _D.DESTROYED, 2: _D.CRASHED, 5: _D.FAILED}),
    6: (_K.SHUTDOWN, {0: _D.FINISHED, 1: _D.GUEST, 2: _D.HOST}),
}


def domain_state(state: int) -> DomainState:
    """A virDomainState number as aiovirt's DomainState (an unknown number is NOSTATE)."""
    return _STATES[state] if 0 <= state < len(_STATES) else _S.NOSTATE


def state_reason(state: int, reason: int) -> StateReason:
    """A (virDomainState, its reason) pair's reason as aiovirt's StateReason (or UNKNOWN)."""
    return _REASONS.get(domain_state(state), {}).get(reason, _R.UNKNOWN)


def domain_event(event: LifecycleEvent, timestamp: float) -> DomainEvent | None:
    """A lifecycle event as aiovirt's DomainEvent, or None when aiovirt has no name for it.

    ``timestamp`` is when it was received (libvirt's lifecycle events carry no time).
    """
    kind_details = _EVENTS.get(int(event.event))
    if kind_details is None:
        return None
    kind, details = kind_details
    detail = details.get(event.detail)
    if detail is None:
        return None
    return DomainEvent(kind, detail, event.dom.name, event.dom.uuid, timestamp)
