"""The remote driver against libvirt-python with a thread pool, on the same private libvirtds.

    .venv/bin/python benchmarks/remote.py                      # everything (many minutes)
    .venv/bin/python benchmarks/remote.py --phases calls fleet --guests 20
    .venv/bin/python benchmarks/remote.py --phases hosts --hosts 4 --per-host 50

Phases (each backend in a fresh interpreter; threads and RSS sampled from outside, see _bench):

- ``calls``: lookup + info of one running ``pc`` guest, sequentially and from 64 concurrent
  callers. aiovirt on the wire (``RPCClient.lookup_by_name`` + ``get_info``: the same two RPCs
  as libvirt-python's ``lookupByName`` + ``info``), and aiovirt's public API (``conn.lookup`` +
  ``dom.info()``, which the connection serves from its table: no RPC at all).
- ``fleet``: N ``pc`` guests (32 MiB, TCG, no OS, so they ignore ACPI) created through the daemon
  (timed, 64 at a time), then stopped: aiovirt's ``stop_all`` with ``acpi_timeout=0`` (straight to
  SIGTERM; on libvirt 9.0 that is QMP ``quit``), libvirt-python's ``destroyFlags(0)`` from 64
  threads. Client memory per domain: RSS with the N domains in hand over RSS before, divided by N.
- ``hosts``: one daemon per host, ``--per-host`` guests each, stopped with one call and one
  deadline (``stop_all_hosts``), libvirt-python with one 64-thread pool over all connections.

The daemons are private (scripts/libvirtd.sh) and stopped at the end, with any guest left.
libvirt-python runs under Debian's /usr/bin/python3 (python3-libvirt).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # _bench, and this checkout's aiovirt

import _bench  # noqa: E402

SCRIPT = HERE.parent / "scripts" / "libvirtd.sh"
SYSTEM_PYTHON = "/usr/bin/python3"
PREFIX = "rbench"


def uri_of(socket: str) -> str:
    return f"qemu+unix:///system?socket={socket}"


def pc_xml(name: str) -> str:
    """aiovirt's own XML for the guest, so that both clients start the very same domain."""
    import aiovirt
    from aiovirt.config import to_libvirt_xml

    return to_libvirt_xml(aiovirt.DomainConfig(name=name, machine="pc", accel="tcg", memory_mib=32))


# -- aiovirt workers -----------------------------------------------------------------------------


