"""The whole exception tree of aiovirt, in one place.

::

    AiovirtError
    ├── ConfigError                 a DomainConfig (or a value for one) is invalid     (also ValueError)
    ├── InvalidURIError             a connection URI is malformed or names no driver   (also ValueError)
    ├── ConnectionClosedError       the connection was closed by its owner (trio's ClosedResourceError)
    ├── ReadOnlyError               a change asked of a read-only connection
    ├── DomainNotFoundError         no domain of that name
    ├── DomainExistsError           a domain of that name (or UUID) already exists
    ├── InvalidStateError           the operation is not allowed in the domain's state
    ├── ConsoleBusyError            another console of the domain is its writer
    ├── LaunchError                 QEMU exited (or could not be executed) while starting
    ├── DestroyTimeoutError         graceful destroy: the process outlived SIGTERM's timeout
    ├── ProcessBusyError            even SIGKILL did not end the process (uninterruptible sleep)
    ├── EventsDroppedError          a subscriber fell behind and events were dropped for it
    ├── QMPError                    anything QEMU's monitor answered
    │   └── CommandError            QEMU answered a command with an error
    ├── ConnectionLostError         a monitor or daemon went away or cannot be reached (trio's
    │                               BrokenResourceError): the peer's doing, not the caller's
    ├── ProtocolError               the peer sent something that is not its protocol (QMP, libvirt RPC)
    ├── LocalProtocolError          aiovirt misused a codec: a bug in aiovirt      (also RuntimeError)
    └── StateDirError               the state directory cannot be used
        └── StateDirLockedError     another controller holds the state directory

Closed versus lost follows trio: :class:`ConnectionClosedError` means the caller closed the
connection and then used it (or one of its domains); :class:`ConnectionLostError` means the other
side went away. Every exception shows as ``aiovirt.X`` in tracebacks.

Every exception carries the objects that caused it as attributes (after qemu.qmp), so callers
never parse messages. Timeouts chosen by the caller are anyio's own (``fail_after`` raises
``TimeoutError``) and cancellation is never wrapped: neither appears here.

This module imports nothing from aiovirt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "AiovirtError",
    "CommandError",
    "ConfigError",
    "ConnectionClosedError",
    "ConnectionLostError",
    "ConsoleBusyError",
    "DestroyTimeoutError",
    "DomainExistsError",
    "DomainNotFoundError",
    "EventsDroppedError",
    "InvalidStateError",
    "InvalidURIError",
    "LaunchError",
    "LocalProtocolError",
    "ProcessBusyError",
    "ProtocolError",
    "QMPError",
    "ReadOnlyError",
    "StateDirError",
    "StateDirLockedError",
]


class AiovirtError(Exception):
    """Base class of every error raised by aiovirt."""


class ConfigError(AiovirtError, ValueError):
    """A configuration is invalid.

    ``errors`` lists the problems as ``(location, message)`` pairs, one per invalid field, so a
    caller can show all of them at once.
    """

    def __init__(self, message: str, errors: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.errors: tuple[tuple[str, str], ...] = tuple(errors)


class InvalidURIError(AiovirtError, ValueError):
    """A connection URI is malformed or names no known driver."""

    def __init__(self, uri: str, problem: str) -> None:
        super().__init__(f"invalid connection URI {uri!r}: {problem}")
        self.uri = uri
        self.problem = problem


class ConnectionClosedError(AiovirtError):
    """The connection was closed (by leaving ``async with connect()``) and then used.

    Raised at once by every operation of the connection and of its domains; nothing is sent.
    ``uri`` is the connection's URI.
    """

    def __init__(self, uri: str, operation: str = "") -> None:
        what = f"cannot {operation}: " if operation else ""
        super().__init__(f"{what}the connection to {uri!r} is closed")
        self.uri = uri
        self.operation = operation


class ReadOnlyError(AiovirtError):
    """A read-only connection (``connect(uri, readonly=True)``) was asked to change something.

    Nothing was sent or written: a read-only connection never signals, commands or writes.
    """

    def __init__(self, uri: str, operation: str) -> None:
        super().__init__(f"cannot {operation}: the connection to {uri!r} is read-only")
        self.uri = uri
        self.operation = operation


class DomainNotFoundError(AiovirtError, LookupError):
    """No domain has this name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"domain {name!r} not found")
        self.name = name


class DomainExistsError(AiovirtError):
    """A domain with this name or UUID already exists."""

    def __init__(self, name: str, detail: str = "") -> None:
        super().__init__(f"domain {name!r} already exists" + (f": {detail}" if detail else ""))
        self.name = name


class InvalidStateError(AiovirtError):
    """The operation is not allowed while the domain is in its current state."""

    def __init__(self, name: str, operation: str, state: object, reason: object | None = None) -> None:
        where = f"{state}" + (f" ({reason})" if reason is not None else "")
        super().__init__(f"cannot {operation} domain {name!r}: it is {where}")
        self.name = name
        self.operation = operation
        self.state = state
        self.reason = reason


