"""A private libvirtd for a test: started by scripts/libvirtd.sh in a short temporary directory.

    with running_libvirtd() as daemon:
        async with RPCClient.open_unix(daemon.socket, "test:///default") as client: ...

The daemon is always stopped (with any guest it started) when the block ends. If it cannot be
started the test fails with the script's output: a daemon test never skips.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "libvirtd.sh"
# Installing the packages on a fresh machine takes most of this; a start alone takes well under 1 s.
_START_TIMEOUT = 600


@dataclass(frozen=True)
class Libvirtd:
    """One running daemon: its directory and its read-write unix socket."""

    directory: Path
    socket: Path

    def uri(self, name: str = "test:///default") -> str:
        """libvirt's URI for ``name`` through this daemon, e.g. ``test+unix:///default?socket=...``."""
        scheme, rest = name.split("://", 1)
        return f"{scheme}+unix://{rest}?socket={self.socket}"

    @property
    def pid(self) -> int:
        return int((self.directory / "libvirtd.pid").read_text())

    def kill(self) -> None:
        """SIGKILL the daemon (the way a crashed host's daemon goes: no goodbye on any socket)."""
        os.kill(self.pid, signal.SIGKILL)

    def log(self) -> str:
        return (self.directory / "libvirtd.log").read_text(errors="replace")


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=_START_TIMEOUT,
        check=False,
        env={**os.environ, **(env or {})},
    )


@contextmanager
def running_libvirtd(keepalive: tuple[int, int] | None = None) -> Iterator[Libvirtd]:
    """Start a daemon; ``keepalive`` is its (keepalive_interval, keepalive_count), libvirt's
    (5, 5) if None."""
    # Should this process die before it can stop the daemon, the daemon goes by itself once idle.
    env = {"LIBVIRTD_IDLE_TIMEOUT": "120"}
    if keepalive is not None:
        env = {
            "LIBVIRTD_KEEPALIVE_INTERVAL": str(keepalive[0]),
            "LIBVIRTD_KEEPALIVE_COUNT": str(keepalive[1]),
        }
    # /tmp, not pytest's tmp_path: the socket's path must stay under 108 bytes.
    directory = Path(tempfile.mkdtemp(prefix="lvd", dir="/tmp"))
    try:
        started = _run("start", str(directory), env=env)
        if started.returncode != 0:
            raise RuntimeError(
                f"scripts/libvirtd.sh start failed (exit {started.returncode}):\n"
                f"{started.stdout}{started.stderr}"
            )
        daemon = Libvirtd(directory, Path(started.stdout.strip().splitlines()[-1]))
        yield daemon
    finally:
        stopped = _run("stop", str(directory))
        shutil.rmtree(directory, ignore_errors=True)
        if stopped.returncode != 0:
            raise RuntimeError(f"scripts/libvirtd.sh stop failed:\n{stopped.stdout}{stopped.stderr}")
