"""Many domains at once, against real QEMU: a subscriber on each and a connection-wide one, all
destroyed together. No STOPPED event is lost or duplicated, a subscriber that never reads does not
slow the others (it alone is told it lost events), and the controller's memory stays bounded.

The default run uses 100 domains; the slow one uses 1,000 (``machine="none"``: ~7 MiB each).
"""

from __future__ import annotations

import contextlib
import resource

import anyio
import pytest

import aiovirt
from aiovirt import EventKind as K

from .conftest import none_config

pytestmark = pytest.mark.anyio


async def _many(conn: aiovirt.Connection, n: int) -> None:
    limiter = anyio.CapacityLimiter(32)
    doms: list[aiovirt.Domain] = []

    async def create(i: int) -> None:
        async with limiter:
            doms.append(await conn.create(none_config(f"l{i:04d}")))

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(create, i)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    per_domain = {}
    async with contextlib.AsyncExitStack() as astack:
        for dom in doms:
            per_domain[dom.name] = await astack.enter_async_context(dom.subscribe(max_buffer=16))
        everything = await astack.enter_async_context(conn.subscribe(max_buffer=8 * n))
        deaf = await astack.enter_async_context(conn.subscribe(max_buffer=4))  # never read until the end
        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for dom in doms:
                    tg.start_soon(dom.destroy)
        stopped: dict[str, int] = {}
        while (event := everything.receive_nowait()) is not None:
            if event.kind is K.STOPPED:
                stopped[event.name] = stopped.get(event.name, 0) + 1
        assert stopped == {d.name: 1 for d in doms}, "a STOPPED event was lost or duplicated"
        for name, sub in per_domain.items():
            kinds = []
            while (event := sub.receive_nowait()) is not None:
                kinds.append(event.kind)
            assert kinds == [K.SHUTDOWN, K.STOPPED], (name, kinds)
        # The subscriber that never read kept only what fit, and is told how much it lost.
        got = [deaf.receive_nowait() for _ in range(4)]
        assert all(e is not None for e in got)
        with pytest.raises(aiovirt.EventsDroppedError) as dropped:
            deaf.receive_nowait()
        assert dropped.value.dropped == 2 * n - 4
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert grown_kib < 64 * n, f"the controller grew {grown_kib} KiB for {n} domains' events"
    assert await conn.list_domains() == []


async def test_many_domains_destroyed_at_once(conn: aiovirt.Connection) -> None:
    await _many(conn, 100)


@pytest.mark.slow
async def test_a_thousand_domains_destroyed_at_once(conn: aiovirt.Connection) -> None:
    await _many(conn, 1000)
