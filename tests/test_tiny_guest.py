"""The tiny test guest: built once and cached, it boots under TCG and powers off on an ACPI button press.

These tests talk to QEMU with plain subprocess and a blocking QMP socket (nothing from aiovirt but the
guest builder), so they check the guest itself, which other tests rely on. Also checked: a ``pc`` machine
with no OS ignores ``system_powerdown`` (the "guest ignores ACPI" case). Waits are bounded and generous
(TCG on a shared machine is slow); no test asserts on durations.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from aiovirt.testing import TinyGuest, TinyGuestBuildError, _guest, ensure_tiny_guest

READY_TIMEOUT = 120.0  # QEMU start to the guest's ready marker (about 3 s on an idle machine)
POWEROFF_TIMEOUT = 60.0  # system_powerdown to QEMU's exit (well under 1 s on an idle machine)
QMP_TIMEOUT = 30.0  # QEMU start to the monitor's greeting, and any one command's reply
IGNORED_WAIT = 5.0  # how long a guest that ignores ACPI is watched for a SHUTDOWN that must not come

Event = dict[str, Any]


class QMP:
    """A blocking QMP client: just enough to send commands and collect events, every wait bounded."""

    def __init__(self, path: Path, proc: subprocess.Popen[bytes], timeout: float = QMP_TIMEOUT) -> None:
        self.events: list[Event] = []
        self.eof = False
        self._buffer = b""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + timeout
        while True:  # QEMU creates the socket shortly after it starts
            try:
                self._sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if proc.poll() is not None:
                    raise AssertionError(
                        f"QEMU exited with status {proc.returncode} before its monitor"
                    ) from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        greeting = self._read(deadline)
        assert greeting is not None, "the monitor closed before its greeting"
        assert "QMP" in greeting, greeting
        assert self.command("qmp_capabilities") == {}

    def close(self) -> None:
        self._sock.close()

    def command(self, name: str, **arguments: Any) -> Any:
        message: dict[str, Any] = {"execute": name}
        if arguments:
            message["arguments"] = arguments
        self._sock.sendall(json.dumps(message).encode() + b"\r\n")
        deadline = time.monotonic() + QMP_TIMEOUT
        while True:
            reply = self._read(deadline)
            assert reply is not None, f"the monitor closed before answering {name}"
            if "return" in reply:
                return reply["return"]
            assert "error" not in reply, f"{name} failed: {reply['error']}"

    def wait_event(self, match: Callable[[Event], bool], timeout: float) -> Event | None:
        """The first event (received so far or within ``timeout``) that matches; None if none did."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if match(event):
                    return event
            seen = len(self.events)
            if self.eof or self._read(deadline) is None:
                return None

    def _read(self, deadline: float) -> dict[str, Any] | None:
        """The next message that is not an event (events go to ``self.events``); None at EOF or deadline."""
        while True:
            line, sep, rest = self._buffer.partition(b"\n")
            if sep:
                self._buffer = rest
                message: dict[str, Any] = json.loads(line)
                if "event" in message:
                    self.events.append(message)
                    return {}  # lets wait_event look at the new event
                return message
            remaining = deadline - time.monotonic()
            if self.eof or remaining <= 0:
                return None
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                return None
            if not chunk:
                self.eof = True
                return None
            self._buffer += chunk


def _is_event(name: str) -> Callable[[Event], bool]:
    return lambda event: event["event"] == name


@pytest.fixture(scope="module")
def qemu_binary() -> str:
    path = shutil.which("qemu-system-x86_64")
    if path is None:
        pytest.fail("qemu-system-x86_64 not found: run scripts/setup.sh")
    return path


