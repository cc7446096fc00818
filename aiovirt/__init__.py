"""aiovirt: QEMU domains as async resources, on asyncio and trio, with libvirt's semantics.

::

    async with aiovirt.connect("qemu:///embed?root=/srv/vms") as conn:
        dom = await conn.define(aiovirt.DomainConfig(name="web-1", memory_mib=256, machine="pc", accel="tcg"))
        await dom.start()
        await dom.destroy(graceful=True, timeout=10)

Everything public is re-exported here; the modules behind it are private. The parts that need
anyio are imported on first use, so ``aiovirt.config`` and the sans-IO ``aiovirt.qmp._codec`` can
be used (and tested) without loading anyio.
"""

import importlib
from typing import TYPE_CHECKING, Any

from ._errors import (
    AiovirtError,
    CommandError,
    ConfigError,
    ConnectionClosedError,
    ConnectionLostError,
    ConsoleBusyError,
    DestroyTimeoutError,
    DomainExistsError,
    DomainNotFoundError,
    EventsDroppedError,
    InvalidStateError,
    InvalidURIError,
    LaunchError,
    LocalProtocolError,
    ProcessBusyError,
    ProtocolError,
    QMPError,
    ReadOnlyError,
    StateDirError,
    StateDirLockedError,
)
from ._states import DomainEvent, DomainState, EventDetail, EventKind, StateReason
from .config import Disk, DomainConfig, Nic, PortForward

if TYPE_CHECKING:
    from ._broadcast import Subscription
    from ._connection import Connection, StateProblem, connect, parse_uri
    from ._console import Console
    from ._domain import Domain, DomainInfo
    from ._fleet import StopPolicy, StopResult, StopStage
    from ._hosts import HostStopResult, stop_all_hosts

_LAZY = {
    "Subscription": "._broadcast",
    "Console": "._console",
    "Connection": "._connection",
    "connect": "._connection",
    "parse_uri": "._uri",
    "StateProblem": "._connection",
    "Domain": "._domain",
    "DomainInfo": "._domain",
    "StopPolicy": "._fleet",
    "StopResult": "._fleet",
    "StopStage": "._fleet",
    "HostStopResult": "._hosts",
    "stop_all_hosts": "._hosts",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'aiovirt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "AiovirtError",
    "CommandError",
    "ConfigError",
    "Connection",
    "ConnectionClosedError",
    "ConnectionLostError",
    "Console",
    "ConsoleBusyError",
    "DestroyTimeoutError",
    "Disk",
    "Domain",
    "DomainConfig",
    "DomainEvent",
    "DomainExistsError",
    "DomainInfo",
    "DomainNotFoundError",
    "DomainState",
    "EventDetail",
    "EventKind",
    "EventsDroppedError",
    "HostStopResult",
    "InvalidStateError",
    "InvalidURIError",
    "LaunchError",
    "LocalProtocolError",
    "Nic",
    "PortForward",
    "ProcessBusyError",
    "ProtocolError",
    "QMPError",
    "ReadOnlyError",
    "StateDirError",
    "StateDirLockedError",
    "StateProblem",
    "StateReason",
    "StopPolicy",
    "StopResult",
    "StopStage",
    "Subscription",
    "connect",
    "parse_uri",
    "stop_all_hosts",
]

__version__ = "0.1.0"