def aiovirt_worker(phase: str, backend: str, sockets: list[str], args: argparse.Namespace) -> dict[str, Any]:
    import anyio

    import aiovirt
    from aiovirt._hosts import stop_all_hosts
    from aiovirt.drivers.remote import RemoteDriver

    def pc(name: str) -> aiovirt.DomainConfig:
        return aiovirt.DomainConfig(name=name, machine="pc", accel="tcg", memory_mib=32)

    async def create_all(conn: aiovirt.Connection, names: list[str], limiter: anyio.CapacityLimiter) -> None:
        async def one(name: str) -> None:
            async with limiter:
                await conn.create(pc(name))

        async with anyio.create_task_group() as tg:
            for name in names:
                tg.start_soon(one, name)

    async def calls() -> dict[str, Any]:
        async with aiovirt.connect(uri_of(sockets[0])) as conn:
            name = f"{PREFIX}-{backend}-info"
            dom = await conn.create(pc(name))
            assert isinstance(conn.driver, RemoteDriver)
            client = conn.driver.client
            out: dict[str, Any] = {}
            try:
                n = args.calls
                t0 = time.perf_counter()
                for _ in range(n):
                    await client.get_info(await client.lookup_by_name(name))
                out["wire_seq_per_s"] = n / (time.perf_counter() - t0)

                async def caller(count: int) -> None:
                    for _ in range(count):
                        await client.get_info(await client.lookup_by_name(name))

                t0 = time.perf_counter()
                async with anyio.create_task_group() as tg:
                    for _ in range(args.concurrency):
                        tg.start_soon(caller, n // args.concurrency)
                out["wire_conc_per_s"] = (n // args.concurrency * args.concurrency) / (
                    time.perf_counter() - t0
                )
                t0 = time.perf_counter()
                for _ in range(n):
                    await (await conn.lookup(name)).info()
                out["api_seq_per_s"] = n / (time.perf_counter() - t0)
                out["threads"] = _bench.os_threads()
            finally:
                await dom.destroy()
            return out

    async def fleet() -> dict[str, Any]:
        names = [f"{PREFIX}-{backend}-{i:03d}" for i in range(args.guests)]
        rss0 = _bench.rss_bytes()
        async with aiovirt.connect(uri_of(sockets[0])) as conn:
            rss_conn = _bench.rss_bytes()
            try:
                t0 = time.perf_counter()
                await create_all(conn, names, anyio.CapacityLimiter(args.concurrency))
                start_s = time.perf_counter() - t0
                rss_running = _bench.rss_bytes()
                threads = _bench.os_threads()
                policy = aiovirt.StopPolicy(acpi_timeout=0, term_timeout=10, kill_timeout=30)
                t0 = time.perf_counter()
                results = await conn.stop_all(policy=policy, limit=args.concurrency)
                stop_s = time.perf_counter() - t0
            finally:
                with anyio.move_on_after(120, shield=True):
                    for dom in await conn.list_domains(active=True):
                        await dom.destroy()
        return {
            "start_s": start_s,
            "stop_s": stop_s,
            "stopped": sum(r.stopped for r in results),
            "stages": sorted({str(r.stage) for r in results}),
            "kib_per_domain": (rss_running - rss_conn) / 1024 / len(names),
            "connection_kib": (rss_conn - rss0) / 1024,
            "threads": threads,
            "sigterm_method": conn.driver.sigterm_method if isinstance(conn.driver, RemoteDriver) else None,
        }

    async def hosts() -> dict[str, Any]:
        from contextlib import AsyncExitStack

        async with AsyncExitStack() as stack:
            conns = [await stack.enter_async_context(aiovirt.connect(uri_of(s))) for s in sockets]
            try:
                t0 = time.perf_counter()
                async with anyio.create_task_group() as tg:
                    for h, conn in enumerate(conns):
                        names = [f"{PREFIX}-{backend}-h{h}-{i:03d}" for i in range(args.per_host)]
                        tg.start_soon(create_all, conn, names, anyio.CapacityLimiter(args.concurrency))
                start_s = time.perf_counter() - t0
                threads = _bench.os_threads()
                policy = aiovirt.StopPolicy(
                    acpi_timeout=0, term_timeout=10, kill_timeout=30, deadline=args.deadline
                )
                t0 = time.perf_counter()
                results = await stop_all_hosts(conns, policy, limit=args.concurrency)
                stop_s = time.perf_counter() - t0
            finally:
                with anyio.move_on_after(120, shield=True):
                    for conn in conns:
                        for dom in await conn.list_domains(active=True):
                            await dom.destroy()
        per_host: dict[str, float] = {}
        for r in results:
            per_host[r.host] = max(per_host.get(r.host, 0.0), r.result.elapsed)
        return {
            "start_s": start_s,
            "stop_s": stop_s,
            "stopped": sum(r.stopped for r in results),
            "guests": len(results),
            "slowest_host_s": max(per_host.values()),
            "fastest_host_s": min(per_host.values()),
            "threads": threads,
        }

    main = {"calls": calls, "fleet": fleet, "hosts": hosts}[phase]
    return anyio.run(main, backend=backend)


# -- libvirt-python workers (run by /usr/bin/python3) --------------------------------------------


def libvirt_worker(phase: str, sockets: list[str], args: argparse.Namespace) -> dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor

    import libvirt  # type: ignore[import-not-found]

    template = Path(args.xml_template).read_text()
    libvirt.registerErrorHandler(lambda *a: None, None)
    conns = [libvirt.open(uri_of(s)) for s in (sockets if phase == "hosts" else sockets[:1])]
    made: list[Any] = []

    def create(conn: Any, name: str) -> Any:
        dom = conn.createXML(template.replace("NAME_PLACEHOLDER", name), 0)
        made.append(dom)
        return dom

    try:
        with ThreadPoolExecutor(args.concurrency) as pool:
            if phase == "calls":
                name = f"{PREFIX}-libvirt-info"
                create(conns[0], name)
                n = args.calls
                t0 = time.perf_counter()
                for _ in range(n):
                    conns[0].lookupByName(name).info()
                seq = n / (time.perf_counter() - t0)
                t0 = time.perf_counter()
                list(pool.map(lambda _: conns[0].lookupByName(name).info(), range(n)))
                conc = n / (time.perf_counter() - t0)
                return {"wire_seq_per_s": seq, "wire_conc_per_s": conc, "threads": _bench.os_threads()}
            if phase == "fleet":
                jobs = [(conns[0], f"{PREFIX}-libvirt-{i:03d}") for i in range(args.guests)]
            else:
                jobs = [
                    (c, f"{PREFIX}-libvirt-h{h}-{i:03d}")
                    for h, c in enumerate(conns)
                    for i in range(args.per_host)
                ]
            rss0 = _bench.rss_bytes()
            t0 = time.perf_counter()
            doms = list(pool.map(lambda job: create(*job), jobs))
            start_s = time.perf_counter() - t0
            rss_running = _bench.rss_bytes()
            threads = _bench.os_threads()
            t0 = time.perf_counter()
            list(pool.map(lambda d: d.destroyFlags(0), doms))
            stop_s = time.perf_counter() - t0
            made.clear()
            return {
                "start_s": start_s,
                "stop_s": stop_s,
                "stopped": len(doms),
                "guests": len(doms),
                "kib_per_domain": (rss_running - rss0) / 1024 / len(doms),
                "threads": threads,
            }
    finally:
        for dom in made:
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroy()
        for conn in conns:
            conn.close()


# -- the orchestrator ----------------------------------------------------------------------------


def start_daemons(count: int) -> tuple[list[Path], list[str]]:
    dirs: list[Path] = []
    sockets: list[str] = []
    try:
        for _ in range(count):
            d = Path(tempfile.mkdtemp(prefix="rbd", dir="/tmp"))
            dirs.append(d)
            out = subprocess.run([str(SCRIPT), "start", str(d)], capture_output=True, text=True, timeout=600)
            if out.returncode != 0:
                raise RuntimeError(f"libvirtd.sh start failed: {out.stdout}{out.stderr}")
            sockets.append(out.stdout.strip().splitlines()[-1])
    except BaseException:
        stop_daemons(dirs)
        raise
    return dirs, sockets


def stop_daemons(dirs: list[Path]) -> None:
    for d in dirs:
        subprocess.run([str(SCRIPT), "stop", str(d)], capture_output=True, timeout=300, check=False)
        shutil.rmtree(d, ignore_errors=True)


def fits(guests: int) -> bool:
    """Whether ``guests`` pc guests fit in the available memory (about 25 MiB each, 2 GiB spare)."""
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return guests * 25 * 1024 + 2 * 1024 * 1024 < info["MemAvailable"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"environment": _bench.environment(), "phases": {}, "params": vars(args).copy()}
    wanted_hosts = args.hosts * args.per_host
    if "hosts" in args.phases and not fits(wanted_hosts):
        per_host = args.per_host
        while per_host > 1 and not fits(args.hosts * per_host):
            per_host //= 2
        result["scaled_down"] = (
            f"{wanted_hosts} pc guests do not fit in memory here: {args.hosts} x {per_host}"
        )
        print(result["scaled_down"], file=sys.stderr)
        args.per_host = per_host
    count = args.hosts if "hosts" in args.phases else 1
    with tempfile.NamedTemporaryFile("w", suffix=".xml", delete=False) as xml:
        xml.write(pc_xml("NAME_PLACEHOLDER"))
    dirs, sockets = start_daemons(count)
    try:
        with open(dirs[0] / "libvirtd.pid") as f:
            daemon_pid = int(f.read())
        for phase in args.phases:
            result["phases"][phase] = {}
            for backend in args.backends:
                python = SYSTEM_PYTHON if backend == "libvirt" else sys.executable
                argv = [python, __file__, "--worker", phase, "--backend", backend, "--sockets", *sockets]
                argv += ["--xml-template", xml.name, *forwarded(args)]
                print(f"{phase} / {backend} ...", file=sys.stderr)
                before = _bench.proc_status(daemon_pid)
                res = _bench.run_worker(argv, timeout=1800)
                res["daemon_threads_before"] = int(before["Threads"])
                result["phases"][phase][backend] = res
                print(json.dumps(res), file=sys.stderr)
    finally:
        stop_daemons(dirs)
        os.unlink(xml.name)
    return result


def forwarded(args: argparse.Namespace) -> list[str]:
    out = []
    for key in ("guests", "per_host", "calls", "concurrency", "deadline"):
        out += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return out


def _fmt(value: Any, digits: int = 3) -> str:
    return _bench.fmt(value, digits)


def markdown(result: dict[str, Any]) -> str:
    phases = result["phases"]
    lines: list[str] = []
    if "calls" in phases:
        rows = []
        lib = phases["calls"].get("libvirt", {})
        for b, r in phases["calls"].items():
            rows.append(
                [
                    b,
                    _fmt(r.get("wire_seq_per_s"), 0),
                    _fmt(_bench.ratio(r.get("wire_seq_per_s"), lib.get("wire_seq_per_s"))),
                    _fmt(r.get("wire_conc_per_s"), 0),
                    _fmt(_bench.ratio(r.get("wire_conc_per_s"), lib.get("wire_conc_per_s"))),
                    _fmt(r.get("api_seq_per_s"), 0),
                    r.get("peak_threads_sampled"),
                ]
            )
        lines += [
            "### lookup + info of one running guest (pairs per second)",
            "",
            _bench.markdown_table(
                [
                    "client",
                    "wire sequential",
                    "/ libvirt",
                    "wire 64 concurrent",
                    "/ libvirt",
                    "API (no RPC)",
                    "peak threads",
                ],
                rows,
            ),
            "",
        ]
    for phase, title in (("fleet", "one daemon"), ("hosts", "across hosts, one deadline")):
        if phase not in phases:
            continue
        lib = phases[phase].get("libvirt", {})
        rows = []
        for b, r in phases[phase].items():
            rows.append(
                [
                    b,
                    r.get("stopped"),
                    _fmt(r.get("start_s")),
                    _fmt(r.get("stop_s")),
                    _fmt(_bench.ratio(r.get("stop_s"), lib.get("stop_s"))),
                    _fmt(r.get("kib_per_domain"), 1),
                    r.get("peak_threads_sampled"),
                ]
            )
        n = (
            result["params"]["guests"]
            if phase == "fleet"
            else result["params"]["hosts"] * result["params"]["per_host"]
        )
        lines += [
            f"### {n} pc guests, {title}",
            "",
            _bench.markdown_table(
                [
                    "client",
                    "stopped",
                    "start s",
                    "stop s",
                    "stop / libvirt",
                    "client KiB/domain",
                    "peak threads",
                ],
                rows,
            ),
            "",
        ]
    if "scaled_down" in result:
        lines.append(f"Scaled down: {result['scaled_down']}.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--phases", nargs="+", default=["calls", "fleet", "hosts"], choices=["calls", "fleet", "hosts"]
    )
    p.add_argument("--backends", nargs="+", default=["asyncio", "trio", "libvirt"])
    p.add_argument("--guests", type=int, default=100)
    p.add_argument("--hosts", type=int, default=4)
    p.add_argument("--per-host", type=int, default=100)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--deadline", type=float, default=60.0)
    p.add_argument("--json-out")
    p.add_argument("--md-out")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--sockets", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--xml-template", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        try:
            if args.backend == "libvirt":
                out = libvirt_worker(args.worker, args.sockets, args)
            else:
                out = aiovirt_worker(args.worker, args.backend, args.sockets, args)
            out["ok"] = True
        except Exception as exc:
            import traceback

            traceback.print_exc()
            out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(out), flush=True)
        return
    _bench.raise_nofile_limit()
    result = run(args)
    md = markdown(result)
    print(json.dumps(result))
    print(md)
    _bench.write_outputs(result, md, args.json_out, args.md_out)


if __name__ == "__main__":
    main()
