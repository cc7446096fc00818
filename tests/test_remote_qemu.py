"""Real QEMU guests (``machine="pc"``, no OS: they ignore the ACPI button) through a private libvirtd's
QEMU driver, ``qemu+unix:///system?socket=...``, through the remote driver. Both anyio backends.

A QEMU that ignores SIGTERM is one stopped with ``kill -STOP`` (SIGTERM stays pending, SIGKILL
still kills), as in the QEMU driver's own tests.
"""

from __future__ import annotations

import os
import signal
import uuid
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

from ._libvirtd import Libvirtd, qemu_pid, running_libvirtd
from .conftest import pid_alive

pytestmark = pytest.mark.anyio
HANG = 60


def pc(name: str, **kw: object) -> aiovirt.DomainConfig:
    return aiovirt.DomainConfig(name=name, machine="pc", accel="tcg", memory_mib=32, **kw)


def unique(prefix: str) -> str:
    """Guest names unique on this machine (other tests' daemons may run guests too)."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def daemon() -> Iterator[Libvirtd]:
    with running_libvirtd() as d:
        yield d


@pytest.fixture
async def conn(daemon: Libvirtd) -> AsyncIterator[aiovirt.Connection]:
    async with aiovirt.connect(daemon.uri("qemu:///system")) as c:
        try:
            yield c
        finally:
            for dom in await c.list_domains(active=True):
                if dom.reachable:
                    with anyio.fail_after(HANG):
                        await dom.destroy(timeout=20)
            for dom in await c.list_domains():
                await dom.undefine()


async def _drain(sub: aiovirt.Subscription[aiovirt.DomainEvent]) -> list[tuple[K, D]]:
    await anyio.sleep(0.2)
    out = []
    while (e := sub.receive_nowait()) is not None:
        out.append((e.kind, e.detail))
    return out


async def test_a_transient_guest(conn: aiovirt.Connection) -> None:
    assert isinstance(conn.driver, RemoteDriver)
    if conn.driver.lib_version < 11_003_000:
        assert conn.driver.sigterm_method == "qmp-quit"  # libvirt's graceful destroy kills (see docs)
    name = unique("rq")
    async with conn.subscribe() as sub:
        dom = await conn.create(pc(name))
        pid = qemu_pid(name)
        assert (dom.state, dom.reason, dom.pid) == (S.RUNNING, R.BOOTED, None)  # its pid is the daemon's
        assert (await dom.qmp("query-status"))["status"] == "running"
        with pytest.raises(aiovirt.CommandError) as refused:
            await dom.qmp("no-such-command")
        assert refused.value.error_class == "CommandNotFound"  # QEMU's own answer
        await dom.suspend()
        assert (dom.state, dom.reason) == (S.PAUSED, R.USER)
        assert (await dom.qmp("query-status"))["status"] == "paused"
        await dom.resume()
        await dom.reset()
        await dom.shutdown()  # no OS: the button is ignored
        with anyio.fail_after(HANG):
            assert await dom.destroy() == signal.SIGTERM
        assert (dom.state, dom.reason, dom.shutdown_reason) == (S.SHUTOFF, R.DESTROYED, "host-signal")
        assert not pid_alive(pid)
        events = await _drain(sub)
    assert events == [
        (K.STARTED, D.BOOTED),
        (K.SUSPENDED, D.PAUSED),
        (K.RESUMED, D.UNPAUSED),
        (K.SHUTDOWN, D.HOST),
        (K.STOPPED, D.DESTROYED),
    ]
    assert await conn.list_domains() == []


async def test_graceful_destroy_never_kills(conn: aiovirt.Connection) -> None:
    name = unique("rq-stuck")
    dom = await conn.create(pc(name))
    pid = qemu_pid(name)
    os.kill(pid, signal.SIGSTOP)
    with anyio.fail_after(HANG), pytest.raises(aiovirt.DestroyTimeoutError):
        await dom.destroy(graceful=True, timeout=1)
    assert dom.state == S.RUNNING and pid_alive(pid)
    assert (await dom.info()).state == S.RUNNING  # the daemon is not blocked by it
    with anyio.fail_after(HANG):
        assert await dom.destroy(timeout=1) == signal.SIGKILL  # libvirt's destroy: SIGTERM, 10 s, SIGKILL
    assert (dom.state, dom.reason) == (S.SHUTOFF, R.DESTROYED)
    assert not pid_alive(pid)


@pytest.mark.slow
async def test_graceful_destroy_outlives_libvirts_own_timeout(conn: aiovirt.Connection) -> None:
    # libvirt 9.0's VIR_DOMAIN_DESTROY_GRACEFUL kills such a QEMU after 15 s (~27 s in all): aiovirt's
    # graceful destroy sends nothing that can, so it is alive long after, and SIGTERM's equivalent
    # takes effect once the process runs again, as a real pending SIGTERM would.
    name = unique("rq-stuck")
    dom = await conn.create(pc(name))
    pid = qemu_pid(name)
    os.kill(pid, signal.SIGSTOP)
    try:
        with anyio.fail_after(HANG), pytest.raises(aiovirt.DestroyTimeoutError):
            await dom.destroy(graceful=True, timeout=35)
        assert dom.state == S.RUNNING and pid_alive(pid)
    finally:
        os.kill(pid, signal.SIGCONT)
    with anyio.fail_after(HANG):
        await dom.wait_for_state(S.SHUTOFF)
    assert dom.reason == R.DESTROYED and not pid_alive(pid)


async def test_a_persistent_domain_taken_back_by_a_new_connection(daemon: Libvirtd) -> None:
    name = unique("rq-kept")
    async with aiovirt.connect(daemon.uri("qemu:///system")) as conn:
        dom = await conn.define(pc(name))
        await dom.set_autostart(True)
        await dom.start()
        uuid_ = dom.uuid
    pid = qemu_pid(name)  # the guest outlives the connection, as libvirt's do
    async with aiovirt.connect(daemon.uri("qemu:///system")) as conn:
        dom = await conn.lookup(name)
        assert (dom.state, dom.reason, dom.uuid) == (S.RUNNING, R.UNKNOWN, uuid_)
        assert dom.persistent
        assert isinstance(conn.driver, RemoteDriver) and conn.driver.daemon_autostart(name) is True
        # What libvirt made of aiovirt's XML: the emulator's path resolved, the machine pinned.
        assert dom.config == pc(name, uuid=uuid_, emulator="/usr/bin/qemu-system-x86_64")
        assert isinstance(conn.driver, RemoteDriver)
        [warning] = conn.driver.import_warnings[name]
        assert "machine 'pc'" in warning and "pc-i440fx-" in warning
        assert conn.problems == []
        assert conn.startup_events == []
        assert (await dom.qmp("query-status"))["running"] is True
        with anyio.fail_after(HANG):
            [result] = await conn.stop_all(policy=StopPolicy(acpi_timeout=0.5, term_timeout=10))
        assert (result.stopped, result.stage, result.reason) == (True, StopStage.SIGTERM, "host-signal")
        assert not pid_alive(pid)
    # libvirt's autostart starts it with the daemon, never at a connect.
    async with aiovirt.connect(daemon.uri("qemu:///system")) as conn:
        dom = await conn.lookup(name)
        assert (dom.state, dom.reason) == (S.SHUTOFF, R.UNKNOWN) and conn.startup_events == []
        await dom.undefine()
        assert await conn.list_domains() == []


async def test_stop_all_of_guests_that_ignore_acpi(conn: aiovirt.Connection) -> None:
    names = sorted(unique("rq-fleet") for _ in range(4))
    doms = [await conn.create(pc(n)) for n in names]
    await doms[1].suspend()  # resumed, then pressed, as with the QEMU driver
    with anyio.fail_after(HANG):
        results = await conn.stop_all(policy=StopPolicy(acpi_timeout=1, repress_interval=None))
    assert [(r.name, r.stopped, r.stage, r.reason) for r in results] == [
        (n, True, StopStage.SIGTERM, "host-signal") for n in names
    ]
    assert not any(d.active for d in doms)


async def test_another_client_destroys_it(daemon: Libvirtd, conn: aiovirt.Connection) -> None:
    name = unique("rq-theirs")
    dom = await conn.create(pc(name))
    async with RPCClient.open_unix(daemon.socket, "qemu:///system") as other:
        await other.destroy(await other.lookup_by_name(name))
    with anyio.fail_after(HANG):
        await dom.wait_for_state(S.SHUTOFF)
    # Not this connection's destroy: the host ended it (SIGTERM from libvirt), not a crash.
    assert dom.reason == R.SHUTDOWN


async def test_a_start_libvirt_refuses_is_a_launch_error(conn: aiovirt.Connection) -> None:
    name = unique("rq-bad")
    with pytest.raises(aiovirt.LaunchError, match=r"libvirt: .*no-such-qemu"):
        await conn.create(pc(name, emulator="/no-such-qemu"))
    assert await conn.list_domains() == []
    # A definition libvirt refuses is libvirt's error, with its code and message.
    with pytest.raises(aiovirt.rpc.LibvirtError, match="no-such-qemu") as refused:
        await conn.define(pc(name, emulator="/no-such-qemu"))
    assert refused.value.code == aiovirt.rpc._protocol.ErrorCode.SYSTEM_ERROR
    assert await conn.list_domains() == []


async def test_a_cancelled_start_leaves_nothing_running(daemon: Libvirtd, conn: aiovirt.Connection) -> None:
    name = unique("rq-cancel")
    with anyio.move_on_after(0.01) as scope:
        await conn.create(pc(name))
    assert scope.cancelled_caught
    assert await conn.list_domains() == []
    async with RPCClient.open_unix(daemon.socket, "qemu:///system") as other:
        with pytest.raises(aiovirt.DomainNotFoundError):
            await other.lookup_by_name(name)  # started, then destroyed: a transient domain is gone
    with pytest.raises(LookupError):
        qemu_pid(name)


async def test_the_daemon_going_away() -> None:
    name = unique("rq-orphan")
    orphans: list[int] = []
    try:
        with running_libvirtd() as daemon:
            async with aiovirt.connect(daemon.uri("qemu:///system")) as conn:
                dom = await conn.create(pc(name))
                orphans.append(qemu_pid(name))  # guests outlive their daemon (libvirt's design)
                daemon.kill()
                with anyio.fail_after(HANG):
                    while dom.reachable:
                        await anyio.sleep(0.05)
                # The guest keeps its last known state; whatever needs the daemon fails at once.
                assert dom.state == S.RUNNING
                assert {p.kind for p in conn.problems} == {"unreachable"}
                assert any("connection was lost" in p.message for p in conn.problems)
                with anyio.fail_after(5):
                    with pytest.raises(aiovirt.ConnectionLostError):
                        await dom.destroy()
                    with pytest.raises(aiovirt.ConnectionLostError):
                        await dom.qmp("query-status")
                    with pytest.raises(aiovirt.ConnectionLostError):
                        await conn.define(pc(unique("rq-late")))
                    [result] = await conn.stop_all(policy=StopPolicy(acpi_timeout=0.2))
                assert not result.stopped and isinstance(result.error, aiovirt.ConnectionLostError)
    finally:
        # libvirtd.sh's stop ends the guests of a running daemon only: this one was killed.
        for pid in orphans:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
