"""aiovirt's pytest plugin, run for real: each test writes a user's test module, runs pytest on it in
a child process (``pytester``), and checks the outcome and what is left on the machine.

The child loads the plugin through its entry point (see ``tests/_entry_points.py``), under anyio's
plugin on asyncio and trio, under pytest-asyncio, and under both at once, with real QEMU
(``machine="none"``: cheap) or the ``test:///empty`` driver. Each child test records its state
directory and its QEMUs' pids in a report file; after the run, no QEMU may use any of them.
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ._entry_points import child_env, write_checkout_metadata
from .conftest import pid_alive, qemu_pids

pytest_plugins = ["pytester"]

CHILD_TIMEOUT = 300  # seconds for one child pytest run (a few QEMUs, generous for a loaded machine)

HEADER = """\
import json
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import aiovirt

REPORT = Path({report!r})


def record(**fields):
    with REPORT.open("a") as f:
        f.write(json.dumps(fields) + "\\n")
"""

ANYIO = """
pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param
"""

ASYNCIO = """
pytestmark = pytest.mark.asyncio
"""

# What a user's suite does, and the ways a test can end badly.
BEHAVIOUR = """
async def test_fresh_short_state_dir(aiovirt_state_dir, aiovirt_uri, aiovirt_connection):
    record(test="fresh", state_dir=str(aiovirt_state_dir))
    assert aiovirt_state_dir.parent == Path("/tmp") and len(str(aiovirt_state_dir)) <= 32
    assert aiovirt_state_dir.stat().st_mode & 0o777 == 0o700
    assert aiovirt_uri == f"qemu:///embed?root={aiovirt_state_dir}"
    assert aiovirt_connection.uri == aiovirt_uri
    assert await aiovirt_connection.list_domains() == []


async def test_domain_in_a_block(aiovirt_state_dir, aiovirt_domains):
    async with aiovirt_domains() as dom:
        record(test="block", state_dir=str(aiovirt_state_dir), pids=[dom.pid])
        assert dom.state is aiovirt.DomainState.RUNNING
    assert dom.state is aiovirt.DomainState.SHUTOFF


async def test_failing_with_domains_running(aiovirt_state_dir, aiovirt_domains):
    kept = await aiovirt_domains.create()
    defined = await aiovirt_domains.define(name="defined")
    await defined.start()
    record(test="failing", state_dir=str(aiovirt_state_dir), pids=[kept.pid, defined.pid])
    raise AssertionError("deliberate failure with two domains running")


async def test_cancelled_with_domains_running(aiovirt_state_dir, aiovirt_domains):
    ready = anyio.Event()

    async def hold():
        async with aiovirt_domains() as dom:
            kept = await aiovirt_domains.create()
            record(test="cancelled", state_dir=str(aiovirt_state_dir), pids=[dom.pid, kept.pid])
            ready.set()
            await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold)
        await ready.wait()
        raise RuntimeError("deliberate: cancels the task that holds the domains")


async def test_leaking(aiovirt_state_dir):
    cfg = aiovirt.DomainConfig(name="leaked", machine="none", accel="tcg", memory_mib=16)
    async with aiovirt.connect(f"qemu:///embed?root={aiovirt_state_dir}/own") as conn:
        dom = await conn.create(cfg)
        record(test="leaking", state_dir=str(aiovirt_state_dir), pids=[dom.pid])
    # leaving the block stops supervising and keeps the QEMU running: the plugin must fail this test
"""

# The same suite for every URI: nothing here depends on the driver.
ANY_URI = """
async def test_one_domain(aiovirt_uri, aiovirt_state_dir, aiovirt_connection, aiovirt_domains):
    async with aiovirt_domains(memory_mib=32) as dom:
        record(uri=aiovirt_uri, state_dir=str(aiovirt_state_dir), pids=[dom.pid])
        assert dom.state is aiovirt.DomainState.RUNNING
        assert dom.config.memory_mib == 32
    assert dom.state is aiovirt.DomainState.SHUTOFF
    assert await aiovirt_connection.list_domains(active=True) == []
"""

STRICT_INI = """
[pytest]
asyncio_mode = strict
asyncio_default_fixture_loop_scope = function
"""


class Child:
    """A user's project in ``pytester.path``, run by pytest in a child process."""

    def __init__(self, pytester: pytest.Pytester) -> None:
        self.pytester = pytester
        self.report = pytester.path / "report.jsonl"

    def module(self, name: str, *parts: str) -> None:
        source = HEADER.format(report=str(self.report)) + "".join(textwrap.dedent(p) for p in parts)
        self.pytester.makepyfile(**{name: source})

    def ini(self, text: str) -> None:
        self.pytester.makeini(text)

    def run(self, *args: str) -> pytest.RunResult:
        return self.pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=CHILD_TIMEOUT)

    def records(self) -> list[dict[str, Any]]:
        if not self.report.exists():
            return []
        return [json.loads(line) for line in self.report.read_text().splitlines()]


