"""The on-disk state of one controller: layout, lock, atomic records, logs, monitor sockets.

Layout (``ROOT`` and ``RUN`` come from the connection URI; for ``qemu:///embed?root=DIR`` both are
under DIR, with ``RUN = DIR/run``)::

    ROOT/               0700
      lock              0600  POSIX-locked by the controller (fcntl); holds its pid
      domains/NAME.json 0600  persistent definitions (see _records for the formats)
      log/NAME.log      0600  QEMU's stdout and stderr, appended at every start
      log/NAME.console  0600  the serial console, when the config enables it
      overlays/         0700
        NAME.diskI.qcow2 0600 the copy-on-write overlay of a transient disk, for one run
    RUN/                0700
      NAME.json         0600  runtime record of a domain with a QEMU process (pid, start time, ...)
      NAME.qmp          0600  its QMP monitor socket (bound by us, listened on by QEMU)
      NAME.serial       0600  its serial console's socket (bound by us, listened on by QEMU)

Every record is written atomically: a temporary file in the same directory, then ``rename``. A
crash at any instant leaves the old or the new file, never a torn one; stale temporary files are
removed when the directory is opened (we hold the lock, so nobody else is writing). Definitions
are also ``fsync``-ed (file and directory) so they survive a host crash; runtime records are not,
because a host crash also ends every QEMU they describe.

Files are opened relative to directory descriptors with ``O_NOFOLLOW``: a symlink planted inside
the state directory is never followed. Unix socket paths are limited to 107 bytes; longer paths
are reached through ``/proc/self/fd/DIRFD/NAME``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import re
import socket
import stat
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio

from ..._errors import StateDirError, StateDirLockedError

__all__ = ["StateDir"]

_MAX_RECORD = 16 << 20
_SUN_PATH_MAX = 107
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


#: The state directories (device, inode) locked by this process, guarded by _LOCKED_GUARD.
_LOCKED: set[tuple[int, int]] = set()
_LOCKED_GUARD = threading.Lock()


def _lock_holder(fd: int) -> int | None:
    """The pid holding the POSIX lock on ``fd``'s file (F_GETLK), else the pid written in it."""
    query = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    with contextlib.suppress(OSError):
        pid = struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, query))[4]
        if pid > 0:  # 0: held from another pid namespace
            return int(pid)
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


