"""One run of one domain on a libvirt daemon: what aiovirt's domain asks of it, as libvirt calls.

The daemon owns the process; this object only relays. Its state is what the daemon's lifecycle
events said (:mod:`._happenings` turns them into happenings); a call the daemon refuses because
the domain is not in the state we believe makes it ask for the state again, so a missed event
cannot leave a domain RUNNING forever.

The destroy primitives (aiovirt's :class:`~aiovirt.Domain` builds ``destroy`` on them):

- SIGTERM: on a daemon whose QEMU driver has libvirt's graceful-destroy bug (older than 11.3:
  ``VIR_DOMAIN_DESTROY_GRACEFUL`` SIGKILLs a QEMU that outlives SIGTERM by 15 s, and holds the
  domain locked meanwhile), QMP ``quit`` through the monitor passthrough: QEMU does for it exactly
  what it does for SIGTERM (flush, exit 0), and nothing stronger can ever follow from it. On other
  daemons (libvirt >= 11.3, the test driver), ``DOMAIN_DESTROY_FLAGS(GRACEFUL)``: SIGTERM only.
- SIGKILL: ``DOMAIN_DESTROY_FLAGS(0)``, libvirt's own destroy: SIGTERM, then SIGKILL 10 s later.

Each is sent once, in the background (the seam's ``send_signal`` does not wait); the run is over
when the daemon says STOPPED.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import uuid as uuid_mod
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Final

import anyio

from ..._broadcast import Subscription
from ..._errors import AiovirtError, CommandError, ConnectionLostError
from ..._lifecycle import Happening
from ...qmp._codec import Event
from ...rpc import DomainRef, LibvirtError, RemoteDomainNotFoundError, RemoteInvalidStateError
from ...rpc import _protocol as P
from .._base import Machine, MachineObserver
from ._happenings import RunState, state_from_libvirt, stopped_detail_from_reason, translate

if TYPE_CHECKING:
    from ._driver import RemoteDriver

__all__ = ["RemoteMachine"]

logger = logging.getLogger("aiovirt")

# The test driver refuses a request in the wrong state with INTERNAL_ERROR ("domain 'x' not
# running"), where the QEMU driver says OPERATION_INVALID: these words make it the same.
_WRONG_STATE: Final = re.compile(r"\b(not running|not paused|is already running|is not running)\b")
_EVENT_STOPPED: Final = 5
_ADOPTED: Final = {
    RunState.RUNNING: Happening.ADOPTED_RUNNING,
    RunState.PAUSED: Happening.ADOPTED_PAUSED,
    RunState.SHUTDOWN: Happening.ADOPTED_SHUTDOWN,
}


class RemoteMachine(Machine):
    """A domain's run on the daemon. Created for a launch or at load (not yet reporting: its
    events are kept until :meth:`adopt` or the launch hands it its observer)."""

    def __init__(self, driver: RemoteDriver, ref: DomainRef, state: RunState) -> None:
        self._driver = driver
        self.ref = ref
        self.state = state
        self._observer: MachineObserver | None = None
        self._live = False
        self._kept: list[tuple[Happening, str | None]] = []  # happenings while not live
        self.exited = anyio.Event()
        self._signalled = False  # this connection asked for the run to end
        self._sent: set[signal.Signals] = set()
        self._in_flight: set[signal.Signals] = set()
        self._last_failure: str | None = None
        self._unreachable: str | None = None
        self._attached_at = anyio.current_time()
        self._snapshot = state  # what the daemon said when this object was made

    @property
    def uuid(self) -> uuid_mod.UUID:
        return self.ref.uuid

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def signalled(self) -> bool:
        """This connection asked for the run to end (SIGTERM or SIGKILL was sent)."""
        return self._signalled

    # -- what the daemon tells ------------------------------------------------------------------

    def on_event(self, event: int, detail: int) -> None:
        """A lifecycle event for this domain (in the daemon's order)."""
        if (
            event == _EVENT_STOPPED
            and self.state is not RunState.SHUTDOWN
            and signal.SIGTERM in self._sent
            and self._driver.sigterm_method == "qmp-quit"
        ):
            # QEMU answers "quit" with its SHUTDOWN event and exits, but libvirt 9.0 sometimes reads
            # the monitor's end first and drops that event (then says STOPPED/failed): QEMU did shut
            # down as SIGTERM makes it, and is reported so, as the QEMU driver reports a SIGTERM.
            self.state = RunState.SHUTDOWN
            self._report(Happening.SHUTDOWN_HOST, "host-signal")
        self.state, reports = translate(event, detail, self.state, destroying=self._signalled)
        for happening, reason in reports:
            self._report(happening, reason)
        if self.state is RunState.SHUTOFF:
            self._ended()

    def _report(self, happening: Happening, reason: str | None = None) -> None:
        if self._live and self._observer is not None:
            self._observer.happened(happening, shutdown_reason=reason)
        else:
            self._kept.append((happening, reason))

    def _ended(self) -> None:
        if not self.exited.is_set():
            self.exited.set()
            self._driver.forget(self)

    def attach(self, observer: MachineObserver) -> None:
        self._observer = observer
        self._attached_at = anyio.current_time()
        observer.attached(self)

    def go_live(self) -> None:
        """Report from now on, starting with what was kept (in order)."""
        self._live = True
        kept, self._kept = self._kept, []
        assert self._observer is not None
        for happening, reason in kept:
            self._observer.happened(happening, shutdown_reason=reason)

    def adopt(self, observer: MachineObserver) -> None:
        """Take this run over: its state when the daemon was asked at load, then what happened since."""
        self.attach(observer)
        observer.happened(_ADOPTED[self._snapshot])
        self.go_live()
        if self._unreachable is not None and not self.exited.is_set():
            observer.reachable(self._unreachable)

    def sync_after_boot(self) -> None:
        """After BOOTED: a pause or shutdown seen during the start (ignored then) counts now."""
        assert self._observer is not None
        if self.state is RunState.PAUSED:
            self._observer.happened(Happening.PAUSED)
        elif self.state is RunState.SHUTDOWN:
            self._observer.happened(Happening.SHUTDOWN_UNKNOWN)

    def connection_lost(self, why: str) -> None:
        self._unreachable = why
        if self._observer is not None and not self.exited.is_set():
            self._observer.reachable(why)

    async def refresh(self) -> None:
        """Ask the daemon for the state (a request was refused as if ours were stale)."""
        client = self._driver.client
        try:
            state, reason = await client.get_state(self.ref)
        except RemoteDomainNotFoundError:
            state, reason = 5, 0  # a transient domain is gone once stopped
        except AiovirtError as exc:
            logger.debug("domain %r: state refresh failed: %s", self.name, exc)
            return
        seen = state_from_libvirt(int(state))
        if seen is self.state or self.exited.is_set():
            return
        if seen is RunState.SHUTOFF:
            self.on_event(_EVENT_STOPPED, stopped_detail_from_reason(reason))
        elif seen is RunState.PAUSED and self.state is RunState.RUNNING:
            self.on_event(3, 0)
        elif seen is RunState.RUNNING and self.state is RunState.PAUSED:
            self.on_event(4, 0)

    # -- Machine ------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return None  # the process is on the daemon's host: its pid means nothing here

    def send_signal(self, sig: signal.Signals) -> bool:
        if self.exited.is_set():
            return False
        self._check_connected(sig.name)
        if sig not in (signal.SIGTERM, signal.SIGKILL):
            raise ValueError(f"only SIGTERM and SIGKILL can be sent through libvirt, not {sig.name}")
        self._signalled = True
        if sig not in self._in_flight:
            self._in_flight.add(sig)
            self._sent.add(sig)
            self._driver.spawn(self._signal, sig)
        return True

    async def _signal(self, sig: signal.Signals) -> None:
        client = self._driver.client
        try:
            if sig == signal.SIGKILL:
                await client.destroy(self.ref, 0)
            elif self._driver.sigterm_method == "qmp-quit":
                await client.qemu_monitor_command(self.ref, '{"execute":"quit"}')
            else:
                await client.destroy(self.ref, P.DOMAIN_DESTROY_GRACEFUL)
        except (RemoteDomainNotFoundError, RemoteInvalidStateError):
            await self.refresh()  # it had stopped already
        except LibvirtError as exc:
            # Expected: QEMU exited before answering "quit" (libvirt: "Unable to read from
            # monitor"); a graceful destroy that timed out (EBUSY). Anything else is kept for
            # process_state(): destroy's ProcessBusyError shows it.
            if not self.exited.is_set():
                self._last_failure = f"{sig.name} failed: {exc}"
                logger.info("domain %r: %s", self.name, self._last_failure)
            if _WRONG_STATE.search(exc.message):
                await self.refresh()
        except ConnectionLostError as exc:
            self._last_failure = f"{sig.name} not confirmed: {exc}"
        finally:
            self._in_flight.discard(sig)

    def poll_exited(self) -> bool:
        return self.exited.is_set()

    def process_state(self) -> str:
        if self.exited.is_set():
            return "gone"
        if self._unreachable is not None:
            return f"unknown: {self._unreachable}"
        if self._last_failure is not None:
            return f"unknown: {self._last_failure}"
        if signal.SIGKILL in self._in_flight:
            return "unknown: libvirt's destroy (SIGTERM, 10 s, then SIGKILL) has not finished"
        return "unknown: the process is on the daemon's host"

    def _check_connected(self, what: str) -> None:
        if self._unreachable is not None:
            raise ConnectionLostError(f"domain {self.name!r}: {self._unreachable}", command=what)

    async def _call(self, what: str, call: Callable[[], Awaitable[Any]]) -> Any:
        """Run a request; the daemon's refusals become aiovirt's (see the module doc)."""
        self._check_connected(what)
        try:
            return await call()
        except LibvirtError as exc:
            wrong_state = isinstance(exc, (RemoteInvalidStateError, RemoteDomainNotFoundError)) or (
                exc.code == P.ErrorCode.INTERNAL_ERROR and _WRONG_STATE.search(exc.message) is not None
            )
            if not wrong_state:
                raise CommandError(what, None, exc.remote.code_name, exc.message) from exc
            # The daemon says the domain is not in the state we believed (a transient one that is
            # gone is "not found"): learn its state first, so the caller sees both at once.
            await self.refresh()
            if isinstance(exc, RemoteInvalidStateError):
                raise
            raise RemoteInvalidStateError(exc.remote, exc.procedure, exc.program, self.name) from exc

    async def command(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        if not self._driver.has_monitor:
            self._check_connected(command)
            raise CommandError(
                command,
                arguments,
                "NO_SUPPORT",
                f"the daemon's {self._driver.daemon_driver!r} driver has no QEMU monitor",
            )
        request = json.dumps({"execute": command, **({"arguments": arguments} if arguments else {})})
        text = await self._call(command, lambda: self._driver.client.qemu_monitor_command(self.ref, request))
        try:
            reply = json.loads(text)
        except ValueError as exc:
            raise CommandError(command, arguments, "ProtocolError", f"not JSON: {text[:200]!r}") from exc
        if isinstance(reply, dict) and "return" in reply:
            return reply["return"]
        error = reply.get("error") if isinstance(reply, dict) else None
        if isinstance(error, dict):
            raise CommandError(command, arguments, str(error.get("class")), str(error.get("desc")))
        raise CommandError(command, arguments, "ProtocolError", f"unexpected reply: {text[:200]!r}")

    def monitor_events(self, max_buffer: int) -> AbstractContextManager[Subscription[Event]]:
        raise CommandError(
            "monitor_events", None, "NO_SUPPORT", "QEMU's own events are not relayed by a libvirt daemon"
        )

    async def powerdown(self) -> None:
        flags = P.DOMAIN_SHUTDOWN_ACPI_POWER_BTN if self._driver.has_monitor else 0
        await self._call("DOMAIN_SHUTDOWN", lambda: self._driver.client.shutdown(self.ref, flags))

    async def pause(self) -> None:
        await self._call("DOMAIN_SUSPEND", lambda: self._driver.client.suspend(self.ref))
        if self.state is RunState.RUNNING:  # the daemon says it is paused now
            self.on_event(3, 0)

    async def resume(self) -> None:
        await self._call("DOMAIN_RESUME", lambda: self._driver.client.resume(self.ref))
        if self.state is RunState.PAUSED:
            self.on_event(4, 0)

    async def reset(self) -> None:
        await self._call("DOMAIN_RESET", lambda: self._driver.client.reset(self.ref))

    def stats(self) -> tuple[float, int, float]:
        # The seam's stats() cannot wait for the daemon: no CPU time or memory here (see docs).
        return 0.0, 0, max(0.0, anyio.current_time() - self._attached_at)