class ConsoleBusyError(AiovirtError):
    """Another console of the domain is its writer: only one may write at a time.

    Nothing was sent. ``name`` is the domain's name.
    """

    def __init__(self, name: str) -> None:
        super().__init__(
            f"domain {name!r}: another console is writing to it (one writer at a time; "
            "close that console, or call its send_eof(), to write from this one)"
        )
        self.name = name


class LaunchError(AiovirtError):
    """QEMU could not be executed, or exited before it was running.

    ``message`` is QEMU's own text from the domain's log (what it printed during this start),
    ``returncode`` its exit status (negative: killed by that signal; None: unknown).
    """

    def __init__(
        self,
        name: str,
        message: str,
        *,
        returncode: int | None = None,
        log_path: str | None = None,
        argv: Sequence[str] = (),
    ) -> None:
        text = message.strip() or "QEMU exited without a message"
        status = f" (exit status {returncode})" if returncode is not None else ""
        super().__init__(f"domain {name!r} failed to start{status}: {text}")
        self.name = name
        self.message = message
        self.returncode = returncode
        self.log_path = log_path
        self.argv = tuple(argv)


class DestroyTimeoutError(AiovirtError):
    """A graceful destroy gave up: the process still lives after SIGTERM and ``timeout`` seconds.

    Nothing more was sent to it; the domain keeps its state and can be destroyed again.
    """

    def __init__(self, name: str, pid: int | None, timeout: float) -> None:
        super().__init__(
            f"domain {name!r}: QEMU process {pid} did not exit within {timeout:g} s of SIGTERM "
            "(graceful destroy sends no SIGKILL)"
        )
        self.name = name
        self.pid = pid
        self.timeout = timeout


class ProcessBusyError(AiovirtError):
    """SIGKILL did not end the process within the wait: it is most likely in uninterruptible sleep.

    ``proc_state`` is the kernel's state of the process (``/proc/PID/stat``), e.g. ``"D"``.
    """

    def __init__(self, name: str, pid: int | None, proc_state: str, timeout: float) -> None:
        super().__init__(
            f"domain {name!r}: QEMU process {pid} survived SIGKILL for {timeout:g} s "
            f"(kernel state {proc_state!r}); it cannot be terminated now"
        )
        self.name = name
        self.pid = pid
        self.proc_state = proc_state
        self.timeout = timeout


class EventsDroppedError(AiovirtError):
    """A subscriber's buffer was full: ``dropped`` events were discarded for it.

    Raised by the subscription once the events that did fit were delivered. The subscription
    stays usable: keep receiving to get the events that arrive from now on.
    """

    def __init__(self, dropped: int) -> None:
        super().__init__(f"subscriber fell behind: {dropped} event(s) dropped")
        self.dropped = dropped


class QMPError(AiovirtError):
    """Base class of errors about the QEMU monitor (QMP)."""


class CommandError(QMPError):
    """QEMU answered a command with an error.

    ``error_class`` and ``desc`` are QEMU's own (e.g. ``"GenericError"``, ``"...not found"``).
    """

    def __init__(
        self, command: str, arguments: Mapping[str, Any] | None, error_class: str, desc: str
    ) -> None:
        super().__init__(f"QMP command {command!r} failed: {error_class}: {desc}")
        self.command = command
        self.arguments = dict(arguments or {})
        self.error_class = error_class
        self.desc = desc


class ConnectionLostError(AiovirtError):
    """The monitor connection closed or could not be established.

    ``command`` is the command that was waiting for a reply, if any; the underlying exception,
    if there was one, is ``__cause__``.
    """

    def __init__(self, message: str = "QMP connection lost", *, command: str | None = None) -> None:
        super().__init__(message if command is None else f"{message} (while waiting for {command!r})")
        self.command = command


class ProtocolError(AiovirtError):
    """The peer sent something that is not valid for its protocol (QMP: bad JSON, an over-long line,
    a bad greeting; libvirt RPC: a bad packet).

    ``data`` is the offending bytes (possibly truncated).
    """

    def __init__(self, message: str, data: bytes = b"") -> None:
        super().__init__(message)
        self.data = data


class LocalProtocolError(AiovirtError, RuntimeError):
    """aiovirt itself misused a sans-IO codec (sent out of turn, after the end): a bug, never the peer's."""


class StateDirError(AiovirtError):
    """The state directory (or a file in it) cannot be used."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"state directory {path!r}: {problem}")
        self.path = path
        self.problem = problem


class StateDirLockedError(StateDirError):
    """Another controller holds the state directory's lock. ``pid`` is its process id if known."""

    def __init__(self, path: str, pid: int | None) -> None:
        holder = f"process {pid}" if pid is not None else "another process"
        super().__init__(path, f"locked by {holder}; one controller per state directory")
        self.pid = pid


# Public exceptions show as ``aiovirt.X`` in tracebacks, not as the private module they live in.
for _name in __all__:
    globals()[_name].__module__ = "aiovirt"
del _name
