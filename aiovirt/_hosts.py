"""Many hosts, one deadline: ``stop_all`` across several connections at once.

Each connection (a local state directory, a libvirt daemon per host) runs its own ``stop_all``
with the same :class:`~aiovirt.StopPolicy`, all started at the same instant, concurrently: so
the policy's ``deadline`` bounds the whole call, whatever the number of hosts (each host's stop
keeps the guarantees of ``Connection.stop_all``, including ending at most about a second past the
deadline). ``limit`` applies per host: each daemon is its own bottleneck.

Results stream per domain with their host as they complete (``on_result``), and come back in
host order, then in each host's order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from ._errors import ConfigError
from ._fleet import StopPolicy, StopResult

if TYPE_CHECKING:
    from ._connection import Connection

__all__ = ["HostStopResult", "stop_all_hosts"]


@dataclass(frozen=True)
class HostStopResult:
    """One domain's :class:`~aiovirt.StopResult` and the host it is on (its connection's URI)."""

    host: str
    result: StopResult

    @property
    def name(self) -> str:
        return self.result.name

    @property
    def stopped(self) -> bool:
        return self.result.stopped


async def stop_all_hosts(
    connections: Iterable[Connection],
    policy: StopPolicy | None = None,
    limit: int = 64,
    on_result: Callable[[HostStopResult], object] | None = None,
) -> list[HostStopResult]:
    """Stop every active domain of every connection concurrently, within one policy and deadline.

    ``limit`` bounds the requests in flight on each connection. ``on_result`` sees each result
    as it completes, with its host; an exception it raises cancels every host's stop (sending
    nothing further) and propagates, unwrapped. A failure of one domain is in its result, never
    raised; so is a host whose daemon went away (every result then carries
    :class:`~aiovirt.ConnectionLostError`). A connection already closed raises
    :class:`~aiovirt.ConnectionClosedError` (after cancelling the others). Cancelling the call
    sends no further request.
    """
    if limit < 1:
        raise ConfigError(f"limit must be at least 1, not {limit}", [("limit", "must be at least 1")])
    conns = list(connections)
    hosts = [conn.uri for conn in conns]
    if len(set(hosts)) != len(hosts):
        raise ConfigError("the same connection (URI) is given twice", [("connections", "duplicate URI")])
    policy = policy or StopPolicy()
    per_host: list[list[StopResult]] = [[] for _ in conns]
    callback_error: list[BaseException] = []

    async def one(i: int, conn: Connection) -> None:
        def report(result: StopResult) -> None:
            if on_result is not None and not callback_error:
                try:
                    on_result(HostStopResult(hosts[i], result))
                except Exception as exc:
                    callback_error.append(exc)
                    tg.cancel_scope.cancel()

        try:
            per_host[i] = await conn.stop_all(policy=policy, limit=limit, on_result=report)
        except Exception as exc:  # a closed connection (ConnectionClosedError), or on_result's own
            if not callback_error:
                callback_error.append(exc)
            tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        for i, conn in enumerate(conns):
            tg.start_soon(one, i, conn)
    if callback_error:
        raise callback_error[0]
    return [HostStopResult(host, r) for host, results in zip(hosts, per_host, strict=True) for r in results]
