"""libvirt's RPC protocol: a sans-IO codec (XDR, packets, keepalive) and an anyio client around it.

The codec and protocol names are imported eagerly (stdlib only). The client names are imported on
first access, so that ``import aiovirt.rpc`` loads no anyio.
"""

from __future__ import annotations

import importlib
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
from ._errors import (
    LibvirtError,
    RemoteDomainExistsError,
    RemoteDomainNotFoundError,
    RemoteInvalidStateError,
    UnsupportedAuthError,
    error_from_remote,
)
from ._mapping import domain_event, domain_state, state_reason
from ._protocol import DomainInfo, DomainRef, LifecycleEvent, RemoteError

if TYPE_CHECKING:
    from ._client import RPCClient
    from ._transport import (
        SocketChannel,
        connect_tls_stream,
        connect_unix,
        connect_unix_socket,
        expect_tls_verdict,
        process_stream,
    )

# PEP 562: the anyio parts are imported only when first asked for.
_LAZY = {
    "RPCClient": "_client",
    "SocketChannel": "_transport",
    "connect_tls_stream": "_transport",
    "connect_unix": "_transport",
    "connect_unix_socket": "_transport",
    "expect_tls_verdict": "_transport",
    "process_stream": "_transport",
}

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
    "RemoteDomainExistsError",
    "RemoteDomainNotFoundError",
    "RemoteError",
    "RemoteInvalidStateError",
    "Reply",
    "Sentinel",
    "SocketChannel",
    "UnsupportedAuthError",
    "connect_tls_stream",
    "connect_unix",
    "connect_unix_socket",
    "domain_event",
    "domain_state",
    "error_from_remote",
    "expect_tls_verdict",
    "process_stream",
    "state_reason",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
