"""What each way of stopping a domain keeps on its disks: the tiny guest's writer, stopped at seeded instants.

One *instant* boots the tiny guest in writer mode on three fresh qcow2 images (virtio,
``cache=writeback``), waits until it has reported a seeded number of fsynced blocks, waits a
seeded fraction of a second more, and stops it in one of the :class:`StopWay` ways. Then, with
QEMU gone, ``qemu-img check`` runs on every image and every block the console reported is read
back from its image: ``FLUSHED`` (fsynced), ``DIRECT`` (written past the guest's page cache, so
QEMU had it, never flushed) and ``WRITTEN`` (in the guest's page cache only).

Used by ``tests/test_integrity.py`` (a few instants) and ``benchmarks/integrity.py`` (the table).
Only aiovirt's public API drives the domain; the bare SIGKILL is the comparison aiovirt is not.
"""

from __future__ import annotations

import enum
import os
import random
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anyio

from .. import Connection, Domain, DomainState, StopPolicy
from ._blocks import Disk, ImageCheck, block_problem, check_image, create_image, parse_console, read_image
from ._guest import MAX_SEED, TinyGuest

__all__ = [
    "KINDS",
    "WAYS",
    "Instant",
    "Kept",
    "Outcome",
    "StopWay",
    "Summary",
    "instants",
    "run_instant",
    "summarize",
]

#: Bound on every wait of one instant (boot, the writer's progress, the stop): a hang fails, never blocks.
HANG = 180.0
#: How long the stuck QEMU's SIGTERM is left pending before destroy sends SIGKILL.
STUCK_TERM_TIMEOUT = 0.5
IMAGE_MIB = 32  # 8192 blocks: a run writes a few hundred
#: The three images, in the guest's disk order (vda, vdb, vdc).
KINDS: tuple[Disk, ...] = ("flushed", "direct", "cached")


class StopWay(str, enum.Enum):
    """The ways of stopping a domain that are compared."""

    ACPI = "acpi"
    DESTROY_GRACEFUL = "destroy-graceful"
    DESTROY_STUCK = "destroy-stuck"
    STOP_ALL = "stop-all"
    STOP_ALL_GRACEFUL = "stop-all-graceful"
    STOP_ALL_SIGNALS = "stop-all-signals"
    SIGKILL = "sigkill"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class WayInfo:
    call: str  # what is run, for the table
    aiovirt: bool  # False for the comparison that is not an aiovirt call
    #: What ends QEMU: the guest powering off (after its sync), SIGTERM, or SIGKILL.
    ending: Literal["guest", "SIGTERM", "SIGKILL"]


WAYS: dict[StopWay, WayInfo] = {
    StopWay.ACPI: WayInfo("`dom.shutdown()`, wait for SHUTOFF", True, "guest"),
    StopWay.DESTROY_GRACEFUL: WayInfo("`dom.destroy(graceful=True)`", True, "SIGTERM"),
    StopWay.DESTROY_STUCK: WayInfo(
        f"QEMU `kill -STOP`ped, then `dom.destroy(timeout={STUCK_TERM_TIMEOUT})`", True, "SIGKILL"
    ),
    StopWay.STOP_ALL: WayInfo("`conn.stop_all([dom], StopPolicy())`", True, "guest"),
    StopWay.STOP_ALL_GRACEFUL: WayInfo("`conn.stop_all([dom], StopPolicy(graceful=True))`", True, "guest"),
    StopWay.STOP_ALL_SIGNALS: WayInfo("`conn.stop_all([dom], StopPolicy(acpi_timeout=0))`", True, "SIGTERM"),
    StopWay.SIGKILL: WayInfo("`kill -KILL` of QEMU, not aiovirt (for comparison)", False, "SIGKILL"),
}


@dataclass(frozen=True)
class Instant:
    """When and how one run is stopped: after ``after_flushed`` FLUSHED lines plus ``delay`` seconds."""

    way: StopWay
    seed: int  # the guest's pattern seed
    after_flushed: int
    delay: float


def instants(way: StopWay, count: int, seed: int) -> list[Instant]:
    """``count`` seeded instants for ``way``: the same arguments give the same instants."""
    rng = random.Random(f"aiovirt-integrity:{seed}:{way.value}")
    return [
        Instant(way, rng.randint(0, MAX_SEED), rng.randint(1, 40), rng.uniform(0.0, 1.5))
        for _ in range(count)
    ]


@dataclass(frozen=True)
class Kept:
    """One image after one instant: the blocks the guest reported, and those not read back intact."""

    reported: int
    lost: tuple[tuple[int, str], ...]  # (block, what is wrong with it)
    check: ImageCheck


@dataclass(frozen=True)
class Outcome:
    """What one instant left on the images."""

    instant: Instant
    images: dict[Disk, Kept]  # by kind, in KINDS order
    stop_stage: str | None  # the last request stop_all sent, for the stop_all ways
    shutdown_reason: str | None  # QEMU's (dom.shutdown_reason): None when it was killed

    @property
    def images_clean(self) -> bool:
        return all(kept.check.clean for kept in self.images.values())

    @property
    def leaked_clusters(self) -> int:
        return sum(kept.check.leaks for kept in self.images.values())

    def describe(self) -> str:
        i = self.instant
        parts = [
            f"{kind} {len(k.lost)} lost of {k.reported}" + (f" {list(k.lost)[:3]}" if k.lost else "")
            for kind, k in self.images.items()
        ]
        bad = [k.check.output for k in self.images.values() if not k.check.clean]
        return (
            f"{i.way} (seed {i.seed}, after {i.after_flushed} flushed + {i.delay:.2f} s): "
            f"{'; '.join(parts)}; QEMU's shutdown reason {self.shutdown_reason}; "
            f"leaked clusters {self.leaked_clusters}" + (f"; qemu-img check: {bad}" if bad else "")
        )


