"""The byte stream to a libvirt daemon for each transport of a URI, as libvirt's own client opens it.

- ``+unix``: the socket named by ``?socket=``, else the one libvirt's client would pick
  (``remote_sockets.c``): ``/var/run/libvirt/libvirt-sock`` (``-ro`` for read-only), or
  ``virtqemud-sock`` when that modular daemon's socket exists (``?mode=auto``, the default;
  ``legacy``/``direct`` force one); a user's own daemon (``/session``, or ``test+unix`` as
  non-root) under ``$XDG_RUNTIME_DIR/libvirt``. aiovirt never spawns a daemon.
- ``+tcp``: plain TCP to port 16509 (libvirtd's default there is SASL, which aiovirt refuses with
  :class:`~aiovirt.rpc.UnsupportedAuthError`).
- ``+tls``: TLS to port 16514 with libvirt's client files: ``?pkipath=DIR`` (``DIR/cacert.pem``,
  ``clientcert.pem``, ``clientkey.pem``), else ``/etc/pki/CA/cacert.pem``,
  ``/etc/pki/libvirt/clientcert.pem`` and ``/etc/pki/libvirt/private/clientkey.pem`` (root) or
  ``~/.pki/libvirt/*.pem``; the server's certificate is checked against the URI's host unless
  ``?no_verify=1``; then libvirtd's one-byte verdict. ``?tls_priority`` (a GnuTLS string) is refused.
- ``+ssh``: the ``ssh`` program (or ``?command=``) with the argv libvirt 9.0 builds
  (``-p PORT -l USER -i KEYFILE -T -e none [-o BatchMode=yes] -- HOST 'sh -c ...'``); the remote
  command is libvirt's: ``virt-ssh-helper URI`` when the remote host has it, else
  ``nc -U SOCKET``, and always ``nc`` when ``?socket=`` or ``?netcat=`` is given (virt-ssh-helper
  cannot be told a socket). Unlike libvirt 9.0 every word of it is shell-quoted. aiovirt also maps
  the libssh transports' ``?known_hosts=FILE`` and ``?known_hosts_verify=normal|auto|ignore`` onto
  OpenSSH's ``UserKnownHostsFile`` and ``StrictHostKeyChecking`` (yes, accept-new, no).
"""

from __future__ import annotations

import os
import shlex
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from subprocess import PIPE
from typing import IO, Final

import anyio
import anyio.abc

from ..._errors import ConnectionLostError, InvalidURIError
from ..._uri import ParsedURI
from ...rpc import connect_tls_stream, connect_unix_socket, process_stream
from ...rpc._transport import Channel

__all__ = ["Transport", "open_transport", "ssh_argv", "tls_files", "unix_socket_path"]

TCP_PORT: Final = 16509
TLS_PORT: Final = 16514
_SYSTEM_RUN: Final = "/var/run/libvirt"
# Bounds the wait for ssh (or its remote command) to exit once the stream is closed.
_PROCESS_EXIT_WAIT: Final = 2.0
# The most of ssh's error output kept for an error message.
_STDERR_KEEP: Final = 4096


def _mode(uri: ParsedURI) -> str:
    mode = uri.param("mode", "auto")
    if mode not in ("auto", "legacy", "direct"):
        raise InvalidURIError(uri.uri, f"mode must be auto, legacy or direct, not {mode!r}")
    return mode or "auto"


def _user_daemon(uri: ParsedURI) -> bool:
    # libvirt's remoteGetURIDaemonInfo: the user's own daemon for /session, and for test+... as non-root.
    return (uri.name.endswith(":///session") or uri.driver == "test") and os.geteuid() != 0


def _runtime_dir() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "libvirt" if runtime else Path.home() / ".cache" / "libvirt"


