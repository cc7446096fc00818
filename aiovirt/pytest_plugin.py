"""aiovirt's pytest plugin: a connection and domains per test, cleaned up whatever the test did.

Registered by entry point (``pytest11``), so installing aiovirt enables it. Fixtures, all
function-scoped, for async tests run by anyio's pytest plugin (asyncio or trio) or by pytest-asyncio::

    import aiovirt, pytest

    @pytest.mark.anyio                                       # or @pytest.mark.asyncio
    async def test_boots(aiovirt_domains):
        async with aiovirt_domains(memory_mib=32) as dom:    # a machine="none" domain, started
            assert dom.state is aiovirt.DomainState.RUNNING
        # destroyed when the block exits, also on error or cancellation

- ``aiovirt_domains`` (:class:`DomainFactory`): ``async with aiovirt_domains(cfg) as dom:`` for a
  transient domain destroyed when the block exits; ``await aiovirt_domains.create(cfg)`` for one
  that lives until the end of the test; ``await aiovirt_domains.define(cfg)`` for a persistent one.
  With no config, a cheap ``machine="none"`` domain named ``vm-1``, ``vm-2``...; keywords override
  fields of the config (validated again).
- ``aiovirt_connection`` (:class:`aiovirt.Connection`): open on ``aiovirt_uri``. At teardown every
  active domain of the connection is destroyed (SIGTERM, then SIGKILL), also when the test failed
  or was cancelled, shielded and bounded; then the connection is closed.
- ``aiovirt_uri`` (str): the connection's URI, from ``--aiovirt-uri`` or the ``aiovirt_uri`` ini
  setting: ``qemu:///embed`` (the default: a fresh root per test, ``aiovirt_state_dir``),
  ``qemu:///embed?root=DIR`` (a root shared by every test, one at a time, kept) or
  ``test:///empty`` (the in-memory driver: no process, a fresh host per test), so one suite runs
  against real QEMU and against the test driver.
- ``aiovirt_state_dir`` (:class:`~pathlib.Path`): a fresh directory under ``/tmp``, short on
  purpose (a unix socket path is at most 107 bytes; pytest's ``tmp_path`` can be longer), removed
  at teardown.

**Leaks fail the test.** After teardown, a QEMU that is still running and whose command line or
open files name the test's state directory (or the configured root) is killed, and the test gets
an error in its teardown saying which. The usual cause: leaving ``async with aiovirt.connect()``,
which stops supervising but keeps QEMUs running, by design.

Async fixtures are driven by whichever plugin runs the test: a test that anyio's plugin runs
(marked ``anyio``, so it has an ``anyio_backend``) gets them from anyio's runner, on either
backend; a test that pytest-asyncio runs (marked ``asyncio``, or in its auto mode) gets them from
pytest-asyncio on the test's own loop, which must be the function-scoped one (its default).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

if TYPE_CHECKING:
    from aiovirt import Connection, Domain, DomainConfig

__all__ = ["DomainFactory"]

log = logging.getLogger("aiovirt.pytest_plugin")

_T = TypeVar("_T")

#: What ``qemu:///embed`` with no root means here: a fresh root per test.
_FRESH_EMBED = "qemu:///embed"
#: Bound on the destroys of one test's teardown (shielded from cancellation).
_TEARDOWN_TIMEOUT = 60.0
#: How long a leaked QEMU may take to die after SIGKILL before it is reported as unkillable.
_KILL_WAIT = 10.0

_HELP_URI = (
    "connection URI for aiovirt's fixtures: qemu:///embed (a fresh root per test, the default), "
    "qemu:///embed?root=DIR (one root for every test) or test:///empty (no QEMU)"
)


@dataclass(frozen=True)
class _Target:
    """The configured URI: the URI itself, or None for a fresh root per test; the root it names."""

    uri: str | None
    root: Path | None


_TARGET = pytest.StashKey[_Target]()


# -- configuration -------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("aiovirt")
    group.addoption("--aiovirt-uri", dest="aiovirt_uri", default=None, metavar="URI", help=_HELP_URI)
    parser.addini("aiovirt_uri", help=_HELP_URI, default=_FRESH_EMBED)


def pytest_configure(config: pytest.Config) -> None:
    option = config.getoption("aiovirt_uri")
    source = "--aiovirt-uri" if option is not None else "the aiovirt_uri ini setting"
    uri = str(option if option is not None else config.getini("aiovirt_uri")).strip()
    config.stash[_TARGET] = _resolve(uri, source)


def _resolve(uri: str, source: str) -> _Target:
    if uri == _FRESH_EMBED:
        return _Target(None, None)
    import aiovirt  # only now: loading the plugin must stay cheap for suites that never use it

    try:
        parsed = aiovirt.parse_uri(uri)
    except aiovirt.InvalidURIError as exc:
        raise pytest.UsageError(f"{source}: {exc}") from None
    if (parsed.scheme, parsed.driver) == ("test", "empty"):
        return _Target(uri, None)
    if (parsed.scheme, parsed.driver) == ("qemu", "embed"):
        return _Target(uri, parsed.root)
    why = (
        "test:///default is one host shared by the whole process"
        if parsed.scheme == "test"
        else "its domains are not the test suite's own"
    )
    raise pytest.UsageError(
        f"{source}: {uri!r} cannot be used by tests: every test's teardown destroys all running "
        f"domains of its connection and {why}; use qemu:///embed (a fresh root per test), "
        "qemu:///embed?root=DIR or test:///empty"
    )


def pytest_report_header(config: pytest.Config) -> str:
    target = config.stash[_TARGET]
    return f"aiovirt: {target.uri or _FRESH_EMBED + ' (a fresh root per test)'}"


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def aiovirt_state_dir() -> Iterator[Path]:
    """A fresh, short directory under /tmp (mode 0700), removed at teardown; leaks fail the test."""
    path = Path(tempfile.mkdtemp(prefix="aiovirt-", dir="/tmp" if os.path.isdir("/tmp") else None))
    try:
        yield path
        _fail_on_leaks(path)
    finally:
        # Best effort: what a test left there is not worth a second error (a leak is reported above).
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def aiovirt_uri(request: pytest.FixtureRequest, aiovirt_state_dir: Path) -> Iterator[str]:
    """The URI of this test's connection (``--aiovirt-uri``, the ``aiovirt_uri`` ini setting)."""
    target = request.config.stash[_TARGET]
    yield target.uri or f"{_FRESH_EMBED}?root={aiovirt_state_dir}"
    if target.root is not None:  # a configured root: this test's QEMUs live there
        _fail_on_leaks(target.root)


