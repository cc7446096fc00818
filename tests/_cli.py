"""Running the ``aiovirt`` command as a subprocess, as a user does, for the CLI tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio

import aiovirt

REPO = Path(__file__).resolve().parents[1]

#: Domains for the CLI tests: no guest at all (cheap; ignores the power button). The console
#: file is under the test's directory, so the leak check recognises these QEMUs.
NONE_TOML = """\
name = "{name}"
memory_mib = 16
machine = "none"
accel = "tcg"
"""


def cli_env(uri: str, backend: str = "asyncio", **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(REPO),  # this checkout's aiovirt, whatever is installed
        AIOVIRT_DEFAULT_URI=uri,
        AIOVIRT_CLI_BACKEND=backend,
        **extra,
    )
    env.pop("COLUMNS", None)
    return env


def aiovirt_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "aiovirt", *args]


def run_cli(
    *args: str, uri: str, backend: str = "asyncio", timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        aiovirt_argv(*args),
        capture_output=True,
        text=True,
        env=cli_env(uri, backend),
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        cwd=REPO,
    )


def ok(*args: str, uri: str, backend: str = "asyncio") -> subprocess.CompletedProcess[str]:
    """Run and require exit status 0 (showing stderr when not)."""
    proc = run_cli(*args, uri=uri, backend=backend)
    assert proc.returncode == 0, f"aiovirt {' '.join(args)} -> {proc.returncode}\n{proc.stderr}"
    return proc


def ok_json(*args: str, uri: str, backend: str = "asyncio") -> Any:
    proc = ok(*args, "--json", uri=uri, backend=backend)
    return json.loads(proc.stdout)


def failing(
    *args: str, uri: str, code: int = 1, backend: str = "asyncio"
) -> subprocess.CompletedProcess[str]:
    """Run and require exit status ``code`` with exactly one ``error:`` line on stderr."""
    proc = run_cli(*args, uri=uri, backend=backend)
    assert proc.returncode == code, f"aiovirt {' '.join(args)} -> {proc.returncode}\n{proc.stderr}"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc


def define_none(tmp_path: Path, uri: str, name: str, backend: str = "asyncio") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(NONE_TOML.format(name=name))
    ok("define", str(path), uri=uri, backend=backend)
    return path


def cleanup(uri: str) -> None:
    """Destroy whatever the test left running (resuming stopped QEMUs first)."""

    async def destroy_all() -> None:
        async with aiovirt.connect(uri) as conn:
            for dom in await conn.list_domains(active=True):
                if dom.pid is not None:
                    os.kill(dom.pid, signal.SIGCONT)
                await dom.destroy(timeout=5)

    anyio.run(destroy_all)
