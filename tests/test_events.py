"""Lifecycle events (libvirt's kinds and details) and the per-subscriber overflow policy, on real QEMU."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import anyio
import pytest

import aiovirt
from aiovirt import DomainEvent, EventDetail, EventKind
from aiovirt import DomainState as S

from .conftest import none_config

pytestmark = pytest.mark.anyio

Sub = aiovirt.Subscription[DomainEvent]


def drain(sub: Sub) -> list[tuple[EventKind, EventDetail]]:
    """Everything buffered right now (events are published before the operation that caused them returns)."""
    out = []
    while (event := sub.receive_nowait()) is not None:
        out.append((event.kind, event.detail))
    return out


async def test_events_of_a_domains_life(conn: aiovirt.Connection) -> None:
    before = time.time()
    async with conn.subscribe() as all_events:
        dom = await conn.define(none_config("life"))
        async with dom.subscribe() as mine:
            await dom.start()
            await dom.suspend()
            await dom.resume()
            await dom.destroy()  # SIGTERM: QEMU reports SHUTDOWN (host-signal), then exits
            expected = [
                (EventKind.STARTED, EventDetail.BOOTED),
                (EventKind.SUSPENDED, EventDetail.PAUSED),
                (EventKind.RESUMED, EventDetail.UNPAUSED),
                (EventKind.SHUTDOWN, EventDetail.HOST),
                (EventKind.STOPPED, EventDetail.DESTROYED),
            ]
            events = [await mine.receive() for _ in expected]
            assert mine.receive_nowait() is None
        assert [(e.kind, e.detail) for e in events] == expected
        assert all(e.name == "life" and e.uuid == dom.uuid for e in events)
        stamps = [e.timestamp for e in events]
        assert stamps == sorted(stamps) and before <= stamps[0] <= stamps[-1] <= time.time()
        assert drain(all_events) == [(EventKind.DEFINED, EventDetail.ADDED), *expected]


async def test_a_domains_subscription_sees_only_its_own_events(conn: aiovirt.Connection) -> None:
    a = await conn.define(none_config("a"))
    b = await conn.define(none_config("b"))
    async with conn.subscribe() as both, a.subscribe() as only_a:
        await a.start()
        await b.start()
        await b.destroy()
        await a.destroy()
        seen_by_a = []
        while (event := only_a.receive_nowait()) is not None:
            seen_by_a.append(event.name)
        seen = []
        while (event := both.receive_nowait()) is not None:
            seen.append((event.name, event.kind))
    assert seen_by_a == ["a"] * 3
    assert seen == [
        ("a", EventKind.STARTED),
        ("b", EventKind.STARTED),
        ("b", EventKind.SHUTDOWN),
        ("b", EventKind.STOPPED),
        ("a", EventKind.SHUTDOWN),
        ("a", EventKind.STOPPED),
    ]


async def test_overflowing_subscriber_is_told_and_others_get_everything(conn: aiovirt.Connection) -> None:
    """A subscriber that does not read gets what fit, then EventsDroppedError with the count; a reader
    alongside it misses nothing; the driver never waits for either."""
    dom = await conn.define(none_config("flood"))
    fast_got: list[tuple[EventKind, EventDetail]] = []
    async with (
        dom.subscribe(max_buffer=2) as slow,
        conn.subscribe(max_buffer=3) as slow_conn,
        dom.subscribe() as fast,
        anyio.create_task_group() as tg,
    ):

        async def read_fast() -> None:
            async for event in fast:
                fast_got.append((event.kind, event.detail))

        tg.start_soon(read_fast)
        for _ in range(2):
            await dom.start()
            await dom.suspend()
            await dom.resume()
            await dom.destroy()
        # 2 x (STARTED, SUSPENDED, RESUMED, SHUTDOWN, STOPPED) = 10 events, all published by now.

        life = [
            (EventKind.STARTED, EventDetail.BOOTED),
            (EventKind.SUSPENDED, EventDetail.PAUSED),
            (EventKind.RESUMED, EventDetail.UNPAUSED),
            (EventKind.SHUTDOWN, EventDetail.HOST),
            (EventKind.STOPPED, EventDetail.DESTROYED),
        ]
        assert [(e.kind, e.detail) for e in (await slow.receive(), await slow.receive())] == life[:2]
        with pytest.raises(aiovirt.EventsDroppedError) as info:
            await slow.receive()
        assert info.value.dropped == 8
        assert slow.receive_nowait() is None  # told once; the subscription goes on

        # The same policy for the connection's stream, also through ``async for``.
        got = []
        with pytest.raises(aiovirt.EventsDroppedError) as info:
            async for event in slow_conn:
                got.append((event.kind, event.detail))
        assert got == life[:3] and info.value.dropped == 7

        await dom.start()  # once told, a subscriber receives new events again
        assert (await slow.receive()).kind == EventKind.STARTED
        assert (await slow_conn.receive()).kind == EventKind.STARTED
        await dom.destroy()

        with anyio.fail_after(10):
            while len(fast_got) < 13:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert fast_got == life * 2 + [life[0], life[3], life[4]]


async def test_define_and_undefine_events(conn: aiovirt.Connection) -> None:
    async with conn.subscribe() as events:
        cfg = none_config("def")
        dom = await conn.define(cfg)
        await conn.define(cfg.model_copy(update={"uuid": dom.uuid, "memory_mib": 32}))
        await dom.undefine()
        assert drain(events) == [
            (EventKind.DEFINED, EventDetail.ADDED),
            (EventKind.DEFINED, EventDetail.UPDATED),
            (EventKind.UNDEFINED, EventDetail.REMOVED),
        ]

        # Undefining a running domain makes it transient: it runs on, and stops as usual.
        running = await conn.define(none_config("def-running"))
        await running.start()
        await running.undefine()
        assert running.active
        await running.destroy()
        assert drain(events) == [
            (EventKind.DEFINED, EventDetail.ADDED),
            (EventKind.STARTED, EventDetail.BOOTED),
            (EventKind.UNDEFINED, EventDetail.REMOVED),
            (EventKind.SHUTDOWN, EventDetail.HOST),
            (EventKind.STOPPED, EventDetail.DESTROYED),
        ]


async def test_failed_start_emits_stopped_failed(conn: aiovirt.Connection) -> None:
    dom = await conn.define(none_config("bogus", extra_args=["-bogus-option"]))
    async with dom.subscribe() as events:
        with pytest.raises(aiovirt.LaunchError):
            await dom.start()
        assert drain(events) == [(EventKind.STOPPED, EventDetail.FAILED)]  # and no STARTED


async def test_unexecutable_emulator_emits_stopped_failed(conn: aiovirt.Connection) -> None:
    dom = await conn.define(none_config("noexec", emulator="/nonexistent/qemu-system-x86_64"))
    async with dom.subscribe() as events:
        with pytest.raises(aiovirt.LaunchError):
            await dom.start()
        assert drain(events) == [(EventKind.STOPPED, EventDetail.FAILED)]


async def test_event_streams_end_when_the_connection_closes(uri: str) -> None:
    seen: list[EventKind] = []
    with anyio.fail_after(3):
        async with anyio.create_task_group() as tg, aiovirt.connect(uri) as conn:
            dom = await conn.define(none_config("watched"))

            async def watch(subscribe: Any) -> None:
                async with subscribe() as events:
                    async for event in events:  # must end once the connection is closed
                        seen.append(event.kind)

            tg.start_soon(watch, conn.subscribe)
            tg.start_soon(watch, dom.subscribe)
            await anyio.sleep(0.1)
            await conn.define(none_config("other"))
    assert seen == [EventKind.DEFINED]


async def test_external_sigkill_emits_stopped_crashed(conn: aiovirt.Connection) -> None:
    dom = await conn.define(none_config("crash"))
    await dom.start()
    assert dom.pid is not None
    async with dom.subscribe() as events:
        os.kill(dom.pid, signal.SIGKILL)  # no SHUTDOWN event: QEMU never knew
        with anyio.fail_after(30):
            event = await events.receive()
        assert (event.kind, event.detail) == (EventKind.STOPPED, EventDetail.CRASHED)
        assert dom.state == S.SHUTOFF and dom.reason == aiovirt.StateReason.CRASHED
        assert events.receive_nowait() is None


@pytest.mark.slow
async def test_300_domains_stopped_concurrently_give_300_stopped_events(conn: aiovirt.Connection) -> None:
    n = 300
    limiter = anyio.CapacityLimiter(16)  # spawning is the costly part on a 2-core machine

    async def create(i: int) -> None:
        async with limiter:
            await conn.create(none_config(f"many-{i:03d}"))

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(create, i)
    assert len(await conn.list_domains(active=True)) == n

    completed: list[aiovirt.StopResult] = []
    async with conn.subscribe(max_buffer=4 * n) as events, conn.subscribe(max_buffer=100) as small:
        # The ACPI stage presses all 300 (64 requests at a time), the guests ignore it, then SIGTERM.
        policy = aiovirt.StopPolicy(acpi_timeout=1, repress_interval=None, term_timeout=30)
        results = await conn.stop_all(policy=policy, limit=64, on_result=completed.append)
        assert len(results) == n and len(completed) == n
        assert all(r.stopped and r.stage == aiovirt.StopStage.SIGTERM for r in results), [
            r for r in results if not r.stopped
        ]
        assert all(r.reason == "host-signal" for r in results)

        got: list[DomainEvent] = []
        while (event := events.receive_nowait()) is not None:
            got.append(event)
        stopped = [e for e in got if e.kind == EventKind.STOPPED]
        assert len(stopped) == n
        assert {e.name for e in stopped} == {f"many-{i:03d}" for i in range(n)}
        assert all(e.detail == EventDetail.DESTROYED for e in stopped)
        assert len([e for e in got if (e.kind, e.detail) == (EventKind.SHUTDOWN, EventDetail.HOST)]) == n
        assert len(got) == 2 * n

        small_got = 0
        with pytest.raises(aiovirt.EventsDroppedError) as info:
            async for _ in small:
                small_got += 1
        assert small_got == 100 and info.value.dropped == 2 * n - 100
    assert await conn.list_domains() == []  # transient: all forgotten once stopped