@pytest.fixture
def aiovirt_connection(request: pytest.FixtureRequest) -> Connection:
    """A connection on ``aiovirt_uri``; every active domain is destroyed at teardown."""
    return _connection(request)


@pytest.fixture
def aiovirt_domains(aiovirt_connection: Connection) -> DomainFactory:
    """Domains for this test (:class:`DomainFactory`), on ``aiovirt_connection``."""
    return DomainFactory(aiovirt_connection)


def _connection(request: pytest.FixtureRequest) -> Connection:
    """The connection, set up by the plugin that runs this test (see the module docstring)."""
    if "anyio_backend" in request.fixturenames:
        conn: Connection = request.getfixturevalue("_aiovirt_connection_anyio")
        return conn
    item = request.node
    if _pytest_asyncio_runs(request.config, item):
        scope = _asyncio_loop_scope(item)
        if scope != "function":
            pytest.fail(
                f"{item.nodeid} runs on pytest-asyncio's {scope}-scoped loop; aiovirt's fixtures are "
                "function-scoped and run on the test's own loop: use the default loop_scope='function'",
                pytrace=False,
            )
        conn = request.getfixturevalue("_aiovirt_connection_asyncio")
        return conn
    pytest.fail(
        f"{item.nodeid}: aiovirt's fixtures need an async test run by anyio's pytest plugin "
        "(@pytest.mark.anyio) or by pytest-asyncio (@pytest.mark.asyncio)",
        pytrace=False,
    )


def _pytest_asyncio_runs(config: pytest.Config, item: object) -> bool:
    if not config.pluginmanager.has_plugin("asyncio"):
        return False
    from pytest_asyncio import is_async_test

    return isinstance(item, pytest.Item) and is_async_test(item)


def _asyncio_loop_scope(item: pytest.Item) -> str:
    marker = item.get_closest_marker("asyncio")
    kwargs = marker.kwargs if marker is not None else {}
    scope = kwargs.get("loop_scope") or kwargs.get("scope")
    return str(scope or item.config.getini("asyncio_default_test_loop_scope") or "function")


@pytest.fixture
async def _aiovirt_connection_anyio(aiovirt_uri: str) -> AsyncIterator[Connection]:
    """anyio's runner keeps an async generator fixture in one task: hold the connection there."""
    async with _connection_for_test(aiovirt_uri) as conn:
        yield conn


try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - pytest-asyncio is optional
    pass
else:

    @pytest_asyncio.fixture(loop_scope="function")
    async def _aiovirt_connection_asyncio(aiovirt_uri: str) -> AsyncIterator[Connection]:
        """pytest-asyncio runs the setup and the teardown of a fixture as two tasks, but the
        connection's task group must be entered and left by one: a task of its own holds it."""
        async with _held_in_own_task(_connection_for_test(aiovirt_uri)) as conn:
            yield conn


@contextlib.asynccontextmanager
async def _connection_for_test(uri: str) -> AsyncIterator[Connection]:
    import aiovirt

    async with aiovirt.connect(uri) as conn:
        try:
            yield conn
        finally:
            await _destroy_all(conn)


async def _destroy_all(conn: Connection) -> None:
    """Destroy every active domain (SIGTERM, then SIGKILL), whatever state the test left."""
    import anyio

    import aiovirt

    with anyio.move_on_after(_TEARDOWN_TIMEOUT, shield=True):
        if conn.closed:  # the test closed it: whatever still runs is found as a leak
            return
        active = await conn.list_domains(active=True)
        if not active:
            return
        policy = aiovirt.StopPolicy(acpi_timeout=0, term_timeout=5, kill_timeout=30, paused="signal")
        for result in await conn.stop_all(active, policy):
            if not result.stopped:
                log.warning("aiovirt: teardown could not stop %s: %s", result.name, result.error)