@pytest.fixture(scope="session")
def checkout_metadata(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkout_metadata(tmp_path_factory.mktemp("entry-points"))


@pytest.fixture
def child(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, checkout_metadata: Path
) -> Iterator[Child]:
    env = child_env(checkout_metadata)
    monkeypatch.setenv("PYTHONPATH", env["PYTHONPATH"])
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    c = Child(pytester)
    yield c
    # Whatever the outcome, nothing the child started may outlive this test.
    left = {pid for r in c.records() for pid in qemu_pids(r["state_dir"]) if pid_alive(pid)}
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"the child's tests left QEMU processes {sorted(left)}"


def _check_cleaned_up(records: list[dict[str, Any]], tests: dict[str, int]) -> None:
    """Each of ``tests`` ran that many times, started real QEMUs, and left neither them nor its directory."""
    seen = [r["test"] for r in records]
    assert {t: seen.count(t) for t in tests} == tests, records
    for r in records:
        assert not Path(r["state_dir"]).exists(), f"{r['state_dir']} was not removed"
        for pid in r.get("pids", []):
            assert isinstance(pid, int), r  # a real QEMU was running
        assert qemu_pids(r["state_dir"]) == set(), r


def test_anyio_plugin_on_asyncio_and_trio(child: Child) -> None:
    child.module("test_user", ANYIO, BEHAVIOUR)
    result = child.run("-p", "no:asyncio", "-v")
    result.assert_outcomes(passed=6, failed=4, errors=2)
    for backend in ("asyncio", "trio"):
        result.stdout.fnmatch_lines_random(
            [
                f"*test_fresh_short_state_dir?{backend}? PASSED*",
                f"*test_domain_in_a_block?{backend}? PASSED*",
                f"*test_failing_with_domains_running?{backend}? FAILED*",
                f"*test_cancelled_with_domains_running?{backend}? FAILED*",
                f"*test_leaking?{backend}? ERROR*",
                f"*ERROR at teardown of test_leaking?{backend}?*",
            ]
        )
    result.stdout.fnmatch_lines(["*the test leaked 1 QEMU process(es) using /tmp/aiovirt-*, now killed*"])
    records = child.records()
    _check_cleaned_up(records, {"fresh": 2, "block": 2, "failing": 2, "cancelled": 2, "leaking": 2})
    for r in records:
        if r["test"] == "leaking":  # the report names the leaked process
            result.stdout.fnmatch_lines([f"*pid {r['pids'][0]}: qemu-system-x86_64 -name guest=leaked*"])


def test_pytest_asyncio(child: Child) -> None:
    child.ini(STRICT_INI)
    child.module("test_user", ASYNCIO, BEHAVIOUR)
    result = child.run("-p", "no:anyio", "-W", "error::pytest.PytestDeprecationWarning")
    result.assert_outcomes(passed=3, failed=2, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_leaking*", "*the test leaked 1 QEMU*"])
    _check_cleaned_up(child.records(), {"fresh": 1, "block": 1, "failing": 1, "cancelled": 1, "leaking": 1})


def test_both_plugins_in_one_strict_suite(child: Child) -> None:
    """This project's own setup: both plugins loaded, pytest-asyncio in strict mode."""
    child.ini(STRICT_INI)
    block = """
    async def test_block(aiovirt_state_dir, aiovirt_domains):
        async with aiovirt_domains() as dom:
            record(test="block", state_dir=str(aiovirt_state_dir), pids=[dom.pid])
    """
    child.module("test_with_anyio", ANYIO, block)
    child.module("test_with_asyncio", ASYNCIO, block)
    result = child.run("-W", "error::pytest.PytestDeprecationWarning")
    result.assert_outcomes(passed=3)
    _check_cleaned_up(child.records(), {"block": 3})


def test_pytest_asyncio_auto_mode(child: Child) -> None:
    child.ini("[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n")
    child.module(
        "test_user",
        """
        async def test_unmarked(aiovirt_state_dir, aiovirt_domains):
            dom = await aiovirt_domains.create()
            record(test="auto", state_dir=str(aiovirt_state_dir), pids=[dom.pid])
        """,
    )
    result = child.run("-p", "no:anyio")
    result.assert_outcomes(passed=1)
    _check_cleaned_up(child.records(), {"auto": 1})


def test_misuse_is_a_clear_error(child: Child) -> None:
    child.ini(STRICT_INI)
    child.module(
        "test_user",
        """
        def test_sync(aiovirt_connection):
            pass


        @pytest.mark.asyncio(loop_scope="module")
        async def test_module_loop(aiovirt_connection):
            pass


        async def test_unmarked_in_strict_mode(aiovirt_domains):
            pass
        """,
    )
    result = child.run()
    result.assert_outcomes(errors=3)
    result.stdout.fnmatch_lines_random(
        [
            "*test_sync: aiovirt's fixtures need an async test run by anyio's pytest plugin "
            "(@pytest.mark.anyio) or by pytest-asyncio (@pytest.mark.asyncio)",
            "*test_module_loop runs on pytest-asyncio's module-scoped loop*",
            "*test_unmarked_in_strict_mode: aiovirt's fixtures need an async test*",
        ]
    )


def test_registered_by_entry_point(child: Child) -> None:
    child.module(
        "test_user",
        """
        import aiovirt.pytest_plugin


        def test_registered(pytestconfig):
            assert pytestconfig.pluginmanager.get_plugin("aiovirt") is aiovirt.pytest_plugin
        """,
    )
    child.run().assert_outcomes(passed=1)
    blocked = child.run("-p", "no:aiovirt")
    blocked.assert_outcomes(failed=1)


@pytest.mark.parametrize(
    ("args", "ini", "expected"),
    [
        pytest.param(["--aiovirt-uri=test:///empty"], None, "test:///empty", id="option"),
        pytest.param([], "test:///empty", "test:///empty", id="ini"),
        pytest.param(["--aiovirt-uri", "qemu:///embed"], "test:///empty", "fresh", id="option-beats-ini"),
        pytest.param([], None, "fresh", id="default"),
    ],
)
def test_one_suite_for_every_uri(child: Child, args: list[str], ini: str | None, expected: str) -> None:
    if ini is not None:
        child.ini(f"[pytest]\naiovirt_uri = {ini}\n")
    child.module("test_user", ANYIO, ANY_URI)
    result = child.run("-p", "no:asyncio", *args)
    result.assert_outcomes(passed=2)
    shown = "qemu:///embed (a fresh root per test)" if expected == "fresh" else expected
    result.stdout.fnmatch_lines([f"aiovirt: {shown}"])
    records = child.records()
    assert len(records) == 2
    for r in records:
        assert not Path(r["state_dir"]).exists()
        if expected == "fresh":
            assert r["uri"] == f"qemu:///embed?root={r['state_dir']}"
            assert isinstance(r["pids"][0], int)
        else:
            assert r["uri"] == expected
            assert r["pids"] == [None]  # the test driver runs no process


def test_a_given_root_is_used_and_kept(child: Child, tmp_path: Path) -> None:
    root = tmp_path / "shared-root"
    child.module("test_user", ANYIO, ANY_URI)
    result = child.run("-p", "no:asyncio", f"--aiovirt-uri=qemu:///embed?root={root}")
    result.assert_outcomes(passed=2)
    records = child.records()
    assert [r["uri"] for r in records] == [f"qemu:///embed?root={root}"] * 2
    assert all(isinstance(r["pids"][0], int) for r in records)
    assert (root / "log").is_dir()  # the given root is the connection's, and it is kept
    assert qemu_pids(str(root)) == set()


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        (
            "qemu:///session",
            "*'qemu:///session' cannot be used by tests*its domains are not the test suite's own*",
        ),
        ("test:///default", "*test:///default is one host shared by the whole process*"),
        ("qemu:///embed?root=relative", "*root must be an absolute path*"),
        ("vbox:///session", "*unknown driver 'vbox'*"),
    ],
)
def test_a_bad_uri_is_a_usage_error(child: Child, uri: str, message: str) -> None:
    child.module("test_user", "def test_nothing():\n    pass\n")
    result = child.run(f"--aiovirt-uri={uri}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: --aiovirt-uri: {message}"])


@pytest.mark.parametrize("plugin", ["anyio", "asyncio"])
def test_a_connection_that_cannot_open_is_a_setup_error(child: Child, plugin: str) -> None:
    child.ini(STRICT_INI)
    child.module(
        "test_user",
        ANYIO if plugin == "anyio" else ASYNCIO,
        """
        async def test_never_runs(aiovirt_connection):
            raise AssertionError("must not run")
        """,
    )
    result = child.run(
        "-p",
        f"no:{'asyncio' if plugin == 'anyio' else 'anyio'}",
        "--aiovirt-uri=qemu:///embed?root=/proc/none",
    )
    result.assert_outcomes(errors=2 if plugin == "anyio" else 1)
    result.stdout.fnmatch_lines(["*StateDirError: state directory '/proc/none': cannot use directory*"])
