"""Scripting the guests of a ``test:///`` connection."""

from __future__ import annotations

from .._connection import Connection
from ..drivers.test import GuestBehaviour, TestDriver

__all__ = ["script_guest"]


def script_guest(conn: Connection, name: str, behaviour: GuestBehaviour) -> None:
    """Make the domain ``name`` of the ``test:///`` connection ``conn`` behave as ``behaviour`` from
    its next start on (the domain need not exist yet).

    ::

        script_guest(conn, "web-1", GuestBehaviour(acpi="ignore", sigterm="ignore"))

    Raises :class:`TypeError` for a connection of another driver: a real QEMU cannot be scripted.
    """
    driver = conn.driver
    if not isinstance(driver, TestDriver):
        raise TypeError(f"script_guest needs a test:/// connection, not {conn.uri!r}")
    driver.host.script(name, behaviour)
