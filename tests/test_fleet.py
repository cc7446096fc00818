"""Stopping fleets in stages (ACPI, SIGTERM, SIGKILL) within one deadline, against real QEMU.

The cast, all real: tiny Linux guests that honour the ACPI power button, guests with no OS that
ignore it (``machine="none"``, or ``pc`` with nothing to boot: SeaBIOS idles), paused domains, and
a QEMU stopped with SIGSTOP, which leaves SIGTERM pending and does not answer its monitor.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator, Sequence

import anyio
import pytest

import aiovirt
from aiovirt import DomainState as S
from aiovirt import EventDetail as D
from aiovirt import EventKind as K
from aiovirt import StateReason as R
from aiovirt import StopPolicy, StopResult
from aiovirt import StopStage as Stage
from aiovirt.testing import TinyGuest

from .conftest import none_config, pid_alive

pytestmark = pytest.mark.anyio

#: Bound on every stop here, so that a stop that hangs fails its test instead of the run.
HANG = 120


def linux_config(name: str, guest: TinyGuest) -> aiovirt.DomainConfig:
    return guest.domain_config(name)


def deaf_pc_config(name: str) -> aiovirt.DomainConfig:
    """A PC with nothing to boot: SeaBIOS idles and the power button does nothing."""
    return aiovirt.DomainConfig(name=name, machine="pc", accel="tcg", memory_mib=32)


def console(dom: aiovirt.Domain) -> str:
    assert dom.console_path is not None
    return dom.console_path.read_text(errors="replace")


async def wait_ready(dom: aiovirt.Domain, guest: TinyGuest) -> None:
    with anyio.fail_after(180):  # TCG on a shared 2-core machine
        while guest.ready_marker not in console(dom):
            await anyio.sleep(0.2)


async def stuck_domain(conn: aiovirt.Connection, name: str) -> tuple[aiovirt.Domain, int]:
    """A QEMU that reacts to nothing but SIGKILL: SIGTERM stays pending, its monitor never answers."""
    dom = await conn.create(none_config(name))
    assert dom.pid is not None
    os.kill(dom.pid, signal.SIGSTOP)
    return dom, dom.pid


@contextlib.contextmanager
def qmp_events(doms: Sequence[aiovirt.Domain]) -> Iterator[Callable[[], list[tuple[float, str, str]]]]:
    """QEMU's own monitor events of ``doms`` as (QEMU's timestamp, domain, event), sorted by time.

    Through ``Domain.monitor_events``: the only way to see a press that a guest ignores.
    """
    with contextlib.ExitStack() as stack:
        subs = {}
        for dom in doms:
            subs[dom.name] = stack.enter_context(dom.monitor_events())

        def collected() -> list[tuple[float, str, str]]:
            out = []
            for name, sub in subs.items():
                while (event := sub.receive_nowait()) is not None:
                    out.append((event.timestamp, name, event.name))
            return sorted(out)

        yield collected


def events_by_domain(sub: aiovirt.Subscription[aiovirt.DomainEvent]) -> dict[str, list[tuple[K, D]]]:
    out: dict[str, list[tuple[K, D]]] = {}
    while (event := sub.receive_nowait()) is not None:
        out.setdefault(event.name, []).append((event.kind, event.detail))
    return out


TERMINATED = [(K.SHUTDOWN, D.HOST), (K.STOPPED, D.DESTROYED)]  # SIGTERM: QEMU reports host-signal
POWERED_OFF = [(K.SHUTDOWN, D.GUEST), (K.STOPPED, D.SHUTDOWN)]  # the guest obeyed the button


# -- the mixed fleet ----------------------------------------------------------------------------


@pytest.mark.slow
async def test_mixed_fleet_graceful(conn: aiovirt.Connection, tiny_guest: TinyGuest) -> None:
    linux = [await conn.create(linux_config(f"linux-{i}", tiny_guest)) for i in range(2)]
    async with anyio.create_task_group() as tg:
        for dom in linux:
            tg.start_soon(wait_ready, dom, tiny_guest)
    paused_linux = linux[1]
    await paused_linux.suspend()
    deaf_none = await conn.create(none_config("deaf-none"))
    deaf_pc = await conn.create(deaf_pc_config("deaf-pc"))
    paused_none = await conn.create(none_config("paused-none"))
    await paused_none.suspend()
    stuck, stuck_pid = await stuck_domain(conn, "stuck")

    completed: list[StopResult] = []
    async with conn.subscribe() as events:
        policy = StopPolicy(graceful=True, acpi_timeout=20, repress_interval=5, term_timeout=1)
        t0 = anyio.current_time()
        with anyio.fail_after(HANG):
            results = await conn.stop_all(policy=policy, on_result=completed.append)  # all active
        wall = anyio.current_time() - t0
        seen = events_by_domain(events)
    print(f"mixed fleet, graceful: {wall:.2f} s; " + ", ".join(f"{r.name} {r.elapsed:.2f}" for r in results))

    by_name = {r.name: r for r in results}
    assert [r.name for r in results] == sorted(by_name)  # one per domain, in the order requested
    assert len(results) == 6
    for dom in linux:  # the paused one was resumed, then pressed
        r = by_name[dom.name]
        assert (r.stopped, r.stage, r.reason, r.error) == (True, Stage.ACPI, "guest-shutdown", None), r
        assert (dom.state, dom.reason) == (S.SHUTOFF, R.SHUTDOWN)
        assert "power button pressed" in console(dom)
    for dom in (deaf_none, deaf_pc, paused_none):
        r = by_name[dom.name]
        assert (r.stopped, r.stage, r.reason, r.error) == (True, Stage.SIGTERM, "host-signal", None), r
        assert (dom.state, dom.reason) == (S.SHUTOFF, R.DESTROYED)
    r = by_name["stuck"]
    assert (r.stopped, r.stage, r.reason) == (False, Stage.NONE, None), r
    assert isinstance(r.error, aiovirt.DestroyTimeoutError)
    assert pid_alive(stuck_pid), "graceful must never SIGKILL"
    assert stuck.state == S.RUNNING and stuck.pid == stuck_pid

    # Results as they complete: the guests that obeyed the button come before the signal stage.
    assert sorted(r.name for r in completed) == sorted(by_name)
    assert {r.name for r in completed[:2]} == {"linux-0", "linux-1"}
    assert completed[-1].name == "stuck"

    assert seen.get("linux-0") == POWERED_OFF
    assert seen.get("linux-1") == [(K.RESUMED, D.UNPAUSED), *POWERED_OFF]
    assert seen.get("paused-none") == [(K.RESUMED, D.UNPAUSED), *TERMINATED]
    assert seen.get("deaf-none") == seen.get("deaf-pc") == TERMINATED
    assert "stuck" not in seen

    # Without graceful the same QEMU ends at SIGKILL (the pending SIGTERM never ran: no reason).
    with anyio.fail_after(HANG):
        r = (await conn.stop_all([stuck], StopPolicy(acpi_timeout=1, term_timeout=1, kill_timeout=10)))[0]
    assert (r.stopped, r.stage, r.reason, r.error) == (True, Stage.SIGKILL, None, None), r
    assert not pid_alive(stuck_pid)
    assert (stuck.state, stuck.reason) == (S.SHUTOFF, R.DESTROYED)


async def test_fleet_without_graceful_ends_at_sigkill(conn: aiovirt.Connection) -> None:
    deaf = await conn.create(none_config("deaf"))
    deaf_pc = await conn.create(deaf_pc_config("deaf-pc"))
    paused = await conn.create(none_config("paused"))
    await paused.suspend()
    stuck, stuck_pid = await stuck_domain(conn, "stuck")
    async with conn.subscribe() as events:
        policy = StopPolicy(acpi_timeout=1, repress_interval=None, term_timeout=1, kill_timeout=10)
        with anyio.fail_after(HANG):
            results = await conn.stop_all([deaf, deaf_pc, "paused", stuck], policy=policy)
        seen = events_by_domain(events)
    assert [(r.name, r.stopped, r.stage, r.reason, r.error) for r in results] == [
        ("deaf", True, Stage.SIGTERM, "host-signal", None),
        ("deaf-pc", True, Stage.SIGTERM, "host-signal", None),
        ("paused", True, Stage.SIGTERM, "host-signal", None),
        ("stuck", True, Stage.SIGKILL, None, None),
    ]
    assert not pid_alive(stuck_pid)
    assert all((d.state, d.reason) == (S.SHUTOFF, R.DESTROYED) for d in (deaf, deaf_pc, paused, stuck))
    assert seen["paused"] == [(K.RESUMED, D.UNPAUSED), *TERMINATED]
    assert seen["stuck"] == [(K.STOPPED, D.DESTROYED)]


async def test_paused_domains_are_reported_or_signalled_never_pressed(conn: aiovirt.Connection) -> None:
    left = await conn.create(none_config("left"))
    signalled = await conn.create(none_config("signalled"))
    for dom in (left, signalled):
        await dom.suspend()
    async with conn.subscribe() as events:
        [r] = await conn.stop_all([left], policy=StopPolicy(paused="report", acpi_timeout=1))
        assert (r.name, r.stopped, r.stage) == ("left", False, Stage.NONE)
        assert isinstance(r.error, aiovirt.InvalidStateError)
        assert left.state == S.PAUSED

        with qmp_events([signalled]) as monitor:
            r = (
                await conn.stop_all([signalled], StopPolicy(paused="signal", acpi_timeout=30, term_timeout=5))
            )[0]
            assert (r.stopped, r.stage, r.reason) == (True, Stage.SIGTERM, "host-signal")
            assert "POWERDOWN" not in [name for _, _, name in monitor()]
        assert events_by_domain(events) == {"signalled": TERMINATED}  # no RESUMED, nothing for "left"


async def test_results_for_domains_that_are_not_running(conn: aiovirt.Connection) -> None:
    off = await conn.define(none_config("off"))
    on = await conn.create(none_config("on"))
    results = await conn.stop_all(["off", on], policy=StopPolicy(acpi_timeout=0))
    assert [(r.name, r.stopped, r.stage) for r in results] == [
        ("off", False, Stage.NONE),
        ("on", True, Stage.SIGTERM),
    ]
    assert isinstance(results[0].error, aiovirt.InvalidStateError)
    r = (await conn.stop_all([off]))[0]
    assert (r.stopped, r.stage) == (False, Stage.NONE) and isinstance(r.error, aiovirt.InvalidStateError)
    assert await conn.stop_all() == []  # nothing active any more


# -- ACPI re-press ------------------------------------------------------------------------------


@pytest.mark.slow
async def test_repress_rescues_a_guest_pressed_before_it_was_ready(
    conn: aiovirt.Connection, tiny_guest: TinyGuest
) -> None:
    """Both guests are pressed at once, while their kernels still boot: that press is lost. Pressed
    once only, a guest ignores the button for good; pressed again every second, it powers off."""
    once = await conn.create(linux_config("pressed-once", tiny_guest))
    again = await conn.create(linux_config("pressed-again", tiny_guest))
    assert tiny_guest.ready_marker not in console(once) + console(again)
    once_pid = once.pid
    assert once_pid is not None
    results: dict[str, StopResult] = {}

    async def stop(dom: aiovirt.Domain, policy: StopPolicy) -> None:
        results[dom.name] = (await conn.stop_all([dom], policy))[0]

    async with anyio.create_task_group() as tg:
        tg.start_soon(stop, again, StopPolicy(acpi_timeout=180, repress_interval=1, graceful=True))
        async with anyio.create_task_group() as once_tg:
            once_tg.start_soon(stop, once, StopPolicy(acpi_timeout=600, repress_interval=None, graceful=True))
            await wait_ready(once, tiny_guest)
            with anyio.move_on_after(3):  # a guest that got the press is gone in a fraction of a second
                await once.wait_for_state(S.SHUTOFF)
            assert once.state == S.RUNNING, "the press before the guest was ready should have been lost"
            once_tg.cancel_scope.cancel()  # a stop cancelled in its ACPI stage sends nothing more
    assert "pressed-once" not in results
    assert once.state == S.RUNNING and pid_alive(once_pid)
    assert "power button pressed" not in console(once)

    r = results["pressed-again"]
    assert (r.stopped, r.stage, r.reason) == (True, Stage.ACPI, "guest-shutdown"), r
    assert "power button pressed" in console(again)


# -- the deadline -------------------------------------------------------------------------------


async def test_deadline_holds_for_a_fleet_that_ignores_acpi(conn: aiovirt.Connection) -> None:
    deaf = [await conn.create(none_config(f"deaf-{i}")) for i in range(3)]
    deaf.append(await conn.create(deaf_pc_config("deaf-pc")))
    stuck, stuck_pid = await stuck_domain(conn, "stuck")
    policy = StopPolicy(deadline=3)  # stage timeouts 60 + 10 + 30 s: all scaled down to fit 3 s
    with qmp_events(deaf) as monitor:
        t0 = anyio.current_time()
        with anyio.fail_after(HANG):
            results = await conn.stop_all([*deaf, stuck], policy=policy)
        elapsed = anyio.current_time() - t0
        log = monitor()
    print(f"deadline {policy.deadline} s: stop_all took {elapsed:.2f} s")
    assert elapsed < 3 + 5
    assert all(r.elapsed <= elapsed for r in results)
    assert [(r.stopped, r.stage) for r in results] == [(True, Stage.SIGTERM)] * 4 + [(True, Stage.SIGKILL)]
    assert not pid_alive(stuck_pid)
    # The deadline shortened the ACPI stage but did not skip it: every guest was pressed first.
    powerdowns = [name for _, name, event in log if event == "POWERDOWN"]
    assert sorted(powerdowns) == sorted(d.name for d in deaf)
    first_shutdown = min(i for i, (_, _, event) in enumerate(log) if event == "SHUTDOWN")
    assert all(event == "POWERDOWN" for _, _, event in log[:first_shutdown])


async def test_deadline_holds_behind_a_queue_of_unresponsive_monitors(conn: aiovirt.Connection) -> None:
    """With limit=1, presses to QEMUs that never answer queue up (each holds the slot a while); the
    queue must not push any domain's SIGTERM past its share of the deadline."""
    stuck = [await stuck_domain(conn, f"stuck-{i}") for i in range(8)]
    t0 = anyio.current_time()
    with anyio.fail_after(HANG):
        results = await conn.stop_all([d for d, _ in stuck], policy=StopPolicy(deadline=2), limit=1)
    elapsed = anyio.current_time() - t0
    print(f"8 stuck QEMUs, limit=1, deadline 2 s: stop_all took {elapsed:.2f} s")
    assert elapsed < 2 + 5
    assert [(r.stopped, r.stage) for r in results] == [(True, Stage.SIGKILL)] * 8
    assert not any(pid_alive(pid) for _, pid in stuck)


