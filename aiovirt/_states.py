"""Domain states, their reasons and lifecycle events, with libvirt's names.

Values are the lower-case libvirt names (``VIR_DOMAIN_SHUTOFF`` -> ``"shutoff"``,
``VIR_DOMAIN_SHUTOFF_DESTROYED`` -> ``"destroyed"``) so they read the same in JSON records,
logs and ``virsh`` habits.
"""

from __future__ import annotations

import enum
import uuid as uuid_mod
from dataclasses import dataclass

__all__ = ["DomainEvent", "DomainState", "EventDetail", "EventKind", "StateReason"]


class DomainState(str, enum.Enum):
    """What a domain is doing (libvirt's ``virDomainState``)."""

    NOSTATE = "nostate"
    RUNNING = "running"
    BLOCKED = "blocked"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"  # the guest is shutting down
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    PMSUSPENDED = "pmsuspended"

    def __str__(self) -> str:
        return self.value

    @property
    def active(self) -> bool:
        """True while a QEMU process exists for the domain."""
        return self not in (DomainState.SHUTOFF, DomainState.NOSTATE, DomainState.CRASHED)


class StateReason(str, enum.Enum):
    """Why a domain is in its state (libvirt's per-state reason enums, merged)."""

    UNKNOWN = "unknown"
    # RUNNING
    BOOTED = "booted"
    UNPAUSED = "unpaused"
    # PAUSED
    USER = "user"
    IOERROR = "ioerror"
    SHUTTING_DOWN = "shutting_down"
    STARTING_UP = "starting_up"
    # SHUTOFF
    SHUTDOWN = "shutdown"  # the guest (or QEMU on request) shut down
    DESTROYED = "destroyed"
    CRASHED = "crashed"  # QEMU exited without a SHUTDOWN event
    FAILED = "failed"  # QEMU failed to start
    DAEMON = "daemon"  # the controller found the process gone (reattach)

    def __str__(self) -> str:
        return self.value


class EventKind(str, enum.Enum):
    """Lifecycle event kinds (libvirt's ``virDomainEventType``)."""

    DEFINED = "defined"
    UNDEFINED = "undefined"
    STARTED = "started"
    SUSPENDED = "suspended"
    RESUMED = "resumed"
    STOPPED = "stopped"
    SHUTDOWN = "shutdown"

    def __str__(self) -> str:
        return self.value


class EventDetail(str, enum.Enum):
    """Lifecycle event details (libvirt's ``virDomainEvent*DetailType``)."""

    # DEFINED
    ADDED = "added"
    UPDATED = "updated"
    # UNDEFINED
    REMOVED = "removed"
    # STARTED
    BOOTED = "booted"
    # SUSPENDED
    PAUSED = "paused"
    IOERROR = "ioerror"
    # RESUMED
    UNPAUSED = "unpaused"
    # STOPPED
    SHUTDOWN = "shutdown"
    DESTROYED = "destroyed"
    CRASHED = "crashed"
    FAILED = "failed"
    # SHUTDOWN
    FINISHED = "finished"
    GUEST = "guest"
    HOST = "host"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class DomainEvent:
    """One lifecycle event of one domain. ``timestamp`` is wall-clock seconds (``time.time()``)."""

    kind: EventKind
    detail: EventDetail
    name: str
    uuid: uuid_mod.UUID
    timestamp: float
