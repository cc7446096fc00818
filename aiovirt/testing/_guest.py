"""A tiny Linux guest that honours the ACPI power button, for tests and demos.

``ensure_tiny_guest()`` returns a kernel, an initramfs and a kernel command line. Booted with
``qemu-system-x86_64 -machine pc -accel tcg -kernel K -initrd I -append CMDLINE -serial ...``, the
guest prints :attr:`TinyGuest.ready_marker` on its serial console once it listens to the power
button; QMP ``system_powerdown`` then makes it ``poweroff -f`` (QEMU emits ``SHUTDOWN`` with
``"guest": true`` and exits 0). After the marker a busybox shell runs on the serial console
(prompt :attr:`TinyGuest.shell_prompt`); it asks the terminal for the cursor position
(``ESC[6n``) at each prompt, so input typed before the prompt is partly swallowed: wait for it.

A second mode, for data-integrity tests: with ``aiovirt.writer=SEED`` on the kernel command line
(:meth:`TinyGuest.writer_config`) the guest writes numbered, checksummed blocks to three virtio
disks (fsynced; written with O_DIRECT and never flushed; only written to its page cache) and
reports each on its console; ``aiovirt.testing._blocks`` checks the images afterwards. Without it
the guest only idles.

Everything comes from Debian packages, nothing is compiled:

- the kernel is Debian's current ``linux-image-*-amd64`` (``apt-get download``, no install). What is
  cached is the ELF ``vmlinux`` inside its ``boot/vmlinuz-*``, which QEMU boots through the PVH entry
  point: under TCG that starts the guest in about 2.5 s instead of 6.5 s (the kernel's own xz
  decompressor is what is slow). A kernel without a PVH note is cached as the bzImage itself.
  The ACPI ``button`` and ``evdev`` drivers, and virtio-blk over PCI for writer mode, are modules
  there and are copied into the initramfs;
- the initramfs holds busybox-static's ``/bin/busybox`` and a shell ``/init`` (see ``INIT_SCRIPT``),
  written as a newc cpio by this module (no root needed for the device node it contains).

The result is cached under ``<cache dir>/tiny-guest-v<RECIPE_VERSION>/`` (the cache dir is
``$AIOVIRT_CACHE_DIR``, else ``$XDG_CACHE_HOME/aiovirt``, else ``~/.cache/aiovirt``). A cached guest
is returned without running anything; builders in several processes serialise on an ``fcntl`` lock
and publish with an atomic rename. Bump ``RECIPE_VERSION`` whenever the recipe changes.

Blocking code on purpose (call it from a test's setup or a worker thread): it imports no async library.
``python -m aiovirt.testing._guest`` builds the guest (or finds it) and prints where it is.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import json
import logging
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..config import Disk, DomainConfig

__all__ = [
    "BLOCK_SIZE",
    "CMDLINE",
    "DIRECT_PREFIX",
    "FLUSHED_PREFIX",
    "HEADER_SIZE",
    "PAYLOAD_LINES",
    "READY_MARKER",
    "RECIPE_VERSION",
    "SHELL_PROMPT",
    "WRITER_PARAM",
    "WRITTEN_PREFIX",
    "TinyGuest",
    "TinyGuestBuildError",
    "default_cache_dir",
    "ensure_tiny_guest",
]

log = logging.getLogger("aiovirt.testing")

#: Part of the cache key: change it whenever anything below changes what gets built.
RECIPE_VERSION = 7
#: ``panic=-1``: if /init ever died the guest would reboot at once instead of hanging.
CMDLINE = "console=ttyS0 quiet panic=-1"
READY_MARKER = "aiovirt-guest: ready"
#: The prompt of the shell that runs on the serial console once the guest is ready.
SHELL_PROMPT = "aiovirt-guest# "

KERNEL_NAME = "kernel"
INITRD_NAME = "initrd.img"
MANIFEST_NAME = "manifest.json"

_SETUP_HINT = "run scripts/setup.sh (as root, or with sudo) from an aiovirt checkout"
_KERNEL_META_PACKAGE = "linux-image-amd64"
_KERNEL_PACKAGE_RE = re.compile(r"^linux-image-[0-9][^\s/]*-amd64$")
_BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
_APT_TIMEOUT = 900.0  # seconds: a 70 MB download on a slow mirror
_LOCK_WAIT_LOG_INTERVAL = 30.0

# (kernel config option, module name, path below lib/modules/<version>/kernel/, required), in the order
# /init loads them. An optional module is one that only some kernel configurations split out.
_DRIVERS = (
    ("CONFIG_INPUT_EVDEV", "evdev", "drivers/input/evdev", True),
    ("CONFIG_ACPI_BUTTON", "button", "drivers/acpi/button", True),
    # writer mode only: virtio-blk over PCI, dependencies first
    ("CONFIG_VIRTIO", "virtio_ring", "drivers/virtio/virtio_ring", True),
    ("CONFIG_VIRTIO", "virtio", "drivers/virtio/virtio", True),
    ("CONFIG_VIRTIO_PCI_LIB", "virtio_pci_modern_dev", "drivers/virtio/virtio_pci_modern_dev", False),
    ("CONFIG_VIRTIO_PCI_LIB_LEGACY", "virtio_pci_legacy_dev", "drivers/virtio/virtio_pci_legacy_dev", False),
    ("CONFIG_VIRTIO_PCI", "virtio_pci", "drivers/virtio/virtio_pci", True),
    ("CONFIG_VIRTIO_BLK", "virtio_blk", "drivers/block/virtio_blk", True),
)
_BUTTON_MODULES = ("evdev", "button")
_WRITER_MODULES = tuple(name for _option, name, _path, _required in _DRIVERS if name not in _BUTTON_MODULES)

# -- writer mode: the block format, shared with aiovirt.testing._blocks, which checks the images --

#: The kernel command-line parameter that turns the writer on; its value is the pattern's seed.
WRITER_PARAM = "aiovirt.writer"
#: What the writer prints on the console, one whole line per block: after fsyncing it to the first
#: disk; after writing it with O_DIRECT (so QEMU has it, but no flush was asked) to the second; after
#: writing it (to the guest's page cache only) to the third.
FLUSHED_PREFIX = "FLUSHED "
DIRECT_PREFIX = "DIRECT "
WRITTEN_PREFIX = "WRITTEN "
BLOCK_SIZE = 4096
#: A text header line, space-padded to this size with a final newline; the payload fills the rest.
HEADER_SIZE = 256
#: The payload: PAYLOAD_LINES lines of "%07d %07d\n" (line index, then a MINSTD step mod 10^7).
PAYLOAD_LINES = (BLOCK_SIZE - HEADER_SIZE) // 16
MAX_SEED = 2**31 - 1

# busybox awk computes in doubles: every product stays below 2**53, so the guest and
# aiovirt.testing._blocks.expected_payload agree exactly.
_PAYLOAD_AWK = (
    "BEGIN { x = (seed * 7919 + n * 104729 + 1) % 2147483647; if (x == 0) x = 1;"
    f" for (i = 0; i < {PAYLOAD_LINES}; i++) {{ x = (x * 48271) % 2147483647;"
    ' printf "%07d %07d\\n", i, x % 10000000 } }'
)

# PID 1 of the guest, run by busybox's ash. Events written to an evdev node before it is opened are
# lost, so each reader opens its device before signalling, and the ready marker waits for all readers.
#
# Writer mode (aiovirt.writer=SEED): block n goes to offset n*4096 of three disks, each with its own
# console line once written: /dev/vda with conv=fsync (the fsync also flushes the disk's write cache:
# QEMU has made it durable in the image) -> "FLUSHED n"; /dev/vdb with oflag=direct (past the page
# cache, so QEMU has it, in its own caches, but no flush was asked) -> "DIRECT n"; /dev/vdc plainly
# (the guest's page cache only) -> "WRITTEN n". Two kernel rules shape this: the last close of a
# block device writes back its page cache, so PID 1 holds every device open until power-off (each
# dd's close is never the last); and fsync of a block device writes back all of that device's dirty
# pages, so each kind of write has a disk of its own. The power button stops the writer between
# blocks (as an init stops processes before it syncs), then syncs: every block reported is in the sync.
INIT_SCRIPT = f"""\
#!/bin/busybox sh
# /init of aiovirt's tiny test guest (PID 1: must never exit).
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

