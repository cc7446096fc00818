"""The verbs: each opens the connection it needs, does one thing through aiovirt's public API,
and prints the result for people or as the JSON shape of :mod:`aiovirt.cli._shapes`.

A verb returns its exit status; failures are raised (:class:`aiovirt.AiovirtError`,
:class:`CliError`, ``TimeoutError``, ``OSError``) and reported by the runner as one line.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio

import aiovirt
from aiovirt.config import ConfigFormat, dump_config, load_config, to_libvirt_xml

from ._args import VERBS
from ._interrupt import Interrupts
from ._output import Output, format_bytes, format_seconds
from ._session import open_connection
from ._shapes import CliError, action_shape, event_shape, info_shape, list_shape, state_shape

__all__ = ["HANDLERS", "Context"]

#: How often ``console-log --follow`` looks for new output (the file is QEMU's, written as the
#: guest prints; a terminal reader needs no more).
_FOLLOW_INTERVAL = 0.2
_READ_CHUNK = 1 << 16


@dataclass
class Context:
    args: argparse.Namespace
    out: Output
    interrupts: Interrupts
    readonly: bool = field(default=False, init=False)
    """Whether the connection opened by :meth:`open` is read-only (asked for, or fallen back to)."""

    @asynccontextmanager
    async def open(self) -> AsyncIterator[aiovirt.Connection]:
        access = VERBS[self.args.verb].access
        async with open_connection(
            self.args.connect,
            readonly=self.args.readonly,
            may_fall_back=access == "read",
            note=self.out.note,
        ) as (conn, readonly):
            self.readonly = readonly
            yield conn


Handler = Callable[[Context], Awaitable[int]]


def _done(ctx: Context, text: str, shape: dict[str, object]) -> int:
    if ctx.out.json_mode:
        ctx.out.json(shape)
    else:
        ctx.out.line(text)
    return 0


# -- listing and inspecting ------------------------------------------------------------------


async def verb_list(ctx: Context) -> int:
    a = ctx.args
    async with ctx.open() as conn:
        doms = await conn.list_domains()
        if a.state is not None:
            doms = [d for d in doms if str(d.state) == a.state]
        elif a.inactive:
            doms = [d for d in doms if not d.active]
        elif not a.all:
            doms = [d for d in doms if d.active]
        for problem in conn.problems:
            # Those the library logged as it found them were shown already.
            if not any(str(problem) in line for line in ctx.out.noted):
                ctx.out.warning(str(problem))
        if ctx.out.json_mode:
            ctx.out.json(list_shape(conn.uri, ctx.readonly, doms, conn.problems))
        elif a.name:
            for dom in doms:
                ctx.out.line(dom.name)
        else:
            ctx.out.domains(doms)
    return 0


async def verb_dominfo(ctx: Context) -> int:
    async with ctx.open() as conn:
        dom = await conn.lookup(ctx.args.domain)
        info = await dom.info()
        if ctx.out.json_mode:
            ctx.out.json(info_shape(dom, info))
            return 0
        cfg = dom.config
        active = dom.active
        ctx.out.fields(
            [
                ("Name", dom.name),
                ("UUID", str(dom.uuid)),
                ("State", f"{info.state} ({info.reason})"),
                ("PID", "-" if info.pid is None else str(info.pid)),
                ("CPU(s)", str(info.vcpus)),
                ("CPU time", format_seconds(info.cpu_time) if active else "-"),
                ("Max memory", f"{info.memory_mib} MiB"),
                ("Used memory", format_bytes(info.rss_bytes) + " (QEMU's RSS)" if active else "-"),
                ("Uptime", format_seconds(info.uptime) if active else "-"),
                ("Machine", f"{cfg.machine} ({cfg.accel})"),
                ("Persistent", "yes" if dom.persistent else "no"),
                ("Autostart", "enable" if dom.autostart else "disable"),
                ("Monitor", "reachable" if dom.reachable else "unreachable"),
                ("Shutdown reason", dom.shutdown_reason or "-"),
                ("Log", str(dom.log_path or "-")),
                ("Console", str(dom.console_path or "-")),
            ]
        )
    return 0


async def verb_domstate(ctx: Context) -> int:
    async with ctx.open() as conn:
        dom = await conn.lookup(ctx.args.domain)
        text = f"{dom.state} ({dom.reason})" if ctx.args.reason else str(dom.state)
        return _done(ctx, text, state_shape(dom))


async def verb_dumpconfig(ctx: Context) -> int:
    async with ctx.open() as conn:
        dom = await conn.lookup(ctx.args.domain)
        fmt: ConfigFormat = "json" if ctx.out.json_mode or ctx.args.format == "json" else "toml"
        ctx.out.stdout.write(dump_config(dom.config, fmt))
        ctx.out.stdout.flush()
    return 0


async def verb_dumpxml(ctx: Context) -> int:
    async with ctx.open() as conn:
        dom = await conn.lookup(ctx.args.domain)
        xml = to_libvirt_xml(dom.config)
        if ctx.out.json_mode:
            ctx.out.json({"name": dom.name, "xml": xml})
        else:
            ctx.out.stdout.write(xml)
            ctx.out.stdout.flush()
    return 0


# -- defining ----------------------------------------------------------------------------------


async def verb_define(ctx: Context) -> int:
    path = ctx.args.file
    imported = load_config(path)  # before connecting: a bad file touches no state directory
    for warning in imported.warnings:
        ctx.out.warning(f"{path}: {warning}")
    async with ctx.open() as conn:
        try:
            await conn.lookup(imported.config.name)
            updated = True
        except aiovirt.DomainNotFoundError:
            updated = False
        dom = await conn.define(imported.config)
        verb = "redefined" if updated else "defined"
        return _done(
            ctx,
            f"Domain '{dom.name}' {verb} from {path}",
            {
                "action": "define",
                "name": dom.name,
                "uuid": str(dom.uuid),
                "file": str(path),
                "updated": updated,
                "warnings": list(imported.warnings),
            },
        )


async def verb_undefine(ctx: Context) -> int:
    async with ctx.open() as conn:
        dom = await conn.lookup(ctx.args.domain)
        await dom.undefine()
        return _done(ctx, f"Domain '{dom.name}' has been undefined", action_shape("undefine", dom))


async def verb_autostart(ctx: Context) -> int:
    enable = not ctx.args.disable
    async with ctx.open() as conn:
        dom = await conn.lookup(ctx.args.domain)
        await dom.set_autostart(enable)
        text = f"Domain '{dom.name}' {'marked as autostarted' if enable else 'unmarked as autostarted'}"
        return _done(ctx, text, action_shape("autostart", dom, autostart=enable))


# -- lifecycle ---------------------------------------------------------------------------------


async def verb_start(ctx: Context) -> int:
    async with ctx.open() as conn:
        dom = await conn.lookup(ctx.args.domain)
        await dom.start()
        return _done(ctx, f"Domain '{dom.name}' started (pid {dom.pid})", action_shape("start", dom))


def _simple(method: str, action: str, past: str) -> Handler:
    async def handler(ctx: Context) -> int:
        async with ctx.open() as conn:
            dom = await conn.lookup(ctx.args.domain)
            await getattr(dom, method)()
            return _done(ctx, f"Domain '{dom.name}' {past}", action_shape(action, dom))

    return handler


async def verb_shutdown(ctx: Context) -> int:
    a = ctx.args
    wait = a.wait or a.timeout is not None
    async with ctx.open() as conn:
        dom = await conn.lookup(a.domain)
        await dom.shutdown()
        if wait:
            with anyio.move_on_after(math.inf if a.timeout is None else a.timeout):
                await dom.wait_for_state(aiovirt.DomainState.SHUTOFF)
            if dom.active:
                raise TimeoutError(
                    f"domain '{dom.name}' did not shut off within {a.timeout:g} s of the power button "
                    f"(the guest may ignore ACPI; 'aiovirt destroy {dom.name}' stops it)"
                )
        text = f"Domain '{dom.name}' " + ("is shut off" if wait else "is being shutdown")
        return _done(ctx, text, action_shape("shutdown", dom, waited=wait, stopped=not dom.active))


async def verb_destroy(ctx: Context) -> int:
    a = ctx.args
    async with ctx.open() as conn:
        dom = await conn.lookup(a.domain)
        sent = await dom.destroy(a.graceful, a.timeout, remove_logs=a.remove_logs)
        return _done(
            ctx,
            f"Domain '{dom.name}' destroyed ({sent.name})",
            action_shape("destroy", dom, signal=sent.name, logs_removed=a.remove_logs),
        )


# -- watching ----------------------------------------------------------------------------------


def _read_from(path: Path, offset: int) -> tuple[bytes, int]:
    """What the file holds from ``offset`` on (from 0 again if it was truncated by a new run)."""
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size < offset:
                offset = 0
            file.seek(offset)
            data = file.read(_READ_CHUNK)
    except FileNotFoundError:
        return b"", 0
    return data, offset + len(data)


async def verb_console_log(ctx: Context) -> int:
    out = ctx.out
    async with ctx.open() as conn:
        dom = await conn.lookup(ctx.args.domain)
        path = dom.console_path
        if path is None:
            why = "its driver keeps no files" if dom.config.console else "its config has console = false"
            raise CliError("NoConsole", f"domain '{dom.name}' has no console log: {why}")

        def emit(data: bytes, *, lines: bool) -> None:
            if out.json_mode:
                text = data.decode("utf-8", errors="replace")
                out.json(
                    {"name": dom.name, "text": text}
                    if lines
                    else {"name": dom.name, "path": str(path), "text": text},
                    lines=lines,
                )
            else:
                out.raw(data)  # as cat does: the guest's bytes, unchanged

        if not ctx.args.follow:
            chunks, offset = [], 0
            while True:
                data, offset = _read_from(path, offset)
                if not data:
                    break
                chunks.append(data)
            emit(b"".join(chunks), lines=False)
            return 0

        offset = 0
        until = "Ctrl-C" if ctx.readonly else "the domain stops or Ctrl-C"
        out.note(f"following {path} until {until}")
        with ctx.interrupts.scope():
            while True:
                data, offset = _read_from(path, offset)
                if data:
                    emit(data, lines=True)
                    continue
                # A controlling connection sees the domain stop: nothing more will be written.
                # A read-only view cannot: it follows until Ctrl-C.
                if not ctx.readonly and not dom.active:
                    break
                await anyio.sleep(_FOLLOW_INTERVAL)
    return 0


def _event_line(event: aiovirt.DomainEvent) -> str:
    when = datetime.datetime.fromtimestamp(event.timestamp).isoformat(sep=" ", timespec="milliseconds")
    return f"{when}  {event.name}: {event.kind} ({event.detail})"


#: virsh's escape character: Ctrl-] (0x1d) ends the session and leaves the guest running.
_DETACH = b"\x1d"


@contextmanager
def _raw_terminal(fd: int) -> Iterator[None]:
    """The terminal in raw mode while attached (keys go to the guest as typed, Ctrl-C included), as
    virsh does; left alone when input is not a terminal."""
    if not os.isatty(fd):
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def verb_console(ctx: Context) -> int:
    async with ctx.open() as conn:
        dom = await conn.lookup(ctx.args.domain)
        async with dom.console() as con:
            stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
            ended = "detached"
            with _raw_terminal(stdin):
                # Said once the terminal is raw: what is typed from here on goes to the guest.
                ctx.out.note(f"Connected to domain '{dom.name}'; escape character is ^] (Ctrl + ])\r")
                async with anyio.create_task_group() as tg:

                    async def show() -> None:
                        nonlocal ended
                        try:
                            while True:
                                data = await con.receive()
                                view = memoryview(data)
                                while view:
                                    await anyio.wait_writable(stdout)
                                    view = view[os.write(stdout, view) :]
                        except (anyio.EndOfStream, anyio.ClosedResourceError):
                            ended = "the domain stopped"
                        tg.cancel_scope.cancel()

                    tg.start_soon(show)
                    while True:
                        await anyio.wait_readable(stdin)
                        data = os.read(stdin, 4096)
                        keys, detach, _ = data.partition(_DETACH)
                        if keys:
                            await con.send(keys)
                        if detach or not data:  # Ctrl-], or the end of the input
                            break
                    tg.cancel_scope.cancel()
        ctx.out.note(f"\r\nDisconnected from domain '{dom.name}' ({ended})")
    return 0


async def verb_event(ctx: Context) -> int:
    a = ctx.args
    out = ctx.out
    count = 0
    if a.readonly:
        raise CliError(
            "ReadOnly",
            "event needs the controlling connection: a read-only view is a snapshot and sees no events",
        )
    async with ctx.open() as conn:
        target = None if a.domain is None else await conn.lookup(a.domain)
        subscription = conn.subscribe() if target is None else target.subscribe()
        async with subscription as sub:
            whose = f"domain '{a.domain}'" if a.domain is not None else "every domain"
            # Said once subscribed: from here on no event is missed (scripts may wait for it).
            out.note(f"waiting for events of {whose} (Ctrl-C ends)")
            with (
                ctx.interrupts.scope() as scope,
                anyio.move_on_after(math.inf if a.timeout is None else a.timeout),
            ):
                while True:
                    try:
                        event = await sub.receive()
                    except aiovirt.EventsDroppedError as exc:
                        out.warning(str(exc))
                        continue
                    except anyio.EndOfStream:
                        break
                    count += 1
                    if out.json_mode:
                        out.json(event_shape(event), lines=True)
                    else:
                        out.line(_event_line(event))
                    if not a.loop:
                        break
    out.note(f"events received: {count}")
    if a.loop or count:
        return 0
    if scope.cancelled_caught:
        return ctx.interrupts.exit_status  # Ctrl-C while waiting for the one event
    if a.timeout is None:
        raise CliError("NoEvent", "the connection closed before any event")
    raise TimeoutError(f"no event within {a.timeout:g} s")


async def verb_stop_all(ctx: Context) -> int:
    from ._stopall import policy_from_args, run_stop_all

    a = ctx.args
    policy = policy_from_args(a)
    async with ctx.open() as conn:
        if a.domains:
            doms = [await conn.lookup(name) for name in dict.fromkeys(a.domains)]
        else:
            doms = await conn.list_domains(active=True)
        return await run_stop_all(conn, doms, policy, a.limit, ctx.out, ctx.interrupts)


HANDLERS: dict[str, Handler] = {
    "list": verb_list,
    "define": verb_define,
    "undefine": verb_undefine,
    "start": verb_start,
    "shutdown": verb_shutdown,
    "destroy": verb_destroy,
    "suspend": _simple("suspend", "suspend", "suspended"),
    "resume": _simple("resume", "resume", "resumed"),
    "reset": _simple("reset", "reset", "was reset"),
    "dominfo": verb_dominfo,
    "domstate": verb_domstate,
    "dumpconfig": verb_dumpconfig,
    "dumpxml": verb_dumpxml,
    "autostart": verb_autostart,
    "console-log": verb_console_log,
    "console": verb_console,
    "event": verb_event,
    "stop-all": verb_stop_all,
}
