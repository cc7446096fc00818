"""QMP, the QEMU Machine Protocol: a sans-IO codec and an anyio client around it.

The codec names are imported eagerly (stdlib only). ``QMPClient`` and ``connect_unix`` are
imported on first access, so that ``import aiovirt.qmp`` loads no anyio.
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
    from ._client import QMPClient, connect_unix

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
    "connect_unix",
]


def __getattr__(name: str) -> Any:
    # PEP 562: the anyio client is imported only when first asked for.
    if name in ("QMPClient", "connect_unix"):
        from . import _client

        return getattr(_client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
