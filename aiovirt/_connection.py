"""Connection: a URI opened on its driver, the table of its domains, and the public calls.

Everything a hypervisor does lives behind the driver (:mod:`aiovirt.drivers`); everything a domain
does lives in :class:`~aiovirt.Domain`. What is here: which driver a URI names, the public API of
a connection, and the cleanup promises of ``connect()`` and ``run()``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager

import anyio

from ._broadcast import Subscription
from ._domain import Domain, DomainTable
from ._errors import InvalidStateError, InvalidURIError
from ._fleet import StopPolicy, StopResult, stop_all
from ._states import DomainEvent
from ._uri import ParsedURI, parse_uri
from .config import DomainConfig
from .drivers._base import Driver, StateProblem

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["Connection", "StateProblem", "connect", "parse_uri"]

#: Bound on the destroy that ends ``Connection.run``'s block (it runs shielded from cancellation).
_RUN_CLEANUP_TIMEOUT = 45.0


class Connection:
    """A controller of the domains of one driver. Get one with :func:`aiovirt.connect`."""

    def __init__(self, uri: ParsedURI, driver: Driver) -> None:
        self.uri = uri.uri
        self._driver = driver
        self._table = DomainTable(driver, uri.uri)

    @property
    def driver(self) -> Driver:
        """The backend behind this connection, for what only it offers (the test driver's scripts)."""
        return self._driver

    @property
    def closed(self) -> bool:
        return self._table.closed

    @property
    def problems(self) -> list[StateProblem]:
        """What could not be used, now: unreadable records (kept, renamed ``.corrupt``), domains
        whose monitor cannot be reached, autostarts that failed."""
        return self._table.problems

    @property
    def startup_events(self) -> list[DomainEvent]:
        """Events of ``connect()`` itself (a QEMU found gone, an autostart), emitted before anyone
        could subscribe."""
        return self._table.startup_events

    # -- domains --------------------------------------------------------------------------------

    async def lookup(self, name: str) -> Domain:
        """The domain called ``name``. Raises :class:`DomainNotFoundError`."""
        return self._table.lookup(name)

    async def list_domains(self, active: bool | None = None) -> list[Domain]:
        """All domains sorted by name; only active (or only inactive) ones when ``active`` is given."""
        return self._table.domains(active)

    async def define(self, config: DomainConfig) -> Domain:
        """Store a persistent definition and return its domain.

        Defining an existing name with the same UUID updates the definition; the new config takes
        effect at the next start. A name or UUID used by another domain raises :class:`DomainExistsError`.
        """
        return await self._table.define(config)

    async def create(self, config: DomainConfig) -> Domain:
        """Start a transient domain (no definition is stored; it is gone once it stops)."""
        return await self._table.create(config)

    @asynccontextmanager
    async def run(self, config: DomainConfig) -> AsyncIterator[Domain]:
        """A transient domain for the duration of the block, destroyed when it exits.

        Also when the body raises or is cancelled: that destroy runs shielded from cancellation and
        bounded in time, so no QEMU outlives the block.
        """
        dom = await self.create(config)
        try:
            yield dom
        finally:
            with anyio.move_on_after(_RUN_CLEANUP_TIMEOUT, shield=True):
                if dom.active and not self.closed:
                    with contextlib.suppress(InvalidStateError):  # it may stop on its own meanwhile
                        await dom.destroy()

    @asynccontextmanager
    async def subscribe(self, max_buffer: int = 1024) -> AsyncIterator[Subscription[DomainEvent]]:
        """Lifecycle events of every domain while the block is open.

        Each subscriber has its own buffer of ``max_buffer`` events; one that falls behind gets
        :class:`EventsDroppedError` (with the count) after the events that fit, and can go on.
        """
        with self._table.events.subscribe(max_buffer) as sub:
            yield sub

    async def stop_all(
        self,
        domains: Iterable[Domain | str] | None = None,
        policy: StopPolicy | None = None,
        limit: int = 64,
        on_result: Callable[[StopResult], object] | None = None,
    ) -> list[StopResult]:
        """Stop many domains concurrently within one policy (default: every active domain, also
        those still starting).

        Returns one :class:`StopResult` per domain, in order; partial failure is in the results,
        not raised. ``limit`` bounds concurrent QMP requests, never the waiting. ``on_result`` sees
        each result as it completes. Cancellation sends no further signal.
        """
        self._table.check_writable("stop domains")
        targets = (
            self._table.domains(active=True)
            if domains is None
            else [d if isinstance(d, Domain) else self._table.lookup(d) for d in domains]
        )
        return await stop_all(targets, policy or StopPolicy(), limit, on_result)

    async def aclose(self) -> None:
        """Stop supervising. Running QEMUs keep running; a new connection takes them back.

        Every later call on this connection or its domains raises :class:`ConnectionClosedError`.
        """
        if not self._table.closed:
            self._table.close()
            await self._driver.aclose()


def _open_driver(parsed: ParsedURI, readonly: bool) -> contextlib.AbstractAsyncContextManager[Driver]:
    # Imported on first use: a test:/// user never loads the QEMU machinery, and the reverse.
    if parsed.scheme == "test":
        from .drivers.test import TestDriver

        return TestDriver.open(parsed, readonly=readonly)
    if parsed.scheme == "remote":
        from .drivers.remote import RemoteDriver

        return RemoteDriver.open(parsed, readonly=readonly)
    if parsed.scheme == "qemu":
        from .drivers.qemu import QemuDriver

        return QemuDriver.open(parsed, readonly=readonly)
    raise InvalidURIError(parsed.uri, f"no driver for {parsed.scheme!r} URIs in this version")


@asynccontextmanager
async def connect(
    uri: str | None = None, *, readonly: bool = False, autostart: bool = True
) -> AsyncIterator[Connection]:
    """Open a connection: ``async with aiovirt.connect("qemu:///embed?root=/srv/vms") as conn:``.

    The URI defaults to ``$AIOVIRT_DEFAULT_URI``, else ``qemu:///system`` for root and
    ``qemu:///session`` otherwise. Only one connection at a time may use a state directory
    (:class:`StateDirLockedError`). Leaving the block stops supervising; QEMUs keep running.

    ``readonly`` (libvirt's ``virConnectOpenReadOnly``) takes no lock, so it works beside the
    controller that holds the directory, and never signals, commands or writes: every change
    raises :class:`ReadOnlyError`. What it shows is a snapshot taken when it opened: the
    definitions, the runtime records and the process identity checks (a QEMU is RUNNING, reason
    unknown, when its record and identity say it runs). Reconnect to refresh it.

    A controlling connection starts the shut-off domains marked autostart, as libvirt's daemon
    does when it starts; ``autostart=False`` leaves them alone (a command that only runs one verb
    should not start what an operator just destroyed).
    """
    parsed = parse_uri(uri)
    try:
        async with _open_driver(parsed, readonly) as driver:
            conn = Connection(parsed, driver)
            try:
                await conn._table.load(await driver.load(), autostart=autostart)
                yield conn
            finally:
                await conn.aclose()
    except BaseExceptionGroup as group:
        # Supervisor tasks never raise into the group, so what it holds is the caller's own
        # exception: give it back as it was raised, not wrapped.
        if len(group.exceptions) != 1:
            raise
        exc = group.exceptions[0]
        context = exc.__context__
        try:
            raise exc
        finally:
            exc.__context__ = context
            del exc
