"""examples/web: the sandbox service, through httpx's ASGI transport, served by uvicorn, in a browser.

Real QEMU booting the tiny guest from a transient disk over one base image. The page is checked
in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``), driven through the
chromedriver's WebDriver protocol with plain httpx: a domain created through the API appears on
it, and turns shutoff after a DELETE, without a reload. Every test on asyncio and trio (the
uvicorn server runs in a process of its own, on asyncio: uvicorn has no trio support).
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

import aiovirt
from aiovirt.testing import TinyGuest

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "web" / "app.py"
BOOT_TIMEOUT = 120.0
BROWSER_TIMEOUT = 60.0
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1000,520",
]


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("aiovirt_web_example", APP)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def make_base(path: Path) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
    return path


def overlays(state_root: Path) -> list[str]:
    return sorted(os.listdir(state_root / "overlays")) if (state_root / "overlays").exists() else []


@asynccontextmanager
async def asgi_client(uri: str, base: Path, guest: TinyGuest) -> AsyncIterator[httpx.AsyncClient]:
    """The app in this process, its lifespan run around the block (httpx's transport runs none)."""
    web = load_example()
    settings = web.Settings(uri, base, "qcow2", guest.kernel, guest.initrd, guest.cmdline)
    app = web.create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sandboxes") as client:
            yield client


async def test_the_api_through_the_asgi_transport(
    uri: str, state_root: Path, tmp_path: Path, tiny_guest: TinyGuest
) -> None:
    base = make_base(tmp_path / "base.qcow2")
    before = base.read_bytes()
    async with asgi_client(uri, base, tiny_guest) as client:
        assert (await client.get("/domains")).json() == []
        created = await client.post("/domains", json={"name": "sb-1"})
        assert created.status_code == 201, created.text
        assert created.json()["state"] == "running" and created.json()["pid"] > 0
        assert overlays(state_root) == ["sb-1.disk0.qcow2"]
        listed = (await client.get("/domains")).json()
        assert [(d["name"], d["state"], d["persistent"]) for d in listed] == [("sb-1", "running", False)]

        ready = await client.get(
            "/domains/sb-1/console",
            params={"wait": tiny_guest.shell_prompt, "timeout": BOOT_TIMEOUT},
            timeout=BOOT_TIMEOUT + 10,
        )
        assert ready.status_code == 200 and tiny_guest.ready_marker in ready.text
        typed = await client.post("/domains/sb-1/console", content=b"echo sandbox-$((6*7))\n")
        assert typed.status_code == 204
        answer = await client.get("/domains/sb-1/console", params={"wait": "sandbox-42\r\n"}, timeout=40)
        assert answer.status_code == 200 and "sandbox-42" in answer.text
        missing = await client.get(
            "/domains/sb-1/console", params={"wait": "never printed", "timeout": "0.2"}
        )
        assert missing.status_code == 504

        assert (await client.post("/domains", json={"name": "sb-1"})).status_code == 409
        assert (await client.post("/domains", json={"name": "-bad"})).status_code == 422
        assert (await client.post("/domains", json=["sb-2"])).status_code == 422
        assert (await client.get("/domains/nope")).status_code == 404

        destroyed = await client.delete("/domains/sb-1", params={"graceful": "true"})
        assert destroyed.json() == {"name": "sb-1", "signal": "SIGTERM", "state": "shutoff"}
        assert (await client.get("/domains")).json() == []  # transient: gone with its QEMU
        assert (await client.delete("/domains/sb-1")).status_code == 404
        assert overlays(state_root) == []
    assert base.read_bytes() == before


# -- served for real ------------------------------------------------------------------------------


async def read_line(stream: BufferedByteReceiveStream, timeout: float = 60) -> str:
    with anyio.fail_after(timeout):
        return (await stream.receive_until(b"\n", 1 << 16)).decode()


@asynccontextmanager
async def process(argv: list[str], **kw: Any) -> AsyncIterator[anyio.abc.Process]:
    """A child process, ended (SIGTERM, then SIGKILL) and reaped when the block exits."""
    proc = await anyio.open_process(argv, start_new_session=True, **kw)
    try:
        yield proc
    finally:
        with anyio.CancelScope(shield=True):
            if proc.returncode is None:
                os.killpg(proc.pid, signal.SIGTERM)
                with anyio.move_on_after(20):
                    await proc.wait()
            if proc.returncode is None:
                os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
            await proc.aclose()


@asynccontextmanager
async def uvicorn_server(uri: str, base: Path, guest: TinyGuest) -> AsyncIterator[str]:
    """The example under uvicorn on a socket bound here (no port race): its base URL."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "AIOVIRT_WEB_URI": uri,
        "AIOVIRT_WEB_BASE": str(base),
        "AIOVIRT_WEB_KERNEL": str(guest.kernel),
        "AIOVIRT_WEB_INITRD": str(guest.initrd),
        "AIOVIRT_WEB_CMDLINE": guest.cmdline,
    }
    argv = [sys.executable, "-m", "uvicorn", "--fd", str(listener.fileno()), "--log-level", "warning"]
    argv += ["--app-dir", str(APP.parent), "--factory", "app:create_app_from_env"]
    try:
        async with process(argv, env=env, pass_fds=[listener.fileno()], stdout=None, stderr=None):
            listener.close()  # the server holds its own copy; connections queue until it serves
            yield f"http://127.0.0.1:{port}"
    finally:
        listener.close()
        # Sandboxes outlive the server by design: end any that a failed test left behind.
        with anyio.CancelScope(shield=True):
            async with aiovirt.connect(uri) as conn:
                for dom in await conn.list_domains(active=True):
                    await dom.destroy(timeout=5)


class Browser:
    """A headless Chromium through its chromedriver's WebDriver protocol (W3C), with plain httpx."""

    def __init__(self, client: httpx.AsyncClient, session: str) -> None:
        self.client = client
        self.session = session

    async def command(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = await self.client.request(method, f"/session/{self.session}{path}", json=body)
        value = response.json()["value"]
        assert response.status_code == 200, value
        return value

    async def wait_until(self, condition: str, *args: Any) -> Any:
        """Run the JavaScript ``condition`` (a function body returning a truthy value when done)
        in the page until it holds; the page checks it on every animation frame."""
        script = (
            "const done = arguments[arguments.length - 1];"
            f"const test = () => {{ {condition} }};"
            "const check = () => { const v = test(); if (v) done(v); else requestAnimationFrame(check); };"
            "check();"
        )
        return await self.command("POST", "/execute/async", {"script": script, "args": list(args)})


@asynccontextmanager
async def browser(tmp_path: Path) -> AsyncIterator[Browser]:
    chromedriver, chromium = shutil.which("chromedriver"), shutil.which("chromium")
    assert chromedriver and chromium, "install Debian's chromium and chromium-driver (scripts/setup.sh does)"
    async with AsyncExitStack() as stack:
        proc = await stack.enter_async_context(process([chromedriver, "--port=0"], stderr=subprocess.DEVNULL))
        assert proc.stdout is not None
        stdout = BufferedByteReceiveStream(proc.stdout)
        while not (found := re.search(r"started successfully on port (\d+)", await read_line(stdout))):
            pass
        client = await stack.enter_async_context(
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{found[1]}", timeout=BROWSER_TIMEOUT + 30)
        )
        options = {"binary": chromium, "args": [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}"]}
        capabilities = {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}
        created = await client.post("/session", json={"capabilities": capabilities})
        assert created.status_code == 200, created.text
        session = created.json()["value"]["sessionId"]
        try:
            yield Browser(client, session)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(30):
                await client.delete(f"/session/{session}")  # closes Chromium


#: The page shows state ``arguments[1]`` for domain ``arguments[0]`` (a wait_until condition).
SHOWS = (
    "const el = document.getElementById('state-' + arguments[0]);"
    " return el !== null && el.textContent === arguments[1];"
)


async def next_event(lines: AsyncIterator[str], accept: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The next lifecycle event (an SSE message of the default type) that ``accept`` takes."""
    kind = "message"
    with anyio.fail_after(BOOT_TIMEOUT):
        async for line in lines:
            if line.startswith("event: "):
                kind = line[len("event: ") :]
            elif line.startswith("data: ") and kind == "message":
                event: dict[str, Any] = json.loads(line[len("data: ") :])
                if accept(event):
                    return event
            elif line == "":
                kind = "message"  # the end of a message
    raise AssertionError("the event stream ended")


async def test_served_by_uvicorn_and_live_in_a_browser(
    uri: str, state_root: Path, tmp_path: Path, tiny_guest: TinyGuest
) -> None:
    base = make_base(tmp_path / "base.qcow2")
    async with (
        uvicorn_server(uri, base, tiny_guest) as url,
        httpx.AsyncClient(base_url=url, timeout=BOOT_TIMEOUT) as api,
        browser(tmp_path) as page,
    ):
        page_html = await api.get("/")
        assert page_html.status_code == 200 and "EventSource" in page_html.text
        async with api.stream("GET", "/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.aiter_lines()
            with anyio.fail_after(30):
                assert [await anext(lines) for _ in range(3)] == ["event: hello", "data: {}", ""]

            await page.command("POST", "/timeouts", {"script": int(BROWSER_TIMEOUT * 1000)})
            await page.command("POST", "/url", {"url": url + "/"})
            await page.wait_until("return document.body.dataset.live === 'yes';")
            await page.command("POST", "/execute/sync", {"script": "window.loadedOnce = true;", "args": []})

            created = await api.post("/domains", json={"name": "web-1"})
            assert created.status_code == 201, created.text
            started = await next_event(lines, lambda e: e["name"] == "web-1")
            assert (started["kind"], started["detail"], started["state"]) == ("started", "booted", "running")
            assert await page.wait_until(SHOWS, "web-1", "running")

            # The guest boots; then the page is what the README shows.
            console = await api.get("/domains/web-1/console", params={"wait": tiny_guest.shell_prompt})
            assert console.status_code == 200
            png = await page.command("GET", "/screenshot")
            assert png.startswith("iVBORw0KGgo")  # base64 of a PNG's signature
            if os.environ.get("AIOVIRT_WEB_SCREENSHOT"):  # how examples/web/screenshot.png was made
                Path(os.environ["AIOVIRT_WEB_SCREENSHOT"]).write_bytes(base64.b64decode(png))

            destroyed = await api.delete("/domains/web-1", params={"graceful": "true"})
            assert destroyed.json()["signal"] == "SIGTERM"
            kinds = [(await next_event(lines, lambda e: e["name"] == "web-1"))["kind"] for _ in range(2)]
            assert kinds == ["shutdown", "stopped"]
            assert await page.wait_until(SHOWS, "web-1", "shutoff")
            # Without a reload: what the script set on the window when the page loaded is still there.
            script = {"script": "return window.loadedOnce === true;", "args": []}
            assert await page.command("POST", "/execute/sync", script) is True
    assert overlays(state_root) == []
