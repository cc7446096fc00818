"""What each way of stopping a domain keeps on its disks: the tiny guest's writer, stopped at seeded instants.

One *instant* boots the tiny guest in writer mode on two fresh qcow2 images (virtio,
``cache=writeback``), waits until it has reported a seeded number of fsynced blocks, waits a
seeded fraction of a second more, and stops it in one of the :class:`StopWay` ways. Then, with
QEMU gone, ``qemu-img check`` runs on both images and every block the console reported is read
back: those reported ``FLUSHED`` from the first image, those reported ``WRITTEN`` (never flushed:
only in the guest's page cache) from the second.

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

import anyio

from .. import Connection, Domain, DomainState, StopPolicy
from ._blocks import ImageCheck, block_problem, check_image, create_image, parse_console, read_image
from ._guest import MAX_SEED, TinyGuest

__all__ = ["WAYS", "Instant", "Outcome", "StopWay", "instants", "run_instant", "summarize"]

#: Bound on every wait of one instant (boot, the writer's progress, the stop): a hang fails, never blocks.
HANG = 180.0
#: How long the stuck QEMU's SIGTERM is left pending before destroy sends SIGKILL.
STUCK_TERM_TIMEOUT = 0.5
IMAGE_MIB = 32  # 8192 blocks: a run writes a few hundred


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
    acpi: bool  # whether the guest gets its power-button shutdown (and so its sync)


WAYS: dict[StopWay, WayInfo] = {
    StopWay.ACPI: WayInfo("`dom.shutdown()`, wait for SHUTOFF", True, True),
    StopWay.DESTROY_GRACEFUL: WayInfo("`dom.destroy(graceful=True)` (SIGTERM)", True, False),
    StopWay.DESTROY_STUCK: WayInfo(
        f"QEMU `kill -STOP`ped, `dom.destroy(timeout={STUCK_TERM_TIMEOUT})` (SIGTERM ignored, SIGKILL)",
        True,
        False,
    ),
    StopWay.STOP_ALL: WayInfo("`conn.stop_all([dom], StopPolicy())`", True, True),
    StopWay.STOP_ALL_GRACEFUL: WayInfo("`conn.stop_all([dom], StopPolicy(graceful=True))`", True, True),
    StopWay.STOP_ALL_SIGNALS: WayInfo(
        "`conn.stop_all([dom], StopPolicy(acpi_timeout=0))` (no ACPI stage: SIGTERM)", True, False
    ),
    StopWay.SIGKILL: WayInfo("bare `kill -KILL` of QEMU (not aiovirt: for comparison)", False, False),
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
class Outcome:
    """What one instant left on the images."""

    instant: Instant
    flushed: int  # blocks reported FLUSHED
    flushed_lost: tuple[tuple[int, str], ...]  # (block, what is wrong) for each not read back intact
    written: int  # blocks reported WRITTEN (never flushed)
    written_lost: int
    checks: tuple[ImageCheck, ImageCheck]  # qemu-img check of the flushed and the cached image
    stop_stage: str | None  # the last request stop_all sent, for the stop_all ways

    @property
    def images_clean(self) -> bool:
        return all(check.clean for check in self.checks)

    @property
    def leaked_clusters(self) -> int:
        return sum(check.leaks for check in self.checks)


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
    flushed_image, cached_image = workdir / f"{name}-flushed.qcow2", workdir / f"{name}-cached.qcow2"
    for image in (flushed_image, cached_image):
        await anyio.to_thread.run_sync(create_image, image, IMAGE_MIB)
    config = guest.writer_config(name, seed=instant.seed, flushed=flushed_image, cached=cached_image)
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
    return await anyio.to_thread.run_sync(
        _check, instant, report.flushed, report.written, flushed_image, cached_image, stage
    )


def _check(
    instant: Instant,
    flushed: frozenset[int],
    written: frozenset[int],
    flushed_image: Path,
    cached_image: Path,
    stage: str | None,
) -> Outcome:
    checks = (check_image(flushed_image), check_image(cached_image))
    on_flushed = read_image(flushed_image, flushed)
    lost = tuple(
        (n, problem)
        for n in sorted(flushed)
        if (problem := block_problem(on_flushed[n], instant.seed, n, "flushed")) is not None
    )
    on_cached = read_image(cached_image, written)
    written_lost = sum(block_problem(on_cached[n], instant.seed, n, "cached") is not None for n in written)
    return Outcome(instant, len(flushed), lost, len(written), written_lost, checks, stage)


@dataclass(frozen=True)
class Summary:
    """One row of the table: every instant of one way."""

    way: StopWay
    instants: int
    clean: int  # instants whose two images passed qemu-img check
    flushed: int
    flushed_lost: int
    written: int
    written_lost: int
    leaked_clusters: int
    stages: tuple[str, ...]  # the distinct stop_all stages seen


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
                flushed=sum(o.flushed for o in mine),
                flushed_lost=sum(len(o.flushed_lost) for o in mine),
                written=sum(o.written for o in mine),
                written_lost=sum(o.written_lost for o in mine),
                leaked_clusters=sum(o.leaked_clusters for o in mine),
                stages=tuple(sorted({o.stop_stage for o in mine if o.stop_stage is not None})),
            )
        )
    return rows