def unix_socket_path(uri: ParsedURI, readonly: bool, *, exists: bool | None = None) -> str:
    """The daemon's socket for a ``+unix`` (or ``+ssh``) URI, as libvirt's client chooses it.

    ``exists`` is for tests (whether the modular daemon's socket exists); None looks.
    """
    given = uri.param("socket")
    if given is not None:
        if not given.startswith("/") or "\0" in given:
            raise InvalidURIError(uri.uri, f"socket must be an absolute path, not {given!r}")
        return given
    mode = _mode(uri)
    suffix = "sock-ro" if readonly and not _user_daemon(uri) else "sock"

    def path(prefix: str) -> str:
        if _user_daemon(uri):
            return str(_runtime_dir() / f"{prefix}-sock")
        return f"{_SYSTEM_RUN}/{prefix}-{suffix}"

    direct, legacy = path(f"virt{uri.driver}d"), path("libvirt")
    if uri.transport != "unix":
        if mode == "direct":
            raise InvalidURIError(uri.uri, f"mode=direct cannot be used with the {uri.transport} transport")
        return legacy
    if mode == "auto":
        direct_exists = os.path.exists(direct) if exists is None else exists
        mode = "direct" if direct_exists else "legacy"
    return direct if mode == "direct" else legacy


def _flag(uri: ParsedURI, key: str) -> bool:
    value = uri.param(key, "0") or "0"
    if value not in ("0", "1"):
        raise InvalidURIError(uri.uri, f"{key} must be 0 or 1, not {value!r}")
    return value == "1"


_KNOWN_HOSTS_VERIFY: Final = {"normal": "yes", "auto": "accept-new", "ignore": "no"}


def ssh_argv(uri: ParsedURI, readonly: bool) -> list[str]:
    """The ssh command line for a ``+ssh`` URI (libvirt 9.0's, with the remote command quoted)."""
    for key in ("command", "keyfile", "known_hosts", "netcat"):
        value = uri.param(key)
        if value is not None and (not value or "\0" in value):
            raise InvalidURIError(uri.uri, f"{key} must be a non-empty path")
    argv = [uri.param("command") or "ssh"]
    if uri.port is not None:
        argv += ["-p", str(uri.port)]
    if uri.user:
        argv += ["-l", uri.user]
    keyfile = uri.param("keyfile")
    if keyfile:
        argv += ["-i", keyfile]
    argv += ["-T", "-e", "none"]
    if _flag(uri, "no_tty"):
        argv += ["-o", "BatchMode=yes"]
    known_hosts = uri.param("known_hosts")
    if known_hosts:
        argv += ["-o", f"UserKnownHostsFile={known_hosts}"]
    verify = uri.param("known_hosts_verify")
    if verify is not None:
        if verify not in _KNOWN_HOSTS_VERIFY:
            raise InvalidURIError(
                uri.uri, f"known_hosts_verify must be normal, auto or ignore, not {verify!r}"
            )
        argv += ["-o", f"StrictHostKeyChecking={_KNOWN_HOSTS_VERIFY[verify]}"]
    argv += ["--", uri.host, remote_command(uri, readonly)]
    return argv


def remote_command(uri: ParsedURI, readonly: bool) -> str:
    """What runs on the remote host: ``sh -c '...'`` relaying the daemon's socket on stdin/stdout."""
    netcat = uri.param("netcat")
    nc = shlex.quote(netcat or "nc")
    sock = shlex.quote(unix_socket_path(uri, readonly))
    # libvirt's probe: netcat-openbsd needs -q0 to quit at EOF on stdin, others have no -q.
    nccmd = (
        f'if {nc} -q 2>&1 | grep "requires an argument" >/dev/null 2>&1; then ARG=-q0; else ARG=; fi; '
        f"{nc} $ARG -U {sock}"
    )
    if uri.param("socket") is not None or netcat is not None:
        inner = nccmd
    else:
        helper = shlex.join(["virt-ssh-helper", *(["-r"] if readonly else []), uri.name])
        inner = f"which virt-ssh-helper 1>/dev/null 2>&1; if test $? = 0; then {helper}; else {nccmd}; fi"
    return f"sh -c {shlex.quote(inner)}"


@dataclass(frozen=True)
class TLSFiles:
    ca: Path
    cert: Path
    key: Path


def tls_files(uri: ParsedURI) -> TLSFiles:
    """libvirt's client PKI files for a ``+tls`` URI."""
    pkipath = uri.param("pkipath")
    if pkipath is not None:
        base = Path(pkipath)
        return TLSFiles(base / "cacert.pem", base / "clientcert.pem", base / "clientkey.pem")
    if os.geteuid() != 0:
        user = Path.home() / ".pki" / "libvirt"
        if (user / "cacert.pem").exists():
            return TLSFiles(user / "cacert.pem", user / "clientcert.pem", user / "clientkey.pem")
    return TLSFiles(
        Path("/etc/pki/CA/cacert.pem"),
        Path("/etc/pki/libvirt/clientcert.pem"),
        Path("/etc/pki/libvirt/private/clientkey.pem"),
    )


