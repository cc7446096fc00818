"""The JSON that ``--json`` prints: one documented, stable shape per verb.

Stable means: a key listed here keeps its name, its type and its meaning; new keys may be added.
States, reasons, event kinds and stop stages are libvirt's lower-case names (``"running"``,
``"destroyed"``, ``"sigterm"``); times are seconds (floats); a missing value is ``null``.

Shapes (``DOMAIN`` and ``ERROR`` are defined at the end)::

    list          {"uri": str, "readonly": bool, "domains": [DOMAIN, ...],   (sorted by name)
                   "problems": [{"kind": str, "path": str, "message": str}, ...]}
                  (problems: records that could not be used, unreachable monitors, failed
                  autostarts; also printed as warnings on stderr)
    dominfo       DOMAIN + {"cpu_time": float, "rss_bytes": int, "uptime": float,
                            "machine": str, "accel": str, "reachable": bool,
                            "shutdown_reason": str|null, "log_path": str|null,
                            "console_path": str|null}
    domstate      {"name": str, "state": str, "reason": str}
    define        {"action": "define", "name": str, "uuid": str, "file": str,
                   "updated": bool, "warnings": [str, ...]}
    undefine, start, suspend, resume, reset
                  {"action": VERB, "name": str, "state": str, "reason": str, "pid": int|null}
    shutdown      the same + {"waited": bool, "stopped": bool}
    destroy       the same + {"signal": "SIGTERM"|"SIGKILL", "logs_removed": bool}
    autostart     the same + {"autostart": bool}
    dumpconfig    the DomainConfig itself (as ``dumpconfig --format json``: define reads it back)
    dumpxml       {"name": str, "xml": str}
    console-log   {"name": str, "path": str, "text": str}; with --follow one JSON line per chunk
                  read: {"name": str, "text": str}
    event         one JSON line per event:
                  {"timestamp": float, "name": str, "uuid": str, "kind": str, "detail": str}
    stop-all      one JSON line per domain as it finishes (STOP_RESULT), in finishing order;
                  after Ctrl-C the unfinished ones follow, with "interrupted": true

    DOMAIN        {"name": str, "uuid": str, "state": str, "reason": str, "pid": int|null,
                   "persistent": bool, "autostart": bool, "memory_mib": int, "vcpus": int}
    STOP_RESULT   {"name": str, "stopped": bool, "stage": "acpi"|"sigterm"|"sigkill"|"none",
                   "reason": str|null, "elapsed": float, "by_other": bool,
                   "interrupted": bool, "error": ERROR|null}
                  (stage: the last request sent before the exit; reason: QEMU's shutdown
                  reason such as "guest-shutdown" or "host-signal")
    ERROR         {"kind": str, "message": str} + what the error carries, when it does:
                  "domain": str, "pid": int|null, "path": str, "fields": [[str, str], ...]

On failure every verb prints ``{"error": ERROR}`` on stdout (and the one-line message on stderr),
so that stdout always holds JSON; ``kind`` is the exception's class name in aiovirt's public API
(``DomainNotFoundError``, ``StateDirLockedError``, ``ConfigError``...), ``TimeoutError`` (a
``--timeout`` ran out), ``OSError`` (a file could not be read) or the command's own ``NoConsole``.

Pure: it only reads public attributes of what it is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import aiovirt

__all__ = [
    "CliError",
    "action_shape",
    "domain_shape",
    "error_shape",
    "event_shape",
    "info_shape",
    "list_shape",
    "state_shape",
    "stop_result_shape",
]


class CliError(Exception):
    """A failure the command itself finds (no serial console, say); ``kind`` names it in JSON."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _enum(value: Any) -> str:
    return str(value.value) if hasattr(value, "value") else str(value)


def domain_shape(dom: aiovirt.Domain) -> dict[str, Any]:
    cfg = dom.config
    return {
        "name": dom.name,
        "uuid": str(dom.uuid),
        "state": _enum(dom.state),
        "reason": _enum(dom.reason),
        "pid": dom.pid,
        "persistent": dom.persistent,
        "autostart": dom.autostart,
        "memory_mib": cfg.memory_mib,
        "vcpus": cfg.vcpus,
    }


def list_shape(
    uri: str, readonly: bool, domains: list[aiovirt.Domain], problems: Sequence[aiovirt.StateProblem] = ()
) -> dict[str, Any]:
    return {
        "uri": uri,
        "readonly": readonly,
        "domains": [domain_shape(d) for d in domains],
        "problems": [{"kind": p.kind, "path": str(p.path), "message": p.message} for p in problems],
    }


def info_shape(dom: aiovirt.Domain, info: aiovirt.DomainInfo) -> dict[str, Any]:
    shape = domain_shape(dom)
    shape.update(
        state=_enum(info.state),
        reason=_enum(info.reason),
        pid=info.pid,
        cpu_time=round(info.cpu_time, 3),
        rss_bytes=info.rss_bytes,
        uptime=round(info.uptime, 3),
        machine=dom.config.machine,
        accel=dom.config.accel,
        reachable=dom.reachable,
        shutdown_reason=dom.shutdown_reason,
        log_path=None if dom.log_path is None else str(dom.log_path),
        console_path=None if dom.console_path is None else str(dom.console_path),
    )
    return shape


def state_shape(dom: aiovirt.Domain) -> dict[str, Any]:
    return {"name": dom.name, "state": _enum(dom.state), "reason": _enum(dom.reason)}


def action_shape(action: str, dom: aiovirt.Domain, **extra: Any) -> dict[str, Any]:
    return {"action": action, **state_shape(dom), "pid": dom.pid, **extra}


def event_shape(event: aiovirt.DomainEvent) -> dict[str, Any]:
    return {
        "timestamp": event.timestamp,
        "name": event.name,
        "uuid": str(event.uuid),
        "kind": _enum(event.kind),
        "detail": _enum(event.detail),
    }


def error_shape(exc: BaseException) -> dict[str, Any]:
    kind = exc.kind if isinstance(exc, CliError) else type(exc).__name__
    shape: dict[str, Any] = {"kind": kind, "message": str(exc)}
    for attr, key in (("name", "domain"), ("pid", "pid"), ("path", "path")):
        if hasattr(exc, attr):
            value = getattr(exc, attr)
            shape[key] = value if value is None or isinstance(value, int) else str(value)
    errors = getattr(exc, "errors", None)
    if isinstance(errors, tuple) and errors:
        shape["fields"] = [[str(loc), str(message)] for loc, message in errors]
    return shape


def stop_result_shape(result: aiovirt.StopResult, *, interrupted: bool = False) -> dict[str, Any]:
    return {
        "name": result.name,
        "stopped": result.stopped,
        "stage": _enum(result.stage),
        "reason": result.reason,
        "elapsed": round(result.elapsed, 3),
        "by_other": result.by_other,
        "interrupted": interrupted,
        "error": None if result.error is None else error_shape(result.error),
    }