async def test_graceful_deadline_never_kills(conn: aiovirt.Connection) -> None:
    deaf = await conn.create(none_config("deaf"))
    stuck, stuck_pid = await stuck_domain(conn, "stuck")
    t0 = anyio.current_time()
    with anyio.fail_after(HANG):
        results = await conn.stop_all(policy=StopPolicy(graceful=True, deadline=2))
    elapsed = anyio.current_time() - t0
    assert elapsed < 2 + 5
    assert [(r.name, r.stopped, r.stage) for r in results] == [
        ("deaf", True, Stage.SIGTERM),
        ("stuck", False, Stage.NONE),
    ]
    assert isinstance(results[1].error, aiovirt.DestroyTimeoutError)
    assert pid_alive(stuck_pid) and stuck.state == S.RUNNING
    assert deaf.state == S.SHUTOFF


# -- cancellation and the limit -----------------------------------------------------------------


@pytest.mark.parametrize("graceful", [False, True])
async def test_cancelled_in_the_sigterm_stage_sends_no_sigkill(
    conn: aiovirt.Connection, graceful: bool
) -> None:
    deaf = await conn.create(none_config("deaf"))
    stuck, stuck_pid = await stuck_domain(conn, "stuck")
    completed: list[StopResult] = []
    with anyio.CancelScope() as scope:

        def on_result(r: StopResult) -> None:
            # "deaf" ended at SIGTERM, so "stuck" got its SIGTERM too and waits for its exit now.
            completed.append(r)
            scope.cancel()

        policy = StopPolicy(graceful=graceful, acpi_timeout=0, term_timeout=60, kill_timeout=5)
        with anyio.fail_after(HANG):
            await conn.stop_all([deaf, stuck], policy=policy, on_result=on_result)
    assert scope.cancelled_caught
    assert [(r.name, r.stage) for r in completed] == [("deaf", Stage.SIGTERM)]
    assert pid_alive(stuck_pid), "a cancelled stop_all sent SIGKILL"
    assert stuck.state == S.RUNNING and stuck.pid == stuck_pid

    await stuck.destroy(timeout=1)  # it can still be destroyed, and its exit is reaped
    assert (stuck.state, stuck.reason) == (S.SHUTOFF, R.DESTROYED)
    assert not pid_alive(stuck_pid)


