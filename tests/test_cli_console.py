"""`aiovirt console NAME` in a real pseudo-terminal, against the real tiny guest: type into its
shell, read the answer, detach with Ctrl-] (as virsh), the guest still running afterwards."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

import aiovirt
from aiovirt.testing import TinyGuest

from .conftest import pid_alive

HANG = 60


def _read_until(fd: int, needle: bytes, seen: bytearray) -> None:
    deadline = time.monotonic() + HANG
    while needle not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"never saw {needle!r}; saw {bytes(seen[-400:])!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                seen += os.read(fd, 4096)
            except OSError:  # the slave side closed: the command ended
                break


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_console_in_a_terminal(backend: str, uri: str, tiny_guest: TinyGuest) -> None:
    prompt = tiny_guest.shell_prompt.encode()

    async def boot() -> int:
        async with aiovirt.connect(uri) as conn:
            dom = await conn.create(tiny_guest.domain_config("tty"))
            async with dom.console() as con:
                with anyio.fail_after(HANG * 3):
                    await con.expect(prompt)
            assert dom.pid is not None
            return dom.pid  # leaving the block keeps the guest running for the command

    pid = anyio.run(boot, backend=backend)
    master, slave = os.openpty()
    env = {**os.environ, "AIOVIRT_CLI_BACKEND": backend}
    proc = subprocess.Popen(
        [sys.executable, "-m", "aiovirt", "-c", uri, "console", "tty"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        cwd=Path(aiovirt.__file__).parent.parent,
        start_new_session=True,
    )
    os.close(slave)
    seen = bytearray()
    try:
        _read_until(master, b"escape character is ^]", seen)
        os.write(master, b"echo cli-$((40+2))\n")  # the tiny guest's shell reads a newline as Enter
        _read_until(master, b"\r\ncli-42\r\n", seen)
        os.write(master, b"\x1d")  # Ctrl-]
        assert proc.wait(timeout=HANG) == 0
        _read_until(master, b"Disconnected", seen)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert pid_alive(pid), "detaching must leave the guest running"

    async def clean_up() -> None:
        async with aiovirt.connect(uri) as conn:
            await (await conn.lookup("tty")).destroy()

    anyio.run(clean_up, backend=backend)
