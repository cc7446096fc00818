"""Stop every running domain of a host within a deadline, the way a host's shutdown script would.

    .venv/bin/python examples/fleet_shutdown.py qemu:///system --deadline 90
    .venv/bin/python examples/fleet_shutdown.py "qemu:///embed?root=/srv/vms" --deadline 30 --graceful

Every domain goes through the stages at once (ACPI power button for ``--acpi-timeout`` seconds,
pressed again every 10 s; then SIGTERM for 10 s; then SIGKILL unless ``--graceful``), scaled down
together to fit the deadline, so a fleet costs one timeout, not one per guest. Each result is
printed as soon as that domain is done. The exit status is 0 when every domain stopped, 1 when any
is still running (``--graceful`` never kills one that outlives SIGTERM), 2 when the URI cannot be
opened or the arguments are wrong.

Domains that are not stopped keep running after this script exits: leaving ``aiovirt.connect()``
stops supervising, never the QEMUs.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import anyio

import aiovirt


def print_result(result: aiovirt.StopResult) -> None:
    if result.stopped:
        how = f"after {result.stage}" + (" (by another task)" if result.by_other else "")
        why = f", {result.reason}" if result.reason else ""
        print(f"{result.name}: stopped {how} in {result.elapsed:.1f} s{why}", flush=True)
    else:
        error = f"{type(result.error).__name__}: {result.error}" if result.error else "no exit seen"
        print(f"{result.name}: STILL RUNNING after {result.elapsed:.1f} s ({error})", flush=True)


async def shutdown_fleet(uri: str, deadline: float, acpi_timeout: float, graceful: bool, limit: int) -> int:
    started = time.monotonic()
    async with aiovirt.connect(uri) as conn:
        targets = await conn.list_domains(active=True)
        mode = "graceful: no SIGKILL" if graceful else "SIGKILL last"
        print(f"stopping {len(targets)} domain(s) of {uri} within {deadline:g} s ({mode})", flush=True)
        policy = aiovirt.StopPolicy(graceful=graceful, deadline=deadline, acpi_timeout=acpi_timeout)
        results = await conn.stop_all(targets, policy, limit=limit, on_result=print_result)
        left = [d.name for d in await conn.list_domains(active=True)]
    stopped = sum(r.stopped for r in results)
    print(f"{stopped} of {len(results)} stopped in {time.monotonic() - started:.1f} s", flush=True)
    if left:
        print(f"still running: {', '.join(left)}", flush=True)
        return 1
    return 0


def seconds(text: str, *, zero: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value >= 0 if zero else value > 0) or math.isinf(value):
        raise argparse.ArgumentTypeError(f"not a{'' if zero else ' positive'} number of seconds: {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("uri", help="e.g. qemu:///system, qemu:///session, qemu:///embed?root=DIR")
    parser.add_argument(
        "--deadline", type=seconds, default=90.0, metavar="SECONDS", help="seconds for the whole fleet (90)"
    )
    parser.add_argument(
        "--acpi-timeout",
        type=lambda text: seconds(text, zero=True),
        metavar="SECONDS",
        default=60.0,
        help="seconds the guests get to power off after the button press; 0 skips it (60)",
    )
    parser.add_argument("--graceful", action="store_true", help="never SIGKILL: report survivors instead")
    parser.add_argument("--limit", type=int, default=64, help="QMP requests in flight at once (64)")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args(argv)
    if args.limit < 1:
        parser.error("--limit must be at least 1")
    try:
        return anyio.run(
            shutdown_fleet,
            args.uri,
            args.deadline,
            args.acpi_timeout,
            args.graceful,
            args.limit,
            backend=args.backend,
        )
    except aiovirt.AiovirtError as exc:  # a bad URI, a state directory another controller holds...
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