async def test_on_result_error_propagates_and_sends_nothing_more(conn: aiovirt.Connection) -> None:
    deaf = await conn.create(none_config("deaf"))
    stuck, stuck_pid = await stuck_domain(conn, "stuck")

    def on_result(r: StopResult) -> None:
        raise KeyError(r.name)

    with pytest.raises(KeyError, match="deaf"), anyio.fail_after(HANG):  # unwrapped, not in a group
        await conn.stop_all(
            [deaf, stuck], policy=StopPolicy(acpi_timeout=0, term_timeout=60), on_result=on_result
        )
    assert pid_alive(stuck_pid) and stuck.state == S.RUNNING  # no SIGKILL after the callback failed


async def test_cancelled_in_the_acpi_stage_sends_nothing_more(conn: aiovirt.Connection) -> None:
    deaf = await conn.create(none_config("deaf"))
    with qmp_events([deaf]) as monitor:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(conn.stop_all, [deaf], StopPolicy(acpi_timeout=60, repress_interval=0.2))
                with anyio.fail_after(30):
                    while len(monitor_log := monitor()) < 1:
                        await anyio.sleep(0.05)
                scope.cancel()
        assert scope.cancelled_caught
        await anyio.sleep(1)  # long enough for several re-presses, had they been sent
        assert [event for _, _, event in monitor_log + monitor()] == ["POWERDOWN"] * len(monitor_log)
    assert deaf.state == S.RUNNING


