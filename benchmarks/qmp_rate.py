"""QMP round trips per second on one monitor: ``query-status``, sequential and 64 callers at once.

    .venv/bin/python benchmarks/qmp_rate.py [--seq-calls 5000] [--conc-calls 20000] [--repeat 3]

One QEMU (``-machine none``, TCG) is started here and its monitor is served to one client at a
time (QEMU serves one client per monitor); every client runs in a fresh interpreter, connects,
negotiates, warms up (``--warmup`` calls), then measures a fixed number of calls:

- ``raw-socket``: a blocking socket, one line out, one line in (sequential only): the baseline.
- ``raw-pipelined``: the same socket keeping 64 commands in flight: the ceiling of QEMU's
  monitor for 64-way load (a reference, not a target; QEMU still runs one command at a time).
- ``asyncio-floor`` / ``trio-floor``: the least an event loop can do per round trip (a bare
  protocol or ``wait_readable`` loop, no JSON, no routing; sequential only): the floor each backend
  puts under any client, so a reference for what "0.9x raw" asks of aiovirt.
- ``aiovirt-asyncio`` / ``aiovirt-trio``: ``aiovirt.qmp._client.QMPClient.execute``.
- ``qemu.qmp``: QEMU's own asyncio library (optional: ``pip install -r benchmarks/requirements.txt``).

Clients alternate over ``--repeat`` rounds; the table reports the median rate of each.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import _bench
from _bench import Result

CLIENTS = (
    "raw-socket",
    "raw-pipelined",
    "asyncio-floor",
    "trio-floor",
    "aiovirt-asyncio",
    "aiovirt-trio",
    "qemu.qmp",
)
CONCURRENCY = 64
COMMAND = "query-status"
# Targets from the issue (README.md explains each).
TARGET_SEQ_VS_FLOOR = 0.95  # of the same event loop's own floor (asyncio-floor, trio-floor)
TARGET_SEQ_VS_QEMU_QMP = 2.0
TARGET_CONC_VS_QEMU_QMP = 1.5
FLOOR = {"aiovirt-asyncio": "asyncio-floor", "aiovirt-trio": "trio-floor"}


# -- workers ------------------------------------------------------------------------------------


def _capabilities(greeting: bytes) -> bytes:
    """The negotiation aiovirt sends: out-of-band on when QEMU offers it. With it QEMU reads the
    monitor in its I/O thread; without it, one byte per main-loop iteration (slow under load)."""
    offered = json.loads(greeting)["QMP"]["capabilities"]
    enable = ["oob"] if "oob" in offered else []
    return json.dumps({"execute": "qmp_capabilities", "arguments": {"enable": enable}}).encode() + b"\n"


def _raw_connect(path: str) -> tuple[socket.socket, Any]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    f = sock.makefile("rb")
    sock.sendall(_capabilities(f.readline()))
    f.readline()
    return sock, f


def _raw_read_reply(f: Any) -> bytes:
    while True:
        line: bytes = f.readline()
        if not line:
            raise ConnectionError("QEMU closed the monitor")
        if b'"event"' not in line:
            return line


def worker_raw(path: str, seq: int, conc: int, warmup: int) -> Result:
    sock, f = _raw_connect(path)
    cmd = b'{"execute": "query-status"}\n'
    try:
        for _ in range(warmup):
            sock.sendall(cmd)
            _raw_read_reply(f)
        t0 = time.perf_counter()
        for _ in range(seq):
            sock.sendall(cmd)
            _raw_read_reply(f)
        t1 = time.perf_counter()
    finally:
        f.close()
        sock.close()
    return {"seq_s": t1 - t0}


def worker_raw_pipelined(path: str, seq: int, conc: int, warmup: int) -> Result:
    sock, f = _raw_connect(path)
    cmd = b'{"execute": "query-status"}\n'
    try:
        for _ in range(warmup):
            sock.sendall(cmd)
            _raw_read_reply(f)
        t0 = time.perf_counter()
        sock.sendall(cmd * CONCURRENCY)
        sent = CONCURRENCY
        for _ in range(conc):
            _raw_read_reply(f)
            if sent < conc:
                sock.sendall(cmd)
                sent += 1
        t1 = time.perf_counter()
    finally:
        f.close()
        sock.close()
    return {"conc_s": t1 - t0}


def worker_asyncio_floor(path: str, seq: int, conc: int, warmup: int) -> Result:
    """The least an asyncio client can do per round trip: a Protocol, a future per call, no parsing."""
    import asyncio
    import collections

    class Protocol(asyncio.Protocol):
        def __init__(self) -> None:
            self.buf = b""
            self.lines: collections.deque[bytes] = collections.deque()
            self.waiter: asyncio.Future[bytes] | None = None

        def data_received(self, data: bytes) -> None:
            self.buf += data
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                self.lines.append(line)
            if self.waiter is not None and self.lines and not self.waiter.done():
                self.waiter.set_result(self.lines.popleft())

    async def main() -> Result:
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_unix_connection(Protocol, path)

        async def call(cmd: bytes | None) -> bytes:
            if cmd:
                transport.write(cmd)
            while True:
                if proto.lines:
                    line = proto.lines.popleft()
                else:
                    proto.waiter = loop.create_future()
                    line = await proto.waiter
                    proto.waiter = None
                if b'"event"' not in line:
                    return line

        try:
            greeting = await call(None)
            await call(_capabilities(greeting))
            cmd = b'{"execute": "query-status"}\n'
            for _ in range(warmup):
                await call(cmd)
            t0 = time.perf_counter()
            for _ in range(seq):
                await call(cmd)
            t1 = time.perf_counter()
        finally:
            transport.close()
        return {"seq_s": t1 - t0}

    return asyncio.run(main())


def worker_trio_floor(path: str, seq: int, conc: int, warmup: int) -> Result:
    """The least a trio client can do per round trip: wait_readable + recv in the calling task."""
    import trio

    async def main() -> Result:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        sock.setblocking(False)
        buf = b""

        async def reply() -> bytes:
            nonlocal buf
            while True:
                while b"\n" not in buf:
                    await trio.lowlevel.wait_readable(sock)
                    buf += sock.recv(65536)
                line, buf = buf.split(b"\n", 1)
                if b'"event"' not in line:
                    return line

        try:
            sock.send(_capabilities(await reply()))
            await reply()
            cmd = b'{"execute": "query-status"}\n'
            for _ in range(warmup):
                sock.send(cmd)
                await reply()
            t0 = time.perf_counter()
            for _ in range(seq):
                sock.send(cmd)
                await reply()
            t1 = time.perf_counter()
        finally:
            sock.close()
        return {"seq_s": t1 - t0}

    return trio.run(main)


async def _measure(call: Callable[[], Awaitable[Any]], seq: int, conc: int, warmup: int) -> Result:
    """Time ``seq`` sequential calls, then ``conc`` calls spread over CONCURRENCY tasks."""
    import anyio

    for _ in range(warmup):
        await call()
    t0 = time.perf_counter()
    for _ in range(seq):
        await call()
    t1 = time.perf_counter()
    remaining = conc

    async def caller() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    t2 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(CONCURRENCY):
            tg.start_soon(caller)
    t3 = time.perf_counter()
    return {"seq_s": t1 - t0, "conc_s": t3 - t2}


def worker_aiovirt(path: str, seq: int, conc: int, warmup: int, backend: str) -> Result:
    import anyio

    from aiovirt.qmp._client import QMPClient

    async def main() -> Result:
        async with QMPClient.open_unix(path) as qmp:

            async def call() -> Any:
                return await qmp.execute(COMMAND)

            return await _measure(call, seq, conc, warmup)

    return anyio.run(main, backend=backend)


def worker_qemu_qmp(path: str, seq: int, conc: int, warmup: int) -> Result:
    import asyncio

    try:
        from qemu.qmp import QMPClient
    except ImportError:
        return {"ok": False, "error": "not installed (pip install -r benchmarks/requirements.txt)"}

    async def main() -> Result:
        qmp = QMPClient("bench")
        await qmp.connect(path)
        try:

            async def call() -> Any:
                return await qmp.execute(COMMAND)

            # anyio's task group runs on asyncio here; qemu.qmp needs nothing else.
            return await _measure(call, seq, conc, warmup)
        finally:
            await qmp.disconnect()

    return asyncio.run(main())


def worker_main(args: argparse.Namespace) -> None:
    client: str = args.worker
    result: Result = {"client": client, "ok": False}
    try:
        if client == "raw-socket":
            out = worker_raw(args.socket, args.seq_calls, args.conc_calls, args.warmup)
        elif client == "raw-pipelined":
            out = worker_raw_pipelined(args.socket, args.seq_calls, args.conc_calls, args.warmup)
        elif client == "asyncio-floor":
            out = worker_asyncio_floor(args.socket, args.seq_calls, args.conc_calls, args.warmup)
        elif client == "trio-floor":
            out = worker_trio_floor(args.socket, args.seq_calls, args.conc_calls, args.warmup)
        elif client.startswith("aiovirt-"):
            backend = client.removeprefix("aiovirt-")
            out = worker_aiovirt(args.socket, args.seq_calls, args.conc_calls, args.warmup, backend)
        else:
            out = worker_qemu_qmp(args.socket, args.seq_calls, args.conc_calls, args.warmup)
        result["ok"] = True
        result.update(out)
        if "seq_s" in result:
            result["seq_calls"] = args.seq_calls
            result["seq_rate"] = round(args.seq_calls / result["seq_s"], 1)
        if "conc_s" in result:
            result["conc_calls"] = args.conc_calls
            result["conc_rate"] = round(args.conc_calls / result["conc_s"], 1)
    except Exception as exc:
        import traceback

        traceback.print_exc()
        result["error"] = _bench.describe(exc)
    _bench.emit(result)


# -- the orchestrator -----------------------------------------------------------------------------


def start_qemu(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """One ``-machine none`` QEMU whose monitor listens on a path (clients connect in turn)."""
    path = str(workdir / "mon.qmp")
    argv = [
        _bench.QEMU,
        "-name",
        "guest=qmprate",
        "-machine",
        "none",
        "-accel",
        "tcg",
        "-m",
        "32",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-chardev",
        f"socket,id=mon,path={path},server=on,wait=off",
        "-mon",
        "chardev=mon,mode=control",
    ]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.recv(4096)  # greeting: QEMU serves us; leave at once so the first client gets it
            s.close()
            break
        except OSError:
            s.close()
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"QEMU did not open its monitor (exit {proc.poll()})") from None
            time.sleep(0.01)
    return proc, path


def summarize(runs: list[Result], clients: list[str]) -> dict[str, Result]:
    out: dict[str, Result] = {}
    for client in clients:
        ok = [r for r in runs if r["client"] == client and r.get("ok")]
        if not ok:
            failed = [r for r in runs if r["client"] == client]
            out[client] = {"ok": False, "error": failed[0].get("error") if failed else "not run"}
            continue
        s: Result = {"ok": True, "runs": len(ok)}
        for key in ("seq_rate", "conc_rate"):
            values = [r[key] for r in ok if key in r]
            s[key] = round(_bench.median(values), 1) if values else None
            if values:
                s[key + "_all"] = values
        out[client] = s
    for client, floor in FLOOR.items():
        s = out.get(client, {})
        if not s.get("ok"):
            continue
        # Ratios per round (the clients of one round ran one after the other on the same QEMU).
        for key, base, field in (
            ("seq_vs_floor", floor, "seq_rate"),
            ("seq_vs_raw", "raw-socket", "seq_rate"),
            ("seq_vs_qemu_qmp", "qemu.qmp", "seq_rate"),
            ("conc_vs_qemu_qmp", "qemu.qmp", "conc_rate"),
            ("conc_vs_pipelined", "raw-pipelined", "conc_rate"),
        ):
            _bench.put_ratio(s, key, _bench.paired_ratios(runs, "client", client, base, field))
    for client in ("raw-socket", *FLOOR.values()):
        # What the 2x-qemu.qmp target asks of the loop itself: can its floor reach it at all?
        s = out.get(client, {})
        if s.get("ok"):
            ratios = _bench.paired_ratios(runs, "client", client, "qemu.qmp", "seq_rate")
            _bench.put_ratio(s, "seq_vs_qemu_qmp", ratios)
    return out


def markdown(report: Result) -> str:
    env = report["environment"]
    head = (
        f"### QMP `{COMMAND}` round trips per second on one monitor "
        f"(median of {report['repeat']}; a ratio is the median (min-max) of each round's own; "
        f"{report['seq_calls']} sequential, {report['conc_calls']} "
        f"with {CONCURRENCY} callers; python {env['python']}, QEMU {env['qemu']}, load "
        f"{env['loadavg_at_start'][0]:.2f} at start)\n"
    )
    rows = []
    for client, s in report["summary"].items():
        if not s.get("ok"):
            rows.append([client, f"unavailable: {s.get('error')}", None, None, None, None, None, None])
            continue
        rows.append(
            [
                client,
                _bench.fmt(s.get("seq_rate"), 0),
                _bench.fmt(s.get("conc_rate"), 0),
                _bench.with_spread(s, "seq_vs_floor"),
                _bench.with_spread(s, "seq_vs_raw"),
                _bench.with_spread(s, "seq_vs_qemu_qmp"),
                _bench.with_spread(s, "conc_vs_qemu_qmp"),
                _bench.with_spread(s, "conc_vs_pipelined"),
            ]
        )
    table = _bench.markdown_table(
        [
            "client",
            "sequential /s",
            f"{CONCURRENCY} callers /s",
            "seq / own loop's floor",
            "seq / raw",
            "seq / qemu.qmp",
            f"{CONCURRENCY}-way / qemu.qmp",
            f"{CONCURRENCY}-way / raw-pipelined",
        ],
        rows,
    )
    targets = []
    for client in FLOOR:
        s = report["summary"].get(client, {})
        if not s.get("ok"):
            continue
        targets.append(
            [
                client,
                *(
                    f"{_bench.with_spread(s, key)} ({_bench.verdict(s.get(key), limit, below=False)})"
                    for key, limit in (
                        ("seq_vs_floor", TARGET_SEQ_VS_FLOOR),
                        ("seq_vs_qemu_qmp", TARGET_SEQ_VS_QEMU_QMP),
                        ("conc_vs_qemu_qmp", TARGET_CONC_VS_QEMU_QMP),
                    )
                ),
            ]
        )
    target_table = _bench.markdown_table(
        [
            "aiovirt on",
            f"sequential ≥ {TARGET_SEQ_VS_FLOOR}x its loop's floor",
            f"sequential ≥ {TARGET_SEQ_VS_QEMU_QMP}x qemu.qmp",
            f"{CONCURRENCY}-way ≥ {TARGET_CONC_VS_QEMU_QMP}x qemu.qmp",
        ],
        targets,
    )
    return head + "\n" + table + "\n\nTargets:\n\n" + target_table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-calls", type=int, default=5000)
    p.add_argument("--conc-calls", type=int, default=20000)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--clients", default=",".join(CLIENTS))
    p.add_argument("--json-out")
    p.add_argument("--md-out")
    p.add_argument("--worker", choices=CLIENTS, help=argparse.SUPPRESS)
    p.add_argument("--socket", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _bench.terminate_as_interrupt(event_loop=bool(args.worker))
    if args.worker:
        worker_main(args)
        return
    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    unknown = set(clients) - set(CLIENTS)
    if unknown:
        sys.exit(f"unknown client(s): {', '.join(sorted(unknown))}")
    _bench.become_subreaper()
    env = _bench.environment()
    workdir = Path(tempfile.mkdtemp(prefix="aiovirt-qmprate-"))
    runs: list[Result] = []
    qemu: subprocess.Popen[bytes] | None = None
    try:
        qemu, path = start_qemu(workdir)
        for rep in range(args.repeat):
            for client in clients:
                argv_ = [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--worker",
                    client,
                    "--socket",
                    path,
                    "--seq-calls",
                    str(args.seq_calls),
                    "--conc-calls",
                    str(args.conc_calls),
                    "--warmup",
                    str(args.warmup),
                ]
                result = _bench.run_worker(argv_, timeout=600, keep=[qemu.pid])
                result.setdefault("client", client)
                result["repeat"] = rep
                runs.append(result)
                print(f"[qmp_rate] round {rep + 1} {client}: {_short(result)}", file=sys.stderr)
                if qemu.poll() is not None:
                    raise RuntimeError(f"QEMU exited ({qemu.returncode}) during the benchmark")
    finally:
        if qemu is not None and qemu.poll() is None:
            qemu.terminate()
            try:
                qemu.wait(10)
            except subprocess.TimeoutExpired:
                qemu.kill()
                qemu.wait()
        _bench.kill_children()
        shutil.rmtree(workdir, ignore_errors=True)
    report: Result = {
        "benchmark": "qmp_rate",
        "command": COMMAND,
        "concurrency": CONCURRENCY,
        "seq_calls": args.seq_calls,
        "conc_calls": args.conc_calls,
        "warmup": args.warmup,
        "repeat": args.repeat,
        "environment": env,
        "summary": summarize(runs, clients),
        "targets": {
            "seq_vs_floor_min": TARGET_SEQ_VS_FLOOR,
            "seq_vs_qemu_qmp_min": TARGET_SEQ_VS_QEMU_QMP,
            "conc_vs_qemu_qmp_min": TARGET_CONC_VS_QEMU_QMP,
        },
        "runs": runs,
    }
    _bench.write_outputs(report, markdown(report), args.json_out, args.md_out)


def _short(result: Result) -> str:
    if not result.get("ok"):
        return f"FAILED: {result.get('error')}"
    return json.dumps({k: result[k] for k in ("seq_rate", "conc_rate") if k in result})


if __name__ == "__main__":
    main()
