"""What each way of stopping a domain keeps on its disks: the table of benchmarks/integrity.md.

    .venv/bin/python benchmarks/integrity.py                    # 20 instants per way (about 15 minutes)
    .venv/bin/python benchmarks/integrity.py --instants 3 --seed 7 --jobs 2   # a quick look

For every way of stopping (``aiovirt.testing._integrity.StopWay``) and every seeded instant: the
tiny guest boots in writer mode on three fresh qcow2 images (virtio, ``cache=writeback``) and
writes numbered, checksummed 4 KiB blocks to each: fsynced on the first (console: ``FLUSHED n``),
with O_DIRECT and never flushed on the second (``DIRECT n``: QEMU has it, in its own caches),
plainly on the third (``WRITTEN n``: in the guest's page cache only). It is stopped after a seeded
number of fsynced blocks plus a seeded fraction of a second. Then ``qemu-img check`` runs on every
image and every reported block is read back and verified (number, checksum, pattern).

Instants alternate between the asyncio and the trio backend (``--backends`` to choose). The same
``--seed`` gives the same instants. Prints one JSON object (every instant), then the markdown
table; ``--json-out`` / ``--md-out`` also write them. Progress goes to stderr. Exits 1 if any
aiovirt way lost a flushed block or left an image that ``qemu-img check`` rejects.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's aiovirt, wherever the script is run from

import anyio  # noqa: E402

import aiovirt  # noqa: E402
from aiovirt.testing import ensure_tiny_guest  # noqa: E402
from aiovirt.testing._integrity import (  # noqa: E402
    KINDS,
    WAYS,
    Instant,
    Outcome,
    StopWay,
    Summary,
    instants,
    run_instant,
    summarize,
)


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def _run_backend(
    work: Path, planned: Sequence[tuple[int, Instant]], jobs: int, backend: str
) -> list[tuple[int, Outcome]]:
    guest = await anyio.to_thread.run_sync(ensure_tiny_guest)
    done: list[tuple[int, Outcome]] = []
    limiter = anyio.CapacityLimiter(jobs)

    async def one(index: int, instant: Instant) -> None:
        async with limiter:
            started = time.monotonic()
            outcome = await run_instant(conn, guest, instant, work / "images", f"i{index}")
            done.append((index, outcome))
            _progress(
                f"[{len(done)}/{len(planned)} {backend}] {outcome.describe()}, images clean "
                f"{outcome.images_clean} ({time.monotonic() - started:.1f} s)"
            )

    uri = f"qemu:///embed?root={work / ('state-' + backend)}"
    async with aiovirt.connect(uri) as conn, anyio.create_task_group() as tg:
        for index, instant in planned:
            tg.start_soon(one, index, instant)
    return done


def _fraction(part: int, whole: int) -> str:
    return f"{part} of {whole}"


def markdown(rows: Sequence[Summary]) -> str:
    lines = [
        "| Way of stopping | QEMU's shutdown reason | instants | images clean (`qemu-img check`) "
        "| fsynced blocks lost | written past the guest's page cache, never flushed: lost "
        "| in the guest's page cache only: lost | leaked clusters |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        reasons = ", ".join("none (killed)" if r == "none" else f"`{r}`" for r in row.shutdown_reasons)
        stage = f" (stop_all stage: {', '.join(row.stages)})" if row.stages else ""
        lost = [_fraction(row.lost[kind], row.reported[kind]) for kind in KINDS]
        lines.append(
            f"| {WAYS[row.way].call}{stage} | {reasons} | {row.instants} "
            f"| {_fraction(row.clean, row.instants)} | **{lost[0]}** | {lost[1]} | {lost[2]} "
            f"| {row.leaked_clusters} |"
        )
    return "\n".join(lines) + "\n"


def _outcome_json(index: int, backend: str, o: Outcome) -> dict[str, Any]:
    return {
        "index": index,
        "backend": backend,
        "way": o.instant.way.value,
        "seed": o.instant.seed,
        "after_flushed": o.instant.after_flushed,
        "delay": round(o.instant.delay, 3),
        "images": {
            kind: {
                "reported": kept.reported,
                "lost": [list(x) for x in kept.lost],
                "qemu_img_check": {
                    "status": kept.check.exit_status,
                    "corruptions": kept.check.corruptions,
                    "leaks": kept.check.leaks,
                    "check_errors": kept.check.check_errors,
                },
            }
            for kind, kept in o.images.items()
        },
        "images_clean": o.images_clean,
        "stop_stage": o.stop_stage,
        "shutdown_reason": o.shutdown_reason,
    }


def _guest_manifest() -> Any:
    """What the tiny guest was built from (its manifest.json: kernel package, recipe version...)."""
    try:
        return json.loads((ensure_tiny_guest().kernel.parent / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _version(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.splitlines()[0] if out else "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instants", type=int, default=20, help="instants per way (default 20)")
    parser.add_argument("--seed", type=int, default=11, help="seed of every instant (default 11)")
    parser.add_argument("--ways", default=",".join(w.value for w in StopWay), help="comma-separated ways")
    parser.add_argument("--backends", default="asyncio,trio", help="instants alternate between these")
    parser.add_argument("--jobs", type=int, default=1, help="instants run at once (default 1)")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--md-out", type=Path)
    args = parser.parse_args(argv)
    if args.instants < 1 or args.jobs < 1:
        parser.error("--instants and --jobs must be at least 1")
    try:
        ways = [StopWay(w) for w in args.ways.split(",")]
    except ValueError as exc:
        parser.error(f"{exc}; ways: {', '.join(w.value for w in StopWay)}")
    backends = args.backends.split(",")
    if not backends or set(backends) - {"asyncio", "trio"}:
        parser.error("--backends takes asyncio, trio or both")

    plan = [
        (i, inst) for i, inst in enumerate(x for w in ways for x in instants(w, args.instants, args.seed))
    ]
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="aiovirt-integrity-", dir="/tmp"))
    results: list[tuple[int, str, Outcome]] = []
    try:
        for k, backend in enumerate(backends):
            mine = [(i, inst) for i, inst in plan if i % len(backends) == k]
            done = anyio.run(_run_backend, work, mine, args.jobs, backend, backend=backend)
            results += [(i, backend, o) for i, o in done]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results.sort(key=lambda r: r[0])
    rows = summarize([o for _i, _b, o in results])
    table = markdown(rows)
    report = {
        "benchmark": "integrity",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "argv": sys.argv,
        "seed": args.seed,
        "instants_per_way": args.instants,
        "backends": backends,
        "jobs": args.jobs,
        "seconds": round(time.monotonic() - started, 1),
        "python": platform.python_version(),
        "qemu": _version(["qemu-system-x86_64", "--version"]),
        "qemu_img": _version(["qemu-img", "--version"]),
        "host_kernel": platform.release(),
        "guest": _guest_manifest(),
        "instants": [_outcome_json(i, b, o) for i, b, o in results],
    }
    print(json.dumps(report, indent=1))
    print()
    print(table)
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=1) + "\n")
    if args.md_out:
        args.md_out.write_text(table)
    bad = [r for r in rows if WAYS[r.way].aiovirt and (r.lost["flushed"] or r.clean != r.instants)]
    if bad:
        _progress(f"integrity: an aiovirt way lost flushed data or left a damaged image: {bad}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
