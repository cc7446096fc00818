"""The one way aiovirt's clients run background tasks around their caller's block.

A client (a QMP monitor, a libvirt daemon connection) runs its reader in a task group that spans
the caller's ``async with``. The caller's own exception must come out as it was raised, never
wrapped in an ExceptionGroup by that task group; an exception of a background task (a bug) does
come out in one. The client is closed on the way out, whatever happened.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import anyio.abc

__all__ = ["background_tasks"]


@asynccontextmanager
async def background_tasks(aclose: Callable[[], Awaitable[None]]) -> AsyncIterator[anyio.abc.TaskGroup]:
    """A task group for the block; ``aclose()`` runs as the block ends, before the group is left."""
    body_error: BaseException | None = None
    async with anyio.create_task_group() as tg:
        try:
            yield tg
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException as exc:
            # Held until the task group is gone, so that it is not wrapped in an ExceptionGroup.
            body_error = exc
        finally:
            await aclose()
    if body_error is not None:
        raise body_error
