#!/usr/bin/env python3
"""A stand-in for QEMU for what a real QEMU cannot be made to do: a monitor that speaks garbage.

Used as ``DomainConfig.emulator`` (an absolute path to this file). It takes QEMU's argv, accepts
the controller on the monitor listener it was handed (``-chardev socket,id=monitor,fd=N``) and
then, as ``$AIOVIRT_FAKE_MONITOR`` says:

- ``garbage``: sends a line that is not JSON;
- ``long``: sends a line longer than any limit, without end;
- ``silent``: sends nothing at all (a QEMU that never greets);
- ``greet-then-exit``: sends a valid greeting, then exits during the negotiation.

It never runs longer than 60 s. Not a test module.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time


def main(argv: list[str]) -> int:
    signal.alarm(60)
    mode = os.environ.get("AIOVIRT_FAKE_MONITOR", "garbage")
    spec = argv[argv.index("-chardev") + 1]
    fd = int(next(part for part in spec.split(",") if part.startswith("fd="))[3:])
    listener = socket.socket(fileno=fd)
    listener.setblocking(True)
    conn, _ = listener.accept()
    if mode == "garbage":
        conn.sendall(b"this is not QMP\r\n")
    elif mode == "long":
        chunk = b"x" * 65536
        try:
            for _ in range(1 << 10):
                conn.sendall(chunk)
        except OSError:
            pass  # the controller hung up: it gave up on the line, as it should
    elif mode == "greet-then-exit":
        conn.sendall(
            b'{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": []}}\r\n'
        )
        conn.recv(4096)
        return 1
    time.sleep(60)  # silent, or waiting to be killed
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
