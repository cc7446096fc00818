"""A controller in a process of its own, for the reattach and crash tests (not a test module).

Run as ``python tests/_controller.py BACKEND URI MODE ARGS...``; it reports on stdout, one line per
step, flushed, so the test can follow it::

    start NAME...        define (if needed) and start each domain; print "started NAME PID"; exit 0
                         with the QEMUs still running (leaving ``connect()`` never stops them).
                         ``NAME:paused`` is suspended once started. A last argument ``--hold``:
                         print "ready PID" and sleep until killed instead of exiting.
    create NAME...       the same with transient domains
    hold                 connect, print "ready PID", then sleep until killed
    hold-fork            the same, after forking a child that does not exec (it shares every open
                         file of the controller) and sleeps: "ready PID CHILD"
    die-at POINT NAME    define NAME and start it, SIGKILLing itself at POINT: "after-spawn" (QEMU
                         spawned, its pid not yet recorded) or "before-cont" (QEMU paused in
                         prelaunch, its monitor negotiated, "cont" not sent)
    churn SEED N         define, start, create (transient), suspend, resume, destroy and undefine
                         domains c00..c(N-1) at random, four at a time, until killed; each action
                         and its outcome, and aiovirt's log, go to stderr (for a failure message)

Domains are ``machine="none"`` (cheap) with the console on, so every QEMU's command line names the
state directory (the tests find them by it). Any unexpected exception exits with status 3.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import sys
import time
import traceback
from collections.abc import Awaitable
from typing import Any

import anyio
import anyio.lowlevel

import aiovirt
import aiovirt.drivers.qemu._process
import aiovirt.qmp._client

EXPECTED = (
    aiovirt.InvalidStateError,
    aiovirt.DomainExistsError,
    aiovirt.DomainNotFoundError,
    aiovirt.ConnectionLostError,
    aiovirt.LaunchError,  # a start that another task's destroy ended ("destroyed while starting")
)


def config(name: str) -> aiovirt.DomainConfig:
    return aiovirt.DomainConfig(name=name, machine="none", accel="tcg", memory_mib=16)


def say(*words: object) -> None:
    print(*words, flush=True)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


async def start(uri: str, names: list[str], *, transient: bool) -> None:
    hold = names[-1:] == ["--hold"]
    if hold:
        names = names[:-1]
    async with aiovirt.connect(uri) as conn:
        for spec in names:
            name, _, paused = spec.partition(":")
            if transient:
                dom = await conn.create(config(name))
            else:
                try:
                    dom = await conn.lookup(name)
                except aiovirt.DomainNotFoundError:
                    dom = await conn.define(config(name))
                await dom.start()
            if paused:
                await dom.suspend()
            say("started", name, dom.pid)
        if hold:
            say("ready", os.getpid())
            await anyio.sleep_forever()


async def hold(uri: str, fork: bool = False) -> None:
    async with aiovirt.connect(uri):
        if not fork:
            say("ready", os.getpid())
        elif (child := os.fork()) == 0:
            signal.alarm(60)  # never outlive the test for long
            signal.pause()
            os._exit(0)
        else:
            say("ready", os.getpid(), child)
        await anyio.sleep_forever()


async def die_at(uri: str, point: str, name: str) -> None:
    if point == "after-spawn":
        spawn = aiovirt.drivers.qemu._process.Process.spawn

        def spawn_then_die(*args: Any, **kwargs: Any) -> aiovirt.drivers.qemu._process.Process:
            proc = spawn(*args, **kwargs)
            say("spawned", proc.pid)
            die()
            return proc

        aiovirt.drivers.qemu._process.Process.spawn = spawn_then_die  # type: ignore[method-assign]
    elif point == "before-exec":
        # A controller killed between fork and exec: its child execs QEMU after the parent's death.
        def fork_then_die(argv: Any, *, output_fd: int, pass_fds: Any = ()) -> Any:
            child = os.fork()
            if child == 0:
                try:
                    os.setsid()
                    devnull = os.open(os.devnull, os.O_RDONLY)
                    os.dup2(devnull, 0)
                    os.dup2(output_fd, 1)  # let go of the test's pipes at once, as QEMU would
                    os.dup2(output_fd, 2)
                    time.sleep(1.0)
                    for fd in pass_fds:
                        os.set_inheritable(fd, True)
                    os.execvp(argv[0], list(argv))
                finally:
                    os._exit(127)
            say("forked", child)
            die()

        aiovirt.drivers.qemu._process.Process.spawn = fork_then_die  # type: ignore[method-assign]
    elif point == "before-cont":
        execute = aiovirt.qmp._client.QMPClient.execute

        async def execute_or_die(self: Any, command: str, *args: Any, **kwargs: Any) -> Any:
            if command == "cont":
                say("before-cont")
                die()
            return await execute(self, command, *args, **kwargs)

        aiovirt.qmp._client.QMPClient.execute = execute_or_die  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown point {point!r}")
    async with aiovirt.connect(uri) as conn:
        dom = await conn.define(config(name))
        await dom.start()
    raise SystemExit("should have died")


def log(line: str) -> None:
    # Unbuffered: the controller is SIGKILLed, and its last actions are the ones that matter.
    os.write(2, f"{time.monotonic():.4f} {line}\n".encode())


class _LogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        log(f"log {record.levelname} {record.getMessage()}")


async def churn(uri: str, seed: int, count: int) -> None:
    rng = random.Random(seed)
    names = [f"c{i:02d}" for i in range(count)]
    logging.getLogger("aiovirt").addHandler(_LogHandler())
    logging.getLogger("aiovirt").setLevel(logging.INFO)
    async with aiovirt.connect(uri) as conn:
        for dom in await conn.list_domains():
            log(f"{dom.name} loaded {dom.uuid} {dom.state.value} pid={dom.pid} persistent={dom.persistent}")
        say("ready", len(await conn.list_domains(active=True)))

        async def act(name: str) -> None:
            try:
                dom = await conn.lookup(name)
            except aiovirt.DomainNotFoundError:
                if rng.random() < 0.7:
                    await logged(name, "define", conn.define(config(name)))
                else:
                    await logged(name, "create", conn.create(config(name)))
                return
            roll = rng.random()
            uuid = str(dom.uuid)[:8]
            if not dom.active:
                if roll < 0.85:
                    await logged(name, f"start {uuid}", dom.start())
                else:
                    await logged(name, f"undefine {uuid}", dom.undefine())
            elif dom.state == aiovirt.DomainState.PAUSED:
                if roll < 0.5:
                    await logged(name, f"resume {uuid}", dom.resume())
                else:
                    await logged(name, f"destroy {uuid}", dom.destroy(timeout=5))
            elif roll < 0.1:
                await logged(name, f"suspend {uuid}", dom.suspend())
            elif roll < 0.15 and dom.persistent:
                await logged(name, f"undefine {uuid}", dom.undefine())
            elif roll < 0.6:
                await logged(name, f"destroy {uuid}", dom.destroy(timeout=5))
            else:
                await logged(name, f"qmp {uuid}", dom.qmp("query-status"))

        async def worker() -> None:
            while True:
                with contextlib.suppress(*EXPECTED):  # another worker got there first
                    await act(rng.choice(names))
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(worker)


async def logged(name: str, what: str, call: Awaitable[Any]) -> None:
    log(f"{name} {what}")
    try:
        result = await call
    except BaseException as exc:
        log(f"{name} {what} -> {type(exc).__name__}: {exc}")
        raise
    if isinstance(result, aiovirt.Domain):
        what += f" {str(result.uuid)[:8]} pid={result.pid}"
    log(f"{name} {what} -> ok")


def main(argv: list[str]) -> None:
    backend, uri, mode, *args = argv
    try:
        if mode == "start":
            anyio.run(lambda: start(uri, args, transient=False), backend=backend)
        elif mode == "create":
            anyio.run(lambda: start(uri, args, transient=True), backend=backend)
        elif mode in ("hold", "hold-fork"):
            anyio.run(hold, uri, mode == "hold-fork", backend=backend)
        elif mode == "die-at":
            anyio.run(die_at, uri, args[0], args[1], backend=backend)
        elif mode == "churn":
            anyio.run(churn, uri, int(args[0]), int(args[1]), backend=backend)
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        sys.exit(3)


if __name__ == "__main__":
    main(sys.argv[1:])