def tls_context(uri: ParsedURI) -> ssl.SSLContext:
    if uri.param("tls_priority") is not None:
        raise InvalidURIError(uri.uri, "tls_priority is a GnuTLS priority string, which aiovirt cannot apply")
    files = tls_files(uri)
    no_verify = _flag(uri, "no_verify")
    try:
        if no_verify:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx = ssl.create_default_context(cafile=str(files.ca))
        if files.cert.exists() or files.key.exists():
            ctx.load_cert_chain(str(files.cert), str(files.key))
    except (OSError, ssl.SSLError) as exc:
        raise ConnectionLostError(f"cannot load the TLS files for {uri.uri}: {exc}") from exc
    return ctx


@dataclass
class Transport:
    """An open stream to a daemon, and (ssh) where the relay's error output goes."""

    stream: anyio.abc.ByteStream | Channel | socket.socket
    errors: IO[bytes] | None = None

    def explain(self) -> str:
        """What ssh said, for an error message ("" if nothing)."""
        if self.errors is None:
            return ""
        self.errors.seek(0)
        text = self.errors.read()[-_STDERR_KEEP:].decode(errors="replace").strip()
        return f" (ssh said: {text})" if text else ""


@asynccontextmanager
async def open_transport(uri: ParsedURI, readonly: bool, timeout: float) -> AsyncIterator[Transport]:
    """Connect to the daemon of ``uri`` within ``timeout`` (ssh: start the relay); the stream is
    then the RPC client's to close. Raises ConnectionLostError when nothing answers."""
    if uri.transport == "ssh":
        async with _ssh(uri, readonly) as transport:
            yield transport
        return
    try:
        with anyio.fail_after(timeout):
            if uri.transport == "unix":
                path = unix_socket_path(uri, readonly)
                try:
                    stream: anyio.abc.ByteStream | socket.socket = await connect_unix_socket(path)
                except OSError as exc:
                    raise ConnectionLostError(
                        f"cannot connect to libvirt socket {path!r}: {exc.strerror or exc}"
                    ) from exc
            else:
                port = uri.port or (TLS_PORT if uri.transport == "tls" else TCP_PORT)
                try:
                    if uri.transport == "tls":
                        stream = await connect_tls_stream(uri.host, port, tls_context(uri))
                    else:
                        stream = await anyio.connect_tcp(uri.host, port)
                except (OSError, ssl.SSLError) as exc:
                    raise ConnectionLostError(f"cannot connect to {uri.host}:{port}: {exc}") from exc
    except TimeoutError as exc:
        raise ConnectionLostError(f"cannot connect to the daemon of {uri.uri} within {timeout:g} s") from exc
    yield Transport(stream)


@asynccontextmanager
async def _ssh(uri: ParsedURI, readonly: bool) -> AsyncIterator[Transport]:
    argv = ssh_argv(uri, readonly)
    # ssh's own complaints (refused key, unknown host, no nc on the remote) go to a file, read only
    # when the handshake fails: no task needs to drain a pipe.
    with tempfile.TemporaryFile() as errors:
        try:
            process = await anyio.open_process(argv, stdin=PIPE, stdout=PIPE, stderr=errors)
        except OSError as exc:
            raise ConnectionLostError(f"cannot run {argv[0]!r}: {exc.strerror or exc}") from exc
        transport = Transport(process_stream(process), errors)
        try:
            yield transport
        finally:
            with anyio.CancelScope(shield=True):
                await _end_process(process)
                await process.aclose()


async def _end_process(process: anyio.abc.Process) -> None:
    """The stream is closed: let ssh go, bounded, then end it (it is ours: we started it)."""
    if process.stdin is not None:
        with suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await process.stdin.aclose()
    with anyio.move_on_after(_PROCESS_EXIT_WAIT):
        await process.wait()
        return
    with suppress(ProcessLookupError):
        process.terminate()
    with anyio.move_on_after(_PROCESS_EXIT_WAIT):
        await process.wait()
        return
    with suppress(ProcessLookupError):
        process.kill()
    await process.wait()
