"""QMP, the QEMU Machine Protocol: a sans-IO codec and an anyio client around it.

The codec names are imported eagerly (stdlib only). ``QMPClient`` is imported on first access so
that ``import aiovirt.qmp`` and ``import aiovirt.qmp._codec`` load no anyio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._codec import (
    CLOSED,
    NEED_DATA,
    CodecState,
    Event,
    Greeting,
    LocalProtocolError,
    Message,
    QMPCodec,
    Response,
    Sentinel,
)

if TYPE_CHECKING:
    from ._client import QMPClient

__all__ = [
    "CLOSED",
    "NEED_DATA",
    "CodecState",
    "Event",
    "Greeting",
    "LocalProtocolError",
    "Message",
    "QMPClient",
    "QMPCodec",
    "Response",
    "Sentinel",
]


def __getattr__(name: str) -> Any:
    if name == "QMPClient":
        from ._client import QMPClient

        return QMPClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
