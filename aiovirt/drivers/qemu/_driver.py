"""The local QEMU driver: a state directory, QEMU processes spawned and supervised in our event loop.

``qemu:///embed?root=DIR``, ``qemu:///session`` and ``qemu:///system`` all open this driver on
their directories (see :mod:`aiovirt._uri`). It owns the state directory (its lock, its records:
:mod:`._records`), launches QEMU (argv from :func:`aiovirt.config.render_argv`), takes back QEMUs an
earlier controller left running, and runs one supervisor per QEMU in its task group.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc

from ..._errors import AiovirtError, ConnectionLostError, LaunchError, StateDirError
from ..._fds import Readers
from ..._lifecycle import Happening
from ..._uri import ParsedURI
from ...config import DomainConfig, render_argv
from ...qmp._client import QMPClient
from .._base import Driver, MachineObserver, StateProblem, StoredDomain
from ._machine import QemuMachine, ReadOnlyMachine
from ._overlay import create_overlays, remove_overlays, transient_disks
from ._process import Process, ProcessIdentity, find_processes_with_arg, read_identity, spaced_copies
from ._records import (
    RuntimeRecord,
    decode_definition,
    decode_runtime,
    encode_definition,
    encode_runtime,
)
from ._statedir import StateDir

__all__ = ["QemuDriver"]

logger = logging.getLogger("aiovirt")

#: How long after a pid-less runtime record was written its QEMU may still appear (see
#: ``QemuDriver._find_late_spawn``).
_SPAWN_GRACE = 5.0
#: QEMU 7.2 prints this first, when it waits for the monitor's client (us): it is no complaint.
_WAITING_NOTICE = "info: QEMU waiting for connection"


class QemuDriver(Driver):
    """One opened state directory. Open with :meth:`open`."""

    def __init__(
        self, uri: ParsedURI, statedir: StateDir, task_group: anyio.abc.TaskGroup, *, readonly: bool = False
    ) -> None:
        self.uri = uri.uri
        self.readonly = readonly
        self.statedir = statedir
        self._tg = task_group
        #: Where the monitors and consoles are read (see :class:`~aiovirt._fds.Readers`).
        self.readers = Readers()
        self._problems: list[StateProblem] = []
        self._watched: list[Process] = []  # a read-only connection's pidfds, closed with it

    @classmethod
    @asynccontextmanager
    async def open(cls, uri: ParsedURI, *, readonly: bool = False) -> AsyncIterator[QemuDriver]:
        """``readonly``: no lock, no signal, no monitor, no write; a snapshot as of the open."""
        if uri.driver == "system" and os.geteuid() != 0 and not readonly:
            raise StateDirError(str(uri.root), "qemu:///system needs root; use qemu:///session")
        statedir = StateDir(uri.root, uri.run)
        statedir.open(readonly=readonly)
        try:
            async with anyio.create_task_group() as tg:
                driver = cls(uri, statedir, tg, readonly=readonly)
                tg.start_soon(driver.readers.serve)
                try:
                    yield driver
                finally:
                    tg.cancel_scope.cancel()
                    for proc in driver._watched:
                        proc.close()
        finally:
            statedir.close()

    async def aclose(self) -> None:
        self._tg.cancel_scope.cancel()

    @property
    def problems(self) -> Sequence[StateProblem]:
        return tuple(self._problems)

    # -- definitions ----------------------------------------------------------------------------

    async def save_definition(self, config: DomainConfig, *, autostart: bool) -> None:
        await self.statedir.write_definition(config.name, encode_definition(config, autostart=autostart))

    async def remove_definition(self, name: str) -> None:
        await self.statedir.remove_definition(name)

    def definition_path(self, name: str) -> Path:
        return self.statedir.definition_path(name)

    def log_path(self, name: str) -> Path:
        return self.statedir.log_path(name)

    def console_path(self, name: str) -> Path:
        return self.statedir.console_path(name)

    def remove_logs(self, name: str) -> None:
        self.statedir.remove_logs(name)

    def write_running_record(self, machine: QemuMachine) -> None:
        config = machine.config
        self.statedir.write_runtime(
            config.name,
            encode_runtime(
                config, phase="running", identity=machine.process.identity, transient=machine.transient
            ),
        )

    # -- launching ------------------------------------------------------------------------------

    async def launch(self, config: DomainConfig, observer: MachineObserver, *, persistent: bool) -> None:
        """Make the overlays of transient disks, spawn QEMU (paused), attach the monitor and the
        console, start the CPUs. See ``Domain.start``."""
        sd = self.statedir
        name = config.name
        log_fd, log_offset = sd.open_log(name)
        sock: socket.socket | None = None
        console_sock: socket.socket | None = None
        overlays: dict[int, str] = {}
        try:
            overlays = await create_overlays(sd, config, log_fd)
            log_offset = os.lseek(log_fd, 0, os.SEEK_END)  # QEMU's complaints start here
            # We bind the monitor socket and hand QEMU the listening fd (as libvirt does): no socket
            # path limit, and our connection is queued before QEMU even runs, so no polling for it.
            # The serial console's socket likewise.
            listener = sd.bind_monitor(name)
            console_listener = sd.bind_console(name) if config.console else None
            try:
                sock = sd.connect_monitor(name)
                console = str(sd.prepare_console(name)) if config.console else None
                console_fd = None
                if console_listener is not None:
                    console_sock = sd.connect_console(name)
                    console_fd = console_listener.fileno()
                # Recorded before the spawn: a crash right after it must not leave an unknown QEMU.
                # No pid yet: that waits for the "running" record (each replacing rename costs a
                # flush on ext4); the next connection finds such a QEMU by its -uuid.
                sd.write_runtime(
                    name, encode_runtime(config, phase="starting", identity=None, transient=not persistent)
                )
                kept = [listener.fileno()] + ([console_fd] if console_fd is not None else [])
                with spaced_copies(kept) as pass_fds:
                    argv = render_argv(
                        config,
                        monitor_fd=pass_fds[0],
                        console_path=console,
                        console_fd=pass_fds[1] if console_fd is not None else None,
                        overlays=overlays,
                        paused=True,
                    )
                    try:
                        proc = Process.spawn(argv, output_fd=log_fd, pass_fds=pass_fds)
                    except OSError as exc:
                        sd.remove_runtime(name)
                        remove_overlays(sd, name, overlays)
                        observer.happened(Happening.EXITED)
                        raise LaunchError(
                            name,
                            f"cannot execute {argv[0]!r}: {exc.strerror}",
                            log_path=str(sd.log_path(name)),
                            argv=argv,
                        ) from exc
            finally:
                listener.close()  # QEMU holds its own copy; once it exits our connection sees EOF
                if console_listener is not None:
                    console_listener.close()
        except BaseException:
            # Nothing was spawned (or it could not be): leave no socket, record or overlay behind.
            for opened in (sock, console_sock):
                if opened is not None:
                    opened.close()
            sd.remove_runtime(name)
            remove_overlays(sd, name, overlays)
            raise
        finally:
            os.close(log_fd)

        machine = QemuMachine(self, config, proc, observer, transient=not persistent)
        if console_sock is not None:
            machine.serve_console(console_sock)
        observer.attached(machine)

        async def on_ready(qmp: QMPClient) -> None:
            await qmp.execute("cont")
            self.write_running_record(machine)
            observer.happened(Happening.BOOTED)

        def on_failure(exc: BaseException) -> LaunchError:
            return self._launch_error(name, exc, proc, log_offset, argv)

        await self._tg.start(machine.supervise_launch, sock, on_ready, on_failure)

    def _launch_error(
        self, name: str, exc: BaseException, proc: Process, log_offset: int, argv: list[str]
    ) -> LaunchError:
        log = self.statedir.read_log(name, log_offset)
        # QEMU's own notice that it waits for the monitor client (us) is not part of its complaint.
        message = "\n".join(line for line in log.splitlines() if _WAITING_NOTICE not in line).strip()
        if not message:
            closed = isinstance(exc, ConnectionLostError) and not isinstance(exc.__cause__, TimeoutError)
            message = "QEMU closed its monitor" if closed else str(exc)
        return LaunchError(
            name, message, returncode=proc.returncode, log_path=str(self.statedir.log_path(name)), argv=argv
        )

    # -- loading and taking back ----------------------------------------------------------------

    def _problem(self, path: Path, kind: str, message: str) -> None:
        problem = StateProblem(path, kind, message)
        self._problems.append(problem)
        logger.warning("aiovirt state directory problem: %s", problem)

    def _set_aside(self, path: Path, kind: str, exc: BaseException, note: str = "") -> None:
        """A record we cannot use: keep it (renamed so it is not read again) and report it."""
        try:
            aside = path if self.readonly else self.statedir.set_aside(path)
        except OSError:
            aside = path
        self._problem(aside, kind, f"unreadable record set aside: {exc}{note}")

    def _report_earlier_set_asides(self, directory: Path, kind: str) -> None:
        for path in self.statedir.set_aside_paths(directory):
            if not any(p.path == path for p in self._problems):
                self._problem(path, kind, "unreadable record set aside by an earlier connection")

    async def load(self) -> list[StoredDomain]:
        sd = self.statedir
        found: dict[str, StoredDomain] = {}
        uuids: dict[object, str] = {}
        for name in sd.definition_names():
            path = sd.definition_path(name)
            try:
                definition = decode_definition(sd.read_definition(name), path)
                other = uuids.get(definition.config.uuid)
                if other is not None:
                    raise ValueError(f"UUID {definition.config.uuid} is already used by domain {other!r}")
            except (ValueError, AiovirtError, OSError) as exc:
                self._set_aside(path, "definition", exc)
                continue
            uuids[definition.config.uuid] = name
            found[name] = StoredDomain(definition.config, True, definition.autostart)
        self._report_earlier_set_asides(sd.domains, "definition")

        for name in sd.runtime_names():
            path = sd.runtime_path(name)
            defined = found.get(name)
            try:
                record = decode_runtime(sd.read_runtime(name), path)
                other = uuids.get(record.config.uuid)
                if defined is None and other is not None:
                    raise ValueError(f"UUID {record.config.uuid} is already used by domain {other!r}")
            except (ValueError, AiovirtError, OSError) as exc:
                if defined is None:
                    # A transient domain's config lived only in this record: its QEMU, if one
                    # still runs, cannot be managed. Say which one it is; never signal it.
                    self._set_aside(path, "runtime", exc, await self._orphan_note(name))
                else:
                    self._set_aside(path, "runtime", exc)
                    # Its QEMU may still run: find it by UUID so that it never runs twice.
                    found[name] = StoredDomain(
                        defined.config,
                        True,
                        defined.autostart,
                        RuntimeRecord(defined.config, "unknown", None, transient=False),
                    )
                continue
            if defined is not None and defined.config.uuid != record.config.uuid:
                # Edited by hand: another machine under this name. Its QEMU is left alone.
                note = f"; its UUID {record.config.uuid} is not the definition's {defined.config.uuid}"
                self._set_aside(path, "runtime", ValueError("conflicting record"), note)
                continue
            if defined is None:
                uuids[record.config.uuid] = name
                found[name] = StoredDomain(record.config, False, False, record)
            else:
                found[name] = StoredDomain(defined.config, True, defined.autostart, record)
        self._report_earlier_set_asides(sd.run, "runtime")
        if not self.readonly:
            # Overlays of runs that ended unwatched before their record was written (a crash
            # between qemu-img and the spawn) or whose record is gone (a wiped RUN after a reboot).
            for name, indexes in sd.overlay_owners().items():
                entry = found.get(name)
                if entry is None or entry.runtime is None:
                    remove_overlays(sd, name, indexes)
        return [found[name] for name in sorted(found)]

    async def _orphan_note(self, name: str) -> str:
        """Which QEMU (if any) still serves ``name``'s monitor: asked through the monitor itself."""
        if self.readonly:
            return "; its monitor belongs to the controller (read-only: not asked)"
        try:
            sock = self.statedir.connect_monitor(name)
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

    async def adopt(self, stored: StoredDomain, observer: MachineObserver) -> None:
        """Take back the QEMU of ``stored``, if it still is that QEMU, and supervise it again.

        A process that is gone, or that is another process now, is never signalled: GONE. One whose
        identity checks pass is never ended here, even when its monitor does not answer.
        """
        record = stored.runtime
        assert isinstance(record, RuntimeRecord)
        name = stored.config.name
        uuid = str(stored.config.uuid)
        proc = self._find(record.identity, uuid)
        if proc is None and record.identity is None:
            proc = await self._find_late_spawn(name, uuid)
        if proc is None:
            if record.identity is None:
                why = "no process has its UUID"
            elif read_identity(record.identity.pid) is None:
                why = f"pid {record.identity.pid} is gone"
            else:
                why = f"pid {record.identity.pid} is another process now"
            logger.info("domain %r: its QEMU exited while no controller ran (%s); shut off", name, why)
            if not self.readonly:
                self.statedir.remove_runtime(name)
                remove_overlays(self.statedir, name, transient_disks(stored.config))
            observer.happened(Happening.GONE)
            return
        if self.readonly:
            # The monitor belongs to the controller: what the record and the identity checks say.
            self._watched.append(proc)
            observer.attached(ReadOnlyMachine(self, proc))
            observer.happened(Happening.ADOPTED_RUNNING)
            return
        machine = QemuMachine(self, stored.config, proc, observer, transient=not stored.persistent)
        if stored.config.console:
            # Its console listens again since the last controller left; a QEMU started without a
            # console socket has none (console() then says so).
            try:
                machine.serve_console(self.statedir.connect_console(name))
            except (OSError, StateDirError) as exc:
                logger.info("domain %r: its console cannot be reached: %s", name, exc)
        observer.attached(machine)
        await self._tg.start(machine.supervise_adopted, record.phase)

    async def _find_late_spawn(self, name: str, uuid: str) -> Process | None:
        """A pid-less ("starting") record whose QEMU is not found may still get one: a controller
        killed between fork and exec leaves a child that execs QEMU afterwards (seen on a loaded
        host, tens of milliseconds later). Look again until ``_SPAWN_GRACE`` after the record was
        written; a record older than that is answered at once."""
        try:
            written = os.stat(self.statedir.runtime_path(name)).st_mtime
        except OSError:
            return None
        while time.time() < written + _SPAWN_GRACE:
            await anyio.sleep(0.05)
            proc = self._find(None, uuid)
            if proc is not None:
                return proc
        return None

    @staticmethod
    def _find(identity: ProcessIdentity | None, uuid: str) -> Process | None:
        if identity is not None:
            return Process.attach(identity, uuid=uuid)
        for pid in find_processes_with_arg("-uuid", uuid):
            found = read_identity(pid)
            proc = Process.attach(found, uuid=uuid) if found else None
            if proc is not None:
                return proc
        return None