say() {{ echo "aiovirt-guest: $*"; }}
idle() {{ while :; do sleep 3600; done; }}
fail() {{ say "error: $*"; idle; }}
# A shell on the serial console, started again whenever it exits (PID 1 must not). ``setsid -c``
# makes ttyS0 its controlling terminal, so Ctrl-C reaches the command it runs.
shell() {{ while :; do PS1='{SHELL_PROMPT}' setsid -c sh </dev/ttyS0 >/dev/ttyS0 2>&1; sleep 1; done; }}

writer=
read -r cmdline < /proc/cmdline
for arg in $cmdline; do
    case "$arg" in
        {WRITER_PARAM}=*) writer=${{arg#{WRITER_PARAM}=}} ;;
    esac
done
case "$writer" in
    *[!0-9]*) fail "{WRITER_PARAM}= wants a decimal seed, not '$writer'" ;;
esac

load() {{
    for m in "$@"; do
        if [ -e "/lib/modules/$m.ko" ]; then
            insmod "/lib/modules/$m.ko" || fail "insmod $m.ko failed"
        fi
    done
}}

# evdev first, so the power button gets its /dev/input/event* node as soon as button.ko registers it
load {" ".join(_BUTTON_MODULES)}

if [ -n "$writer" ]; then
    load {" ".join(_WRITER_MODULES)}
    n=0
    while [ ! -b /dev/vda ] || [ ! -b /dev/vdb ] || [ ! -b /dev/vdc ]; do
        n=$((n + 1))
        [ "$n" -lt 600 ] || fail "writer mode needs three virtio disks: no /dev/vda, vdb and vdc after 30 s"
        sleep 0.05
    done
    # a failed redirection of exec would end PID 1: try it in a subshell first
    ( exec 3<>/dev/vda 4<>/dev/vdb 5<>/dev/vdc ) 2>/dev/null || fail "cannot open /dev/vda, vdb and vdc"
    exec 3<>/dev/vda 4<>/dev/vdb 5<>/dev/vdc
    # Periodic writeback an hour away: a block on /dev/vdc stays in the page cache until a sync (or
    # the background threshold, 10% of RAM, far above what a run writes). Not 0, which turns the
    # periodic flush off but, measured here, has the first pages of a device written back at once.
    for knob in dirty_writeback_centisecs dirty_expire_centisecs; do
        echo 360000 > "/proc/sys/vm/$knob" || fail "cannot set vm.$knob"
    done
fi

# The event device shows up a little after insmod returns: wait for the power button's node.
n=0
while :; do
    found=
    for d in /sys/class/input/event*; do
        [ -r "$d/device/name" ] || continue
        read -r name < "$d/device/name"
        if [ "$name" = "Power Button" ] && [ -c "/dev/input/${{d##*/}}" ]; then found=1; fi
    done
    [ -n "$found" ] && break
    n=$((n + 1))
    [ "$n" -lt 600 ] || fail "no Power Button input device after 30 s"
    sleep 0.05
done

stop_writer() {{
    [ -n "$writer" ] || return 0
    : > /run/writer.stop
    w=0
    while [ ! -e /run/writer.stopped ] && [ "$w" -lt 200 ]; do
        sleep 0.05
        w=$((w + 1))
    done
}}

# One reader per event device: the first event read is the button press (nothing else sends input).
mkdir -p /run/readers
n=0
for dev in /dev/input/event*; do
    {{
        : > "/run/readers/$n"
        if dd bs=4096 count=1 of=/dev/null 2>/dev/null; then
            say "power button pressed, powering off"
            stop_writer
            sync
            poweroff -f
        fi
    }} < "$dev" &
    n=$((n + 1))
done
i=0
while [ "$i" -lt "$n" ]; do
    w=0
    while [ ! -e "/run/readers/$i" ]; do
        w=$((w + 1))
        [ "$w" -lt 1000 ] || fail "reader $i did not start"
        sleep 0.01
    done
    i=$((i + 1))
done

echo "{READY_MARKER}"
# In writer mode the console is the writer's report: no shell there to mix a prompt into it.
[ -n "$writer" ] || shell

# block DISK N: the header line of block N for DISK (flushed, direct or cached), then the payload
block() {{
    printf '%-{HEADER_SIZE - 1}s\\n' "AIOVIRT-BLOCK v1 disk=$1 seed=$writer seq=$2 sha256=$sum"
    cat /run/payload
}}
payload_awk='{_PAYLOAD_AWK}'
blocks=
for d in vda vdb vdc; do
    size=$(blockdev --getsize64 "/dev/$d") || fail "blockdev --getsize64 /dev/$d failed"
    size=$((size / {BLOCK_SIZE}))
    if [ -z "$blocks" ] || [ "$size" -lt "$blocks" ]; then blocks=$size; fi
done
n=0
while [ ! -e /run/writer.stop ]; do
    if [ "$n" -ge "$blocks" ]; then say "writer: the disks are full"; break; fi
    awk -v seed="$writer" -v n="$n" "$payload_awk" > /run/payload || fail "awk failed"
    set -- $(sha256sum /run/payload)
    sum=$1
    block flushed "$n" > /run/block
    dd if=/run/block of=/dev/vda bs={BLOCK_SIZE} seek="$n" count=1 conv=notrunc,fsync 2>/dev/null \\
        || fail "writing block $n to /dev/vda failed"
    echo "{FLUSHED_PREFIX}$n"
    block direct "$n" > /run/block
    dd if=/run/block of=/dev/vdb bs={BLOCK_SIZE} seek="$n" count=1 conv=notrunc oflag=direct 2>/dev/null \\
        || fail "writing block $n to /dev/vdb failed"
    echo "{DIRECT_PREFIX}$n"
    block cached "$n" > /run/block
    dd if=/run/block of=/dev/vdc bs={BLOCK_SIZE} seek="$n" count=1 conv=notrunc 2>/dev/null \\
        || fail "writing block $n to /dev/vdc failed"
    echo "{WRITTEN_PREFIX}$n"
    n=$((n + 1))
done
: > /run/writer.stopped
idle
"""


@dataclass(frozen=True)
class TinyGuest:
    """A bootable guest: ``-kernel kernel -initrd initrd -append cmdline``, serial console on ttyS0.

    x86-64 only (``qemu-system-x86_64``, machine ``pc`` or ``q35``); it needs at least 96 MiB of guest
    RAM (64 MiB does not boot). Prefer ``-accel tcg`` on hosts whose KVM is nested: Linux guests hang there.
    """

    kernel: Path
    initrd: Path
    cmdline: str
    #: A whole line the guest prints on its serial console once a power-button press will be seen.
    ready_marker: str
    #: The prompt of the shell on its serial console (started after the ready marker).
    shell_prompt: str = SHELL_PROMPT

    def domain_config(self, name: str, *, memory_mib: int = 128) -> DomainConfig:
        """A ``pc`` domain under TCG (portable: nested KVM hangs Linux guests) that boots this guest."""
        return DomainConfig(
            name=name,
            machine="pc",
            accel="tcg",
            memory_mib=memory_mib,
            kernel=self.kernel,
            initrd=self.initrd,
            cmdline=self.cmdline,
        )

    def writer_config(
        self,
        name: str,
        *,
        seed: int,
        flushed: Path,
        direct: Path,
        cached: Path,
        image_format: Literal["raw", "qcow2"] = "qcow2",
        memory_mib: int = 128,
    ) -> DomainConfig:
        """:meth:`domain_config` in writer mode, with ``flushed``, ``direct`` and ``cached`` as
        ``/dev/vda``, ``vdb`` and ``vdc`` (virtio, ``cache=writeback``, the images made beforehand).

        Once ready, the guest writes block 0, 1, 2... to the three disks (see ``INIT_SCRIPT`` and
        ``aiovirt.testing._blocks``), each write followed by a console line: fsynced on ``flushed``
        (``FLUSHED n``); with O_DIRECT and no flush on ``direct`` (``DIRECT n``); into the guest's
        page cache on ``cached`` (``WRITTEN n``). It stops when the smallest disk is full, or at a
        power-button press, which it then honours (``sync``, power off). No shell runs on its
        console: the console is the writer's report.
        """
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer from 0 to {MAX_SEED}, not {seed!r}")
        disks = [
            Disk(path=path, format=image_format, bus="virtio", cache="writeback")
            for path in (flushed, direct, cached)
        ]
        return DomainConfig(
            name=name,
            machine="pc",
            accel="tcg",
            memory_mib=memory_mib,
            kernel=self.kernel,
            initrd=self.initrd,
            cmdline=f"{self.cmdline} {WRITER_PARAM}={seed}",
            disks=disks,
        )


class TinyGuestBuildError(RuntimeError):
    """The tiny guest could not be built (no apt, no network, no kernel package, no busybox-static...)."""


def default_cache_dir() -> Path:
    """``$AIOVIRT_CACHE_DIR``, else ``$XDG_CACHE_HOME/aiovirt``, else ``~/.cache/aiovirt``."""
    explicit = os.environ.get("AIOVIRT_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "aiovirt"
    return Path.home() / ".cache" / "aiovirt"


def ensure_tiny_guest(cache_dir: Path | None = None) -> TinyGuest:
    """Return the cached tiny guest, building it first if needed (blocking; about 10 s and a 70 MB download).

    Safe to call from several processes at once: one builds, the others wait for it and reuse the result.
    Raises :class:`TinyGuestBuildError` when apt, the network or a tool needed for the build is missing.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / f"tiny-guest-v{RECIPE_VERSION}"
    guest = _guest_in(final)
    if _is_complete(guest, final):
        return guest
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TinyGuestBuildError(
            f"cannot create the cache directory {root}: {exc}; set AIOVIRT_CACHE_DIR to a writable directory"
        ) from exc
    with _locked(root / f"tiny-guest-v{RECIPE_VERSION}.lock"):
        if _is_complete(guest, final):  # another process built it while we waited
            return guest
        _remove_stale(root, final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
        try:
            started = time.monotonic()
            manifest = _build(tmp)
            manifest["build_seconds"] = round(time.monotonic() - started, 2)
            _write_sparse(
                tmp / MANIFEST_NAME, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
            )
            tmp.chmod(0o755)
            os.rename(tmp, final)  # atomic: readers see nothing or the complete guest
            _fsync_dir(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("tiny guest built in %.1f s: %s", manifest["build_seconds"], final)
    return guest


def _guest_in(directory: Path) -> TinyGuest:
    return TinyGuest(
        kernel=directory / KERNEL_NAME,
        initrd=directory / INITRD_NAME,
        cmdline=CMDLINE,
        ready_marker=READY_MARKER,
    )


def _is_complete(guest: TinyGuest, directory: Path) -> bool:
    try:
        return all(p.stat().st_size > 0 for p in (guest.kernel, guest.initrd, directory / MANIFEST_NAME))
    except OSError:
        return False


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    # The lock file is never deleted: unlinking a lock file lets two processes lock different inodes.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        waited_since = time.monotonic()
        next_log = waited_since + _LOCK_WAIT_LOG_INTERVAL
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= next_log:
                    log.info("waiting for another process building the tiny guest (lock %s)", path)
                    next_log += _LOCK_WAIT_LOG_INTERVAL
                time.sleep(0.1)
        yield  # the lock goes with the fd
    finally:
        os.close(fd)


def _remove_stale(root: Path, final: Path) -> None:
    """Under the lock: drop leftovers of crashed builds, and an incomplete (damaged) final directory."""
    for leftover in root.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if final.exists() or final.is_symlink():
        doomed = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
        os.rename(final, doomed / "old")
        shutil.rmtree(doomed, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- build


def _build(workdir: Path) -> dict[str, object]:
    """Write the kernel and the initramfs into ``workdir``; return what the manifest should record."""
    busybox = _find_static_busybox()
    apt_get, apt_cache, dpkg_deb = (_require_tool(t) for t in ("apt-get", "apt-cache", "dpkg-deb"))
    download_dir = workdir / "download"
    download_dir.mkdir()
    deb, package = _download_kernel(apt_get, apt_cache, download_dir)
    version = _run([dpkg_deb, "--field", str(deb), "Version"], what="read the kernel package's version")
    bzimage, modules = _extract_kernel(dpkg_deb, deb)
    shutil.rmtree(download_dir)

    # Under TCG the bzImage's decompressor takes 4 of the 6.5 s to the ready marker: keep the ELF inside it
    vmlinux = _pvh_vmlinux(bzimage)
    _write_sparse(workdir / KERNEL_NAME, bzimage if vmlinux is None else vmlinux)
    _write_sparse(workdir / INITRD_NAME, _gzip(_initramfs(busybox, modules)))
    return {
        "recipe_version": RECIPE_VERSION,
        "kernel_package": package,
        "kernel_package_version": version.strip(),
        "kernel_format": "bzImage" if vmlinux is None else "ELF vmlinux, PVH entry",
        "busybox": str(busybox),
        "modules": sorted(modules),
        "cmdline": CMDLINE,
        "ready_marker": READY_MARKER,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise TinyGuestBuildError(
            f"{name!r} not found on PATH: the tiny test guest is built from Debian packages with apt and "
            f"dpkg, so it needs a Debian or Ubuntu host; {_SETUP_HINT}"
        )
    return path


def _find_static_busybox() -> Path:
    for candidate in _BUSYBOX_CANDIDATES:
        path = Path(candidate)
        if path.is_file():
            problem = _static_x86_64_problem(path)
            if problem is None:
                return path
            raise TinyGuestBuildError(
                f"{path} cannot run in the guest's initramfs: {problem}; "
                f"install busybox-static (apt-get install busybox-static) or {_SETUP_HINT}"
            )
    raise TinyGuestBuildError(
        f"busybox not found (looked for {', '.join(_BUSYBOX_CANDIDATES)}); {_SETUP_HINT}"
    )


def _static_x86_64_problem(path: Path) -> str | None:
    """None if ``path`` is a static x86-64 ELF executable, else what is wrong with it."""
    with path.open("rb") as f:
        header = f.read(64)
        if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
            return "not a 64-bit little-endian ELF file"
        (machine,) = struct.unpack_from("<H", header, 18)
        if machine != 62:
            return f"not an x86-64 executable (ELF machine {machine})"
        (phoff,) = struct.unpack_from("<Q", header, 32)
        phentsize, phnum = struct.unpack_from("<HH", header, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    for i in range(phnum):
        (p_type,) = struct.unpack_from("<I", table, i * phentsize)
        if p_type == 3:  # PT_INTERP: needs a dynamic loader and libc, which the initramfs lacks
            return "it is dynamically linked (the 'busybox' package, not 'busybox-static')"
    return None


def _run(argv: Sequence[str], *, what: str, cwd: Path | None = None, timeout: float = _APT_TIMEOUT) -> str:
    """Run a command (argument list, no shell) and return its stdout; raise TinyGuestBuildError on failure."""
    env = {**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"}
    try:
        done = subprocess.run(
            list(argv),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TinyGuestBuildError(
            f"could not {what}: `{' '.join(argv)}` failed: {exc}; {_SETUP_HINT}"
        ) from exc
    if done.returncode != 0:
        raise _CommandFailed(argv, done.returncode, done.stdout + done.stderr, what)
    return done.stdout


class _CommandFailed(TinyGuestBuildError):
    def __init__(self, argv: Sequence[str], returncode: int, output: str, what: str) -> None:
        tail = "\n".join(output.strip().splitlines()[-8:])
        super().__init__(
            f"could not {what}: `{' '.join(argv)}` exited with status {returncode}:\n{tail}\n"
            f"(the tiny test guest's kernel comes from Debian's package mirror: check the network, "
            f"then {_SETUP_HINT})"
        )


def _resolve_kernel_package(apt_cache: str) -> str | None:
    """The current ``linux-image-<abi>-amd64`` package name, from the apt lists; None if they know none."""
    try:
        depends = _run([apt_cache, "depends", _KERNEL_META_PACKAGE], what="ask apt for the kernel package")
    except _CommandFailed:
        depends = ""
    for line in depends.splitlines():
        key, _, value = line.strip().lstrip("|").partition(":")
        if key == "Depends" and _KERNEL_PACKAGE_RE.match(value.strip()):
            return value.strip()
    try:
        found = _run(
            [apt_cache, "search", "--names-only", "^linux-image-[0-9].*-amd64$"],
            what="search apt for a kernel package",
        )
    except _CommandFailed:
        return None
    names = [line.split(" ", 1)[0] for line in found.splitlines()]
    names = [n for n in names if _KERNEL_PACKAGE_RE.match(n)]
    if not names:
        return None
    return max(names, key=lambda n: [int(x) for x in re.findall(r"\d+", n)])


def _download_kernel(apt_get: str, apt_cache: str, into: Path) -> tuple[Path, str]:
    """``apt-get download`` the kernel package; refresh the apt lists once if they are missing or stale."""
    may_update = os.geteuid() == 0
    for attempt in ("cached lists", "fresh lists"):
        package = _resolve_kernel_package(apt_cache)
        try:
            if package is None:
                raise TinyGuestBuildError(
                    f"apt knows no {_KERNEL_META_PACKAGE} or linux-image-*-amd64 package "
                    f"(are the apt lists missing? `apt-get update` fetches them); {_SETUP_HINT}"
                )
            log.info("downloading %s", package)
            # as root apt drops to the _apt user to download, which cannot write into our private build dir
            sandbox = ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []
            _run([apt_get, *sandbox, "download", package], what=f"download {package}", cwd=into)
            debs = sorted(into.glob("*.deb"))
            if len(debs) != 1:
                raise TinyGuestBuildError(
                    f"`apt-get download {package}` left {len(debs)} .deb files in {into}"
                )
            return debs[0], package
        except TinyGuestBuildError as exc:
            if attempt == "fresh lists" or not may_update:
                raise
            first_error = exc
        log.info("kernel download failed with the cached apt lists: running apt-get update")
        try:
            _run([apt_get, "update"], what="refresh the apt package lists (apt-get update)")
        except TinyGuestBuildError as exc:
            raise TinyGuestBuildError(
                f"{first_error}\n\nthen apt-get update failed too: {exc}"
            ) from first_error
    raise AssertionError("unreachable")


def _extract_kernel(dpkg_deb: str, deb: Path) -> tuple[bytes, dict[str, bytes]]:
    """The kernel image and the needed modules (decompressed), streamed out of the package.

    Reading the data tarball through ``dpkg-deb --fsys-tarfile`` takes as long as ``dpkg -x`` but keeps the
    package's 400 MB of other modules off the disk.
    """
    module_re = re.compile(
        r"^(?:\./)?(?:usr/)?lib/modules/[^/]+/kernel/(?P<path>.+)\.ko(?:\.(?P<comp>xz|zst|gz))?$"
    )
    wanted = {path: name for _option, name, path, _required in _DRIVERS}
    kernels: dict[str, bytes] = {}
    configs: list[bytes] = []
    modules: dict[str, bytes] = {}
    proc = subprocess.Popen(
        [dpkg_deb, "--fsys-tarfile", str(deb)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "LC_ALL": "C"},
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name.removeprefix("./")
                module = module_re.match(member.name)
                if name.startswith("boot/vmlinuz-"):
                    kernels[name] = _read_member(tar, member)
                elif name.startswith("boot/config-"):
                    configs.append(_read_member(tar, member))
                elif module and module["path"] in wanted:
                    modules[wanted[module["path"]]] = _decompress(
                        _read_member(tar, member), module["comp"], name
                    )
    except tarfile.TarError as exc:
        proc.kill()
        raise TinyGuestBuildError(f"cannot read {deb}: {exc}") from exc
    finally:
        proc.stdout.close()
        stderr = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
        returncode = proc.wait()
    if returncode != 0:
        raise TinyGuestBuildError(
            f"`dpkg-deb --fsys-tarfile {deb}` exited with status {returncode}: {stderr}"
        )
    if len(kernels) != 1:
        raise TinyGuestBuildError(f"{deb.name} holds {len(kernels)} boot/vmlinuz-* files, expected one")
    config = b"\n".join(configs).decode(errors="replace")
    needed: dict[str, bytes] = {}
    for option, name, path, required in _DRIVERS:
        value = re.search(rf"^{option}=(\S+)$", config, re.MULTILINE)
        if value and value[1] == "y":
            continue  # built in: nothing to load
        if name in modules:
            needed[name] = modules[name]
        elif required or (value and value[1] == "m"):
            raise TinyGuestBuildError(
                f"{deb.name} has no {path}.ko module and its config does not build {option} in "
                f"({option}={value[1] if value else 'unset'}): this kernel cannot run the tiny guest"
            )
    return next(iter(kernels.values())), needed


def _pvh_vmlinux(bzimage: bytes) -> bytes | None:
    """The uncompressed ELF kernel inside a bzImage if QEMU can boot it directly (PVH), else None.

    QEMU (>= 4.0) loads an ELF ``-kernel`` that has a Xen PHYS32_ENTRY note straight into guest memory on
    ``pc``, ``q35`` and ``microvm``: the kernel then skips its own decompressor, which is slow under TCG.
    """
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        return None
    (protocol,) = struct.unpack_from("<H", bzimage, 0x206)
    if protocol < 0x208:  # payload_offset/payload_length appeared in boot protocol 2.08
        return None
    setup_sects = bzimage[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = bzimage[start : start + payload_length]
    try:
        if payload.startswith(b"\xfd7zXZ\x00"):
            elf = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(payload)
        elif payload.startswith(b"\x1f\x8b"):
            elf = gzip.decompress(payload)
        else:  # zstd, lz4, lzo, bzip2, lzma: not worth a dependency, the bzImage boots too
            return None
    except (lzma.LZMAError, OSError, EOFError):
        return None
    return elf if _has_pvh_note(elf) else None


def _has_pvh_note(elf: bytes) -> bool:
    """True for a 64-bit little-endian ELF whose PT_NOTE has XEN_ELFNOTE_PHYS32_ENTRY (QEMU's PVH test)."""
    if len(elf) < 64 or elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        return False
    try:
        return _find_pvh_note(elf)
    except struct.error:  # truncated or malformed
        return False


def _find_pvh_note(elf: bytes) -> bool:
    (phoff,) = struct.unpack_from("<Q", elf, 32)
    phentsize, phnum = struct.unpack_from("<HH", elf, 54)
    for i in range(phnum):
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize
        )
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, note_type = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and note_type == 18:  # XEN_ELFNOTE_PHYS32_ENTRY
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def _write_sparse(path: Path, data: bytes, block: int = 4096) -> None:
    """Write a new file, mode 0644, durably, with holes for zero blocks (half of a vmlinux is zeros)."""
    zeros = bytes(block)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as f:
        for offset in range(0, len(data), block):
            chunk = data[offset : offset + block]
            if chunk == zeros[: len(chunk)]:
                f.seek(len(chunk), os.SEEK_CUR)
            else:
                f.write(chunk)
        f.truncate(len(data))
        f.flush()
        os.fchmod(f.fileno(), 0o644)  # whatever the umask
        os.fsync(f.fileno())  # before the rename that publishes it


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(member)
    assert f is not None
    return f.read()


def _decompress(data: bytes, compression: str | None, name: str) -> bytes:
    """Modules may be compressed (Debian 12: none; newer: xz; Ubuntu: zstd); insmod wants them plain."""
    if compression is None:
        return data
    if compression == "xz":
        return lzma.decompress(data)
    if compression == "gz":
        return gzip.decompress(data)
    zstd = shutil.which("zstd")  # no zstd in the standard library before Python 3.14
    if zstd is None:
        raise TinyGuestBuildError(
            f"{name} is zstd-compressed and the zstd tool is missing: apt-get install zstd"
        )
    done = subprocess.run([zstd, "-dc"], input=data, capture_output=True, check=False, timeout=60)
    if done.returncode != 0:
        raise TinyGuestBuildError(f"zstd could not decompress {name}: {done.stderr.decode(errors='replace')}")
    return done.stdout


# ------------------------------------------------------------------------------------------ initramfs


def _initramfs(busybox: Path, modules: dict[str, bytes]) -> bytes:
    """The newc cpio archive: /init, /bin/busybox with a symlink per applet, the modules, /dev/console."""
    archive = _Cpio()
    for d in ("bin", "dev", "lib", "lib/modules", "proc", "run", "sys", "tmp"):
        archive.directory(d)
    archive.char_device("dev/console", 0o600, 5, 1)  # the kernel opens it for /init's stdio before /init runs
    archive.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in _applets(busybox):
        archive.symlink(f"bin/{applet}", "busybox")
    for name, data in sorted(modules.items()):
        archive.file(f"lib/modules/{name}.ko", data, 0o644)
    archive.file("init", INIT_SCRIPT.encode(), 0o755)
    return archive.finish()


def _applets(busybox: Path) -> list[str]:
    listed = _run([str(busybox), "--list"], what="list busybox's applets", timeout=30)
    names = {a for a in listed.split() if re.fullmatch(r"[A-Za-z0-9_.\[-]+", a) and a != "busybox"}
    needed = {"sh", "mount", "insmod", "sleep", "dd", "mkdir", "sync", "poweroff", "setsid"}
    needed |= {"awk", "sha256sum", "cat", "blockdev"}  # writer mode
    missing = needed - names
    if missing:
        raise TinyGuestBuildError(f"{busybox} lacks applets the guest's /init needs: {sorted(missing)}")
    return sorted(names)


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)


class _Cpio:
    """A minimal writer of the "new ASCII" (newc, ``070701``) cpio format that the kernel unpacks."""

    def __init__(self) -> None:
        self._out = bytearray()
        self._ino = 0

    def directory(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm, nlink=2)

    def file(self, name: str, data: bytes, perm: int) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, perm: int, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, ino=0, nlink=1)
        return bytes(self._out)

    def _entry(
        self,
        name: str,
        mode: int,
        data: bytes = b"",
        *,
        rdev: tuple[int, int] = (0, 0),
        nlink: int = 1,
        ino: int | None = None,
    ) -> None:
        if ino is None:
            self._ino += 1
            ino = self._ino
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self._out += b"070701" + b"".join(b"%08X" % v for v in fields) + encoded
        self._pad()
        self._out += data
        self._pad()

    def _pad(self) -> None:
        self._out += b"\0" * (-len(self._out) % 4)


# ------------------------------------------------------------------------------------------------ CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m aiovirt.testing._guest",
        description="Build (or find) the cached tiny test guest and print where it is.",
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help=f"default: {default_cache_dir()}")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        guest = ensure_tiny_guest(args.cache_dir)
    except TinyGuestBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    manifest = json.loads((guest.kernel.parent / MANIFEST_NAME).read_text())
    info = {
        "kernel": str(guest.kernel),
        "initrd": str(guest.initrd),
        "cmdline": guest.cmdline,
        "ready_marker": guest.ready_marker,
        "kernel_package": manifest.get("kernel_package"),
        "kernel_package_version": manifest.get("kernel_package_version"),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key}: {value}")
        print(
            "boot it: qemu-system-x86_64 -machine pc -accel tcg -m 256 -nodefaults -display none "
            f"-kernel {guest.kernel} -initrd {guest.initrd} -append '{guest.cmdline}' -serial stdio"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
