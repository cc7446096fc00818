"""Connection: URIs, the table of domains, launching, and the task group that supervises them."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import sys
import uuid as uuid_mod
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import anyio.abc

from ._broadcast import Broadcaster, Subscription
from ._domain import Domain
from ._errors import (
    AiovirtError,
    ConfigError,
    ConnectionLostError,
    DomainExistsError,
    DomainNotFoundError,
    InvalidStateError,
    InvalidURIError,
    LaunchError,
    StateDirError,
)
from ._fleet import StopPolicy, StopResult, stop_all
from ._process import Process, ProcessIdentity, find_processes_with_arg, read_identity
from ._statedir import RECORD_FORMAT, StateDir
from ._states import DomainEvent, DomainState, EventDetail, EventKind, StateReason
from .config import DomainConfig, render_argv
from .qmp._client import QMPClient

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["Connection", "ParsedURI", "StateProblem", "connect", "parse_uri"]

logger = logging.getLogger("aiovirt")

#: Bound on the destroy that ends ``Connection.run``'s block (it runs shielded from cancellation).
_RUN_CLEANUP_TIMEOUT = 45.0


@dataclass(frozen=True)
class StateProblem:
    """A file of the state directory that could not be used; ``path`` is where it is now."""

    path: Path
    kind: str  # "definition", "runtime" or "autostart"
    message: str

    def __str__(self) -> str:
        return f"{self.kind} {self.path}: {self.message}"


@dataclass(frozen=True)
class ParsedURI:
    """Where a connection keeps its state: ``root`` (definitions, logs, lock) and ``run`` (sockets)."""

    uri: str
    driver: str
    root: Path
    run: Path


def default_uri() -> str:
    """``$AIOVIRT_DEFAULT_URI``, else ``qemu:///system`` for root and ``qemu:///session`` otherwise."""
    env = os.environ.get("AIOVIRT_DEFAULT_URI")
    if env:
        return env
    return "qemu:///system" if os.geteuid() == 0 else "qemu:///session"


def parse_uri(uri: str | None = None) -> ParsedURI:
    """Resolve a connection URI to its directories. Raises :class:`InvalidURIError`."""
    text = default_uri() if uri is None else uri
    parts = urlsplit(text)
    if parts.scheme != "qemu":
        raise InvalidURIError(text, f"unknown driver {parts.scheme or '(none)'!r}; expected 'qemu'")
    if parts.netloc:
        raise InvalidURIError(text, "remote hosts are not supported; use qemu:///...")
    if parts.fragment or text.endswith("#"):
        raise InvalidURIError(text, "a fragment (#...) means nothing here")
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise InvalidURIError(text, f"malformed query: {exc}") from exc
    path = parts.path
    allowed: set[str] = set()
    if path == "/embed":
        allowed = {"root"}
        roots = query.get("root", [])
        if len(roots) != 1 or not roots[0]:
            raise InvalidURIError(text, "qemu:///embed needs exactly one root=DIR")
        if "\0" in roots[0]:
            raise InvalidURIError(text, "root contains a NUL byte")
        root = Path(roots[0])
        if not root.is_absolute():
            raise InvalidURIError(text, f"root must be an absolute path, not {roots[0]!r}")
        parsed = ParsedURI(text, "embed", root, root / "run")
    elif path == "/session":
        home = Path.home()
        state = Path(os.environ.get("XDG_STATE_HOME") or home / ".local" / "state") / "aiovirt"
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        parsed = ParsedURI(text, "session", state, Path(runtime) / "aiovirt" if runtime else state / "run")
    elif path == "/system":
        parsed = ParsedURI(text, "system", Path("/var/lib/aiovirt"), Path("/run/aiovirt"))
    else:
        raise InvalidURIError(text, f"unknown path {path!r}; expected /session, /system or /embed?root=DIR")
    unknown = set(query) - allowed
    if unknown:
        raise InvalidURIError(text, f"unknown parameter(s): {', '.join(sorted(unknown))}")
    return parsed


