"""Nothing flushed is lost: a real guest writing to real qcow2 images, stopped in every way aiovirt offers.

The tiny guest in writer mode writes numbered, checksummed blocks to three virtio disks: fsynced
(console ``FLUSHED n``), with O_DIRECT and never flushed (``DIRECT n``: QEMU has them, in its own
caches) and into its page cache only (``WRITTEN n``). It is stopped at seeded instants in each
:class:`StopWay`; then ``qemu-img check`` runs on the images and every reported block is read back.

What must hold, for every way (the bare SIGKILL too, since aiovirt's destroy falls back to it):
no fsynced block lost, no image that ``qemu-img check`` rejects (leaked clusters are reported, not
failures). What each way must save, which also shows the test measures something: a stop that
ends with the guest's own power-off (it syncs) keeps everything; SIGTERM keeps what QEMU had
(``DIRECT``) and loses the guest's page cache; a SIGKILL loses the page cache too (what it does to
``DIRECT`` blocks is QEMU's business: reported by benchmarks/integrity.py, not asserted).

The default run stops the guest twice per way on each backend; the slow test 10 times per way on
each backend (20 per way in all), as ``benchmarks/integrity.py`` does for its table.
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

SHORT_INSTANTS = 2  # per way and backend in the default run (about 3 s each, two at a time)
FULL_INSTANTS = 10  # per way and backend: 20 per way in all, as in benchmarks/integrity.py
SEEDS = {"asyncio": 1, "trio": 2}  # each backend stops at its own instants
SHUTDOWN_REASONS = {"guest": "guest-shutdown", "SIGTERM": "host-signal", "SIGKILL": None}


def _assert_nothing_flushed_lost(outcomes: Sequence[Outcome]) -> None:
    for o in outcomes:
        what = o.describe()
        flushed, direct, cached = o.images["flushed"], o.images["direct"], o.images["cached"]
        ending = WAYS[o.instant.way].ending
        assert flushed.reported >= o.instant.after_flushed, what  # the stop came after them
        assert not flushed.lost, what
        assert o.images_clean, what
        assert o.shutdown_reason == SHUTDOWN_REASONS[ending], what
        if ending == "guest":
            assert not direct.lost and not cached.lost, (
                f"the guest's shutdown did not keep everything: {what}"
            )
        else:
            assert len(cached.lost) == cached.reported, f"page-cache blocks reached the image: {what}"
        if ending == "SIGTERM":
            assert not direct.lost, f"SIGTERM did not keep what QEMU had: {what}"


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
        _blocks.expected_block(seed, n, "direct"): "disk=direct",
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
        "aiovirt-guest: ready\nFLUSHED 0\nDIRECT 0\nWRITTEN 0\nFLUSHED 1\r\nDIRECT 1\nWRITTEN 1\n"
        "FLUSHED x\nFLUSHED \u0663\nxFLUSHED 7\nFLUSHED 2\nDIRECT -2\nWRIT"
    )
    report = _blocks.parse_console(text)
    assert report.flushed == {0, 1, 2}
    assert report.direct == {0, 1}
    assert report.written == {0, 1}
    assert _blocks.parse_console("FLUSHED 3").flushed == set()  # cut off: the stop may have torn it


def test_writer_config(tiny_guest: TinyGuest, tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.qcow2", tmp_path / "b.qcow2", tmp_path / "c.qcow2"
    cfg = tiny_guest.writer_config("w", seed=9, flushed=a, direct=b, cached=c)
    assert cfg.cmdline == f"{tiny_guest.cmdline} aiovirt.writer=9"
    assert [(d.path, d.format, d.bus, d.cache) for d in cfg.disks] == [
        (a, "qcow2", "virtio", "writeback"),
        (b, "qcow2", "virtio", "writeback"),
        (c, "qcow2", "virtio", "writeback"),
    ]
    for bad in (-1, _guest.MAX_SEED + 1, True, 1.5):
        with pytest.raises(ValueError, match="seed"):
            tiny_guest.writer_config("w", seed=bad, flushed=a, direct=b, cached=c)  # type: ignore[arg-type]


def test_instants_are_seeded() -> None:
    assert instants(StopWay.ACPI, 5, 3) == instants(StopWay.ACPI, 5, 3)
    assert instants(StopWay.ACPI, 5, 3) != instants(StopWay.ACPI, 5, 4)
    assert instants(StopWay.ACPI, 5, 3) != instants(StopWay.SIGKILL, 5, 3)
    assert all(i.after_flushed >= 1 for i in instants(StopWay.SIGKILL, 50, 0))
