"""No thread per domain: hundreds of QEMU processes are started, watched and destroyed by one thread.

Python 3.11's asyncio (and anyio.open_process on it) would start a thread per child; the pidfd
path must not, on either backend.
"""

from __future__ import annotations

import sys

import anyio
import pytest

import aiovirt

from .conftest import none_config

pytestmark = pytest.mark.anyio

N = 300


def os_threads() -> int:
    """Threads of this process as the kernel counts them (not only Python's)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise AssertionError("no Threads: line")


@pytest.mark.slow
async def test_300_domains_no_thread_growth(uri: str) -> None:
    print(f"python {sys.version_info[:3]}")
    samples: list[int] = []

    async def sample(stop: anyio.Event) -> None:
        while not stop.is_set():
            samples.append(os_threads())
            await anyio.sleep(0.01)

    async with aiovirt.connect(uri) as conn:
        baseline = os_threads()
        stop = anyio.Event()
        domains: list[aiovirt.Domain] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(sample, stop)

            async def create(i: int) -> None:
                domains.append(await conn.create(none_config(f"t{i}")))

            async with anyio.create_task_group() as starters:
                for i in range(N):
                    starters.start_soon(create, i)
            assert len(await conn.list_domains(active=True)) == N
            samples.append(os_threads())  # all N running and watched

            async with anyio.create_task_group() as stoppers:
                for dom in domains:
                    stoppers.start_soon(dom.destroy)
            stop.set()
        assert all(d.state == aiovirt.DomainState.SHUTOFF for d in domains)
        assert await conn.list_domains() == []
    peak = max(samples)
    # Not one thread per domain: a fixed allowance for the runtime's own helpers, far below N.
    assert peak <= baseline + 2, f"threads grew from {baseline} to {peak} with {N} domains"


def live_tasks(backend: str) -> int:
    """Tasks alive in this event loop."""
    if backend == "asyncio":
        import asyncio

        return len(asyncio.all_tasks())
    import trio

    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(count(child) for nursery in task.child_nurseries for child in nursery.child_tasks)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return count(root)


#: What watches one running domain (a console included): its supervisor alone, the monitor and the
#: console being read by reader callbacks (the loop's on asyncio; on trio those of a connection
#: share one task, started with it).
TASKS_PER_DOMAIN = 1


async def test_tasks_per_running_domain(anyio_backend: str, uri: str) -> None:
    async with aiovirt.connect(uri) as conn:
        await anyio.wait_all_tasks_blocked()
        before = live_tasks(anyio_backend)
        domains = [await conn.create(none_config(f"k{i}")) for i in range(4)]
        await anyio.wait_all_tasks_blocked()
        running = live_tasks(anyio_backend)
        for dom in domains:
            assert (await dom.qmp("query-status"))["status"] == "running"
            assert dom.config.console  # its console is served too
        async with anyio.create_task_group() as tg:
            for dom in domains:
                tg.start_soon(dom.destroy)
        await anyio.wait_all_tasks_blocked()
        after = live_tasks(anyio_backend)
    assert (running - before) == TASKS_PER_DOMAIN * len(domains)
    assert after == before  # nothing outlives its domain
