"""The tiny guest's writer mode, seen from the host: its block format, its console report, its images.

Block ``n`` sits at offset ``n * BLOCK_SIZE`` of a disk: a header line of ``HEADER_SIZE`` bytes
(``AIOVIRT-BLOCK v1 disk=DISK seed=SEED seq=N sha256=HEX``, space-padded, newline-terminated),
then the payload, a pattern computed from the seed and ``n`` (``expected_payload`` is the guest's
awk program in Python). A block is intact when its header names the right disk, seed and number,
the checksum matches the payload, and the payload is the expected pattern: a torn, stale or
misplaced block fails at least one of these.

Blocking code (``qemu-img`` runs as a subprocess); run it in a worker thread from async code.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ._guest import (
    BLOCK_SIZE,
    DIRECT_PREFIX,
    FLUSHED_PREFIX,
    HEADER_SIZE,
    MAX_SEED,
    PAYLOAD_LINES,
    WRITTEN_PREFIX,
)

__all__ = [
    "ImageCheck",
    "WriterReport",
    "block_problem",
    "check_image",
    "create_image",
    "expected_block",
    "expected_payload",
    "parse_console",
    "read_image",
]

Disk = Literal["flushed", "direct", "cached"]

_MINSTD = 2147483647
_HEADER_RE = re.compile(
    rb"AIOVIRT-BLOCK v1 disk=(?P<disk>[a-z]+) seed=(?P<seed>[0-9]+) seq=(?P<seq>[0-9]+) "
    rb"sha256=(?P<sum>[0-9a-f]{64}) *\n"
)
_QEMU_IMG_TIMEOUT = 120.0


def expected_payload(seed: int, n: int) -> bytes:
    """The payload of block ``n``: the guest's awk program (``_guest._PAYLOAD_AWK``), byte for byte."""
    if not 0 <= seed <= MAX_SEED or n < 0:
        raise ValueError(f"no block {n} for seed {seed}")
    x = (seed * 7919 + n * 104729 + 1) % _MINSTD or 1
    lines = []
    for i in range(PAYLOAD_LINES):
        x = x * 48271 % _MINSTD
        lines.append(b"%07d %07d\n" % (i, x % 10_000_000))
    return b"".join(lines)


def expected_block(seed: int, n: int, disk: Disk) -> bytes:
    """Block ``n`` exactly as the guest writes it to ``disk``."""
    payload = expected_payload(seed, n)
    header = f"AIOVIRT-BLOCK v1 disk={disk} seed={seed} seq={n} sha256={hashlib.sha256(payload).hexdigest()}"
    return header.encode().ljust(HEADER_SIZE - 1) + b"\n" + payload


def block_problem(data: bytes, seed: int, n: int, disk: Disk) -> str | None:
    """None if ``data`` is block ``n`` of ``disk``, intact; else what is wrong with it."""
    if len(data) != BLOCK_SIZE:
        return f"{len(data)} bytes, not {BLOCK_SIZE}"
    if not any(data):
        return "all zeros (never written)"
    header = _HEADER_RE.fullmatch(data[:HEADER_SIZE])
    if header is None:
        return f"no block header: {data[:64]!r}"
    payload = data[HEADER_SIZE:]
    found = (header["disk"].decode(), int(header["seed"]), int(header["seq"]))
    if found != (disk, seed, n):
        return f"header of disk={found[0]} seed={found[1]} seq={found[2]}"
    if hashlib.sha256(payload).hexdigest() != header["sum"].decode():
        return "payload does not match its checksum (torn write)"
    if payload != expected_payload(seed, n):
        return "payload matches its checksum but not the pattern"
    return None


@dataclass(frozen=True)
class WriterReport:
    """What the guest's console says it did: blocks fsynced (FLUSHED), written with O_DIRECT and
    never flushed (DIRECT), and written to its page cache only (WRITTEN)."""

    flushed: frozenset[int]
    direct: frozenset[int]
    written: frozenset[int]


def parse_console(text: str) -> WriterReport:
    """The writer's report in a console capture. Only whole lines count: a line cut off by the
    stop, or mixed with kernel output, is ignored (it can only hide a block from the check)."""
    flushed: set[int] = set()
    direct: set[int] = set()
    written: set[int] = set()
    complete = text if text.endswith("\n") else text[: text.rfind("\n") + 1]
    for line in complete.splitlines():
        line = line.strip()
        for prefix, into in ((FLUSHED_PREFIX, flushed), (DIRECT_PREFIX, direct), (WRITTEN_PREFIX, written)):
            number = line.removeprefix(prefix)
            if number != line and number.isdigit() and number.isascii():
                into.add(int(number))
    return WriterReport(frozenset(flushed), frozenset(direct), frozenset(written))


@dataclass(frozen=True)
class ImageCheck:
    """``qemu-img check`` of one image: clean means no corruption and no check error (leaks allowed)."""

    exit_status: int
    corruptions: int
    leaks: int
    check_errors: int
    output: str

    @property
    def clean(self) -> bool:
        # 0: no problem; 3: leaked clusters only (wasted space, no data affected)
        return self.exit_status in (0, 3) and self.corruptions == 0 and self.check_errors == 0


def _qemu_img() -> str:
    path = shutil.which("qemu-img")
    if path is None:
        raise FileNotFoundError("qemu-img not found on PATH (package qemu-utils; run scripts/setup.sh)")
    return path


def create_image(path: Path, size_mib: int = 64, image_format: str = "qcow2") -> None:
    """An empty image (``qemu-img create``)."""
    subprocess.run(
        [_qemu_img(), "create", "-q", "-f", image_format, str(path), f"{size_mib}M"],
        check=True,
        capture_output=True,
        timeout=_QEMU_IMG_TIMEOUT,
    )


def check_image(path: Path) -> ImageCheck:
    """``qemu-img check --output=json`` of a qcow2 image (exit status 2 is corruption, 3 leaks only)."""
    done = subprocess.run(
        [_qemu_img(), "check", "-f", "qcow2", "--output=json", str(path)],
        capture_output=True,
        timeout=_QEMU_IMG_TIMEOUT,
        check=False,
    )
    output = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    try:
        report = json.loads(done.stdout)
    except ValueError:
        report = None
    if not isinstance(report, dict):  # exit status 1: the check could not run at all
        return ImageCheck(done.returncode, 0, 0, 1, output)
    return ImageCheck(
        exit_status=done.returncode,
        corruptions=int(report.get("corruptions", 0)),
        leaks=int(report.get("leaks", 0)),
        check_errors=int(report.get("check-errors", 0)),
        output=output,
    )


def read_image(path: Path, blocks: Iterable[int], image_format: str = "qcow2") -> dict[int, bytes]:
    """The guest-visible contents of ``blocks`` (``qemu-img convert`` to a temporary raw file)."""
    wanted = sorted(set(blocks))
    with tempfile.TemporaryDirectory(prefix="aiovirt-blocks-") as tmp:
        raw = Path(tmp) / "image.raw"
        subprocess.run(
            [_qemu_img(), "convert", "-f", image_format, "-O", "raw", str(path), str(raw)],
            check=True,
            capture_output=True,
            timeout=_QEMU_IMG_TIMEOUT,
        )
        out = {}
        with raw.open("rb") as f:
            for n in wanted:
                f.seek(n * BLOCK_SIZE)
                out[n] = f.read(BLOCK_SIZE)
        return out
