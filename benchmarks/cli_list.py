"""Wall time of ``aiovirt list`` with 1,000 defined domains: read-write and read-only (``-r``).

What a user waits for, measured from outside: a fresh ``python -m aiovirt`` process from spawn to
exit, output to a pipe. In the same run, two floors: the bare interpreter (``python -c pass``)
and ``aiovirt --help`` (start-up: the interpreter plus ``import aiovirt``, no connection).

    .venv/bin/python benchmarks/cli_list.py                      # 1,000 domains, 7 repeats
    .venv/bin/python benchmarks/cli_list.py --n 100 --repeat 3
    .venv/bin/python benchmarks/cli_list.py --running 10         # also 10 of them running

Cases (each the median of ``--repeat`` runs):

- ``list --all``: a controlling connection (takes the lock; loads every definition, asks each
  running domain's monitor); table output.
- ``list --all --json``: the same, JSON output (no rich).
- ``-r list --all``: a read-only connection (no lock, no monitor: records and process checks).
- ``list --all`` beside a controller: the lock is held by another process, so the verb falls
  back to the read-only view (the case of a web backend holding the directory).

The domains are ``machine="none"`` definitions written through the library; ``--running N``
starts N of them (started and destroyed by this script).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import REPO, environment, fmt, markdown_table, median, raise_nofile_limit, write_outputs

_DEFINE = """
import sys, anyio, aiovirt

async def main():
    uri, n, running = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    async with aiovirt.connect(uri) as conn:
        for i in range(n):
            cfg = aiovirt.DomainConfig(name=f"d{i:05d}", memory_mib=16, machine="none", accel="tcg")
            dom = await conn.define(cfg)
            if i < running:
                await dom.start()

anyio.run(main)
"""

_HOLD = """
import sys, anyio, aiovirt

async def main():
    async with aiovirt.connect(sys.argv[1]):
        print("ready", flush=True)
        await anyio.sleep(3600)

anyio.run(main)
"""

_DESTROY = """
import sys, anyio, aiovirt

async def main():
    async with aiovirt.connect(sys.argv[1]) as conn:
        for dom in await conn.list_domains(active=True):
            await dom.destroy()

anyio.run(main)
"""


def _env(uri: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), AIOVIRT_DEFAULT_URI=uri)
    env.pop("COLUMNS", None)
    return env


def _timed(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, cwd=REPO)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return elapsed, proc.stdout


def _case(argv: list[str], env: dict[str, str], repeat: int, expect_lines: int | None) -> dict[str, Any]:
    _timed(argv, env)  # warm the page cache: every case then reads from memory alike
    times = []
    for _ in range(repeat):
        elapsed, out = _timed(argv, env)
        if expect_lines is not None:
            names = [line for line in out.splitlines() if line.startswith("d0")]
            assert len(names) == expect_lines, f"expected {expect_lines} domains, saw {len(names)}"
        times.append(elapsed)
    return {
        "median_s": round(median(times), 4),
        "min_s": round(min(times), 4),
        "runs_s": [round(t, 4) for t in times],
    }


def run(n: int, running: int, repeat: int) -> dict[str, Any]:
    raise_nofile_limit()
    py = sys.executable
    aiovirt_cmd = [py, "-m", "aiovirt"]
    with tempfile.TemporaryDirectory(prefix="aiovirt-cli-bench-") as tmp:
        uri = f"qemu:///embed?root={Path(tmp) / 'state'}"
        env = _env(uri)
        t0 = time.perf_counter()
        subprocess.run([py, "-c", _DEFINE, uri, str(n), str(running)], check=True, env=env, cwd=REPO)
        print(f"defined {n} domains ({running} running) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        cases: dict[str, dict[str, Any]] = {}
        try:
            cases["python -c pass"] = _case([py, "-c", "pass"], env, repeat, None)
            cases["aiovirt --help"] = _case([*aiovirt_cmd, "--help"], env, repeat, None)
            cases["list --all"] = _case([*aiovirt_cmd, "list", "--all"], env, repeat, n)
            json_argv = [*aiovirt_cmd, "list", "--all", "--json"]
            cases["list --all --json"] = _case(json_argv, env, repeat, None)
            cases["-r list --all"] = _case([*aiovirt_cmd, "-r", "list", "--all"], env, repeat, n)
            holder = subprocess.Popen(
                [py, "-c", _HOLD, uri], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO
            )
            try:
                assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
                beside = [*aiovirt_cmd, "list", "--all"]
                cases["list --all beside a controller (falls back to -r)"] = _case(beside, env, repeat, n)
            finally:
                holder.terminate()
                holder.wait()
        finally:
            if running:
                subprocess.run([py, "-c", _DESTROY, uri], check=True, env=env, cwd=REPO)
    return {
        "benchmark": "cli_list",
        "n_defined": n,
        "n_running": running,
        "repeat": repeat,
        "cases": cases,
        "environment": environment(),
    }


def markdown(result: dict[str, Any]) -> str:
    n, running = result["n_defined"], result["n_running"]
    rows = [(name, fmt(c["median_s"]), fmt(c["min_s"])) for name, c in result["cases"].items()]
    env = result["environment"]
    head = (
        f"`aiovirt` wall time, {n} defined `machine=none` domains ({running} running), "
        f"median of {result['repeat']} runs; Python {env['python']}, {env['cpus']} CPUs, "
        f"load average at start {env['loadavg_at_start'][0]:.2f}, {env['date']}"
    )
    return head + "\n\n" + markdown_table(["command", "median (s)", "min (s)"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1000, help="defined domains (1000)")
    parser.add_argument("--running", type=int, default=0, help="of which running (0)")
    parser.add_argument("--repeat", type=int, default=7, help="runs per case (7)")
    parser.add_argument("--json-out")
    parser.add_argument("--md-out")
    args = parser.parse_args()
    result = run(args.n, args.running, args.repeat)
    write_outputs(result, markdown(result), args.json_out, args.md_out)


if __name__ == "__main__":
    main()
