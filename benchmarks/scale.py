"""Scale of the controller itself, measured with the in-memory test driver (no QEMU in the way).

For each N (default 1,000, 10,000, 100,000) and each backend, in a fresh interpreter: define N
domains, start them all at once, then ``stop_all`` them (the test guests take the ACPI button at
once), with one connection-wide subscriber counting every event. Reported per domain: wall time
of each phase (µs) and the controller's memory growth (KiB of peak RSS over the empty
interpreter). Per-domain costs that stay flat as N grows 100x mean no operation scans all domains.

    .venv/bin/python benchmarks/scale.py                  # 1k, 10k, 100k on asyncio and trio
    .venv/bin/python benchmarks/scale.py --n 1000 10000   # smaller
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any


def _worker(backend: str, n: int) -> dict[str, Any]:
    import anyio

    import aiovirt

    async def main() -> dict[str, Any]:
        base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        counted = {"events": 0}
        async with aiovirt.connect("test:///empty") as conn, conn.subscribe(max_buffer=8 * n) as sub:

            async def count() -> None:
                async for _ in sub:
                    counted["events"] += 1

            async with anyio.create_task_group() as counter:
                counter.start_soon(count)
                t0 = time.perf_counter()
                doms = [
                    await conn.define(aiovirt.DomainConfig(name=f"d{i:06d}", memory_mib=8, machine="none"))
                    for i in range(n)
                ]
                t1 = time.perf_counter()
                async with anyio.create_task_group() as tg:
                    for dom in doms:
                        tg.start_soon(dom.start)
                t2 = time.perf_counter()
                results = await conn.stop_all(policy=aiovirt.StopPolicy(acpi_timeout=30), limit=64)
                t3 = time.perf_counter()
                await anyio.wait_all_tasks_blocked()
                counter.cancel_scope.cancel()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        stopped = sum(r.stopped for r in results)
        return {
            "backend": backend,
            "n": n,
            "define_us": (t1 - t0) / n * 1e6,
            "start_us": (t2 - t1) / n * 1e6,
            "stop_all_us": (t3 - t2) / n * 1e6,
            "rss_kib_per_domain": (rss - base_rss) / n,
            "stopped": stopped,
            "events": counted["events"],  # DEFINED, STARTED, SHUTDOWN, STOPPED per domain
        }

    return anyio.run(main, backend=backend)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--backends", nargs="+", default=["asyncio", "trio"])
    parser.add_argument("--worker", nargs=2, metavar=("BACKEND", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--json-out")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker[0], int(args.worker[1]))))
        return 0
    rows = []
    for backend in args.backends:
        for n in args.n:
            print(f"scale: {backend} N={n}", file=sys.stderr)
            out = subprocess.run(
                [sys.executable, __file__, "--worker", backend, str(n)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            rows.append(json.loads(out))
    print(json.dumps(rows, indent=2))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=2)
    print("\n| backend | N | define µs/dom | start µs/dom | stop_all µs/dom | KiB/dom | stopped | events |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['backend']} | {r['n']:,} | {r['define_us']:.0f} | {r['start_us']:.0f} | "
            f"{r['stop_all_us']:.0f} | {r['rss_kib_per_domain']:.1f} | {r['stopped']:,} | {r['events']:,} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
