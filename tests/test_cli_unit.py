"""Fast tests of the ``aiovirt`` command: argument parsing, start-up imports, the JSON shapes, the
stop-all schedule and output, and verbs run in-process on the in-memory ``test:///`` driver."""

from __future__ import annotations

import ast
import io
import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from rich.console import Console

import aiovirt
from aiovirt.cli import main
from aiovirt.cli._args import VERBS, build_parser
from aiovirt.cli._interrupt import Interrupts
from aiovirt.cli._output import Output
from aiovirt.cli._shapes import error_shape, stop_result_shape
from aiovirt.cli._stopall import StopProgress, StopSchedule, render_panel, run_stop_all, summary_rows
from aiovirt.testing import GuestBehaviour, script_guest

from ._cli import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@pytest.fixture(params=["asyncio", "trio"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The event loop the in-process command runs on."""
    monkeypatch.setenv("AIOVIRT_CLI_BACKEND", request.param)
    return str(request.param)


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- parsing and start-up -----------------------------------------------------------------------


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_has_help_with_an_example(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, verb, "--help")
    assert code == 0
    assert f"usage: aiovirt {verb}" in out
    assert "example:\n  aiovirt " in out and VERBS[verb].example in out
    assert "--json" in out and "--connect" in out


def test_top_level_help_lists_every_verb_and_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "--help")
    assert code == 0
    for verb in VERBS:
        assert f"    {verb} " in out
    assert "exit status: 0 success; 1 the operation failed" in out


def test_global_options_go_before_or_after_the_verb() -> None:
    parser = build_parser()
    for argv in (["--json", "-c", "test:///empty", "list"], ["list", "--json", "-c", "test:///empty"]):
        args = parser.parse_args(argv)
        assert args.json is True and args.connect == "test:///empty" and args.readonly is False
    args = parser.parse_args(["-r", "list"])
    assert args.readonly is True and args.json is False


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nope"],
        ["list", "--state-running", "--state-paused"],
        ["shutdown", "vm", "--timeout", "0"],
        ["destroy", "vm", "--timeout", "soon"],
        ["destroy", "vm", "--timeout", "nan"],
        ["stop-all", "--deadline", "-3"],
        ["stop-all", "--limit", "1.5"],
        ["stop-all", "--paused", "ignore"],
        ["dumpconfig", "vm", "--format", "yaml"],
        ["define"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(capsys, *argv)
    assert code == 2 and out == ""
    assert "usage: aiovirt" in err and "error:" in err


def test_help_imports_no_machinery() -> None:
    """``aiovirt --help`` (and a usage error) load neither anyio nor the drivers nor rich."""
    code = (
        "import sys\n"
        "from aiovirt.cli import main\n"
        "for argv in (['--help'], ['stop-all', '--help'], ['bogus']):\n"
        "    main(argv)\n"
        "heavy = ('anyio', 'trio', 'sniffio', 'rich', 'aiovirt.drivers', 'aiovirt.qmp._client',\n"
        "         'aiovirt._connection', 'aiovirt._domain', 'aiovirt.cli._run')\n"
        "bad = sorted(m for m in sys.modules if m.startswith(heavy))\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 0, proc.stderr


def test_console_script_and_module_entry_points() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, func = scripts["aiovirt"].partition(":")
    assert (module, func) == ("aiovirt.cli", "main")
    assert getattr(__import__(module, fromlist=[func]), func) is main
    proc = subprocess.run(
        [sys.executable, "-m", "aiovirt", "--version"], capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 0 and proc.stdout.strip() == f"aiovirt {aiovirt.__version__}"


# -- verbs in-process on test:/// -----------------------------------------------------------------


def test_read_verbs_on_the_test_host(backend: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(capsys, "-c", "test:///default", "list", "--json")
    assert code == 0, err
    shape = json.loads(out)
    assert shape["uri"] == "test:///default" and shape["readonly"] is False
    assert [d["name"] for d in shape["domains"]] == ["test"]
    code, out, _ = run_main(capsys, "-c", "test:///default", "list")
    assert code == 0 and out.splitlines()[0].split()[:3] == ["Name", "State", "Reason"]
    assert "test" in out and "running" in out
    code, out, _ = run_main(capsys, "-c", "test:///default", "domstate", "test", "--reason")
    assert (code, out) == (0, "running (unknown)\n")
    code, out, _ = run_main(capsys, "-c", "test:///default", "dominfo", "test", "--json")
    assert code == 0 and json.loads(out)["state"] == "running"
    code, out, _ = run_main(capsys, "-c", "test:///default", "dumpconfig", "test")
    assert code == 0 and 'name = "test"' in out


@pytest.mark.parametrize(
    "argv",
    [
        ["start", "x"],
        ["shutdown", "x"],
        ["destroy", "x"],
        ["suspend", "x"],
        ["resume", "x"],
        ["reset", "x"],
        ["undefine", "x"],
        ["dominfo", "x"],
        ["domstate", "x"],
        ["dumpconfig", "x"],
        ["dumpxml", "x"],
        ["autostart", "x"],
        ["console-log", "x"],
        ["event", "--domain", "x"],
        ["stop-all", "x"],
    ],
)
def test_unknown_domain_for_every_verb(
    argv: list[str], backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(capsys, "-c", "test:///empty", *argv)
    assert (code, out, err) == (1, "", "error: domain 'x' not found\n")
    code, out, err = run_main(capsys, "-c", "test:///empty", "--json", *argv)
    assert code == 1 and json.loads(out) == {
        "error": {"kind": "DomainNotFoundError", "message": "domain 'x' not found", "domain": "x"}
    }


def test_define_on_the_test_host(tmp_path: Path, backend: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.toml"
    path.write_text('name = "t"\nmemory_mib = 8\n')
    code, out, err = run_main(capsys, "-c", "test:///empty", "define", str(path), "--json")
    assert code == 0, err
    shape = json.loads(out)
    assert shape["action"] == "define" and shape["name"] == "t" and shape["updated"] is False
    assert shape["uuid"] and shape["file"] == str(path)


def test_console_log_of_a_domain_without_console(backend: str, capsys: pytest.CaptureFixture[str]) -> None:
    # The test driver keeps no files: no console to show, said in one line
    code, out, err = run_main(capsys, "-c", "test:///default", "console-log", "test", "--json")
    assert code == 1 and err == "error: domain 'test' has no console log: its driver keeps no files\n"
    assert json.loads(out)["error"]["kind"] == "NoConsole"


# -- JSON shapes ---------------------------------------------------------------------------------


def test_error_shapes_carry_what_the_error_carries() -> None:
    locked = error_shape(aiovirt.StateDirLockedError("/srv/vms", 4242))
    assert locked["kind"] == "StateDirLockedError" and locked["pid"] == 4242 and locked["path"] == "/srv/vms"
    config = error_shape(aiovirt.ConfigError("vm.toml: memory_mib: bad", [("memory_mib", "bad")]))
    assert config["fields"] == [["memory_mib", "bad"]]
    assert error_shape(TimeoutError("late")) == {"kind": "TimeoutError", "message": "late"}


def test_stop_result_shape() -> None:
    stopped = aiovirt.StopResult("a", True, aiovirt.StopStage.SIGTERM, "host-signal", 1.23456)
    assert stop_result_shape(stopped) == {
        "name": "a",
        "stopped": True,
        "stage": "sigterm",
        "reason": "host-signal",
        "elapsed": 1.235,
        "by_other": False,
        "interrupted": False,
        "error": None,
    }
    failed = aiovirt.StopResult(
        "b", False, aiovirt.StopStage.NONE, None, 10.0, aiovirt.DestroyTimeoutError("b", 7, 10.0)
    )
    shape = stop_result_shape(failed)
    assert shape["stage"] == "none" and shape["error"]["kind"] == "DestroyTimeoutError"
    assert shape["error"]["pid"] == 7


# -- stop-all: schedule, panel, lines -----------------------------------------------------------


def test_stop_schedule_follows_the_policy() -> None:
    policy = aiovirt.StopPolicy(acpi_timeout=60, term_timeout=10, kill_timeout=30)
    s = StopSchedule(policy)
    assert s.stage_at(59.9, acpi=True) == aiovirt.StopStage.ACPI
    assert s.stage_at(60.1, acpi=True) == aiovirt.StopStage.SIGTERM
    assert s.stage_at(70.1, acpi=True) == aiovirt.StopStage.SIGKILL
    assert s.stage_at(0.0, acpi=False) == aiovirt.StopStage.SIGTERM
    assert s.time_left(30) == (70.0, False)
    # a deadline of half the stages' sum halves every stage
    scaled = StopSchedule(policy.model_copy(update={"deadline": 50.0}))
    assert scaled.stage_at(29.9, acpi=True) == aiovirt.StopStage.ACPI
    assert scaled.stage_at(30.1, acpi=True) == aiovirt.StopStage.SIGTERM
    assert scaled.stage_at(35.1, acpi=True) == aiovirt.StopStage.SIGKILL
    assert scaled.time_left(20) == (30.0, True)
    # graceful: never a SIGKILL stage
    graceful = StopSchedule(policy.model_copy(update={"graceful": True}))
    assert graceful.stage_at(1000, acpi=True) == aiovirt.StopStage.SIGTERM


def _render(renderable: Any) -> str:
    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(renderable)
    out = console.file
    assert isinstance(out, io.StringIO)
    return out.getvalue()


@pytest.mark.anyio
async def test_stop_all_lines_and_panel_on_the_test_host() -> None:
    """One line per domain as it finishes; the panel counts stages, stopped, failed, time left."""
    async with aiovirt.connect("test:///empty") as conn:
        script_guest(conn, "stuck", GuestBehaviour(acpi="ignore", sigterm="ignore"))
        doms = []
        for name in ("ok", "stuck"):
            dom = await conn.define(aiovirt.DomainConfig(name=name, memory_mib=8))
            await dom.start()
            doms.append(dom)
        policy = aiovirt.StopPolicy(graceful=True, acpi_timeout=0.2, term_timeout=0.2, deadline=30)

        progress = StopProgress(doms, policy, anyio.current_time())
        panel = _render(render_panel(progress, anyio.current_time()))
        assert "Stopping 2 domains (graceful: no SIGKILL)" in panel
        assert re.search(r"ACPI power button +2\n", panel) and re.search(r"failed +0\n", panel)
        assert "30.0 s left of the 30 s deadline" in panel
        assert "after SIGKILL" not in panel

        stdout = io.StringIO()
        code = await run_stop_all(
            conn, doms, policy, 64, Output(json_mode=False, stdout=stdout), Interrupts()
        )
        lines = stdout.getvalue().splitlines()
        assert code == 1  # "stuck" outlived SIGTERM: graceful sends nothing more
        assert lines[0].startswith("ok: stopped (acpi")
        assert lines[1].startswith("stuck: NOT stopped after ") and "SIGTERM" in lines[1]
        assert lines[2].startswith("Stopped 1 of 2 domains in ")
        await (await conn.lookup("stuck")).destroy(timeout=0.1)

        for dom in doms:
            await dom.start()
        stdout = io.StringIO()
        code = await run_stop_all(conn, doms, policy, 64, Output(json_mode=True, stdout=stdout), Interrupts())
        shapes = [json.loads(line) for line in stdout.getvalue().splitlines()]
        assert [s["name"] for s in shapes] == ["ok", "stuck"]
        assert shapes[0]["stopped"] is True and shapes[1]["stopped"] is False
        assert shapes[1]["error"]["kind"] == "DestroyTimeoutError"
        await (await conn.lookup("stuck")).destroy(timeout=0.1)


@pytest.mark.anyio
@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
async def test_stop_all_interrupted_sends_nothing_further(signum: signal.Signals, status: int) -> None:
    """An interruption (what Ctrl-C or SIGTERM does) ends the call: unfinished domains are
    reported, and the status is 128 + the signal."""
    async with aiovirt.connect("test:///empty") as conn:
        script_guest(conn, "deaf", GuestBehaviour(acpi="ignore"))
        dom = await conn.define(aiovirt.DomainConfig(name="deaf", memory_mib=8))
        await dom.start()
        interrupts = Interrupts()
        stdout = io.StringIO()
        policy = aiovirt.StopPolicy(acpi_timeout=30)
        async with anyio.create_task_group() as tg:

            async def interrupt_soon() -> None:
                await anyio.sleep(0.2)
                interrupts.fire(signum)

            tg.start_soon(interrupt_soon)
            code = await run_stop_all(
                conn, [dom], policy, 64, Output(json_mode=False, stdout=stdout), interrupts
            )
        assert code == status
        lines = stdout.getvalue().splitlines()
        assert lines[0].startswith("deaf: NOT stopped after ") and lines[0].endswith("interrupted (Ctrl-C)")
        assert "interrupted: nothing further was sent" in lines[1]
        assert dom.state == aiovirt.DomainState.RUNNING  # no SIGTERM was sent: it still runs
        progress = StopProgress([dom], policy, anyio.current_time())
        headers, rows = summary_rows(progress, anyio.current_time())
        assert headers[-1] == "Error"
        assert [str(cell) for cell in rows[0]][:3] == ["deaf", "interrupted", "none"]
        await dom.destroy()


def test_the_command_uses_only_the_public_api() -> None:
    """aiovirt.cli imports ``aiovirt`` and ``aiovirt.config`` only (and its own modules)."""
    cli = REPO / "aiovirt" / "cli"
    for path in sorted(cli.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name == "aiovirt" or name.startswith("aiovirt."):
                    assert name in ("aiovirt", "aiovirt.config"), f"{path.name} imports {name}"
