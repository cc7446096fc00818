"""The remote driver: a libvirt daemon (libvirtd, virtqemud) behind aiovirt's API, over libvirt's RPC.

``qemu+unix:///system``, ``qemu+ssh://host/system``, ``qemu+tls://host/system``,
``test+unix:///default``... open one RPC connection (:mod:`aiovirt.rpc`, no libvirt-python, no
thread per call) and map the seam onto libvirt's calls:

- :meth:`RemoteDriver.load`: every domain the daemon has (CONNECT_LIST_ALL_DOMAINS), its XML
  (the inactive definition for persistent domains) read by :func:`aiovirt.config.from_libvirt_xml`,
  and, if active, its state. libvirt's autostart flag means "start with the daemon": it is kept
  by the driver (:meth:`RemoteDriver.daemon_autostart`), not given to the connection, which would
  start every such domain at each connect; ``Domain.set_autostart`` sets libvirt's flag.
- A domain whose XML aiovirt cannot represent (a bridged network, a host device, the test
  driver's ``type='test'``) is still listed, with a *stand-in* config (name, UUID, memory, vCPUs)
  and a ``definition`` entry in ``problems`` saying so: it can be started, stopped, destroyed and
  watched, since none of that sends its config. A name aiovirt refuses (``DomainConfig``'s
  rules) leaves the domain out, and says so in ``problems``. Where the config is close but not
  all of libvirt's definition (libvirt pins ``pc`` to ``pc-i440fx-7.2``, resolves the emulator's
  path, ...), ``import_warnings`` says what differs.
- definitions: DOMAIN_DEFINE_XML (:func:`aiovirt.config.to_libvirt_xml`), DOMAIN_UNDEFINE_FLAGS,
  DOMAIN_SET_AUTOSTART (a change of autostart alone never redefines the domain).
- launch: DOMAIN_CREATE_WITH_FLAGS (persistent: the definition already is on the daemon) or
  DOMAIN_CREATE_XML (transient); BOOTED once it returns (the domain runs then).
- a run (:class:`~._machine.RemoteMachine`): lifecycle events become happenings; SIGTERM/SIGKILL,
  power button, pause, resume, reset and QMP passthrough are libvirt calls.

When the connection to the daemon breaks, every pending call fails with ConnectionLostError;
every domain keeps its last known state and becomes unreachable (``dom.reachable`` False, listed
in ``conn.problems``), its requests and destroys fail with ConnectionLostError at once; the
connection does not reconnect: open a new one (the daemon kept running its guests).
"""

from __future__ import annotations

import logging
import math
import uuid as uuid_mod
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final, Literal

import anyio
import anyio.abc
import anyio.lowlevel

from ..._errors import AiovirtError, ConfigError, ConnectionLostError, LaunchError
from ..._lifecycle import Happening
from ..._uri import ParsedURI
from ...config import DomainConfig, from_libvirt_xml, to_libvirt_xml
from ...config._models import MAX_MEMORY_MIB, MAX_VCPUS
from ...rpc import (
    DomainRef,
    LibvirtError,
    LifecycleEvent,
    RemoteDomainNotFoundError,
    RemoteInvalidStateError,
    RPCClient,
)
from ...rpc import _protocol as P
from .._base import Driver, MachineObserver, StateProblem, StoredDomain
from ._happenings import RunState, state_from_libvirt
from ._machine import RemoteMachine
from ._streams import open_transport

__all__ = ["RemoteDriver"]

logger = logging.getLogger("aiovirt")

#: Connecting (TCP, TLS, ssh's own login) and libvirt's handshake together.
_CONNECT_TIMEOUT: Final = 20.0
#: Calls in flight while loading (per domain: its XML, its state).
_LOAD_CONCURRENCY: Final = 64
#: A start runs to its end, shielded from the caller's cancellation, for at most this long.
_CREATE_TIMEOUT: Final = 120.0
#: A start cancelled by its caller: the bound on ending the domain it started.
_CLEANUP_TIMEOUT: Final = 30.0
#: A destroy asked for while the start was in flight: how long the start waits for that end.
_DESTROYED_WHILE_STARTING_WAIT: Final = 60.0
#: libvirt 11.3 fixed VIR_DOMAIN_DESTROY_GRACEFUL in the QEMU driver (it killed a QEMU that outlived
#: SIGTERM by 15 s, holding the domain's lock all along).
GRACEFUL_DESTROY_FIXED: Final = 11_003_000
_LIST_AUTOSTART: Final = 1024  # VIR_CONNECT_LIST_DOMAINS_AUTOSTART
_NOTE_MAX: Final = 600


