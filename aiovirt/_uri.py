"""Connection URIs, as libvirt spells them: which driver, and where it keeps its state.

- ``qemu:///embed?root=DIR``: everything under DIR (``RUN = DIR/run``);
- ``qemu:///session``: ``$XDG_STATE_HOME/aiovirt``, sockets under ``$XDG_RUNTIME_DIR/aiovirt``;
- ``qemu:///system``: ``/var/lib/aiovirt`` and ``/run/aiovirt`` (root only);
- ``test:///default``: the in-memory test host shared by the whole process (one running domain,
  ``test``, as libvirt's); ``test:///empty``: a fresh, empty in-memory host per connection.

The query is percent-decoded only, as libvirt's URIs are: a ``+`` is a plus, not a space.
Pure (stdlib only).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import SplitResult, unquote, urlsplit

from ._errors import InvalidURIError

__all__ = ["ParsedURI", "default_uri", "parse_uri"]


@dataclass(frozen=True)
class ParsedURI:
    """A resolved URI. For ``qemu``: ``root`` (definitions, logs, lock) and ``run`` (sockets).

    For a daemon (``scheme == "remote"``): ``transport`` (unix, tcp, tls, ssh), ``host``,
    ``port``, ``user``, ``params`` (libvirt's query parameters) and ``name``, the URI the daemon is
    asked to open (``qemu:///system``: the transport and the client-side parameters removed).
    """

    uri: str
    scheme: str  # "qemu", "test" or "remote"
    driver: str  # qemu: "embed", "session", "system"; test: "default", "empty"; remote: "qemu", "test"
    root: Path = Path()
    run: Path = Path()
    transport: str = ""
    host: str = ""
    port: int | None = None
    user: str = ""
    params: tuple[tuple[str, str], ...] = ()
    name: str = ""

    def param(self, key: str, default: str | None = None) -> str | None:
        return dict(self.params).get(key, default)


#: libvirt's client-side URI parameters, per transport (they are not sent to the daemon).
_REMOTE_PARAMS = {
    "unix": {"socket", "mode"},
    "tcp": {"no_verify"},
    "tls": {"no_verify", "pkipath", "tls_priority"},
    "ssh": {"socket", "keyfile", "no_tty", "known_hosts", "known_hosts_verify", "command", "netcat", "mode"},
}
_REMOTE_DRIVERS = {"qemu": ("/system", "/session"), "test": ("/default",)}


def default_uri() -> str:
    """``$AIOVIRT_DEFAULT_URI``, else ``qemu:///system`` for root and ``qemu:///session`` otherwise."""
    env = os.environ.get("AIOVIRT_DEFAULT_URI")
    if env:
        return env
    return "qemu:///system" if os.geteuid() == 0 else "qemu:///session"


def _query(text: str, raw: str) -> dict[str, list[str]]:
    query: dict[str, list[str]] = {}
    if not raw:
        return query
    for item in raw.split("&"):
        key, sep, value = item.partition("=")
        if not key or not sep:
            raise InvalidURIError(text, f"malformed query: {item!r} is not NAME=VALUE")
        query.setdefault(unquote(key, errors="strict"), []).append(unquote(value, errors="strict"))
    return query


def _split(text: str) -> SplitResult:
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - urllib checks the port (and a bracketed host) only when asked
    except ValueError as exc:
        raise InvalidURIError(text, f"malformed: {exc}") from exc
    return parts


def parse_uri(uri: str | None = None) -> ParsedURI:
    """Resolve a connection URI. Raises :class:`InvalidURIError`."""
    text = default_uri() if uri is None else uri
    parts = _split(text)
    if "+" in parts.scheme:
        return _parse_remote(text)
    if parts.scheme not in ("qemu", "test"):
        raise InvalidURIError(text, f"unknown driver {parts.scheme or '(none)'!r}; expected 'qemu' or 'test'")
    if parts.netloc:
        raise InvalidURIError(text, f"remote hosts are not supported; use {parts.scheme}:///...")
    if parts.fragment or text.endswith("#"):
        raise InvalidURIError(text, "a fragment (#...) means nothing here")
    try:
        query = _query(text, parts.query)
    except UnicodeDecodeError as exc:
        raise InvalidURIError(text, f"malformed query: {exc}") from exc
    path = parts.path
    allowed: set[str] = set()
    if parts.scheme == "test":
        if path not in ("/default", "/empty"):
            raise InvalidURIError(text, f"unknown path {path!r}; expected test:///default or test:///empty")
        parsed = ParsedURI(text, "test", path[1:])
    elif path == "/embed":
        allowed = {"root"}
        roots = query.get("root", [])
        if len(roots) != 1 or not roots[0]:
            raise InvalidURIError(text, "qemu:///embed needs exactly one root=DIR")
        if "\0" in roots[0]:
            raise InvalidURIError(text, "root contains a NUL byte")
        root = Path(roots[0])
        if not root.is_absolute():
            raise InvalidURIError(text, f"root must be an absolute path, not {roots[0]!r}")
        parsed = ParsedURI(text, "qemu", "embed", root, root / "run")
    elif path == "/session":
        home = Path.home()
        state = Path(os.environ.get("XDG_STATE_HOME") or home / ".local" / "state") / "aiovirt"
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        parsed = ParsedURI(
            text, "qemu", "session", state, Path(runtime) / "aiovirt" if runtime else state / "run"
        )
    elif path == "/system":
        parsed = ParsedURI(text, "qemu", "system", Path("/var/lib/aiovirt"), Path("/run/aiovirt"))
    else:
        raise InvalidURIError(text, f"unknown path {path!r}; expected /session, /system or /embed?root=DIR")
    unknown = set(query) - allowed
    if unknown:
        raise InvalidURIError(text, f"unknown parameter(s): {', '.join(sorted(unknown))}")
    return parsed


def _parse_remote(text: str) -> ParsedURI:
    parts = _split(text)
    driver, _, transport = parts.scheme.partition("+")
    if driver not in _REMOTE_DRIVERS:
        raise InvalidURIError(text, f"unknown driver {driver!r} for a daemon; expected 'qemu' or 'test'")
    if transport not in _REMOTE_PARAMS:
        raise InvalidURIError(text, f"unknown transport {transport!r}; expected unix, tcp, tls or ssh")
    if parts.fragment or text.endswith("#"):
        raise InvalidURIError(text, "a fragment (#...) means nothing here")
    if parts.path not in _REMOTE_DRIVERS[driver]:
        expected = " or ".join(f"{driver}+{transport}://...{p}" for p in _REMOTE_DRIVERS[driver])
        raise InvalidURIError(text, f"unknown path {parts.path!r}; expected {expected}")
    try:
        query = _query(text, parts.query)
        port = parts.port
    except UnicodeDecodeError as exc:
        raise InvalidURIError(text, f"malformed query: {exc}") from exc
    except ValueError as exc:
        raise InvalidURIError(text, f"bad port: {exc}") from exc
    host = parts.hostname or ""
    if transport == "unix" and (host or port):
        raise InvalidURIError(text, "a unix socket URI names no host: use qemu+unix:///system")
    if transport in ("tcp", "tls", "ssh") and not host:
        raise InvalidURIError(text, f"{transport} needs a host: {driver}+{transport}://HOST{parts.path}")
    unknown = set(query) - _REMOTE_PARAMS[transport]
    if unknown:
        raise InvalidURIError(text, f"unknown parameter(s) for {transport}: {', '.join(sorted(unknown))}")
    for key, values in query.items():
        if len(values) != 1:
            raise InvalidURIError(text, f"parameter {key!r} given {len(values)} times")
    params = tuple((k, v[0]) for k, v in sorted(query.items()))
    return ParsedURI(
        text,
        "remote",
        driver,
        transport=transport,
        host=host,
        port=port,
        user=unquote(parts.username or ""),
        params=params,
        name=f"{driver}://{parts.path}",
    )