class StateDir:
    """One controller's directories. Open with :meth:`open`, release with :meth:`close`."""

    def __init__(self, root: Path, run: Path | None = None) -> None:
        self.root = Path(root)
        self.run = Path(run) if run is not None else self.root / "run"
        self.domains = self.root / "domains"
        self.logs = self.root / "log"
        self.overlays = self.root / "overlays"
        self._fds: dict[Path, int] = {}
        self._lock_fd: int | None = None
        self._lock_key = (0, 0)
        self._tmp_counter = 0
        self.readonly = False

    # -- open / close -------------------------------------------------------------------------

    def open(self, *, readonly: bool = False) -> None:
        """Create the directories (0700), take the lock, remove stale temporary files.

        ``readonly`` opens what exists and takes no lock and creates nothing (a read-only
        connection beside the controller): a missing directory reads as empty. The root and a
        separate run directory may be symbolic links the user made (``/srv/vms -> /data/vms``);
        nothing inside them is followed.
        """
        self.readonly = readonly
        separate_run = self.root not in self.run.parents
        try:
            for d in (self.root, self.domains, self.logs, self.overlays, self.run):
                follow = d == self.root or (d == self.run and separate_run)
                if readonly and not d.is_dir():
                    continue
                self._fds[d] = self._open_dir(d, follow=follow, create=not readonly)
            if readonly:
                return
            self._take_lock()
            for d in (self.domains, self.run):
                for name in self._listdir(d):
                    if name.startswith(".") and name.endswith(".tmp"):
                        os.unlink(name, dir_fd=self._fds[d])
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None
            with _LOCKED_GUARD:
                _LOCKED.discard(self._lock_key)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _open_dir(self, path: Path, *, follow: bool, create: bool) -> int:
        try:
            if create:
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, _DIR_FLAGS & ~os.O_NOFOLLOW if follow else _DIR_FLAGS)
        except OSError as exc:
            raise StateDirError(str(path), f"cannot use directory: {exc.strerror}") from exc
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            os.close(fd)
            raise StateDirError(str(path), f"owned by uid {st.st_uid}, not by us (uid {os.geteuid()})")
        if stat.S_IMODE(st.st_mode) != 0o700 and create:
            os.fchmod(fd, 0o700)  # ours, but made by someone with a looser umask
        return fd

    def _take_lock(self) -> None:
        """One controller per state directory: a POSIX record lock on ``lock``, which holds our pid.

        Not ``flock``: a flock belongs to the open file, which a child shares from ``fork`` until
        its ``exec``, so a controller killed while spawning a QEMU would leave the directory locked
        for a moment after its death. A POSIX lock belongs to the process alone and ends with it.
        It does not exclude a second connection of the same process, so those are counted here;
        the ``lock`` file is opened only when this process holds no lock on it (closing any
        descriptor of the file would release a POSIX lock).
        """
        st = os.fstat(self._fds[self.root])
        key = (st.st_dev, st.st_ino)
        with _LOCKED_GUARD:
            if key in _LOCKED:
                raise StateDirLockedError(str(self.root), os.getpid())
            fd = self._open_file(self.root, "lock", os.O_RDWR | os.O_CREAT)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    os.close(fd)
                    raise
                holder = _lock_holder(fd)
                os.close(fd)
                raise StateDirLockedError(str(self.root), holder) from None
            _LOCKED.add(key)
        self._lock_key = key
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _fd(self, d: Path) -> int:
        try:
            return self._fds[d]
        except KeyError:
            raise StateDirError(str(self.root), "not open") from None

    def _listdir(self, d: Path) -> list[str]:
        if self.readonly and d not in self._fds:
            return []  # read-only: a directory the controller has not made yet
        return os.listdir(self._fd(d))

    def _open_file(self, d: Path, name: str, flags: int) -> int:
        """Open ``d/name`` (mode 0600 if created), never through a symlink: StateDirError if it is one."""
        try:
            return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self._fd(d))
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise StateDirError(str(d / name), "is a symbolic link; not followed") from exc
            raise

    # -- records ------------------------------------------------------------------------------

    def _check_writable(self, d: Path) -> None:
        if self.readonly:
            raise StateDirError(str(d), "opened read-only; nothing is written")

    def _write(self, d: Path, name: str, data: bytes, *, durable: bool) -> None:
        """Atomic replace of ``d/name``. A failure (a full disk) leaves the old record as it was and
        raises :class:`StateDirError` naming the file and the cause."""
        self._check_writable(d)
        try:
            self._write_atomically(d, name, data, durable=durable)
        except OSError as exc:
            raise StateDirError(str(d / name), f"cannot write: {exc.strerror or exc}") from exc

    def _write_atomically(self, d: Path, name: str, data: bytes, *, durable: bool) -> None:
        dirfd = self._fd(d)
        self._tmp_counter += 1
        tmp = f".{name}.{os.getpid()}.{self._tmp_counter}.tmp"
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dirfd
        )
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dirfd)
            raise
        if durable:
            os.fsync(dirfd)

    def _read(self, d: Path, name: str) -> bytes:
        """The raw bytes of a record. Raises FileNotFoundError, or StateDirError for a non-file."""
        fd = self._open_file(d, name, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: a planted FIFO
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise StateDirError(str(d / name), "is not a regular file")
            return f.read(_MAX_RECORD + 1)

    def set_aside(self, path: Path) -> Path:
        """Rename the unusable record ``path`` to ``NAME.json.corrupt`` (``.corrupt-2``... if taken).

        It is kept for whoever investigates, never deleted nor overwritten, and no longer read as
        a record. A symlink is renamed itself, never followed. Returns the new path.
        """
        self._check_writable(path.parent)
        dirfd = self._fd(path.parent)
        for n in itertools.count(1):
            aside = f"{path.name}.corrupt" + (f"-{n}" if n > 1 else "")
            try:
                os.stat(aside, dir_fd=dirfd, follow_symlinks=False)
            except FileNotFoundError:
                break  # we hold the lock: nobody else creates it meanwhile
        os.rename(path.name, aside, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        return path.with_name(aside)

    def set_aside_paths(self, d: Path) -> list[Path]:
        """The records of ``d`` (``domains`` or ``run``) set aside so far."""
        return [d / e for e in sorted(self._listdir(d)) if ".json.corrupt" in e and not e.startswith(".")]

    def _remove(self, d: Path, name: str, *, durable: bool) -> None:
        self._check_writable(d)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self._fd(d))
        if durable:
            os.fsync(self._fd(d))

    @staticmethod
    def _names(entries: list[str]) -> Iterator[str]:
        for entry in sorted(entries):
            if entry.endswith(".json") and not entry.startswith("."):
                yield entry[: -len(".json")]

    def definition_path(self, name: str) -> Path:
        return self.domains / f"{name}.json"

    def definition_names(self) -> list[str]:
        return list(self._names(self._listdir(self.domains)))

    def read_definition(self, name: str) -> bytes:
        return self._read(self.domains, f"{name}.json")

    async def write_definition(self, name: str, data: bytes) -> None:
        """Durable and atomic; the fsyncs run in a worker thread to keep the event loop free."""
        await anyio.to_thread.run_sync(lambda: self._write(self.domains, f"{name}.json", data, durable=True))

    async def remove_definition(self, name: str) -> None:
        await anyio.to_thread.run_sync(lambda: self._remove(self.domains, f"{name}.json", durable=True))

    def runtime_path(self, name: str) -> Path:
        return self.run / f"{name}.json"

    def runtime_names(self) -> list[str]:
        return list(self._names(self._listdir(self.run)))

    def read_runtime(self, name: str) -> bytes:
        return self._read(self.run, f"{name}.json")

    def write_runtime(self, name: str, data: bytes) -> None:
        self._write(self.run, f"{name}.json", data, durable=False)

    def remove_runtime(self, name: str) -> None:
        self._remove(self.run, f"{name}.json", durable=False)
        self._remove(self.run, f"{name}.qmp", durable=False)
        self._remove(self.run, f"{name}.serial", durable=False)

    # -- logs ---------------------------------------------------------------------------------

    def log_path(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def console_path(self, name: str) -> Path:
        return self.logs / f"{name}.console"

    def open_log(self, name: str) -> tuple[int, int]:
        """Open the domain's log for appending: ``(fd, offset where this run's output starts)``."""
        fd = self._open_file(self.logs, f"{name}.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        return fd, os.lseek(fd, 0, os.SEEK_END)

    def read_log(self, name: str, offset: int, limit: int = 64 << 10) -> str:
        """QEMU's output from ``offset`` on (at most the last ``limit`` bytes)."""
        try:
            fd = os.open(
                f"{name}.log", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._fd(self.logs)
            )
        except FileNotFoundError:
            return ""
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(fd).st_size
            f.seek(max(offset, size - limit))
            return f.read().decode(errors="replace")

    def prepare_console(self, name: str) -> Path:
        """Create the console file 0600 (QEMU would create it with its umask) and return its path."""
        os.close(self._open_file(self.logs, f"{name}.console", os.O_WRONLY | os.O_CREAT))
        return self.console_path(name)

    def remove_logs(self, name: str) -> None:
        for suffix in (".log", ".console"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{name}{suffix}", dir_fd=self._fd(self.logs))

    # -- sockets: the QMP monitor, the serial console ----------------------------------------

    def monitor_path(self, name: str) -> Path:
        return self.run / f"{name}.qmp"

    def console_socket_path(self, name: str) -> Path:
        return self.run / f"{name}.serial"

    def _socket_address(self, filename: str) -> str:
        path = str(self.run / filename)
        if len(os.fsencode(path)) <= _SUN_PATH_MAX:
            return path
        return f"/proc/self/fd/{self._fd(self.run)}/{filename}"

    def bind_monitor(self, name: str) -> socket.socket:
        """A listening unix socket for the domain's monitor (mode 0600), replacing a stale one.

        It is non-blocking, and so is QEMU's copy (the flag belongs to the shared open file). It
        must be: QEMU 7.2 can watch the listener from its main loop and from the monitor's I/O
        thread at once after a client disconnects; both wake for the next client, one accepts it,
        and on a blocking socket the other then blocks in ``accept`` for good, taking the
        monitor's I/O thread with it (seen when a controller was killed during a start: the next
        controller's ``qmp_capabilities`` was never read). Non-blocking, the loser gets EAGAIN.
        """
        return self._bind(f"{name}.qmp")

    def bind_console(self, name: str) -> socket.socket:
        """A listening unix socket for the domain's serial console (0600, non-blocking as the monitor's)."""
        return self._bind(f"{name}.serial")

    def _bind(self, filename: str) -> socket.socket:
        self._remove(self.run, filename, durable=False)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.bind(self._socket_address(filename))
            os.chmod(filename, 0o600, dir_fd=self._fd(self.run))
            sock.listen(8)
            # QEMU shares this open file description. Left blocking, QEMU 7.2's main thread can
            # block for good in accept4() when its main loop and the monitor's I/O thread both
            # see the queued connection (one accepts it, the other waits forever): the monitor
            # then never answers. Non-blocking, the loser gets EAGAIN, which QEMU ignores.
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def connect_monitor(self, name: str) -> socket.socket:
        """A connected, non-blocking socket to the domain's monitor.

        Raises OSError if nobody listens, StateDirError if the path is not a socket (a symlink).
        """
        return self._connect(f"{name}.qmp")

    def connect_console(self, name: str) -> socket.socket:
        """A connected, non-blocking socket to the domain's serial console (as :meth:`connect_monitor`)."""
        return self._connect(f"{name}.serial")

    def _connect(self, filename: str) -> socket.socket:
        st = os.stat(filename, dir_fd=self._fd(self.run), follow_symlinks=False)
        if not stat.S_ISSOCK(st.st_mode):
            raise StateDirError(str(self.run / filename), "is not a socket; not followed")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Non-blocking: a unix connect queues in the listener's backlog at once, or fails
            # with EAGAIN when it is full. A stopped QEMU re-listens with a backlog of one, so a
            # blocking connect to it could wait for ever (and with it the event loop).
            sock.setblocking(False)
            sock.connect(self._socket_address(filename))
        except BaseException:
            sock.close()
            raise
        return sock

    # -- overlays of transient disks ------------------------------------------------------------

    def overlay_path(self, name: str, index: int) -> Path:
        return self.overlays / _overlay_filename(name, index)

    def create_overlay_file(self, name: str, index: int) -> Path:
        """Create the overlay's file empty (0600, never through a symlink; a stale one is replaced)
        for ``qemu-img`` to fill, and return its path."""
        filename = _overlay_filename(name, index)
        self._remove(self.overlays, filename, durable=False)
        fd = self._open_file(self.overlays, filename, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        os.close(fd)
        return self.overlays / filename

    def remove_overlay(self, name: str, index: int) -> None:
        self._remove(self.overlays, _overlay_filename(name, index), durable=False)

    def overlay_owners(self) -> dict[str, list[int]]:
        """The domains that have overlay files, with their disk indexes."""
        owners: dict[str, list[int]] = {}
        for entry in sorted(self._listdir(self.overlays)):
            match = _OVERLAY_RE.fullmatch(entry)
            if match is not None:
                owners.setdefault(match["name"], []).append(int(match["index"]))
        return owners


_OVERLAY_RE = re.compile(r"(?P<name>[^/]+)\.disk(?P<index>[0-9]+)\.qcow2")


def _overlay_filename(name: str, index: int) -> str:
    return f"{name}.disk{index}.qcow2"
