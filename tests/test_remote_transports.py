"""The remote driver over libvirt's network transports, for real: ``+tls`` to a private libvirtd with a
throwaway CA (tests/_libvirtd.py), and ``+ssh`` through a private sshd on 127.0.0.1 (Debian's
openssh-server; a throwaway host key and client key, its own config and port, started and stopped
here) whose remote side runs ``nc -U SOCKET`` (netcat-openbsd), as libvirt's client has it do when
the URI names a socket. Both anyio backends.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

import aiovirt
from aiovirt import DomainState as S

from ._libvirtd import Libvirtd, running_libvirtd
from .conftest import none_config

pytestmark = pytest.mark.anyio
BOUND = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def tls_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def daemon(tls_port: int) -> Iterator[Libvirtd]:
    with running_libvirtd(tls_port=tls_port) as d:
        yield d


def pc(name: str) -> aiovirt.DomainConfig:
    return aiovirt.DomainConfig(name=name, machine="pc", accel="tcg", memory_mib=32)


# -- TLS ------------------------------------------------------------------------------------------


def pkipath(daemon: Libvirtd, tmp_path: Path, *, ca: str = "ca", client: str = "client") -> Path:
    """A libvirt pkipath directory (cacert.pem, clientcert.pem, clientkey.pem) from the test PKI."""
    assert daemon.pki is not None
    src, dst = daemon.pki.directory, tmp_path / f"pki-{ca}-{client}"
    dst.mkdir()
    shutil.copy(src / f"{ca}cert.pem", dst / "cacert.pem")
    shutil.copy(src / f"{client}cert.pem", dst / "clientcert.pem")
    shutil.copy(src / f"{client}key.pem", dst / "clientkey.pem")
    return dst


async def test_tls(daemon: Libvirtd, tls_port: int, tmp_path: Path) -> None:
    pki = pkipath(daemon, tmp_path)
    async with aiovirt.connect(f"test+tls://localhost:{tls_port}/default?pkipath={pki}") as conn:
        assert [d.name for d in await conn.list_domains()] == ["test"]
        dom = await conn.create(none_config("over-tls"))
        await dom.destroy()
    # A real QEMU guest, as far away as TLS puts it.
    async with aiovirt.connect(f"qemu+tls://127.0.0.1:{tls_port}/system?pkipath={pki}") as conn:
        dom = await conn.create(pc("rt-tls"))
        assert (await dom.qmp("query-status"))["running"] is True
        with anyio.fail_after(BOUND):
            await dom.destroy()
        assert dom.state == S.SHUTOFF


async def test_tls_refusals(daemon: Libvirtd, tls_port: int, tmp_path: Path) -> None:
    # A client certificate from another CA: the daemon refuses it (no verdict byte).
    rogue = pkipath(daemon, tmp_path, client="rogue")
    with anyio.fail_after(BOUND), pytest.raises(aiovirt.ConnectionLostError, match="refused this client"):
        async with aiovirt.connect(f"test+tls://localhost:{tls_port}/default?pkipath={rogue}"):
            pass
    # A server certificate we cannot verify (the wrong CA), or not for that name.
    wrong_ca = pkipath(daemon, tmp_path, ca="otherca")
    with (
        anyio.fail_after(BOUND),
        pytest.raises(aiovirt.ConnectionLostError, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        async with aiovirt.connect(f"test+tls://localhost:{tls_port}/default?pkipath={wrong_ca}"):
            pass
    # no_verify=1: libvirt's "do not check the server's certificate"; the daemon still checks ours.
    async with aiovirt.connect(
        f"test+tls://localhost:{tls_port}/default?pkipath={wrong_ca}&no_verify=1"
    ) as conn:
        assert [d.name for d in await conn.list_domains()] == ["test"]
    with pytest.raises(aiovirt.InvalidURIError, match="GnuTLS"):
        async with aiovirt.connect(f"test+tls://localhost:{tls_port}/default?tls_priority=NORMAL"):
            pass
    missing = tmp_path / "nothing"
    with pytest.raises(aiovirt.ConnectionLostError, match="TLS files"):
        async with aiovirt.connect(f"test+tls://localhost:{tls_port}/default?pkipath={missing}"):
            pass
    # Plain TCP to the TLS port: the daemon expects a TLS handshake, sees garbage, and closes.
    with anyio.fail_after(BOUND), pytest.raises(aiovirt.ConnectionLostError):
        async with aiovirt.connect(f"test+tcp://127.0.0.1:{tls_port}/default"):
            pass


# -- ssh ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SSHD:
    port: int
    directory: Path

    def uri(self, daemon: Libvirtd, name: str = "test:///default", **params: str) -> str:
        scheme, path = name.split(":///", 1)
        query = {
            "socket": str(daemon.socket),
            "keyfile": str(self.directory / "id"),
            "known_hosts": str(self.directory / "known_hosts"),
            "known_hosts_verify": "normal",
            "no_tty": "1",
            **params,
        }
        return f"{scheme}+ssh://root@127.0.0.1:{self.port}/{path}?" + "&".join(
            f"{k}={v}" for k, v in query.items()
        )


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, timeout=60)
    return (path.parent / f"{path.name}.pub").read_text().strip()


@pytest.fixture(scope="module")
def sshd() -> Iterator[SSHD]:
    binary = Path("/usr/sbin/sshd")
    assert binary.exists(), "the ssh tests need Debian's openssh-server (and netcat-openbsd for nc -U)"
    assert shutil.which("nc"), "the remote side of libvirt's ssh transport needs nc (netcat-openbsd)"
    directory = Path(tempfile.mkdtemp(prefix="sshd", dir="/tmp"))
    os.chmod(directory, 0o700)
    port = free_port()
    host_pub = _keygen(directory / "host_key")
    (directory / "authorized_keys").write_text(_keygen(directory / "id") + "\n")
    (directory / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub}\n")
    (directory / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {directory}/host_key\n"
        f"AuthorizedKeysFile {directory}/authorized_keys\nPidFile {directory}/sshd.pid\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nStrictModes no\nAllowTcpForwarding no\nX11Forwarding no\nPrintMotd no\n"
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    log = open(directory / "sshd.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(binary), "-D", "-e", "-f", str(directory / "sshd_config")], stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (directory / "sshd.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "sshd did not listen within 30 s"
                time.sleep(0.05)
        yield SSHD(port, directory)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
        shutil.rmtree(directory, ignore_errors=True)


async def test_ssh(daemon: Libvirtd, sshd: SSHD) -> None:
    async with aiovirt.connect(sshd.uri(daemon)) as conn:
        assert [d.name for d in await conn.list_domains()] == ["test"]
        async with conn.run(none_config("over-ssh")) as dom:
            await dom.suspend()
            assert dom.state == S.PAUSED
    async with aiovirt.connect(sshd.uri(daemon, "qemu:///system")) as conn:
        dom = await conn.create(pc("rt-ssh"))
        assert (await dom.qmp("query-status"))["running"] is True
        with anyio.fail_after(BOUND):
            await dom.destroy()
        assert dom.state == S.SHUTOFF


async def test_ssh_refusals_say_what_ssh_said(daemon: Libvirtd, sshd: SSHD, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    _keygen(stranger)
    with (
        anyio.fail_after(BOUND),
        pytest.raises(aiovirt.ConnectionLostError, match=r"ssh said: .*Permission denied"),
    ):
        async with aiovirt.connect(sshd.uri(daemon, keyfile=str(stranger))):
            pass
    (tmp_path / "empty_known_hosts").write_text("")
    with (
        anyio.fail_after(BOUND),
        pytest.raises(aiovirt.ConnectionLostError, match="Host key verification failed"),
    ):
        async with aiovirt.connect(sshd.uri(daemon, known_hosts=str(tmp_path / "empty_known_hosts"))):
            pass
    # The remote side cannot reach the socket: nc says so.
    with (
        anyio.fail_after(BOUND),
        pytest.raises(aiovirt.ConnectionLostError, match=r"ssh said: .*No such file"),
    ):
        async with aiovirt.connect(sshd.uri(daemon, socket=f"{daemon.directory}/no-such-sock")):
            pass
    with anyio.fail_after(BOUND), pytest.raises(aiovirt.ConnectionLostError, match="cannot run"):
        async with aiovirt.connect(sshd.uri(daemon, command=str(tmp_path / "no-ssh-here"))):
            pass
