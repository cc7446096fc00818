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
from urllib.parse import unquote, urlsplit

from ._errors import InvalidURIError

__all__ = ["ParsedURI", "default_uri", "parse_uri"]


@dataclass(frozen=True)
class ParsedURI:
    """A resolved URI. For ``qemu``: ``root`` (definitions, logs, lock) and ``run`` (sockets)."""

    uri: str
    scheme: str  # "qemu" or "test"
    driver: str  # qemu: "embed", "session", "system"; test: "default", "empty"
    root: Path = Path()
    run: Path = Path()


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


def parse_uri(uri: str | None = None) -> ParsedURI:
    """Resolve a connection URI. Raises :class:`InvalidURIError`."""
    text = default_uri() if uri is None else uri
    parts = urlsplit(text)
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