@contextlib.asynccontextmanager
async def _held_in_own_task(cm: contextlib.AbstractAsyncContextManager[_T]) -> AsyncIterator[_T]:
    """Enter and exit ``cm`` in a new asyncio task that lives from this block's start to its end."""
    loop = asyncio.get_running_loop()
    entered: asyncio.Future[_T] = loop.create_future()
    release = asyncio.Event()

    async def hold() -> None:
        async with cm as value:
            entered.set_result(value)
            await release.wait()

    task = loop.create_task(hold())
    try:
        either: list[asyncio.Future[Any]] = [entered, task]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    if not entered.done():  # entering failed: give its exception
        task.result()
        raise RuntimeError("the connection's task ended before it was open")
    try:
        yield entered.result()
    finally:
        release.set()
        await asyncio.shield(task)


# -- domains -------------------------------------------------------------------------------------


class DomainFactory:
    """Domains for one test (the ``aiovirt_domains`` fixture), on its connection.

    Every method takes an optional :class:`aiovirt.DomainConfig` and keyword overrides of its
    fields, validated like the config itself::

        async with aiovirt_domains(guest_cfg, name="guest-2") as dom: ...
        dom = await aiovirt_domains.create()          # a machine="none" domain "vm-N"

    Whatever the test leaves running is destroyed at its teardown.
    """

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._count = 0

    def config(self, config: DomainConfig | None = None, /, **fields: Any) -> DomainConfig:
        """The config a call with these arguments uses (a fresh ``vm-N`` name when none is given)."""
        import aiovirt

        if config is None:
            self._count += 1
            base: dict[str, Any] = {
                "name": f"vm-{self._count}",
                "machine": "none",
                "accel": "tcg",
                "memory_mib": 16,
            }
        elif isinstance(config, aiovirt.DomainConfig):
            if not fields:
                return config
            base = config.model_dump()
        else:
            raise TypeError(f"expected an aiovirt.DomainConfig or None, not {type(config).__name__}")
        return aiovirt.DomainConfig.model_validate({**base, **fields})

    def __call__(
        self, config: DomainConfig | None = None, /, **fields: Any
    ) -> contextlib.AbstractAsyncContextManager[Domain]:
        """``async with aiovirt_domains(cfg) as dom:`` a transient domain, started; destroyed when
        the block exits, also when it raises or is cancelled (shielded, bounded)."""
        return self.connection.run(self.config(config, **fields))

    async def create(self, config: DomainConfig | None = None, /, **fields: Any) -> Domain:
        """A transient domain, started; it lives until the test's teardown (or its own end)."""
        return await self.connection.create(self.config(config, **fields))

    async def define(self, config: DomainConfig | None = None, /, **fields: Any) -> Domain:
        """A persistent definition, not started (``await dom.start()``)."""
        return await self.connection.define(self.config(config, **fields))


# -- leaks ---------------------------------------------------------------------------------------


def _fail_on_leaks(path: Path) -> None:
    leaked = _qemus_using(path)
    if not leaked:
        return
    survivors = [pid for pid in leaked if not _kill(pid)]
    lines = [f"  pid {pid}: {argv}" for pid, argv in sorted(leaked.items())]
    pytest.fail(
        f"the test leaked {len(leaked)} QEMU process(es) using {path}, now killed"
        + (f" (still alive after SIGKILL: {survivors})" if survivors else "")
        + ":\n"
        + "\n".join(lines)
        + "\nLeaving `async with aiovirt.connect()` keeps QEMUs running: use the aiovirt_connection "
        "or aiovirt_domains fixtures, conn.run(), or destroy the domains",
        pytrace=False,
    )


def _qemus_using(path: Path) -> dict[int, str]:
    """Running QEMUs whose command line names ``path`` or that hold a file under it open
    (stdout and stderr go to the domain's log there), by pid, with their command line."""
    marker = os.fsencode(path)
    prefix = marker.rstrip(b"/") + b"/"
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().rstrip(b"\0").split(b"\0")
        except OSError:
            continue
        if not os.path.basename(argv[0]).startswith(b"qemu") or not _alive(int(entry)):
            continue
        if any(marker in arg for arg in argv) or _has_file_under(entry, prefix):
            found[int(entry)] = b" ".join(argv).decode(errors="replace")
    return found


def _has_file_under(pid: str, prefix: bytes) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(os.fsencode(f"/proc/{pid}/fd/{fd}")).startswith(prefix):
                return True
    return False


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rindex(b")") + 2 :].split()[0] not in (b"Z", b"X")


def _kill(pid: int) -> bool:
    """SIGKILL ``pid`` through a pidfd (never a recycled pid) and wait, bounded; True once it is gone."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        gone = bool(poller.poll(_KILL_WAIT * 1000))
        with contextlib.suppress(ChildProcessError):  # reap it if it is our child (no one else will)
            os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
        return gone
    finally:
        os.close(pidfd)
