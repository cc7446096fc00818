"""Nothing flushed is lost: a real guest writing to real qcow2 images, stopped in every way aiovirt offers.

The tiny guest in writer mode fsyncs numbered, checksummed blocks to one virtio disk (console:
``FLUSHED n``) and only writes them to a second one (``WRITTEN n``: in its page cache). It is
stopped at seeded instants in each :class:`StopWay`; then ``qemu-img check`` runs on both images
and every reported block is read back. What must hold, for every way (the bare SIGKILL too,
since aiovirt's destroy falls back to it): no flushed block lost, no image ``qemu-img check``
rejects (leaked clusters are reported, not failures). And so that the test measures something:
the never-flushed blocks all survive a stop that gives the guest its ACPI shutdown (it syncs),
and are all lost when QEMU is signalled (they never left the guest).

The default run stops the guest twice per way on each backend; the slow test 10 times per way on
each backend (20 per way in all).
``benchmarks/integrity.py`` prints the same measurement as a table.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest

import aiovirt
from aiovirt.testing import TinyGuest, _blocks, _guest
from aiovirt.testing._integrity import WAYS, Instant, Outcome, StopWay, instants, run_instant, summarize

SHORT_INSTANTS = 2  # per way and backend in the default run (about 3 s each)
FULL_INSTANTS = 10  # per way and backend: 20 per way in all, as in benchmarks/integrity.py
SEEDS = {"asyncio": 1, "trio": 2}  # each backend stops at its own instants


def _describe(o: Outcome) -> str:
    i = o.instant
    return (
        f"{i.way} (seed {i.seed}, after {i.after_flushed} flushed + {i.delay:.2f} s): "
        f"flushed {o.flushed}, lost {list(o.flushed_lost)[:5]}; written {o.written}, lost {o.written_lost}; "
        f"qemu-img check: {[c.output for c in o.checks if not c.clean]}"
    )


def _assert_nothing_flushed_lost(outcomes: Sequence[Outcome]) -> None:
    for o in outcomes:
        assert o.flushed >= o.instant.after_flushed, _describe(o)  # the stop came after them
        assert not o.flushed_lost, _describe(o)
        assert o.images_clean, _describe(o)
        if WAYS[o.instant.way].acpi:
            assert o.written_lost == 0, f"the guest's shutdown did not run: {_describe(o)}"
        else:
            assert o.written_lost == o.written, f"unflushed blocks reached the image: {_describe(o)}"


async def _run(
    conn: aiovirt.Connection, guest: TinyGuest, workdir: Path, count: int, seed: int
) -> list[Outcome]:
    """``count`` instants of every way, two at a time (one per core: the guests run under TCG)."""
    planned = [inst for way in StopWay for inst in instants(way, count, seed)]
    outcomes: list[Outcome] = []
    limiter = anyio.CapacityLimiter(2)

    async def one(i: int, instant: Instant) -> None:
        async with limiter:
            outcomes.append(await run_instant(conn, guest, instant, workdir, f"w{i}"))

    async with anyio.create_task_group() as tg:
        for i, instant in enumerate(planned):
            tg.start_soon(one, i, instant)
    return outcomes


@pytest.mark.anyio
async def test_flushed_blocks_survive_every_way_of_stopping(
    conn: aiovirt.Connection, tiny_guest: TinyGuest, tmp_path: Path, anyio_backend: str
) -> None:
    outcomes = await _run(conn, tiny_guest, tmp_path, SHORT_INSTANTS, SEEDS[anyio_backend])
    _assert_nothing_flushed_lost(outcomes)
    assert {row.way for row in summarize(outcomes)} == set(StopWay)


@pytest.mark.slow
@pytest.mark.anyio
async def test_flushed_blocks_survive_every_way_of_stopping_many_instants(
    conn: aiovirt.Connection, tiny_guest: TinyGuest, tmp_path: Path, anyio_backend: str
) -> None:
    outcomes = await _run(conn, tiny_guest, tmp_path, FULL_INSTANTS, 100 + SEEDS[anyio_backend])
    _assert_nothing_flushed_lost(outcomes)
    for row in summarize(outcomes):
        assert row.instants == FULL_INSTANTS and row.clean == FULL_INSTANTS, row


# -- the parts, without a guest -------------------------------------------------------------------


def test_payload_is_the_guest_awk_program() -> None:
    """expected_payload mirrors the awk program the guest runs: the same busybox, on the host."""
    busybox = _guest._find_static_busybox()
    for seed, n in [(0, 0), (1, 1), (_guest.MAX_SEED, 8191), (123456789, 4242)]:
        out = subprocess.run(
            [str(busybox), "awk", "-v", f"seed={seed}", "-v", f"n={n}", _guest._PAYLOAD_AWK],
            capture_output=True,
            check=True,
            timeout=30,
        ).stdout
        assert out == _blocks.expected_payload(seed, n)


def test_block_checks() -> None:
    seed, n = 77, 5
    good = _blocks.expected_block(seed, n, "flushed")
    assert len(good) == _guest.BLOCK_SIZE
    assert _blocks.block_problem(good, seed, n, "flushed") is None
    other = _blocks.expected_block(seed, n + 1, "flushed")
    torn = good[: _guest.BLOCK_SIZE // 2] + other[_guest.BLOCK_SIZE // 2 :]
    flipped = bytearray(good)
    flipped[-1] ^= 1
    forged = bytearray(good)  # a consistent checksum over a payload that is not the pattern
    forged[_guest.HEADER_SIZE] ^= 1
    digest = hashlib.sha256(bytes(forged[_guest.HEADER_SIZE :])).hexdigest().encode()
    at = forged.index(b"sha256=") + len(b"sha256=")
    forged[at : at + 64] = digest
    cases = {
        bytes(_guest.BLOCK_SIZE): "all zeros",
        good[:100]: "bytes, not",
        other: "seq=6",
        _blocks.expected_block(seed, n, "cached"): "disk=cached",
        _blocks.expected_block(seed + 1, n, "flushed"): "seed=78",
        torn: "checksum",
        bytes(flipped): "checksum",
        bytes(forged): "not the pattern",
        b"x" * _guest.BLOCK_SIZE: "no block header",
    }
    for data, problem in cases.items():
        found = _blocks.block_problem(data, seed, n, "flushed")
        assert found is not None and problem in found, (problem, found)


def test_console_report_counts_whole_lines_only() -> None:
    text = (
        "[    1.0] virtio_blk virtio1: [vdb] 65536 512-byte logical blocks\n"
        "aiovirt-guest: ready\nFLUSHED 0\nWRITTEN 0\nFLUSHED 1\r\nWRITTEN 1\nFLUSHED x\n"
        "FLUSHED \u0663\nxFLUSHED 7\nFLUSHED 2\nWRIT"
    )
    report = _blocks.parse_console(text)
    assert report.flushed == {0, 1, 2}
    assert report.written == {0, 1}
    assert _blocks.parse_console("FLUSHED 3").flushed == set()  # cut off: the stop may have torn it


def test_writer_config(tiny_guest: TinyGuest, tmp_path: Path) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    cfg = tiny_guest.writer_config("w", seed=9, flushed=a, cached=b)
    assert cfg.cmdline == f"{tiny_guest.cmdline} aiovirt.writer=9"
    assert [(d.path, d.format, d.bus, d.cache) for d in cfg.disks] == [
        (a, "qcow2", "virtio", "writeback"),
        (b, "qcow2", "virtio", "writeback"),
    ]
    for bad in (-1, _guest.MAX_SEED + 1, True, 1.5):
        with pytest.raises(ValueError, match="seed"):
            tiny_guest.writer_config("w", seed=bad, flushed=a, cached=b)  # type: ignore[arg-type]


def test_instants_are_seeded() -> None:
    assert instants(StopWay.ACPI, 5, 3) == instants(StopWay.ACPI, 5, 3)
    assert instants(StopWay.ACPI, 5, 3) != instants(StopWay.ACPI, 5, 4)
    assert instants(StopWay.ACPI, 5, 3) != instants(StopWay.SIGKILL, 5, 3)
    assert all(i.after_flushed >= 1 for i in instants(StopWay.SIGKILL, 50, 0))
