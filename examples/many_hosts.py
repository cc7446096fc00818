"""Stop every guest of several hosts with one policy and one deadline, printing each result as it comes.

    .venv/bin/python examples/many_hosts.py qemu+ssh://root@host1/system qemu+tls://host2/system
    .venv/bin/python examples/many_hosts.py --deadline 30 --graceful "qemu+unix:///system?socket=/tmp/d1/sock/libvirt-sock"

Each URI is one connection (a libvirt daemon, or a local ``qemu:///...``); once all are open
they are stopped together: ACPI button, then SIGTERM, then SIGKILL unless
``--graceful``, all within ``--deadline`` seconds whatever the number of hosts.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import AsyncExitStack

import anyio

import aiovirt
from aiovirt._hosts import HostStopResult, stop_all_hosts


def show(result: HostStopResult) -> None:
    r = result.result
    outcome = f"stopped at {r.stage}" if r.stopped else f"NOT stopped: {r.error}"
    print(f"{result.host}  {r.name}: {outcome} after {r.elapsed:.1f} s", flush=True)


async def main(uris: list[str], deadline: float, graceful: bool) -> int:
    policy = aiovirt.StopPolicy(graceful=graceful, acpi_timeout=deadline / 2, deadline=deadline)
    async with AsyncExitStack() as stack:
        # Opened one after the other: a connection is entered and left by the same task.
        conns = [await stack.enter_async_context(aiovirt.connect(uri)) for uri in uris]
        results = await stop_all_hosts(conns, policy, on_result=show)
    failed = [r for r in results if not r.stopped]
    print(f"{len(results) - len(failed)} of {len(results)} guests stopped on {len(uris)} hosts")
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("uris", nargs="+")
    parser.add_argument("--deadline", type=float, default=90.0)
    parser.add_argument("--graceful", action="store_true", help="never send SIGKILL")
    args = parser.parse_args()
    sys.exit(anyio.run(main, args.uris, args.deadline, args.graceful))
