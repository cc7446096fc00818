"""One behaviour suite, run against every driver on both backends: aiovirt's ``test:///empty``,
``qemu:///embed``, and (``remote``) libvirt's own test driver behind a real, private libvirtd,
reached through the remote driver (``test+unix:///default``). What only one driver shows stays in
its own files (QEMU: argv, reattach, pid reuse, crash safety; remote: test_remote_conformance.py).

Guests here ignore the ACPI button (QEMU: ``machine="none"``, no OS; test: scripted) so that a
stop goes through the signal stages; one that ignores SIGTERM is, for QEMU, a ``kill -STOP``ped
process and, for the test driver, scripted. libvirt's test driver can do neither: it has no
processes (no pid; nothing ignores SIGTERM), no QEMU monitor (``qmp`` raises CommandError
NO_SUPPORT), its guests power off at once on the button, a destroy sends it no SHUTDOWN event, and
its host has a domain of its own (``test``). Tests that need what it cannot do run on the others.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator, Iterator

import anyio
import pytest

import aiovirt
from aiovirt import DomainState as S
from aiovirt import EventDetail as D
from aiovirt import EventKind as K
from aiovirt import StateReason as R
from aiovirt import StopPolicy, StopStage
from aiovirt.drivers.remote import RemoteDriver
from aiovirt.rpc import RPCClient
from aiovirt.testing import GuestBehaviour, script_guest

from ._libvirtd import Libvirtd, running_libvirtd
from .conftest import none_config
from .test_defects import _stop_once_it_handles_sigterm

pytestmark = pytest.mark.anyio
HANG = 30
#: Drivers whose guests can be made to ignore the ACPI button and SIGTERM.
SCRIPTABLE = ["test", "qemu"]


class Guests:
    """A connection to one driver, and what that driver's guests show."""

    def __init__(self, conn: aiovirt.Connection, kind: str) -> None:
        self.conn = conn
        self.kind = kind
        self.remote = kind == "remote"
        #: Domains the host has of its own.
        self.others = ["test"] if self.remote else []

    def _script(self, name: str, **behaviour: object) -> None:
        if self.kind == "test":
            script_guest(self.conn, name, GuestBehaviour(acpi="ignore", **behaviour))  # type: ignore[arg-type]

    async def create(self, name: str) -> aiovirt.Domain:
        self._script(name)
        return await self.conn.create(none_config(name))

    async def define(self, name: str) -> aiovirt.Domain:
        self._script(name)
        return await self.conn.define(none_config(name))

    async def create_deaf(self, name: str) -> aiovirt.Domain:
        """A running guest whose process ignores SIGTERM and does not answer its monitor."""
        self._script(name, sigterm="ignore")
        dom = await self.conn.create(none_config(name))
        if self.kind == "qemu":
            assert dom.pid is not None
            _stop_once_it_handles_sigterm(dom.pid)
        return dom


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[Libvirtd]:
    with running_libvirtd() as d:
        yield d


