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

from .conftest import qemu_pids

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "libvirtd.sh"
# Installing the packages on a fresh machine takes most of this; a start alone takes well under 1 s.
_START_TIMEOUT = 600


@dataclass(frozen=True)
class Libvirtd:
    """One running daemon: its directory and its read-write unix socket."""

    directory: Path
    socket: Path
    pki: TestPKI | None = None

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
def running_libvirtd(
    keepalive: tuple[int, int] | None = None, tls_port: int | None = None
) -> Iterator[Libvirtd]:
    """Start a daemon; ``keepalive`` is its (keepalive_interval, keepalive_count), libvirt's
    (5, 5) if None. With ``tls_port`` it also serves TLS on 127.0.0.1 with a throwaway PKI
    (``daemon.pki``)."""
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
        pki = None
        if tls_port is not None:
            pki = make_test_pki(directory / "pki")
            env["LIBVIRTD_TLS_PORT"] = str(tls_port)
        started = _run("start", str(directory), env=env)
        if started.returncode != 0:
            raise RuntimeError(
                f"scripts/libvirtd.sh start failed (exit {started.returncode}):\n"
                f"{started.stdout}{started.stderr}"
            )
        daemon = Libvirtd(directory, Path(started.stdout.strip().splitlines()[-1]), pki)
        yield daemon
    finally:
        stopped = _run("stop", str(directory))
        shutil.rmtree(directory, ignore_errors=True)
        if stopped.returncode != 0:
            raise RuntimeError(f"scripts/libvirtd.sh stop failed:\n{stopped.stdout}{stopped.stderr}")


@dataclass(frozen=True)
class TestPKI:
    """A throwaway CA with a server certificate (localhost, 127.0.0.1) and a client certificate,
    plus a client certificate from another CA that the daemon must refuse. PEM files in ``directory``."""

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "cacert.pem"

    def client(self, trusted: bool = True) -> tuple[Path, Path]:
        """(certificate, key) of the trusted client, or of the one signed by the other CA."""
        name = "client" if trusted else "rogue"
        return self.directory / f"{name}cert.pem", self.directory / f"{name}key.pem"


_USAGES = {
    "server": (
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
    ),
    "client": (
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=clientAuth\n"
    ),
}


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_test_pki(directory: Path) -> TestPKI:
    """Make the CA and certificates with openssl(1), as libvirt wants them (key usages checked).
    The names are those libvirtd.sh expects in DIR/pki: cacert.pem, servercert.pem, serverkey.pem."""
    directory.mkdir(parents=True, exist_ok=True)
    d = str(directory)
    for kind, text in _USAGES.items():
        (directory / f"{kind}.ext").write_text(text)

    def ca(name: str, subject: str) -> None:
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", subject,
            "-keyout", f"{d}/{name}key.pem", "-out", f"{d}/{name}cert.pem",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip

    def leaf(name: str, subject: str, kind: str, signer: str, serial: int) -> None:
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject,
                 "-keyout", f"{d}/{name}key.pem", "-out", f"{d}/{name}.csr")  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{d}/{name}.csr", "-days", "2", "-set_serial", str(serial),
            "-CA", f"{d}/{signer}cert.pem", "-CAkey", f"{d}/{signer}key.pem",
            "-extfile", f"{d}/{kind}.ext", "-out", f"{d}/{name}cert.pem",
        )  # fmt: skip

    ca("ca", "/CN=aiovirt test CA")
    ca("otherca", "/CN=another CA")
    leaf("server", "/CN=localhost", "server", "ca", 2)
    leaf("client", "/CN=aiovirt-client", "client", "ca", 3)
    leaf("rogue", "/CN=rogue-client", "client", "otherca", 4)
    return TestPKI(directory)


def qemu_pid(name: str) -> int:
    """The QEMU a daemon runs for domain ``name`` (libvirt's ``-name guest=NAME,debug-threads=on``)."""
    pids = qemu_pids(f"\0guest={name},debug-threads=on\0")
    if len(pids) != 1:
        raise LookupError(f"{name}: QEMU pids {sorted(pids)}")
    return pids.pop()