def validate_config(config: DomainConfig) -> DomainConfig:
    """Re-validate a config at the API boundary (``model_copy(update=...)`` skips validation)."""
    if not isinstance(config, DomainConfig):
        raise ConfigError(f"expected a DomainConfig, got {type(config).__name__}")
    return DomainConfig.parse(config.model_dump(mode="json"))


class Connection:
    """A controller of the domains in one state directory. Get one with :func:`aiovirt.connect`."""

    def __init__(self, uri: ParsedURI, statedir: StateDir, task_group: anyio.abc.TaskGroup) -> None:
        self.uri = uri.uri
        self._parsed = uri
        self._statedir = statedir
        self._tg = task_group
        self._domains: dict[str, Domain] = {}
        self._events: Broadcaster[DomainEvent] = Broadcaster()
        self._closed = False
        # Serialises changes to the table of names (define writes a file between check and insert).
        self._table_lock = anyio.Lock()
        #: Events of ``connect()`` itself (reattach, autostart), emitted before anyone could subscribe.
        self.startup_events: list[DomainEvent] = []
        self._connecting = True
        #: What could not be loaded from the state directory (the files are kept, never deleted).
        self.problems: list[StateProblem] = []

    # -- domains --------------------------------------------------------------------------------

    async def lookup(self, name: str) -> Domain:
        """The domain called ``name``. Raises :class:`DomainNotFoundError`."""
        self._check_open()
        try:
            return self._domains[name]
        except KeyError:
            raise DomainNotFoundError(name) from None

    async def list_domains(self, active: bool | None = None) -> list[Domain]:
        """All domains sorted by name; only active (or only inactive) ones when ``active`` is given."""
        self._check_open()
        doms = sorted(self._domains.values(), key=lambda d: d.name)
        return doms if active is None else [d for d in doms if d.active == active]

    async def define(self, config: DomainConfig) -> Domain:
        """Store a persistent definition (``domains/NAME.json``) and return its domain.

        Defining an existing name with the same UUID updates the definition; the new config takes
        effect at the next start. A name or UUID used by another domain raises :class:`DomainExistsError`.
        """
        self._check_open()
        async with self._table_lock:  # the name must not be taken while the record is written
            return await self._define(config)

    async def _define(self, config: DomainConfig) -> Domain:
        config = self._complete(config)
        existing = self._check_unique(config)
        autostart = existing.autostart if existing is not None else False
        await self._statedir.write_definition(
            config.name, self._definition_record(config, autostart=autostart)
        )
        if existing is None:
            dom = Domain(self, config, persistent=True)
            self._domains[config.name] = dom
            dom._emit(EventKind.DEFINED, EventDetail.ADDED)
        else:
            dom = existing
            dom._config, dom._persistent = config, True
            dom._emit(EventKind.DEFINED, EventDetail.UPDATED)
        return dom

    async def create(self, config: DomainConfig) -> Domain:
        """Start a transient domain (no definition is stored; it is gone once it stops)."""
        self._check_open()
        async with self._table_lock:
            config = self._complete(config)
            if self._check_unique(config) is not None:
                raise DomainExistsError(config.name)
            dom = Domain(self, config, persistent=False)
            self._domains[config.name] = dom
        try:
            await dom.start()
        except BaseException:
            if not dom.active:
                self._forget(dom)
            raise
        return dom

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
                if dom.active:
                    with contextlib.suppress(InvalidStateError):  # it may stop on its own meanwhile
                        await dom.destroy()

    @asynccontextmanager
    async def subscribe(self, max_buffer: int = 1024) -> AsyncIterator[Subscription[DomainEvent]]:
        """Lifecycle events of every domain while the block is open.

        Each subscriber has its own buffer of ``max_buffer`` events; one that falls behind gets
        :class:`EventsDroppedError` (with the count) after the events that fit, and can go on.
        """
        with self._events.subscribe(max_buffer) as sub:
            yield sub

    async def stop_all(
        self,
        domains: Iterable[Domain | str] | None = None,
        policy: StopPolicy | None = None,
        limit: int = 64,
        on_result: Callable[[StopResult], object] | None = None,
    ) -> list[StopResult]:
        """Stop many domains concurrently within one policy (default: every active domain).

        Returns one :class:`StopResult` per domain, in order; partial failure is in the results,
        not raised. ``limit`` bounds concurrent QMP requests, never the waiting. ``on_result`` sees
        each result as it completes. Cancellation sends no further signal.
        """
        self._check_open()
        targets = (
            await self.list_domains(active=True)
            if domains is None
            else [d if isinstance(d, Domain) else await self.lookup(d) for d in domains]
        )
        return await stop_all(targets, policy or StopPolicy(), limit, on_result)

    # -- internals used by Domain ---------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StateDirError(str(self._statedir.root), "the connection is closed")

    def _check_usable(self, dom: Domain) -> None:
        self._check_open()
        if dom._gone or self._domains.get(dom.name) is not dom:
            raise DomainNotFoundError(dom.name)

    def _complete(self, config: DomainConfig) -> DomainConfig:
        """Validate, and give a config without a UUID the one of its name's domain, or a new one."""
        config = validate_config(config)
        if config.uuid is None:
            existing = self._domains.get(config.name)
            config = config.model_copy(update={"uuid": existing.uuid if existing else uuid_mod.uuid4()})
        return config

    def _check_unique(self, config: DomainConfig) -> Domain | None:
        """The existing domain this config redefines, if any; raise if it clashes with another."""
        existing = self._domains.get(config.name)
        if existing is not None and existing.uuid != config.uuid:
            raise DomainExistsError(config.name, f"it has UUID {existing.uuid}")
        for dom in self._domains.values():
            if dom.uuid == config.uuid and dom.name != config.name:
                raise DomainExistsError(dom.name, f"UUID {config.uuid} is already used by it")
        return existing

    @staticmethod
    def _definition_record(config: DomainConfig, *, autostart: bool) -> dict[str, Any]:
        return {"autostart": autostart, "config": config.model_dump(mode="json")}

    def _publish(self, event: DomainEvent) -> None:
        if self._connecting:
            self.startup_events.append(event)
        self._events.publish(event)

    def _forget(self, dom: Domain) -> None:
        dom._gone = True
        if self._domains.get(dom.name) is dom:
            del self._domains[dom.name]

    def _on_domain_stopped(self, dom: Domain) -> None:
        if not dom.persistent:
            self._forget(dom)

    async def _undefine(self, dom: Domain) -> None:
        await self._statedir.remove_definition(dom.name)
        dom._persistent = False
        if dom.active:
            self._write_runtime_record(dom, phase="running")
        else:
            self._forget(dom)
        dom._emit(EventKind.UNDEFINED, EventDetail.REMOVED)

    def _write_runtime_record(self, dom: Domain, *, phase: str) -> None:
        proc = dom._process
        self._statedir.write_runtime(
            dom.name,
            {
                "name": dom.name,
                "uuid": str(dom.uuid),
                "phase": phase,
                "pid": proc.pid if proc else None,
                "start_time": proc.identity.start_time if proc else None,
                "transient": not dom.persistent,
                "config": dom.config.model_dump(mode="json"),
            },
        )

    async def _launch(self, dom: Domain) -> None:
        """Spawn QEMU for ``dom`` (paused), attach the monitor, start the CPUs. See ``Domain.start``."""
        sd = self._statedir
        cfg = dom._config
        name = cfg.name
        log_fd, log_offset = sd.open_log(name)
        try:
            # We bind the monitor socket and hand QEMU the listening fd (as libvirt does): no socket
            # path limit, and our connection is queued before QEMU even runs, so no polling for it.
            listener = sd.bind_monitor(name)
            try:
                sock = sd.connect_monitor(name)
                console = str(sd.prepare_console(name)) if cfg.console else None
                argv = render_argv(cfg, monitor_fd=listener.fileno(), console_path=console, paused=True)
                # Recorded before the spawn: a crash right after it must not leave an unknown QEMU.
                dom._running_config = cfg
                self._write_runtime_record(dom, phase="starting")
                try:
                    proc = Process.spawn(argv, output_fd=log_fd, pass_fds=[listener.fileno()])
                except OSError as exc:
                    sock.close()
                    dom._shut_off(StateReason.FAILED, EventDetail.FAILED)
                    raise LaunchError(
                        name,
                        f"cannot execute {argv[0]!r}: {exc.strerror}",
                        log_path=str(dom.log_path),
                        argv=argv,
                    ) from exc
            finally:
                listener.close()  # QEMU holds its own copy; once it exits our connection sees EOF
        finally:
            os.close(log_fd)
        # No record of the pid yet: that waits for the "running" record (each replacing rename
        # costs a flush on ext4). A crash before it leaves the pid-less "starting" record, and the
        # next connection finds this QEMU by the -uuid on its command line.
        dom._exited = anyio.Event()

        async def on_ready(qmp: QMPClient) -> None:
            await qmp.execute("cont")
            dom._attach(proc, qmp, cfg)
            self._write_runtime_record(dom, phase="running")
            dom._set_state(DomainState.RUNNING, StateReason.BOOTED)
            dom._emit(EventKind.STARTED, EventDetail.BOOTED)

        def on_failure(exc: BaseException) -> LaunchError:
            return dom._launch_error(exc, proc, log_offset, argv)

        dom._starting = True
        try:
            await self._tg.start(dom._supervise, proc, sock, on_ready, on_failure)
        finally:
            dom._starting = False

    # -- loading and reattaching --------------------------------------------------------------

    def _problem(self, path: Path, kind: str, message: str) -> None:
        problem = StateProblem(path, kind, message)
        self.problems.append(problem)
        logger.warning("aiovirt state directory problem: %s", problem)

    def _set_aside(self, path: Path, kind: str, exc: BaseException, note: str = "") -> None:
        """A record we cannot use: keep it (renamed so it is not read again) and report it."""
        try:
            aside = self._statedir.set_aside(path)
        except OSError:
            aside = path
        self._problem(aside, kind, f"unreadable record set aside: {exc}{note}")

    def _report_earlier_set_asides(self, directory: Path, kind: str) -> None:
        for path in self._statedir.set_aside_paths(directory):
            if not any(p.path == path for p in self.problems):
                self._problem(path, kind, "unreadable record set aside by an earlier connection")

    @staticmethod
    def _read_record(raw: bytes, path: Path) -> dict[str, Any]:
        try:
            data = json.loads(raw)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        version = data.get("format")
        if type(version) is not int or version != RECORD_FORMAT:
            raise ValueError(f"unknown record format {version!r} (this version reads {RECORD_FORMAT})")
        config = data.get("config")
        if not isinstance(config, dict) or f"{config.get('name')}.json" != path.name:
            raise ValueError("its config does not name this file")
        if not config.get("uuid"):
            raise ValueError("its config has no UUID")
        return data

    def _load_definitions(self) -> None:
        sd = self._statedir
        for name in sd.definition_names():
            path = sd.definition_path(name)
            try:
                data = self._read_record(sd.read_definition(name), path)
                config = DomainConfig.parse(data["config"])
                self._check_unique(config)
            except (ValueError, AiovirtError, OSError) as exc:
                self._set_aside(path, "definition", exc)
                continue
            self._domains[name] = Domain(
                self, config, persistent=True, autostart=data.get("autostart") is True
            )
        self._report_earlier_set_asides(sd.domains, "definition")

    async def _reattach_all(self) -> None:
        """Take back every QEMU that a runtime record describes (see ``_reattach``)."""
        sd = self._statedir
        for name in sd.runtime_names():
            path = sd.runtime_path(name)
            dom = self._domains.get(name)
            try:
                record = self._read_record(sd.read_runtime(name), path)
                config = DomainConfig.parse(record["config"])
                if dom is None:
                    self._check_unique(config)
            except (ValueError, AiovirtError, OSError) as exc:
                if dom is None:
                    # A transient domain's config lived only in this record: its QEMU, if one
                    # still runs, cannot be managed. Say which one it is; never signal it.
                    self._set_aside(path, "runtime", exc, await self._orphan_note(name))
                else:
                    self._set_aside(path, "runtime", exc)
                    # Its QEMU may still run: find it by UUID so that it never runs twice.
                    await self._reattach(dom, dom.config, None, "unknown")
                continue
            if dom is not None and dom.uuid != config.uuid:
                # Edited by hand: another machine under this name. Its QEMU is left alone.
                note = f"; its UUID {config.uuid} is not the definition's {dom.uuid}"
                self._set_aside(path, "runtime", ValueError("conflicting record"), note)
                continue
            if dom is None:
                dom = Domain(self, config, persistent=False)
                self._domains[name] = dom
            pid, start_time = record.get("pid"), record.get("start_time")
            identity = (
                ProcessIdentity(pid, start_time)
                if type(pid) is int and type(start_time) is int and pid > 0
                else None
            )
            await self._reattach(dom, config, identity, str(record.get("phase")))
        self._report_earlier_set_asides(sd.run, "runtime")

    async def _orphan_note(self, name: str) -> str:
        """Which QEMU (if any) still serves ``name``'s monitor: asked through the monitor itself."""
        try:
            sock = self._statedir.connect_monitor(name)
        except (OSError, StateDirError):
            return "; no QEMU serves its monitor"
        uuid = None
        with anyio.move_on_after(5):
            try:
                async with QMPClient.open(sock, handshake_timeout=5) as qmp:
                    uuid = (await qmp.execute("query-uuid"))["UUID"]
            except (AiovirtError, OSError, KeyError, TypeError):
                pass
        pids = list(find_processes_with_arg("-uuid", uuid)) if isinstance(uuid, str) else []
        if not pids:
            return "; its monitor does not tell which QEMU serves it"
        return f"; QEMU pid {', '.join(map(str, pids))} (UUID {uuid}) still runs and is not managed"

    async def _reattach(
        self, dom: Domain, config: DomainConfig, identity: ProcessIdentity | None, phase: str
    ) -> None:
        """Take back ``dom``'s QEMU, if it still is that QEMU, and supervise it again.

        ``identity`` is the recorded pid and start time (None: search by the UUID on QEMU's
        command line). A process that is gone, or that is another process now, is never
        signalled: the domain is SHUTOFF with reason ``daemon``. ``phase`` is the recorded
        phase: ``starting`` means the last controller died during the start, which is finished.
        """
        sd = self._statedir
        name = dom.name
        uuid = str(config.uuid)
        proc: Process | None = None
        if identity is None:
            for pid in find_processes_with_arg("-uuid", uuid):
                found = read_identity(pid)
                proc = Process.attach(found, uuid=uuid) if found else None
                if proc is not None:
                    break
        else:
            proc = Process.attach(identity, uuid=uuid)
        if proc is None:
            # Gone while nobody watched, or the pid now belongs to another process: never signal it.
            if identity is None:
                why = "no process has its UUID"
            elif read_identity(identity.pid) is None:
                why = f"pid {identity.pid} is gone"
            else:
                why = f"pid {identity.pid} is another process now"
            logger.info("domain %r: its QEMU exited while no controller ran (%s); shut off", name, why)
            dom._shut_off(StateReason.DAEMON, EventDetail.FAILED)
            return
        try:
            sock = sd.connect_monitor(name)
        except (OSError, StateDirError) as exc:
            # Our QEMU, but its monitor is unreachable: it cannot be managed and must not run twice.
            logger.warning("domain %r: monitor unreachable (%s); stopping pid %d", name, exc, proc.pid)
            self._problem(
                sd.monitor_path(name), "runtime", f"monitor unreachable, QEMU {proc.pid} stopped: {exc}"
            )
            proc.send_signal(signal.SIGKILL)
            with anyio.move_on_after(30):
                await proc.wait()
            proc.close()
            dom._shut_off(StateReason.DAEMON, EventDetail.FAILED)
            return
        dom._exited = anyio.Event()
        attached = proc

        async def on_ready(qmp: QMPClient) -> None:
            status = (await qmp.execute("query-status"))["status"]
            dom._attach(attached, qmp, config)
            # The last controller died during the start: before "cont" (prelaunch), or after it
            # but before it recorded the start as done.
            booted = status == "prelaunch" or (phase == "starting" and status == "running")
            if status == "prelaunch":
                await qmp.execute("cont")
            # Always rewritten: the record may have been set aside, or lack the pid.
            self._write_runtime_record(dom, phase="running")
            if booted:
                dom._set_state(DomainState.RUNNING, StateReason.BOOTED)
                dom._emit(EventKind.STARTED, EventDetail.BOOTED)
            elif status == "running":
                dom._set_state(DomainState.RUNNING, StateReason.UNKNOWN)
            elif status == "shutdown":
                dom._set_state(DomainState.SHUTDOWN, StateReason.USER)
            elif status == "paused":
                dom._set_state(DomainState.PAUSED, StateReason.USER)
            else:
                dom._set_state(DomainState.PAUSED, StateReason.UNKNOWN)

        failures: list[BaseException] = []

        def on_failure(exc: BaseException) -> AiovirtError:
            failures.append(exc)
            return ConnectionLostError(f"cannot take back domain {name!r} (pid {attached.pid}): {exc}")

        dom._starting = True
        try:
            await self._tg.start(
                functools.partial(dom._supervise, proc, sock, on_ready, on_failure, launching=False)
            )
        except AiovirtError as exc:
            # The supervisor has stopped the QEMU (waiting for it to exit first): SHUTOFF/daemon now.
            cause = failures[0] if failures else exc
            if isinstance(cause, ConnectionLostError) and not isinstance(cause.__cause__, TimeoutError):
                # QEMU closed its monitor: it was exiting already (e.g. destroyed just before the
                # last controller died). Nothing is wrong with the state directory.
                logger.info("domain %r: its QEMU exited while being taken back (%s)", name, cause)
            else:
                self._problem(sd.runtime_path(name), "runtime", str(exc))
        finally:
            dom._starting = False

    async def _autostart_all(self) -> None:
        async def autostart(dom: Domain) -> None:
            try:
                await dom.start()
            except AiovirtError as exc:
                self._problem(self._statedir.definition_path(dom.name), "autostart", str(exc))

        async with anyio.create_task_group() as tg:
            for dom in self._domains.values():
                if dom.autostart and not dom.active:
                    tg.start_soon(autostart, dom)

    async def aclose(self) -> None:
        """Stop supervising. Running QEMUs keep running; a new connection takes them back."""
        self._closed = True
        self._events.close()
        for dom in self._domains.values():
            dom._events.close()
        self._tg.cancel_scope.cancel()


@asynccontextmanager
async def connect(uri: str | None = None) -> AsyncIterator[Connection]:
    """Open a connection: ``async with aiovirt.connect("qemu:///embed?root=/srv/vms") as conn:``.

    The URI defaults to ``$AIOVIRT_DEFAULT_URI``, else ``qemu:///system`` for root and
    ``qemu:///session`` otherwise. Only one connection at a time may use a state directory
    (:class:`StateDirLockedError`). Leaving the block stops supervising; QEMUs keep running.
    """
    parsed = parse_uri(uri)
    if parsed.driver == "system" and os.geteuid() != 0:
        raise StateDirError(str(parsed.root), "qemu:///system needs root; use qemu:///session")
    statedir = StateDir(parsed.root, parsed.run)
    statedir.open()
    try:
        async with anyio.create_task_group() as tg:
            conn = Connection(parsed, statedir, tg)
            conn._load_definitions()
            await conn._reattach_all()
            await conn._autostart_all()
            conn._connecting = False
            try:
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
    finally:
        statedir.close()