async def _wait_flushed(console: Path, count: int) -> None:
    while len(parse_console(await anyio.Path(console).read_text(errors="replace")).flushed) < count:
        await anyio.sleep(0.05)


async def _stop(conn: Connection, dom: Domain, pid: int, way: StopWay) -> str | None:
    """Stop ``dom`` (QEMU ``pid``) in ``way``; return the stage for the stop_all ways."""
    if way is StopWay.ACPI:
        await dom.shutdown()
        await dom.wait_for_state(DomainState.SHUTOFF)
    elif way is StopWay.DESTROY_GRACEFUL:
        await dom.destroy(graceful=True, timeout=HANG)
    elif way is StopWay.DESTROY_STUCK:
        os.kill(pid, signal.SIGSTOP)  # SIGTERM now stays pending: only SIGKILL ends it
        await dom.destroy(timeout=STUCK_TERM_TIMEOUT)
    elif way is StopWay.SIGKILL:
        os.kill(pid, signal.SIGKILL)
        await dom.wait_for_state(DomainState.SHUTOFF)
    else:
        policy = {
            StopWay.STOP_ALL: StopPolicy(),
            StopWay.STOP_ALL_GRACEFUL: StopPolicy(graceful=True),
            StopWay.STOP_ALL_SIGNALS: StopPolicy(acpi_timeout=0),
        }[way]
        (result,) = await conn.stop_all([dom], policy)
        if not result.stopped:
            raise AssertionError(f"stop_all did not stop {dom.name}: {result}")
        return result.stage.value
    return None


async def run_instant(
    conn: Connection, guest: TinyGuest, instant: Instant, workdir: Path, name: str
) -> Outcome:
    """Boot a writer on fresh images in ``workdir``, stop it at ``instant``, check what the images kept."""
    await anyio.Path(workdir).mkdir(parents=True, exist_ok=True)
    images = {kind: workdir / f"{name}-{kind}.qcow2" for kind in KINDS}
    for image in images.values():
        await anyio.to_thread.run_sync(create_image, image, IMAGE_MIB)
    config = guest.writer_config(
        name, seed=instant.seed, flushed=images["flushed"], direct=images["direct"], cached=images["cached"]
    )
    with anyio.fail_after(HANG):
        dom = await conn.create(config)
        console, pid = dom.console_path, dom.pid
        assert console is not None and pid is not None
        try:
            await _wait_flushed(console, instant.after_flushed)
            await anyio.sleep(instant.delay)
            stage = await _stop(conn, dom, pid, instant.way)
        except BaseException:
            with anyio.CancelScope(shield=True), anyio.move_on_after(30):
                if dom.active:
                    os.kill(pid, signal.SIGKILL)
                    await dom.wait_for_state(DomainState.SHUTOFF)
            raise
    if dom.state is not DomainState.SHUTOFF:
        raise AssertionError(f"{name} is {dom.state} after {instant.way}")
    report = parse_console(await anyio.Path(console).read_text(errors="replace"))
    reported = {"flushed": report.flushed, "direct": report.direct, "cached": report.written}

    def check() -> Outcome:
        kept = {kind: _kept(images[kind], kind, reported[kind], instant.seed) for kind in KINDS}
        return Outcome(instant, kept, stage, dom.shutdown_reason)

    return await anyio.to_thread.run_sync(check)


def _kept(image: Path, kind: Disk, reported: frozenset[int], seed: int) -> Kept:
    check = check_image(image)
    blocks = read_image(image, reported)
    lost = tuple(
        (n, problem)
        for n in sorted(reported)
        if (problem := block_problem(blocks[n], seed, n, kind)) is not None
    )
    return Kept(len(reported), lost, check)


@dataclass(frozen=True)
class Summary:
    """One row of the table: every instant of one way."""

    way: StopWay
    instants: int
    clean: int  # instants whose images all passed qemu-img check
    reported: dict[Disk, int]  # blocks reported, by kind
    lost: dict[Disk, int]  # of those, not read back intact
    leaked_clusters: int
    stages: tuple[str, ...]  # the distinct stop_all stages seen
    shutdown_reasons: tuple[str, ...]  # the distinct QEMU shutdown reasons seen ("none": killed)


def summarize(outcomes: Sequence[Outcome]) -> list[Summary]:
    """One :class:`Summary` per way, in :class:`StopWay` order."""
    rows = []
    for way in StopWay:
        mine = [o for o in outcomes if o.instant.way is way]
        if not mine:
            continue
        rows.append(
            Summary(
                way=way,
                instants=len(mine),
                clean=sum(o.images_clean for o in mine),
                reported={kind: sum(o.images[kind].reported for o in mine) for kind in KINDS},
                lost={kind: sum(len(o.images[kind].lost) for o in mine) for kind in KINDS},
                leaked_clusters=sum(o.leaked_clusters for o in mine),
                stages=tuple(sorted({o.stop_stage for o in mine if o.stop_stage is not None})),
                shutdown_reasons=tuple(sorted({o.shutdown_reason or "none" for o in mine})),
            )
        )
    return rows
