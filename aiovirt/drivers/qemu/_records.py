"""The state directory's record formats, in one place: encode, decode, and the format number.

Two kinds of record, both JSON objects carrying ``"format": 1``::

    domains/NAME.json   {"format": 1, "autostart": false, "config": {...}}
    RUN/NAME.json       {"format": 1, "name", "uuid", "phase": "starting"|"running",
                         "pid", "start_time", "transient", "config": {...}}

Decoding is strict (the file may have been edited, truncated or planted): anything unexpected is
a ``ValueError`` or :class:`~aiovirt.ConfigError` naming the problem, and the caller sets the
file aside. Pure: bytes in, typed records out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ...config import DomainConfig
from ._process import ProcessIdentity

__all__ = [
    "RECORD_FORMAT",
    "Definition",
    "RuntimeRecord",
    "decode_definition",
    "decode_runtime",
    "encode_definition",
    "encode_runtime",
]

RECORD_FORMAT = 1

Phase = Literal["starting", "running"]


@dataclass(frozen=True)
class Definition:
    config: DomainConfig
    autostart: bool


@dataclass(frozen=True)
class RuntimeRecord:
    """What a controller wrote about a QEMU it started. ``identity`` is None until the pid was
    recorded (a crash right after the spawn: the QEMU is then found by its ``-uuid``)."""

    config: DomainConfig
    phase: str
    identity: ProcessIdentity | None
    transient: bool


def _encode(record: dict[str, Any]) -> bytes:
    # One line: with ``indent`` json falls back to its pure-Python encoder, a sixth of the
    # controller's CPU per domain started (two runtime records each).
    return json.dumps({"format": RECORD_FORMAT, **record}, sort_keys=True).encode() + b"\n"


def encode_definition(config: DomainConfig, *, autostart: bool) -> bytes:
    return _encode({"autostart": autostart, "config": config.model_dump(mode="json")})


def encode_runtime(
    config: DomainConfig, *, phase: Phase, identity: ProcessIdentity | None, transient: bool
) -> bytes:
    return _encode(
        {
            "name": config.name,
            "uuid": str(config.uuid),
            "phase": phase,
            "pid": identity.pid if identity else None,
            "start_time": identity.start_time if identity else None,
            "transient": transient,
            "config": config.model_dump(mode="json"),
        }
    )


def _decode(raw: bytes, path: Path) -> tuple[dict[str, Any], DomainConfig]:
    try:
        data = json.loads(raw)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    version = data.get("format")
    if type(version) is not int or version != RECORD_FORMAT:
        raise ValueError(f"unknown record format {version!r} (this version reads {RECORD_FORMAT})")
    config = data.get("config")
    if not isinstance(config, dict) or f"{config.get('name')}.json" != path.name:
        raise ValueError("its config does not name this file")
    if not config.get("uuid"):
        raise ValueError("its config has no UUID")
    return data, DomainConfig.parse(config)


def decode_definition(raw: bytes, path: Path) -> Definition:
    """Raises ValueError or ConfigError for a record that cannot be used."""
    data, config = _decode(raw, path)
    return Definition(config, data.get("autostart") is True)


def decode_runtime(raw: bytes, path: Path) -> RuntimeRecord:
    """Raises ValueError or ConfigError for a record that cannot be used."""
    data, config = _decode(raw, path)
    pid, start_time = data.get("pid"), data.get("start_time")
    identity = (
        ProcessIdentity(pid, start_time) if type(pid) is int and type(start_time) is int and pid > 0 else None
    )
    return RuntimeRecord(config, str(data.get("phase")), identity, data.get("transient") is True)