@pytest.fixture(scope="module")
def guest() -> TinyGuest:
    return ensure_tiny_guest()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory whose paths fit a unix socket address (pytest's tmp_path may be too long)."""
    path = Path(tempfile.mkdtemp(prefix="aiovirt-tg-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def running_qemu(qemu: str, workdir: Path, *args: str) -> Iterator[tuple[subprocess.Popen[bytes], QMP]]:
    """Start QEMU with a QMP monitor in ``workdir``; whatever happens, it is killed and reaped at the end."""
    monitor = workdir / "qmp.sock"
    argv = [
        qemu,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        *args,
        "-chardev",
        f"socket,id=mon,path={monitor},server=on,wait=off",
        "-mon",
        "chardev=mon,mode=control",
    ]
    with (workdir / "qemu.out").open("wb") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    qmp: QMP | None = None
    try:
        qmp = QMP(monitor, proc)
        yield proc, qmp
    finally:
        if qmp is not None:
            qmp.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def _diagnostics(workdir: Path) -> str:
    parts = []
    for name in ("serial.log", "qemu.out"):
        path = workdir / name
        if path.exists():
            text = path.read_text(errors="replace")[-3000:]
            parts.append(f"--- {name} (tail) ---\n{text}")
    return "\n".join(parts)


def _wait_for_marker(log: Path, marker: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        if marker in (line.strip() for line in lines):
            return
        failed = [line for line in lines if line.startswith("aiovirt-guest: error")]
        assert not failed, f"the guest's /init failed: {failed}\n{_diagnostics(log.parent)}"
        assert proc.poll() is None, f"QEMU exited with {proc.returncode}\n{_diagnostics(log.parent)}"
        assert time.monotonic() < deadline, f"no {marker!r} after {timeout} s\n{_diagnostics(log.parent)}"
        time.sleep(0.1)


@pytest.mark.slow
def test_guest_powers_off_on_acpi_power_button(qemu_binary: str, guest: TinyGuest, short_dir: Path) -> None:
    log = short_dir / "serial.log"
    with running_qemu(
        qemu_binary,
        short_dir,
        *("-machine", "pc", "-accel", "tcg", "-m", "256"),
        *("-kernel", str(guest.kernel), "-initrd", str(guest.initrd), "-append", guest.cmdline),
        *("-chardev", f"file,id=c0,path={log}", "-serial", "chardev:c0"),
    ) as (proc, qmp):
        _wait_for_marker(log, guest.ready_marker, proc, READY_TIMEOUT)
        assert qmp.command("system_powerdown") == {}
        powerdown = qmp.wait_event(_is_event("POWERDOWN"), POWEROFF_TIMEOUT)
        assert powerdown is not None, _diagnostics(short_dir)
        shutdown = qmp.wait_event(_is_event("SHUTDOWN"), POWEROFF_TIMEOUT)
        assert shutdown is not None, f"no SHUTDOWN event: {qmp.events}\n{_diagnostics(short_dir)}"
        assert shutdown["data"]["guest"] is True, shutdown
        assert qmp.events.index(powerdown) < qmp.events.index(shutdown)
        assert proc.wait(timeout=POWEROFF_TIMEOUT) == 0, _diagnostics(short_dir)


def test_pc_without_os_ignores_acpi_power_button(qemu_binary: str, short_dir: Path) -> None:
    """No kernel, no disk: SeaBIOS idles, so a power-button press is noticed by nobody."""
    with running_qemu(qemu_binary, short_dir, "-machine", "pc", "-accel", "tcg", "-m", "32") as (proc, qmp):
        assert qmp.command("system_powerdown") == {}
        assert qmp.wait_event(_is_event("POWERDOWN"), QMP_TIMEOUT) is not None
        assert qmp.wait_event(_is_event("SHUTDOWN"), IGNORED_WAIT) is None, qmp.events
        assert proc.poll() is None
        assert qmp.command("query-status")["status"] == "running"


def test_second_call_reuses_the_cached_guest(guest: TinyGuest, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {path: path.stat() for path in (guest.kernel, guest.initrd)}

    def no_build(workdir: Path) -> dict[str, object]:
        raise AssertionError("the cached guest was rebuilt")

    monkeypatch.setattr(_guest, "_build", no_build)
    again = ensure_tiny_guest()
    assert again == guest
    for path, stat in before.items():
        after = path.stat()
        assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
            stat.st_ino,
            stat.st_mtime_ns,
            stat.st_size,
        )


def test_initrd_is_a_cpio_archive_that_gnu_cpio_reads(guest: TinyGuest) -> None:
    cpio = shutil.which("cpio")
    if cpio is None:
        pytest.skip("cpio not installed (scripts/setup.sh installs it)")
    listing = subprocess.run(
        [cpio, "-itv", "--quiet"],
        input=gzip.decompress(guest.initrd.read_bytes()),
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.decode()
    entries = {
        line.split()[-1] if "->" not in line else line.split()[-3]: line for line in listing.splitlines()
    }
    for name in ("init", "bin/busybox", "lib/modules/evdev.ko", "lib/modules/button.ko"):
        assert entries[name].startswith("-rw"), entries[name]
    assert entries["init"].startswith("-rwxr-xr-x")
    assert entries["bin/sh"].startswith("lrwxrwxrwx")
    assert entries["dev/console"].startswith("crw-------")


def _fake_build(calls: list[int]) -> Callable[[Path], dict[str, object]]:
    def build(workdir: Path) -> dict[str, object]:
        calls.append(1)
        time.sleep(0.3)  # long enough for the other builders to pile up on the lock
        (workdir / _guest.KERNEL_NAME).write_bytes(b"kernel")
        (workdir / _guest.INITRD_NAME).write_bytes(b"initrd")
        return {"fake": True}

    return build


def test_concurrent_builders_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(_guest, "_build", _fake_build(calls))
    results: list[TinyGuest] = []
    errors: list[BaseException] = []

    def builder() -> None:
        try:
            results.append(ensure_tiny_guest(tmp_path))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=builder) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert len(calls) == 1
    assert len(results) == 4
    assert len(set(results)) == 1
    assert results[0].kernel.read_bytes() == b"kernel"
    assert results[0].kernel.parent == tmp_path / f"tiny-guest-v{_guest.RECIPE_VERSION}"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"tiny-guest-v{_guest.RECIPE_VERSION}", f"tiny-guest-v{_guest.RECIPE_VERSION}.lock"]
    )


def test_failed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_build(workdir: Path) -> dict[str, object]:
        (workdir / _guest.KERNEL_NAME).write_bytes(b"half")
        raise TinyGuestBuildError("no network")

    monkeypatch.setattr(_guest, "_build", failing_build)
    with pytest.raises(TinyGuestBuildError, match="no network"):
        ensure_tiny_guest(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [f"tiny-guest-v{_guest.RECIPE_VERSION}.lock"]


def test_damaged_cache_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(_guest, "_build", _fake_build(calls))
    first = ensure_tiny_guest(tmp_path)
    first.initrd.unlink()
    second = ensure_tiny_guest(tmp_path)
    assert second == first
    assert len(calls) == 2
    assert second.initrd.read_bytes() == b"initrd"


def test_missing_apt_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(TinyGuestBuildError, match=r"scripts/setup\.sh"):
        ensure_tiny_guest(tmp_path / "cache")


def test_kernel_without_pvh_note_is_kept_as_bzimage() -> None:
    assert _guest._pvh_vmlinux(b"MZ" + bytes(4096)) is None
    assert not _guest._has_pvh_note(b"\x7fELF\x02\x01" + bytes(200))


def test_sparse_write_round_trips(tmp_path: Path) -> None:
    data = b"head" + bytes(3 * 4096) + b"middle" + bytes(5000)
    _guest._write_sparse(tmp_path / "f", data)
    assert (tmp_path / "f").read_bytes() == data


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AIOVIRT_CACHE_DIR", str(tmp_path / "explicit"))
    assert _guest.default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("AIOVIRT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _guest.default_cache_dir() == tmp_path / "xdg" / "aiovirt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _guest.default_cache_dir() == tmp_path / "home" / ".cache" / "aiovirt"
    assert os.fspath(_guest.default_cache_dir()).endswith(".cache/aiovirt")
