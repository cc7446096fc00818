"""Helpers for testing code that drives QEMU: a tiny Linux guest that honours the ACPI power button.

Import-light on purpose: no async library is imported here, and the guest builder is loaded on first
use (which also keeps ``python -m aiovirt.testing._guest`` free of runpy's double-import warning).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..drivers.test import ConsoleScript, GuestBehaviour, TestHost
    from ._guest import TinyGuest, TinyGuestBuildError, ensure_tiny_guest
    from ._script import script_guest

__all__ = [
    "ConsoleScript",
    "GuestBehaviour",
    "TestHost",
    "TinyGuest",
    "TinyGuestBuildError",
    "ensure_tiny_guest",
    "script_guest",
]

_LAZY = {
    "TinyGuest": "._guest",
    "TinyGuestBuildError": "._guest",
    "ensure_tiny_guest": "._guest",
    "ConsoleScript": "..drivers.test",
    "GuestBehaviour": "..drivers.test",
    "TestHost": "..drivers.test",
    "script_guest": "._script",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
