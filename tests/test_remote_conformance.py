"""What libvirt's own test driver shows through the remote driver (``test+unix:///default``, a
real, private libvirtd) beyond the behaviour suite, which runs against it too (test_conformance.py,
the ``remote`` driver). Both anyio backends.

Where libvirt's test driver differs from aiovirt's drivers, the test shows what the caller gets:
it has no processes (a destroy ends a guest at once, graceful or not; nothing can ignore SIGTERM),
its guests power off at once on the ACPI button, its host has a domain of its own that aiovirt
cannot represent, and definitions live on the daemon. Each new connection to it sees a fresh host,
as with ``virsh``.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import AsyncIterator, Iterator

import anyio
import pytest

import aiovirt
from aiovirt import DomainState as S
from aiovirt import StateReason as R
from aiovirt import StopPolicy, StopStage
from aiovirt.rpc import LifecycleEvent

from ._libvirtd import Libvirtd, running_libvirtd
from .conftest import none_config
from .test_conformance import remote_driver, reset_test_host

pytestmark = pytest.mark.anyio
HANG = 30


@pytest.fixture(scope="module")
def daemon() -> Iterator[Libvirtd]:
    with running_libvirtd() as d:
        yield d


@pytest.fixture
async def conn(daemon: Libvirtd) -> AsyncIterator[aiovirt.Connection]:
    async with aiovirt.connect(daemon.uri("test:///default")) as c:
        yield c
    await reset_test_host(daemon)


async def test_graceful_destroy_always_ends_a_test_guest(conn: aiovirt.Connection) -> None:
    # aiovirt's own test driver can script a guest that ignores SIGTERM; libvirt's cannot: its
    # DOMAIN_DESTROY_FLAGS(GRACEFUL) ends the guest at once. (Real QEMU: test_remote_qemu.py.)
    dom = await conn.create(none_config("deaf"))
    with anyio.fail_after(HANG):
        assert await dom.destroy(graceful=True, timeout=0.5) == signal.SIGTERM
    assert (dom.state, dom.reason) == (S.SHUTOFF, R.DESTROYED)


async def test_the_daemons_own_refusal(conn: aiovirt.Connection) -> None:
    # A domain the daemon has under that name, which this connection never saw.
    client = remote_driver(conn).client
    await client.define_xml(
        f"<domain type='test'><name>theirs</name><uuid>{uuid.uuid4()}</uuid><memory>65536</memory>"
        "<os><type>hvm</type></os></domain>"
    )
    with pytest.raises(aiovirt.DomainExistsError, match="already exists"):
        await conn.define(none_config("theirs"))
    assert [d.name for d in await conn.list_domains()] == ["test"]


async def test_stop_all_stages_and_results(conn: aiovirt.Connection) -> None:
    plain = await conn.create(none_config("plain"))
    paused = await conn.create(none_config("paused"))
    await paused.suspend()
    policy = StopPolicy(acpi_timeout=1, term_timeout=1, kill_timeout=10, graceful=True)
    with anyio.fail_after(HANG):
        results = await conn.stop_all(policy=policy)
    # libvirt's test guests power off at once on the button, a paused one once resumed.
    assert [(r.name, r.stopped, r.stage, r.reason) for r in results] == [
        ("paused", True, StopStage.ACPI, None),
        ("plain", True, StopStage.ACPI, None),
        ("test", True, StopStage.ACPI, None),
    ]
    assert not plain.active and not paused.active
    assert (await conn.lookup("test")).reason == R.SHUTDOWN


async def test_the_default_host_and_its_unrepresentable_domain(conn: aiovirt.Connection) -> None:
    dom = await conn.lookup("test")
    assert dom.state == S.RUNNING and dom.persistent and dom.pid is None
    # Its XML (type='test', i686, a libvirt network) is nothing aiovirt can run: it is listed with a
    # stand-in config and a problem that says so, and it can be stopped and started all the same.
    [problem] = conn.problems
    assert (problem.kind, str(problem.path)) == ("definition", "test")
    assert "stand-in config" in problem.message and "type" in problem.message
    assert (dom.config.memory_mib, dom.config.vcpus) == (8192, 2)
    info = await dom.info()
    assert (info.state, info.memory_mib, info.vcpus, info.pid) == (S.RUNNING, 8192, 2, None)
    await dom.set_autostart(True)  # changes the flag only: libvirt's definition stays as it was
    assert await remote_driver(conn).client.get_autostart(
        await remote_driver(conn).client.lookup_by_name("test")
    )
    assert remote_driver(conn).daemon_autostart("test") is True
    assert await dom.destroy() == signal.SIGTERM
    await dom.start()
    assert (dom.state, dom.reason) == (S.RUNNING, R.BOOTED)
    xml = await remote_driver(conn).client.get_xml_desc(
        await remote_driver(conn).client.lookup_by_name("test")
    )
    assert "type='test'" in xml and "testnet0" in xml


async def test_definitions_live_on_the_daemon(conn: aiovirt.Connection) -> None:
    client = remote_driver(conn).client
    daemon_events: list[LifecycleEvent] = []
    async with client.subscribe_lifecycle() as raw:
        dom = await conn.define(none_config("kept", memory_mib=32))
        await dom.set_autostart(True)
        await dom.set_autostart(False)
        await conn.define(dom.config.model_copy(update={"memory_mib": 48}))
        await anyio.sleep(0.2)
        while (e := raw.receive_nowait()) is not None:
            daemon_events.append(e)
    # Two definitions (added, updated); the autostart changes redefine nothing.
    assert [(e.dom.name, e.event, e.detail) for e in daemon_events] == [("kept", 0, 0), ("kept", 0, 1)]
    ref = await client.lookup_by_name("kept")
    assert ref.uuid == dom.uuid and (await client.get_info(ref)).max_mem_kib == 48 * 1024
    assert dom.config.memory_mib == 48


async def test_two_clients_of_one_test_host(daemon: Libvirtd, conn: aiovirt.Connection) -> None:
    # libvirt's test:///default is one host while any connection to it is open (a fresh one once
    # all have closed): another client's changes after connect() are not in this connection's
    # table (the driver seam has no way to add a domain to it), but its domains' runs are watched.
    mine = await conn.create(none_config("mine"))
    async with aiovirt.connect(daemon.uri("test:///default")) as other:
        assert [d.name for d in await other.list_domains()] == ["mine", "test"]
        await other.define(none_config("theirs"))
        await (await other.lookup("mine")).destroy()
    with anyio.fail_after(HANG):
        await mine.wait_for_state(S.SHUTOFF)
    assert mine.reason == R.SHUTDOWN  # ended by another client: the host ended it, not a crash
    with pytest.raises(aiovirt.DomainNotFoundError):
        await conn.lookup("theirs")
    async with aiovirt.connect(daemon.uri("test:///default")) as third:
        assert [d.name for d in await third.list_domains()] == ["test", "theirs"]


async def test_wait_for_state_and_a_crash_of_the_connection_state(conn: aiovirt.Connection) -> None:
    dom = await conn.create(none_config("waited"))
    async with anyio.create_task_group() as tg:

        async def press() -> None:
            await anyio.sleep(0.1)
            await dom.shutdown()

        tg.start_soon(press)
        with anyio.fail_after(HANG):
            await dom.wait_for_state(S.SHUTOFF)
    assert (dom.reason, dom.shutdown_reason) == (R.SHUTDOWN, None)
    with pytest.raises(aiovirt.DomainNotFoundError):
        await conn.lookup("waited")  # transient: gone once stopped


async def test_a_closed_connection_is_closed(daemon: Libvirtd) -> None:
    async with aiovirt.connect(daemon.uri("test:///default")) as conn:
        dom = await conn.create(none_config("closing"))
    with pytest.raises(aiovirt.ConnectionClosedError):
        await dom.destroy()
    with pytest.raises(aiovirt.ConnectionClosedError):
        await conn.list_domains()


async def test_readonly_connection(daemon: Libvirtd) -> None:
    async with aiovirt.connect(daemon.uri("test:///default"), readonly=True) as conn:
        dom = await conn.lookup("test")
        assert dom.state == S.RUNNING
        with pytest.raises(aiovirt.ReadOnlyError):
            await dom.destroy()
        with pytest.raises(aiovirt.ReadOnlyError):
            await conn.define(none_config("nope"))
        # The daemon itself refuses writes on this connection (it was opened VIR_CONNECT_RO).
        with pytest.raises(aiovirt.rpc.LibvirtError, match=r"read-only|read only"):
            await remote_driver(conn).client.suspend(await remote_driver(conn).client.lookup_by_name("test"))


async def test_an_error_in_the_block_propagates_unchanged(daemon: Libvirtd) -> None:
    with pytest.raises(ZeroDivisionError):
        async with aiovirt.connect(daemon.uri("test:///default")) as conn:
            await conn.create(none_config("unwound"))
            1 / 0  # noqa: B018
    with pytest.raises(aiovirt.DomainNotFoundError):
        async with aiovirt.connect(daemon.uri("test:///default")) as conn:
            await conn.lookup("nobody")