def _short(text: str) -> str:
    return text if len(text) <= _NOTE_MAX else text[: _NOTE_MAX - 3] + "..."


class RemoteDriver(Driver):
    """One connection to a libvirt daemon. Open with :meth:`open` (``aiovirt.connect`` does).

    ``sigterm_method`` says how a destroy's SIGTERM reaches QEMU on this daemon (see
    :mod:`._machine`): ``"qmp-quit"`` (libvirt < 11.3 with QEMU) or ``"graceful-destroy"``.
    ``daemon_driver`` is the driver the daemon opened (``qemu``, ``test``); ``lib_version``
    the daemon's libvirt (major * 1000000 + minor * 1000 + micro).
    """

    def __init__(self, uri: ParsedURI, *, readonly: bool = False) -> None:
        self.uri = uri.uri
        self.readonly = readonly
        self.daemon_driver = uri.driver
        self.has_monitor = uri.driver == "qemu"
        self.lib_version = 0
        self.sigterm_method: Literal["qmp-quit", "graceful-destroy"] = "graceful-destroy"
        self._background: anyio.abc.TaskGroup | None = None
        self._client: RPCClient | None = None
        self._machines: dict[uuid_mod.UUID, RemoteMachine] = {}
        # What the daemon holds, as far as this connection knows: name -> (config, autostart).
        self._definitions: dict[str, tuple[DomainConfig, bool]] = {}
        self._problems: list[StateProblem] = []
        #: Domains whose config is not all of libvirt's definition, with what differs (from_libvirt_xml's
        #: warnings: a pinned machine version, a device aiovirt has no field for, ...).
        self.import_warnings: dict[str, tuple[str, ...]] = {}
        self._capture: list[LifecycleEvent] | None = None  # the events received while loading
        self._closing = False

    @classmethod
    @asynccontextmanager
    async def open(cls, uri: ParsedURI, *, readonly: bool = False) -> AsyncIterator[RemoteDriver]:
        async with anyio.create_task_group() as tg:
            driver = cls(uri, readonly=readonly)
            # Background calls run in their own task group, so that ending them never cancels
            # the caller's block (an exception unwinding it must not be replaced by a cancellation).
            await tg.start(driver._run_background)
            try:
                async with open_transport(uri, readonly, _CONNECT_TIMEOUT) as transport:
                    opened = False
                    try:
                        async with RPCClient.open(
                            transport.stream,
                            uri.name,
                            flags=1 if readonly else 0,  # VIR_CONNECT_RO
                            on_lifecycle=driver._on_lifecycle,
                            handshake_timeout=_CONNECT_TIMEOUT,
                        ) as client:
                            opened = True
                            await driver._started(client)
                            yield driver
                    except ConnectionLostError as exc:
                        if opened or not transport.explain():
                            raise
                        raise ConnectionLostError(f"{exc}{transport.explain()}") from exc
            finally:
                driver._stop_background()

    async def _run_background(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with anyio.create_task_group() as background:
            self._background = background
            task_status.started()
            await anyio.sleep_forever()

    def _stop_background(self) -> None:
        self._closing = True
        if self._background is not None:
            self._background.cancel_scope.cancel()

    async def _started(self, client: RPCClient) -> None:
        self._client = client
        self.lib_version = await client.get_lib_version()
        if self.has_monitor and self.lib_version < GRACEFUL_DESTROY_FIXED:
            self.sigterm_method = "qmp-quit"
        self.spawn(self._watch_connection)

    @property
    def client(self) -> RPCClient:
        if self._client is None:
            raise ConnectionLostError(f"{self.uri}: not connected")
        return self._client

    async def aclose(self) -> None:
        self._stop_background()
        await anyio.lowlevel.checkpoint()

    # -- background work ------------------------------------------------------------------------

    def spawn(self, func: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run ``func`` in the connection's task group; a bug in it is logged, never lost silently."""

        async def guarded() -> None:
            try:
                await func(*args)
            except Exception:
                logger.exception("%s: background call %s failed", self.uri, getattr(func, "__name__", func))

        if not self._closing and self._background is not None:
            self._background.start_soon(guarded)

    def forget(self, machine: RemoteMachine) -> None:
        if self._machines.get(machine.uuid) is machine:
            del self._machines[machine.uuid]

    def _on_lifecycle(self, event: LifecycleEvent) -> None:
        # In the RPC reader task, in the daemon's order.
        if self._capture is not None:
            self._capture.append(event)
        machine = self._machines.get(event.dom.uuid)
        if machine is not None:
            machine.on_event(int(event.event), event.detail)

    async def _watch_connection(self) -> None:
        client = self.client
        await client.wait_closed()
        if self._closing:
            return
        try:
            await client.get_uri()  # raises ConnectionLostError saying why the connection ended
            why = "the libvirt daemon connection ended"
        except ConnectionLostError as exc:
            why = str(exc).split(" (while waiting for", 1)[0]
        problem = f"the libvirt daemon connection was lost ({why}); reconnect to reach its domains"
        logger.warning("%s: %s", self.uri, problem)
        self._problems.append(StateProblem(Path(self.uri), "unreachable", problem))
        for machine in list(self._machines.values()):
            machine.connection_lost(problem)

    # -- Driver: what is stored -----------------------------------------------------------------

    @property
    def problems(self) -> Sequence[StateProblem]:
        return tuple(self._problems)

    async def load(self) -> list[StoredDomain]:
        client = self.client
        self._capture = []
        try:
            refs = await client.list_all_domains()
            persistent = {r.uuid for r in await client.list_all_domains(P.ListFlags.PERSISTENT)}
            autostart = {r.uuid for r in await client.list_all_domains(_LIST_AUTOSTART)}
            found: dict[uuid_mod.UUID, StoredDomain] = {}
            limiter = anyio.CapacityLimiter(_LOAD_CONCURRENCY)

            async def one(ref: DomainRef) -> None:
                async with limiter:
                    stored = await self._load_one(ref, ref.uuid in persistent, ref.uuid in autostart)
                if stored is not None:
                    found[ref.uuid] = stored

            async with anyio.create_task_group() as tg:
                for ref in refs:
                    tg.start_soon(one, ref)
        finally:
            self._capture = None
        return [found[r.uuid] for r in refs if r.uuid in found]

    async def _load_one(self, ref: DomainRef, persistent: bool, autostart: bool) -> StoredDomain | None:
        client = self.client
        assert self._capture is not None
        mark = len(self._capture)
        state: RunState | None = None
        try:
            if ref.id != -1:
                state = state_from_libvirt(int((await client.get_state(ref))[0]))
            xml = await client.get_xml_desc(ref, P.DOMAIN_XML_INACTIVE if persistent else 0)
            config = await self._config_of(ref, xml)
        except RemoteDomainNotFoundError:
            return None  # gone since it was listed
        if config is None:
            return None
        machine = None
        if state is not None and state is not RunState.SHUTOFF:
            machine = RemoteMachine(self, ref, state)
            self._machines[ref.uuid] = machine
            # Events that came while its state was asked for happened at or after that moment.
            for event in self._capture[mark:]:
                if event.dom.uuid == ref.uuid:
                    machine.on_event(int(event.event), event.detail)
        if persistent:
            self._definitions[ref.name] = (config, autostart)
        # libvirt's autostart starts a domain when the daemon starts; aiovirt's table would start
        # it at every connect (its own driver's meaning): it is kept here, never told the table.
        return StoredDomain(config, persistent, False, machine)

    async def _config_of(self, ref: DomainRef, xml: str) -> DomainConfig | None:
        """The config for a domain's XML; a stand-in (and a problem) where aiovirt cannot represent it."""
        where = Path(ref.name)
        try:
            imported = from_libvirt_xml(xml)
        except ConfigError as exc:
            why = str(exc)
        else:
            config = imported.config.model_copy(update={"name": ref.name, "uuid": ref.uuid})
            if imported.warnings:
                # Usable, but dom.config is not all of libvirt's definition (libvirt pins the
                # machine version of an alias, adds devices...): said, not a problem.
                self.import_warnings[ref.name] = imported.warnings
                logger.info("%s: domain %r: %s", self.uri, ref.name, "; ".join(imported.warnings))
            return config
        info = await self.client.get_info(ref)
        try:
            standin = DomainConfig(
                name=ref.name,
                uuid=ref.uuid,
                memory_mib=min(MAX_MEMORY_MIB, max(1, math.ceil(info.max_mem_kib / 1024))),
                vcpus=min(MAX_VCPUS, max(1, info.nr_virt_cpu)),
            )
        except ConfigError as exc:
            self._problems.append(
                StateProblem(where, "definition", _short(f"not managed by aiovirt: {exc}; and {why}"))
            )
            return None
        self._problems.append(
            StateProblem(
                where,
                "definition",
                _short(
                    "listed with a stand-in config (name, UUID, memory, vCPUs only): start, stop, "
                    "destroy and events use libvirt's own definition, but dom.config does not describe "
                    f"it and redefining the domain from it would replace libvirt's definition: {why}"
                ),
            )
        )
        return standin

    def daemon_autostart(self, name: str) -> bool | None:
        """libvirt's autostart flag of a persistent domain (started when the daemon starts), as
        last loaded or set through this connection; None for a domain it does not know as persistent."""
        known = self._definitions.get(name)
        return None if known is None else known[1]

    async def save_definition(self, config: DomainConfig, *, autostart: bool) -> None:
        assert config.uuid is not None  # the table assigns one first
        known = self._definitions.get(config.name)
        ref = DomainRef(config.name, config.uuid, -1)
        if known is None or known[0] != config:
            ref = await self.client.define_xml(to_libvirt_xml(config))
        if autostart != (known[1] if known is not None else False):
            await self.client.set_autostart(ref, autostart)
        self._definitions[config.name] = (config, autostart)

    async def remove_definition(self, name: str) -> None:
        known = self._definitions.get(name)
        uuid = known[0].uuid if known is not None else None
        try:
            ref = DomainRef(name, uuid, -1) if uuid is not None else await self.client.lookup_by_name(name)
            await self.client.undefine(ref)
        except RemoteDomainNotFoundError:
            pass  # already gone from the daemon: what was asked for
        self._definitions.pop(name, None)

    # -- Driver: runs ---------------------------------------------------------------------------

    async def launch(self, config: DomainConfig, observer: MachineObserver, *, persistent: bool) -> None:
        assert config.uuid is not None
        xml = None if persistent else to_libvirt_xml(config)  # a ConfigError before anything is sent
        ref = DomainRef(config.name, config.uuid, -1)
        machine = RemoteMachine(self, ref, RunState.RUNNING)
        self._machines[config.uuid] = machine  # its events, from now on
        created = False
        try:
            # The call is shielded (bounded): cancelled midway, libvirt would start the domain all
            # the same and nobody could tell; so it completes, then a cancellation ends what it made.
            with anyio.CancelScope(shield=True), anyio.move_on_after(_CREATE_TIMEOUT):
                machine.ref = await self._create(config, ref, xml)
                created = True
            if not created:
                raise LaunchError(
                    config.name, f"libvirt did not finish the start within {_CREATE_TIMEOUT:g} s"
                )
            await anyio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            self.forget(machine)
            if created:
                await self._end_cancelled_start(ref)
            raise
        machine.attach(observer)  # a destroy asked for meanwhile is sent now
        machine.go_live()
        if not machine.exited.is_set() and machine.signalled:
            with anyio.move_on_after(_DESTROYED_WHILE_STARTING_WAIT):
                await machine.exited.wait()
        if machine.exited.is_set():
            raise LaunchError(config.name, "the domain stopped while it was being started")
        observer.happened(Happening.BOOTED)
        machine.sync_after_boot()

    async def _create(self, config: DomainConfig, ref: DomainRef, xml: str | None) -> DomainRef:
        client = self.client
        try:
            return await (client.create(ref) if xml is None else client.create_xml(xml))
        except RemoteInvalidStateError:
            pass  # "already running": started by another client meanwhile (below)
        except LibvirtError as exc:
            if type(exc) is not LibvirtError:
                raise  # exists, not found: aiovirt's own errors
            if not (exc.code == P.ErrorCode.INTERNAL_ERROR and "already running" in exc.message):
                raise LaunchError(config.name, f"libvirt: {exc.message} ({exc.remote.code_name})") from exc
        # Someone else started it: it runs, which is what was asked; this start takes it over.
        state, _ = await client.get_state(ref)
        if state_from_libvirt(int(state)) is RunState.SHUTOFF:
            raise LaunchError(config.name, "libvirt said it was running, then that it was not")
        logger.info("%s: domain %r was started by another client; taking it over", self.uri, config.name)
        return await client.lookup_by_uuid(ref.uuid)

    async def _end_cancelled_start(self, ref: DomainRef) -> None:
        """The caller gave the start up once it had started the domain: end it (shielded, bounded)."""
        with anyio.move_on_after(_CLEANUP_TIMEOUT, shield=True):
            try:
                state, _ = await self.client.get_state(ref)
                if state_from_libvirt(int(state)) is not RunState.SHUTOFF:
                    await self.client.destroy(ref, 0)
            except AiovirtError as exc:
                logger.info("%s: cleanup of the cancelled start of %r: %s", self.uri, ref.name, exc)

    async def adopt(self, stored: StoredDomain, observer: MachineObserver) -> None:
        machine = stored.runtime
        assert isinstance(machine, RemoteMachine)
        machine.adopt(observer)