@pytest.fixture(params=[*SCRIPTABLE, "remote"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def daemon(kind: str, request: pytest.FixtureRequest) -> Libvirtd | None:
    # Started (once per module) only when a remote test runs.
    return request.getfixturevalue("libvirtd") if kind == "remote" else None


@pytest.fixture
async def guests(kind: str, daemon: Libvirtd | None, uri: str) -> AsyncIterator[Guests]:
    if daemon is not None:
        async with aiovirt.connect(daemon.uri("test:///default")) as conn:
            yield Guests(conn, kind)
        await reset_test_host(daemon)
        return
    async with aiovirt.connect("test:///empty" if kind == "test" else uri) as conn:
        try:
            yield Guests(conn, kind)
        finally:
            for dom in await conn.list_domains(active=True):
                if dom.pid is not None:
                    os.kill(dom.pid, signal.SIGCONT)
                with anyio.fail_after(HANG):
                    await dom.destroy(timeout=5)


async def reset_test_host(daemon: Libvirtd) -> None:
    """Leave libvirt's test host as a fresh one is (its own ``test`` running), for the next test.
    It lives as long as any connection to it, and the daemon may take a moment to let one go."""
    async with RPCClient.open_unix(daemon.socket, "test:///default") as client:
        for ref in await client.list_all_domains():
            if ref.name == "test":
                if ref.id == -1:
                    await client.create(ref)
                await client.set_autostart(ref, False)
                continue
            if ref.id != -1:
                await client.destroy(ref)
            with contextlib.suppress(aiovirt.DomainNotFoundError):
                await client.undefine(ref)


def remote_driver(conn: aiovirt.Connection) -> RemoteDriver:
    assert isinstance(conn.driver, RemoteDriver)
    return conn.driver


def _kinds(events: list[aiovirt.DomainEvent]) -> list[tuple[K, D]]:
    return [(e.kind, e.detail) for e in events]


async def _drain(sub: aiovirt.Subscription[aiovirt.DomainEvent]) -> list[aiovirt.DomainEvent]:
    await anyio.sleep(0.1)
    out = []
    while (e := sub.receive_nowait()) is not None:
        out.append(e)
    return out


async def test_lifecycle_states_and_events(guests: Guests) -> None:
    conn = guests.conn
    async with conn.subscribe() as sub:
        dom = await guests.define("life")
        await dom.start()
        assert (dom.state, dom.reason) == (S.RUNNING, R.BOOTED)
        assert (dom.pid is None) == (guests.kind != "qemu")  # no process: no made-up pid
        await dom.suspend()
        assert (dom.state, dom.reason) == (S.PAUSED, R.USER)
        with pytest.raises(aiovirt.InvalidStateError, match="cannot shut down"):
            await dom.shutdown()  # as libvirt: a paused domain is refused
        await dom.resume()
        assert (dom.state, dom.reason) == (S.RUNNING, R.UNPAUSED)
        await dom.reset()
        assert (dom.state, dom.reason) == (S.RUNNING, R.UNPAUSED)
        if guests.remote:
            with pytest.raises(aiovirt.CommandError) as no_monitor:
                await dom.qmp("query-status")  # libvirt's test driver has no QEMU monitor
            assert no_monitor.value.error_class == "NO_SUPPORT"
        else:
            assert (await dom.qmp("query-status"))["status"] == "running"
            with pytest.raises(aiovirt.CommandError):
                await dom.qmp("no-such-command")
        assert await dom.destroy() == signal.SIGTERM
        # libvirt's test driver sends STOPPED/destroyed alone: no SHUTDOWN/host, no QEMU reason.
        shutdown_reason = None if guests.remote else "host-signal"
        assert (dom.state, dom.reason, dom.shutdown_reason) == (S.SHUTOFF, R.DESTROYED, shutdown_reason)
        with pytest.raises(aiovirt.InvalidStateError, match="cannot destroy"):
            await dom.destroy()
        await dom.undefine()
        events = await _drain(sub)
    assert _kinds(events) == [
        (K.DEFINED, D.ADDED),
        (K.STARTED, D.BOOTED),
        (K.SUSPENDED, D.PAUSED),
        (K.RESUMED, D.UNPAUSED),
        *([] if guests.remote else [(K.SHUTDOWN, D.HOST)]),
        (K.STOPPED, D.DESTROYED),
        (K.UNDEFINED, D.REMOVED),
    ]
    with pytest.raises(aiovirt.DomainNotFoundError):
        await conn.lookup("life")
    if guests.remote:
        with pytest.raises(aiovirt.DomainNotFoundError):  # and the daemon has forgotten it too
            await remote_driver(conn).client.lookup_by_name("life")


@pytest.mark.parametrize("kind", SCRIPTABLE, indirect=True)
async def test_graceful_destroy_of_a_process_that_ignores_sigterm(guests: Guests) -> None:
    dom = await guests.create_deaf("deaf")
    with anyio.fail_after(HANG), pytest.raises(aiovirt.DestroyTimeoutError) as info:
        await dom.destroy(graceful=True, timeout=0.5)
    assert info.value.timeout == 0.5
    assert dom.active and dom.state == S.RUNNING
    with anyio.fail_after(HANG):
        assert await dom.destroy(timeout=0.5) == signal.SIGKILL
    assert (dom.state, dom.reason) == (S.SHUTOFF, R.DESTROYED)


async def test_errors_for_bad_requests(guests: Guests) -> None:
    conn = guests.conn
    dom = await guests.define("dup")
    with pytest.raises(aiovirt.DomainExistsError):
        await conn.create(none_config("dup"))
    with pytest.raises(aiovirt.DomainExistsError, match="UUID"):
        await conn.define(none_config("other", uuid=dom.uuid))
    with pytest.raises(aiovirt.DomainNotFoundError):
        await conn.lookup("nobody")
    with pytest.raises(aiovirt.InvalidStateError, match="cannot suspend"):
        await dom.suspend()
    with pytest.raises(aiovirt.ConfigError):
        await conn.define(none_config("bad name/"))
    assert [d.name for d in await conn.list_domains()] == sorted(["dup", *guests.others])


async def test_run_destroys_on_cancellation(guests: Guests) -> None:
    conn = guests.conn
    with anyio.move_on_after(0.5):
        async with conn.run(none_config("cancelled")) as dom:
            await anyio.sleep_forever()
    assert (dom.state, dom.reason) == (S.SHUTOFF, R.DESTROYED)
    assert [d.name for d in await conn.list_domains()] == guests.others


@pytest.mark.parametrize("kind", SCRIPTABLE, indirect=True)
async def test_stop_all_stages_and_results(guests: Guests) -> None:
    conn = guests.conn
    plain = await guests.create("plain")
    deaf = await guests.create_deaf("deafer")
    paused = await guests.create("paused")
    await paused.suspend()
    policy = StopPolicy(acpi_timeout=1, term_timeout=1, kill_timeout=10, graceful=True)
    with anyio.fail_after(HANG):
        results = await conn.stop_all(policy=policy)
    by_name = {r.name: r for r in results}
    assert [r.name for r in results] == ["deafer", "paused", "plain"]
    assert (by_name["plain"].stopped, by_name["plain"].stage, by_name["plain"].reason) == (
        True,
        StopStage.SIGTERM,
        "host-signal",
    )
    assert by_name["paused"].stopped and by_name["paused"].stage == StopStage.SIGTERM
    assert not by_name["deafer"].stopped and isinstance(by_name["deafer"].error, aiovirt.DestroyTimeoutError)
    assert deaf.active and not plain.active and not paused.active
    with anyio.fail_after(HANG):
        [r] = await conn.stop_all([deaf], StopPolicy(acpi_timeout=0, term_timeout=0.5))
    assert (r.stopped, r.stage) == (True, StopStage.SIGKILL)


async def test_paused_policy_report_leaves_it_alone(guests: Guests) -> None:
    conn = guests.conn
    dom = await guests.create("left")
    await dom.suspend()
    [r] = await conn.stop_all([dom], policy=StopPolicy(paused="report", acpi_timeout=1))
    assert (r.stopped, r.stage) == (False, StopStage.NONE)
    assert isinstance(r.error, aiovirt.InvalidStateError) and dom.state == S.PAUSED


# -- the test driver's own promises ------------------------------------------------------------------


async def test_default_test_host_has_a_running_domain() -> None:
    async with aiovirt.connect("test:///default") as conn:
        dom = await conn.lookup("test")
        assert dom.state == S.RUNNING and dom.persistent
        assert dom.pid is None  # no process: no made-up pid


async def test_a_closed_test_connection_is_closed() -> None:
    async with aiovirt.connect("test:///empty") as conn:
        dom = await conn.create(none_config("closing"))
    with pytest.raises(aiovirt.ConnectionClosedError):
        await dom.destroy()
    with pytest.raises(aiovirt.ConnectionClosedError):
        await conn.list_domains()


async def test_scripted_behaviours() -> None:
    async with aiovirt.connect("test:///empty") as conn:
        script_guest(conn, "slow", GuestBehaviour(acpi_delay=5))
        script_guest(conn, "boom", GuestBehaviour(start_error="could not open disk"))
        script_guest(conn, "crashy", GuestBehaviour(crash_after=1))
        script_guest(conn, "stuck", GuestBehaviour(sigterm="ignore", sigkill="ignore"))
        with pytest.raises(aiovirt.LaunchError, match="could not open disk"):
            await conn.create(none_config("boom"))
        crashy = await conn.create(none_config("crashy"))
        with anyio.fail_after(HANG):
            await crashy.wait_for_state(S.SHUTOFF)
        assert crashy.reason == R.CRASHED
        slow = await conn.create(none_config("slow"))
        await slow.shutdown()
        with anyio.fail_after(HANG):
            await slow.wait_for_state(S.SHUTOFF)
        assert (slow.reason, slow.shutdown_reason) == (R.SHUTDOWN, "guest-shutdown")
        stuck = await conn.create(none_config("stuck"))
        with pytest.raises(aiovirt.ProcessBusyError) as info:
            await stuck.destroy(timeout=0.1, kill_timeout=0.1)
        assert info.value.proc_state == "D"


def test_virtual_time_costs_no_wall_time() -> None:
    """Under trio's MockClock (autojump), a 60-second ACPI stage passes at once."""
    import time

    import trio.testing

    async def main() -> None:
        async with aiovirt.connect("test:///empty") as conn:
            script_guest(conn, "deaf", GuestBehaviour(acpi="ignore"))
            await conn.create(none_config("deaf"))
            [r] = await conn.stop_all(policy=StopPolicy(acpi_timeout=60))
            assert (r.stopped, r.stage) == (True, StopStage.SIGTERM) and r.elapsed >= 60

    started = time.monotonic()
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert time.monotonic() - started < 30  # a bound against hanging, not a measure
