"""Many hosts, one deadline: ``stop_all_hosts`` across several private libvirtds (each stands for a host),
mixed with a local connection. Both anyio backends."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, ExitStack

import anyio
import pytest

import aiovirt
from aiovirt import StopPolicy, StopStage
from aiovirt._hosts import HostStopResult, stop_all_hosts
from aiovirt.testing import GuestBehaviour, script_guest

from ._libvirtd import Libvirtd, qemu_pid, running_libvirtd
from .conftest import none_config

pytestmark = pytest.mark.anyio
HANG = 90


@pytest.fixture(scope="module")
def daemons() -> Iterator[list[Libvirtd]]:
    with ExitStack() as stack:
        yield [stack.enter_context(running_libvirtd()) for _ in range(3)]


@pytest.fixture
async def hosts(daemons: list[Libvirtd]) -> AsyncIterator[list[aiovirt.Connection]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(aiovirt.connect(d.uri("test:///default"))) for d in daemons]


async def test_one_call_stops_every_host(hosts: list[aiovirt.Connection]) -> None:
    for i, conn in enumerate(hosts):
        for j in range(i + 1):
            await conn.create(none_config(f"h{i}-{j}"))
    async with aiovirt.connect("test:///empty") as local:
        script_guest(local, "local", GuestBehaviour(acpi="ignore"))
        await local.create(none_config("local"))
        streamed: list[HostStopResult] = []
        policy = StopPolicy(acpi_timeout=2, term_timeout=2, kill_timeout=2, deadline=10)
        with anyio.fail_after(HANG):
            results = await stop_all_hosts([*hosts, local], policy, limit=4, on_result=streamed.append)
    # In host order, then each host's own order (by name): its test domain and ours.
    assert [(r.host, r.name) for r in results] == [
        (hosts[0].uri, "h0-0"),
        (hosts[0].uri, "test"),
        (hosts[1].uri, "h1-0"),
        (hosts[1].uri, "h1-1"),
        (hosts[1].uri, "test"),
        (hosts[2].uri, "h2-0"),
        (hosts[2].uri, "h2-1"),
        (hosts[2].uri, "h2-2"),
        (hosts[2].uri, "test"),
        ("test:///empty", "local"),
    ]
    assert sorted(streamed, key=results.index) == results  # every result was streamed, with its host
    assert all(r.stopped for r in results)
    by_host = {r.host: r.result.stage for r in results}
    assert by_host["test:///empty"] == StopStage.SIGTERM  # it ignored the button
    assert {by_host[c.uri] for c in hosts} == {StopStage.ACPI}  # libvirt's test guests do not
    for conn in hosts:
        assert await conn.list_domains(active=True) == []


async def test_a_host_that_went_away_is_in_its_results(daemons: list[Libvirtd]) -> None:
    with running_libvirtd() as doomed:
        async with (
            aiovirt.connect(daemons[0].uri("test:///default")) as alive,
            aiovirt.connect(doomed.uri("test:///default")) as gone,
        ):
            doomed.kill()
            with anyio.fail_after(HANG):
                while (await gone.lookup("test")).reachable:
                    await anyio.sleep(0.05)
                results = await stop_all_hosts([alive, gone], StopPolicy(acpi_timeout=1, deadline=5))
    assert [(r.host, r.name, r.stopped) for r in results] == [
        (alive.uri, "test", True),
        (gone.uri, "test", False),
    ]
    assert isinstance(results[1].result.error, aiovirt.ConnectionLostError)


async def test_on_result_raising_stops_everything(hosts: list[aiovirt.Connection]) -> None:
    class Enough(Exception):
        pass

    def on_result(result: HostStopResult) -> None:
        raise Enough(result.host)

    with anyio.fail_after(HANG), pytest.raises(Enough):
        await stop_all_hosts(hosts, StopPolicy(acpi_timeout=1), on_result=on_result)


async def test_bad_calls(hosts: list[aiovirt.Connection], daemons: list[Libvirtd]) -> None:
    with pytest.raises(aiovirt.ConfigError, match="limit"):
        await stop_all_hosts(hosts, limit=0)
    with pytest.raises(aiovirt.ConfigError, match="twice"):
        await stop_all_hosts([hosts[0], hosts[0]])
    async with aiovirt.connect(daemons[0].uri("test:///default")) as closed:
        pass
    with pytest.raises(aiovirt.ConnectionClosedError):
        await stop_all_hosts([hosts[1], closed])
    assert await stop_all_hosts([]) == []


async def test_real_guests_on_two_hosts_one_deadline(daemons: list[Libvirtd]) -> None:
    # QEMU guests with no OS (they ignore the button) on two daemons, one of them stuck
    # (kill -STOP): a graceful policy stops the others within the deadline and reports it.
    tag = uuid.uuid4().hex[:6]
    async with AsyncExitStack() as stack:
        conns = [
            await stack.enter_async_context(aiovirt.connect(d.uri("qemu:///system"))) for d in daemons[:2]
        ]
        cfg = aiovirt.DomainConfig(name="x", machine="pc", accel="tcg", memory_mib=32)
        for i, conn in enumerate(conns):
            for j in range(2):
                await conn.create(cfg.model_copy(update={"name": f"hq{tag}-{i}{j}"}))
        stuck = qemu_pid(f"hq{tag}-11")
        os.kill(stuck, signal.SIGSTOP)
        try:
            policy = StopPolicy(graceful=True, acpi_timeout=1, term_timeout=3, deadline=20)
            with anyio.fail_after(HANG):
                results = await stop_all_hosts(conns, policy)
            assert [(r.name, r.stopped, r.result.stage) for r in results] == [
                (f"hq{tag}-00", True, StopStage.SIGTERM),
                (f"hq{tag}-01", True, StopStage.SIGTERM),
                (f"hq{tag}-10", True, StopStage.SIGTERM),
                (f"hq{tag}-11", False, StopStage.NONE),
            ]
            assert isinstance(results[-1].result.error, aiovirt.DestroyTimeoutError)
        finally:
            os.kill(stuck, signal.SIGCONT)
        with anyio.fail_after(HANG):
            [last] = await conns[1].stop_all(policy=StopPolicy(acpi_timeout=0, term_timeout=20))
        assert last.stopped
