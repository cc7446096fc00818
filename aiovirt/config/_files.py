"""Config files: a DomainConfig as JSON, TOML or a libvirt domain XML, in and out.

:func:`load_config` picks the format from the file's suffix (``.json``, ``.toml``, ``.xml``),
else from its first character (``<`` XML, ``{`` JSON, anything else TOML). Every problem is a
:class:`ConfigError` whose message starts with the file's name and names the field
(``vm.toml: memory_mib: Input should be greater than or equal to 1 (got 0)``).

:func:`dump_config` writes JSON (``model_dump(mode="json")``, indented), TOML (a small writer
for this flat model: scalars first, then ``[[disks]]``, ``[[nics]]`` and ``[[nics.forwards]]``;
TOML has no null, so unset optional fields are left out) or libvirt XML. Each reads back with
:func:`load_config` to an equal config.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import Any, Literal

from .._errors import ConfigError
from ._models import DomainConfig
from ._xml import to_libvirt_xml
from ._xml_import import ImportedConfig, from_libvirt_xml
from ._xml_tree import MAX_XML_BYTES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["ConfigFormat", "dump_config", "load_config", "parse_config"]

ConfigFormat = Literal["json", "toml", "xml"]

_SUFFIXES: dict[str, ConfigFormat] = {".json": "json", ".toml": "toml", ".xml": "xml"}


def _fail(source: str, message: str, errors: list[tuple[str, str]] | None = None) -> ConfigError:
    return ConfigError(f"{source}: {message}", errors if errors is not None else [("", message)])


def _sniff(data: bytes) -> ConfigFormat:
    head = data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if head == b"<":
        return "xml"
    if head == b"{":
        return "json"
    return "toml"


def load_config(path: str | os.PathLike[str], *, format: ConfigFormat | None = None) -> ImportedConfig:
    """Read a DomainConfig from the file at ``path`` (JSON, TOML or libvirt domain XML).

    ``format`` overrides the choice by suffix and content. Returns the config and the warnings
    (only a domain XML has any: see :func:`from_libvirt_xml`). Raises :class:`ConfigError`,
    starting with the file's name, when the file is missing, unreadable, too large, not text,
    not valid in its format, or not a valid config.
    """
    source = os.fsdecode(path)
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_XML_BYTES + 1)
    except FileNotFoundError:
        raise _fail(source, "no such file") from None
    except IsADirectoryError:
        raise _fail(source, "is a directory, not a config file") from None
    except OSError as exc:
        raise _fail(source, f"cannot be read: {exc.strerror or exc}") from None
    if len(data) > MAX_XML_BYTES:
        raise _fail(source, f"larger than {MAX_XML_BYTES} bytes: not a config file")
    if format is None:
        format = _SUFFIXES.get(os.path.splitext(source)[1].lower()) or _sniff(data)
    return parse_config(data, format, source=source)


def parse_config(data: bytes | str, format: ConfigFormat, *, source: str = "<config>") -> ImportedConfig:
    """Read a DomainConfig from ``data`` in ``format``; errors start with ``source``."""
    if format == "xml":
        try:
            return from_libvirt_xml(data)
        except ConfigError as exc:
            raise _fail(source, str(exc).removeprefix("invalid "), list(exc.errors)) from None
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise _fail(
                source, f"not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start})"
            ) from None
    else:
        text = data
    mapping = _load_json(text, source) if format == "json" else _load_toml(text, source)
    try:
        return ImportedConfig(DomainConfig.parse(mapping))
    except ConfigError as exc:
        shown = "; ".join(f"{loc}: {message}" if loc else message for loc, message in exc.errors)
        raise _fail(source, shown or str(exc), list(exc.errors)) from None


def _load_json(text: str, source: str) -> Any:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in items:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")  # JSON would silently keep the last
            seen[key] = value
        return seen

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except json.JSONDecodeError as exc:
        raise _fail(source, f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except ValueError as exc:
        raise _fail(source, f"invalid JSON: {exc}") from None


def _load_toml(text: str, source: str) -> Any:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _fail(source, f"invalid TOML: {exc}") from None


# -- writing -----------------------------------------------------------------------------------


def dump_config(cfg: DomainConfig, format: ConfigFormat = "toml") -> str:
    """``cfg`` as a config file's text in ``format`` (``json``, ``toml`` or ``xml``)."""
    if format == "json":
        return json.dumps(cfg.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n"
    if format == "toml":
        return _toml(cfg.model_dump(mode="json"))
    if format == "xml":
        return to_libvirt_xml(cfg)
    raise ValueError(f"unknown config format {format!r}: expected 'json', 'toml' or 'xml'")


def _toml_string(value: str) -> str:
    out = ['"']
    for char in value:
        if char in '"\\':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")  # pragma: no cover - not in the model


def _is_tables(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, Mapping) for item in value)


def _toml_table(data: Mapping[str, Any], prefix: str, out: list[str]) -> None:
    # Scalars (and arrays of them) first: after a [[table]] header every key would belong to it.
    for key, value in data.items():
        if value is not None and not _is_tables(value):
            out.append(f"{key} = {_toml_value(value)}\n")
    for key, value in data.items():
        if _is_tables(value):
            for item in value:
                out.append(f"\n[[{prefix}{key}]]\n")
                _toml_table(item, f"{prefix}{key}.", out)


def _toml(data: Mapping[str, Any]) -> str:
    out: list[str] = []
    _toml_table(data, "", out)
    return "".join(out)
