"""A sandbox service: an ASGI backend (Starlette) that hands out throwaway VMs, and a live page.

    .venv/bin/uvicorn --app-dir examples/web --factory app:create_app_from_env

The app's lifespan holds one aiovirt connection for the whole process. Every sandbox is a
transient domain booting the same kernel, with a *transient disk* over one base image: a qcow2
overlay made at its start and deleted when it ends, so any number of sandboxes share the base,
which is never written. The API (see README.md beside this file for curl commands):

    GET    /                          the page: every domain, kept up to date from /events
    GET    /domains                   the domains, as JSON
    POST   /domains                   {"name": "sb-1"}: create and start a sandbox (201)
    GET    /domains/NAME              one domain
    DELETE /domains/NAME?graceful=true&timeout=10
                                      destroy it (graceful: SIGTERM only; 409 if it outlives the timeout)
    GET    /domains/NAME/console?wait=TEXT&timeout=30
                                      what its serial console printed in this run (text/plain);
                                      with wait, once TEXT has appeared (504 if it does not in time)
    POST   /domains/NAME/console      type the request body into its console (204)
    GET    /events                    lifecycle events as server-sent events

Settings come from the environment (:meth:`Settings.from_env`): ``AIOVIRT_WEB_URI`` (default
``qemu:///session``), ``AIOVIRT_WEB_BASE`` (the base image, required), ``AIOVIRT_WEB_BASE_FORMAT``
(``qcow2``), ``AIOVIRT_WEB_KERNEL``/``_INITRD``/``_CMDLINE`` (default: aiovirt's tiny test guest).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

import aiovirt
from aiovirt.testing import ensure_tiny_guest

__all__ = ["Settings", "create_app", "create_app_from_env"]

PAGE = Path(__file__).with_name("page.html")
#: How often an idle event stream sends a comment, so that proxies keep it open.
KEEPALIVE = 15.0
#: The state each lifecycle event leaves a domain in (None: the event says nothing of it).
STATE_AFTER: Mapping[aiovirt.EventKind, aiovirt.DomainState | None] = {
    aiovirt.EventKind.DEFINED: None,
    aiovirt.EventKind.UNDEFINED: None,
    aiovirt.EventKind.STARTED: aiovirt.DomainState.RUNNING,
    aiovirt.EventKind.SUSPENDED: aiovirt.DomainState.PAUSED,
    aiovirt.EventKind.RESUMED: aiovirt.DomainState.RUNNING,
    aiovirt.EventKind.SHUTDOWN: aiovirt.DomainState.SHUTDOWN,
    aiovirt.EventKind.STOPPED: aiovirt.DomainState.SHUTOFF,
}


@dataclass(frozen=True)
class Settings:
    """What the service runs: where (``uri``), from which base image, booting which kernel."""

    uri: str
    base: Path
    base_format: Literal["raw", "qcow2"] = "qcow2"
    kernel: Path | None = None  # None: aiovirt's tiny test guest (built on first use)
    initrd: Path | None = None
    cmdline: str | None = None
    memory_mib: int = 128

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        base = env.get("AIOVIRT_WEB_BASE")
        if not base:
            raise SystemExit("set AIOVIRT_WEB_BASE to the base image of the sandboxes")
        fmt = env.get("AIOVIRT_WEB_BASE_FORMAT", "qcow2")
        if fmt not in ("raw", "qcow2"):
            raise SystemExit(f"AIOVIRT_WEB_BASE_FORMAT must be raw or qcow2, not {fmt!r}")
        kernel, initrd = env.get("AIOVIRT_WEB_KERNEL"), env.get("AIOVIRT_WEB_INITRD")
        return cls(
            uri=env.get("AIOVIRT_WEB_URI", "qemu:///session"),
            base=Path(base),
            base_format="raw" if fmt == "raw" else "qcow2",
            kernel=Path(kernel) if kernel else None,
            initrd=Path(initrd) if initrd else None,
            cmdline=env.get("AIOVIRT_WEB_CMDLINE"),
        )

    def sandbox(self, name: str) -> aiovirt.DomainConfig:
        """The config of the sandbox ``name`` (raises ConfigError for a bad name)."""
        return aiovirt.DomainConfig(
            name=name,
            machine="pc",
            accel="tcg",  # portable: a nested KVM can hang Linux guests
            memory_mib=self.memory_mib,
            kernel=self.kernel,
            initrd=self.initrd,
            cmdline=self.cmdline,
            disks=[aiovirt.Disk(path=self.base, format=self.base_format, transient=True)],
        )


def domain_json(dom: aiovirt.Domain) -> dict[str, Any]:
    return {
        "name": dom.name,
        "uuid": str(dom.uuid),
        "state": dom.state.value,
        "reason": dom.reason.value,
        "pid": dom.pid,
        "persistent": dom.persistent,
    }


def event_json(event: aiovirt.DomainEvent) -> dict[str, Any]:
    state = STATE_AFTER[event.kind]
    return {
        "kind": event.kind.value,
        "detail": event.detail.value,
        "name": event.name,
        "uuid": str(event.uuid),
        "timestamp": event.timestamp,
        "state": state.value if state is not None else None,
    }


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def conn_of(request: Request) -> aiovirt.Connection:
    conn: aiovirt.Connection = request.app.state.conn
    return conn


async def page(request: Request) -> Response:
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))


async def list_domains(request: Request) -> Response:
    return JSONResponse([domain_json(d) for d in await conn_of(request).list_domains()])


async def create_domain(request: Request) -> Response:
    try:
        body = await request.json()
    except ValueError:
        return error(400, 'the body must be JSON: {"name": ...}')
    if not isinstance(body, dict) or not isinstance(body.get("name"), str):
        return error(422, 'the body must be {"name": "..."}')
    settings: Settings = request.app.state.settings
    dom = await conn_of(request).create(settings.sandbox(body["name"]))
    return JSONResponse(domain_json(dom), status_code=201)


async def get_domain(request: Request) -> Response:
    return JSONResponse(domain_json(await conn_of(request).lookup(request.path_params["name"])))


async def destroy_domain(request: Request) -> Response:
    dom = await conn_of(request).lookup(request.path_params["name"])
    graceful = request.query_params.get("graceful", "false").lower() in ("1", "true", "yes")
    try:
        timeout = float(request.query_params.get("timeout", "10"))
    except ValueError:
        return error(422, "timeout must be a number of seconds")
    sent = await dom.destroy(graceful=graceful, timeout=timeout)
    return JSONResponse({"name": dom.name, "signal": sent.name, "state": dom.state.value})


async def read_console(request: Request) -> Response:
    dom = await conn_of(request).lookup(request.path_params["name"])
    wait = request.query_params.get("wait")
    try:
        timeout = float(request.query_params.get("timeout", "30"))
    except ValueError:
        return error(422, "timeout must be a number of seconds")
    async with dom.console() as con:  # starts with what the run printed so far
        if wait:
            with anyio.move_on_after(timeout) as scope:
                await con.expect(wait.encode())
            if scope.cancelled_caught:
                return error(504, f"{wait!r} did not appear on the console within {timeout:g} s")
        return PlainTextResponse(con.text)


async def write_console(request: Request) -> Response:
    dom = await conn_of(request).lookup(request.path_params["name"])
    data = await request.body()
    async with dom.console(replay=False) as con:
        await con.send(data)
    return Response(status_code=204)


async def events(request: Request) -> Response:
    conn = conn_of(request)

    async def stream() -> AsyncIterator[str]:
        async with conn.subscribe() as sub:
            # Subscribed: from here on nothing is missed, so a client may read the list now.
            yield "event: hello\ndata: {}\n\n"
            while True:
                with anyio.move_on_after(KEEPALIVE):
                    try:
                        event = await sub.receive()
                    except aiovirt.EventsDroppedError as exc:
                        yield f"event: dropped\ndata: {json.dumps({'dropped': exc.dropped})}\n\n"
                        continue
                    except anyio.EndOfStream:  # the connection closed: the server is stopping
                        return
                    yield f"data: {json.dumps(event_json(event))}\n\n"
                    continue
                yield ": keepalive\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


ERRORS: Mapping[type[aiovirt.AiovirtError], int] = {
    aiovirt.DomainNotFoundError: 404,
    aiovirt.DomainExistsError: 409,
    aiovirt.InvalidStateError: 409,
    aiovirt.DestroyTimeoutError: 409,
    aiovirt.ConfigError: 422,
    aiovirt.LaunchError: 502,
    aiovirt.ConsoleBusyError: 409,
}


async def aiovirt_error(request: Request, exc: Exception) -> Response:
    status = next((s for cls, s in ERRORS.items() if isinstance(exc, cls)), 500)
    return error(status, str(exc))


def create_app(settings: Settings) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if settings.kernel is None:
            guest = await anyio.to_thread.run_sync(ensure_tiny_guest)
            app.state.settings = Settings(
                settings.uri,
                settings.base,
                settings.base_format,
                guest.kernel,
                guest.initrd,
                guest.cmdline,
                settings.memory_mib,
            )
        else:
            app.state.settings = settings
        # Sandboxes outlive a restart of the service: the next connection takes them back.
        async with aiovirt.connect(settings.uri) as conn:
            app.state.conn = conn
            yield

    routes = [
        Route("/", page),
        Route("/domains", list_domains, methods=["GET"]),
        Route("/domains", create_domain, methods=["POST"]),
        Route("/domains/{name}", get_domain, methods=["GET"]),
        Route("/domains/{name}", destroy_domain, methods=["DELETE"]),
        Route("/domains/{name}/console", read_console, methods=["GET"]),
        Route("/domains/{name}/console", write_console, methods=["POST"]),
        Route("/events", events),
    ]
    return Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={aiovirt.AiovirtError: aiovirt_error}
    )


def create_app_from_env() -> Starlette:
    return create_app(Settings.from_env())
