"""Opening the connection a verb needs, with the fallback to a read-only view.

- ``-r``: a read-only connection, always (no lock, nothing sent, nothing written).
- A verb that only reads: a controlling connection if the state directory is free (its view is
  live: each running domain's monitor is asked), else a read-only one, said on stderr with the
  holder's pid (its view is what the records and the process checks say as of the open).
- A verb that changes something: a controlling connection, or :class:`StateDirLockedError`
  naming the holder's pid.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import aiovirt

__all__ = ["open_connection"]


@asynccontextmanager
async def open_connection(
    uri: str | None, *, readonly: bool, may_fall_back: bool, note: Callable[[str], None]
) -> AsyncIterator[tuple[aiovirt.Connection, bool]]:
    """A connection to ``uri`` for the block, and whether it is read-only. ``note`` receives the
    fallback's one-line notice."""
    async with AsyncExitStack() as stack:
        conn: aiovirt.Connection | None = None
        if not readonly:
            try:
                conn = await stack.enter_async_context(aiovirt.connect(uri, autostart=False))
            except aiovirt.StateDirLockedError as exc:
                if not may_fall_back:
                    raise
                holder = f"process {exc.pid}" if exc.pid is not None else "another process"
                note(
                    f"note: {exc.path} is held by {holder}; showing a read-only view "
                    "(from its records, as of now)"
                )
        if conn is not None:
            yield conn, False
        else:
            yield await stack.enter_async_context(aiovirt.connect(uri, readonly=True)), True
