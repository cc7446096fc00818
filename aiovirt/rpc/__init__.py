"""libvirt's RPC protocol: a sans-IO codec (XDR, packets, keepalive) and an anyio client around it.

The codec and protocol names are imported eagerly (stdlib only). The client names are imported on
first access, so that ``import aiovirt.rpc`` loads no anyio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._codec import (
    CLOSED,
    NEED_DATA,
    CodecState,
    ErrorReply,
    Event,
    KeepalivePing,
    KeepalivePong,
    LocalProtocolError,
    Message,
    Reply,
    RPCCodec,
    Sentinel,
)
from ._protocol import DomainInfo, DomainRef, LifecycleEvent, RemoteError

if TYPE_CHECKING:
    from ._client import LibvirtError, RPCClient, connect_tls_stream, connect_unix

_CLIENT_NAMES = frozenset({"LibvirtError", "RPCClient", "connect_tls_stream", "connect_unix"})

__all__ = [
    "CLOSED",
    "NEED_DATA",
    "CodecState",
    "DomainInfo",
    "DomainRef",
    "ErrorReply",
    "Event",
    "KeepalivePing",
    "KeepalivePong",
    "LibvirtError",
    "LifecycleEvent",
    "LocalProtocolError",
    "Message",
    "RPCClient",
    "RPCCodec",
    "RemoteError",
    "Reply",
    "Sentinel",
    "connect_tls_stream",
    "connect_unix",
]


def __getattr__(name: str) -> Any:
    # PEP 562: the anyio client is imported only when first asked for.
    if name in _CLIENT_NAMES:
        from . import _client

        return getattr(_client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