async def test_limit_one_still_presses_everyone_in_the_first_stage(conn: aiovirt.Connection) -> None:
    """limit bounds requests in flight, not waiting: a QEMU that never answers its monitor, first in
    line, does not keep the others from being pressed long before the ACPI stage ends."""
    stuck, _ = await stuck_domain(conn, "a-stuck")
    deaf = [await conn.create(none_config(f"deaf-{i}")) for i in range(3)]
    policy = StopPolicy(graceful=True, acpi_timeout=4, repress_interval=None, term_timeout=1)
    with qmp_events(deaf) as monitor:
        with anyio.fail_after(HANG):
            results = await conn.stop_all([stuck, *deaf], policy=policy, limit=1)
        log = monitor()
    assert [(r.stopped, r.stage) for r in results] == [(False, Stage.NONE)] + [(True, Stage.SIGTERM)] * 3
    events = [(name, event) for _, name, event in log]
    # Each pressed once, all before the first SIGTERM (QEMU reports it as SHUTDOWN).
    assert sorted(events[:3]) == [(d.name, "POWERDOWN") for d in deaf]
    assert sorted(events[3:]) == [(d.name, "SHUTDOWN") for d in deaf]


# -- the API ------------------------------------------------------------------------------------


def test_stop_policy_is_validated() -> None:
    assert StopPolicy() == StopPolicy(
        graceful=False, acpi_timeout=60, repress_interval=10, term_timeout=10, kill_timeout=30, deadline=None
    )
    invalid: list[dict[str, object]] = [
        {"acpi_timeout": -1},
        {"repress_interval": 0},
        {"deadline": 0},
        {"paused": "press"},
        {"unknown": 1},
    ]
    for bad in invalid:
        field = next(iter(bad))
        with pytest.raises(aiovirt.ConfigError, match=f"StopPolicy: {field}") as info:
            StopPolicy.model_validate(bad)
        assert [loc for loc, _ in info.value.errors] == [field]
        with pytest.raises(aiovirt.ConfigError, match=field):
            StopPolicy(**bad)


async def test_limit_must_be_positive(conn: aiovirt.Connection) -> None:
    with pytest.raises(aiovirt.ConfigError, match="limit"):
        await conn.stop_all(limit=0)
