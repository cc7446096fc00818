"""Transient disks: a qcow2 overlay per disk and run, over a base image that is never written.

``qemu-img create -f qcow2 -b BASE -F FORMAT OVERLAY`` makes each overlay in the state directory
(``overlays/NAME.diskI.qcow2``, 0600) before QEMU is spawned. qemu-img opens the base read-only
to read its size, which also checks that it is an image of that format (a file that is not
qcow2 is refused; any regular file is a raw image). QEMU then opens the base read-only, as a
node of its own, and writes only to the overlay (see :mod:`aiovirt.config._render`).

qemu-img runs as a child watched through its pidfd (:class:`._process.Process`), like QEMU: no
thread is started for it on either event loop. Its messages go to the domain's log, from where
they become the :class:`~aiovirt.LaunchError`.

The overlays live as long as the run: the driver removes them once the QEMU's exit was seen
(however it ended), when a start fails, and at ``connect()`` for runs that ended while no
controller watched.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
from collections.abc import Iterable
from pathlib import Path

import anyio

from ..._errors import LaunchError
from ...config import DomainConfig
from ._process import Process
from ._statedir import StateDir

__all__ = ["create_overlays", "qemu_img_for", "remove_overlays", "transient_disks"]

#: Bound on the cleanup of a cancelled qemu-img (it is killed; this only bounds its reaping).
_KILL_WAIT = 10.0


def qemu_img_for(emulator: str) -> str:
    """The ``qemu-img`` beside an emulator given as an absolute path, else the one on PATH."""
    if os.path.isabs(emulator):
        sibling = Path(emulator).with_name("qemu-img")
        if os.access(sibling, os.X_OK):
            return str(sibling)
    return shutil.which("qemu-img") or "qemu-img"


def _base_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a base image (a regular file or a block device), if it cannot."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"cannot be used: {exc.strerror}"
    if stat.S_ISDIR(st.st_mode):
        return "is a directory, not a disk image"
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        return "is not a disk image (neither a regular file nor a block device)"
    return None


async def create_overlays(sd: StateDir, config: DomainConfig, log_fd: int) -> dict[int, str]:
    """Create a fresh overlay for each transient disk of ``config``: ``{disk index: overlay path}``.

    Raises :class:`LaunchError` (qemu-img's own message when it refused) and then leaves no
    overlay behind, also when cancelled.
    """
    name = config.name
    made: dict[int, str] = {}
    try:
        for i, disk in enumerate(config.disks):
            if not disk.transient:
                continue
            problem = _base_problem(disk.path)
            if problem is not None:
                raise LaunchError(name, f"disks.{i}: base image {str(disk.path)!r} {problem}")
            overlay = sd.create_overlay_file(name, i)
            made[i] = str(overlay)
            await _qemu_img_create(sd, config, i, overlay, log_fd)
    except BaseException:
        remove_overlays(sd, name, made)
        raise
    return made


async def _qemu_img_create(
    sd: StateDir, config: DomainConfig, index: int, overlay: Path, log_fd: int
) -> None:
    disk = config.disks[index]
    argv = [
        qemu_img_for(config.emulator),
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        str(disk.path),
        "-F",
        disk.format,
        str(overlay),
    ]
    offset = os.lseek(log_fd, 0, os.SEEK_END)
    try:
        proc = Process.spawn(argv, output_fd=log_fd)
    except OSError as exc:
        raise LaunchError(
            config.name,
            f"cannot execute {argv[0]!r}: {exc.strerror}",
            log_path=str(sd.log_path(config.name)),
            argv=argv,
        ) from exc
    try:
        await proc.wait()
    except BaseException:
        with anyio.move_on_after(_KILL_WAIT, shield=True):
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        raise
    finally:
        proc.close()
    if proc.returncode != 0:
        message = sd.read_log(config.name, offset).strip() or "qemu-img failed without a message"
        # No returncode: LaunchError's is QEMU's, which never ran; qemu-img's status is in the text.
        raise LaunchError(
            config.name,
            f"disks.{index}: cannot create the overlay of {str(disk.path)!r} "
            f"(qemu-img exit status {proc.returncode}): {message}",
            log_path=str(sd.log_path(config.name)),
            argv=argv,
        )


def remove_overlays(sd: StateDir, name: str, indexes: Iterable[int]) -> None:
    """Remove the overlays of ``name``'s disks ``indexes`` (those that exist)."""
    for i in indexes:
        sd.remove_overlay(name, i)


def transient_disks(config: DomainConfig) -> list[int]:
    """The indexes of ``config``'s transient disks."""
    return [i for i, disk in enumerate(config.disks) if disk.transient]
