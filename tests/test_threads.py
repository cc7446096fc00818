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
