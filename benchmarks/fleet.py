"""Fleet benchmark: start N domains concurrently, then destroy them all concurrently.

    .venv/bin/python benchmarks/fleet.py                     # 1000 machine=none domains
    .venv/bin/python benchmarks/fleet.py --machine pc        # 100 machine=pc domains
    .venv/bin/python benchmarks/fleet.py --machine pc --libvirt

Backends, each in a fresh interpreter (so thread and memory figures are its own), in this order:

- ``raw``: the physical limit (see ``_raw.py``): plain ``subprocess`` + one epoll loop, the argv
  aiovirt renders (serial console socket and log included). "Start" ends when every monitor's
  greeting was read; "destroy" is SIGTERM to all + every exit seen via pidfd.
- ``raw-qmp``: the same, but doing aiovirt's protocol work per domain: QEMU starts paused, and
  "started" is the reply to ``cont`` after ``qmp_capabilities`` (a like-for-like physical limit;
  ``start / raw-qmp`` in the table).
- ``floor-asyncio`` / ``floor-trio``: the floor of any controller built on anyio (``_raw.run_tasks``):
  raw's spawn, greeting and destroy, but one anyio task per domain awaiting its monitor and its
  pidfd, and nothing else. ``/ floor`` in the table is aiovirt over the floor of its own event loop:
  what aiovirt's own work costs, apart from what the event loop and a task per domain cost.
- ``duties-asyncio`` / ``duties-trio``: the floor plus, done in the fewest steps, what aiovirt must
  do at a destroy: read the monitor to its EOF, close both sockets, remove the record and both
  socket files (``duties=True``). ``destroy / duties`` is what aiovirt's own code costs beyond that.
- ``asyncio`` / ``trio``: ``aiovirt.connect("qemu:///embed?root=TMP")``, ``conn.create(cfg)`` for
  all N in one task group, then ``dom.destroy()`` for all in one task group. ``create`` returns only
  once QEMU was spawned paused, the monitor greeted, ``qmp_capabilities`` and ``cont`` were answered
  and the runtime record was written: two QMP round trips and a file write more than raw per domain.
  ``destroy`` returns once the exit was seen through the pidfd and the monitor's last events read.
- ``libvirt`` (``--libvirt``): libvirtd + libvirt-python from Debian's ``/usr/bin/python3``, 64
  client threads (``libvirt_fleet.py``); define is not timed, ``create`` and ``destroy`` are.

Prints one JSON object and a markdown table (``--json-out`` / ``--md-out`` also write them).
"""

from __future__ import annotations

import argparse
import gc
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _bench
from _bench import Result

AIOVIRT_BACKENDS = ("asyncio", "trio")
FLOOR_BACKENDS = tuple(f"{kind}-{b}" for kind in ("floor", "duties") for b in AIOVIRT_BACKENDS)
ALL_BACKENDS = ("raw", "raw-qmp", *FLOOR_BACKENDS, *AIOVIRT_BACKENDS)
DEFAULT_N = {"none": 1000, "pc": 100}

# Targets from the issue (README.md explains each).
TARGET_START_RATIO = 1.15
TARGET_DESTROY_RATIO = 1.2
TARGET_KIB_PER_DOMAIN = 64.0


# -- workers (run in a fresh interpreter) ------------------------------------------------------


def _per_domain(result: Result, n: int) -> None:
    rss_growth = result["rss_running_kib"] - result["rss_before_kib"]
    result["rss_growth_kib"] = rss_growth
    result["kib_per_domain"] = round(rss_growth / n, 2)
    result["fds_per_domain"] = round((result["fds_running"] - result["fds_before"]) / n, 2)
    result["thread_growth"] = result["threads_running"] - result["threads_before"]


def worker_raw(args: argparse.Namespace, workdir: Path) -> Result:
    import _raw

    handshake = args.worker == "raw-qmp"
    make = (
        _raw.anchor_argv(args.machine, args.memory_mib, paused=handshake)
        if args.raw_argv == "anchor"
        else _raw.aiovirt_argv(args.machine, args.memory_mib, paused=handshake)
    )
    console = args.raw_argv == "aiovirt"  # like aiovirt's domains (console on by default)
    make(0, 3, (4, "/dev/null") if console else None)  # import and warm the renderer first
    if args.worker in FLOOR_BACKENDS:
        kind, backend = args.worker.split("-")
        duties = kind == "duties"
        return _raw.run_tasks(args.n, workdir, make, backend=backend, console=console, duties=duties)
    return _raw.run(args.n, workdir, make, handshake=handshake, console=console)


def worker_aiovirt(args: argparse.Namespace, workdir: Path) -> Result:
    import anyio

    import aiovirt
    from aiovirt import _connection, _domain  # noqa: F401  (load everything before the baseline)

    backend = args.worker
    n: int = args.n
    uri = f"qemu:///embed?root={workdir}"

    async def main() -> Result:
        configs = [
            aiovirt.DomainConfig(name=f"b{i}", machine=args.machine, accel="tcg", memory_mib=args.memory_mib)
            for i in range(n)
        ]
        doms: list[aiovirt.Domain] = []
        phase = ["idle"]
        stalls = {"start": 0.0, "destroy": 0.0}

        async def ticker() -> None:
            # How long the event loop was unable to run anything else (e.g. a web server's
            # requests) while aiovirt worked: the largest lateness of a 10 ms sleep.
            last = time.perf_counter()
            while True:
                await anyio.sleep(0.01)
                now = time.perf_counter()
                if phase[0] in stalls:
                    stalls[phase[0]] = max(stalls[phase[0]], now - last - 0.01)
                last = now

        async with aiovirt.connect(uri) as conn:
            try:
                gc.collect()
                out: Result = {
                    "threads_before": _bench.os_threads(),
                    "rss_before_kib": _bench.rss_bytes() // 1024,
                    "fds_before": _bench.open_fds(),
                }
                ready_at: list[float] = []

                async def create(cfg: aiovirt.DomainConfig) -> None:
                    doms.append(await conn.create(cfg))
                    ready_at.append(time.perf_counter() - t0)

                async with anyio.create_task_group() as monitor:
                    monitor.start_soon(ticker)
                    await anyio.sleep(0.02)
                    phase[0] = "start"
                    t0 = time.perf_counter()
                    c0 = time.process_time()  # the controller's own CPU
                    async with anyio.create_task_group() as tg:
                        for cfg in configs:
                            tg.start_soon(create, cfg)
                    t1 = time.perf_counter()
                    c1 = time.process_time()
                    phase[0] = "idle"
                    gc.collect()
                    out["rss_running_kib"] = _bench.rss_bytes() // 1024
                    out["threads_running"] = _bench.os_threads()
                    out["fds_running"] = _bench.open_fds()
                    running = len(await conn.list_domains(active=True))
                    if running != n:
                        raise RuntimeError(f"{running} of {n} domains are running after create")

                    await anyio.sleep(0.02)
                    phase[0] = "destroy"
                    t2 = time.perf_counter()
                    c2 = time.process_time()
                    async with anyio.create_task_group() as tg:
                        for dom in doms:
                            tg.start_soon(dom.destroy)
                    t3 = time.perf_counter()
                    c3 = time.process_time()
                    phase[0] = "idle"
                    monitor.cancel_scope.cancel()
                states = {d.state.value for d in doms}
                if states != {"shutoff"}:
                    raise RuntimeError(f"states after destroy: {sorted(states)}")
                ready_at.sort()
                out.update(
                    start_s=round(t1 - t0, 4),
                    start_p50_s=round(ready_at[len(ready_at) // 2], 4),
                    destroy_s=round(t3 - t2, 4),
                    start_cpu_s=round(c1 - c0, 4),
                    destroy_cpu_s=round(c3 - c2, 4),
                    threads_after=_bench.os_threads(),
                    max_loop_stall_start_s=round(stalls["start"], 4),
                    max_loop_stall_destroy_s=round(stalls["destroy"], 4),
                )
                return out
            finally:
                # On error or cancellation: stop what runs, shielded and bounded (kill_children
                # in the caller is the last resort).
                with anyio.CancelScope(shield=True), anyio.move_on_after(60):
                    leftover = await conn.list_domains(active=True)
                    if leftover:
                        async with anyio.create_task_group() as tg:
                            for dom in leftover:
                                tg.start_soon(_destroy_quietly, dom)

    return anyio.run(main, backend=backend)


async def _destroy_quietly(dom: Any) -> None:
    try:
        await dom.destroy(timeout=5)
    except Exception as exc:
        print(f"cleanup: destroy {dom.name}: {exc!r}", file=sys.stderr)


def worker_main(args: argparse.Namespace) -> None:
    _bench.check_nofile(3 * args.n + 64)
    workdir = Path(tempfile.mkdtemp(prefix=f"aiovirt-fleet-{args.worker}-", dir=args.state_base))
    result: Result = {"backend": args.worker, "n": args.n, "machine": args.machine, "ok": False}
    profiler = None
    if args.profile:
        import cProfile
        import importlib

        # Imports are not what we profile: load everything first.
        modules = ["_raw", "aiovirt.config"]
        if args.worker in AIOVIRT_BACKENDS:
            modules += ["anyio", args.worker, "aiovirt._connection", "aiovirt._domain"]
        elif args.worker in FLOOR_BACKENDS:
            modules += ["anyio", args.worker.split("-")[1]]
        for module in modules:
            importlib.import_module(module)
        profiler = cProfile.Profile()
        profiler.enable()
    try:
        if args.worker not in AIOVIRT_BACKENDS:
            result.update(worker_raw(args, workdir))
        else:
            result.update(worker_aiovirt(args, workdir))
        _per_domain(result, args.n)
        result["ok"] = True
    except Exception as exc:
        result["error"] = _bench.describe(exc)
        import traceback

        traceback.print_exc()
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(f"{args.profile}.{args.worker}.prof")
        leaked = _bench.kill_children()
        shutil.rmtree(workdir, ignore_errors=True)
        if leaked:
            print(
                f"[fleet] worker {args.worker}: killed {len(leaked)} QEMU(s) still running at exit",
                file=sys.stderr,
            )
    if leaked:
        # QEMUs still alive after a run that reported success would be a driver bug: say so.
        result["leaked_qemu_killed"] = len(leaked)
    result["vm_hwm_kib"] = _bench.kib(_bench.proc_status()["VmHWM"])
    _bench.emit(result)
    if not result["ok"]:
        sys.exit(1)


# -- libvirt -------------------------------------------------------------------------------------


def run_libvirt(n: int, machine: str, memory_mib: int, workers: int) -> Result:
    """A private libvirtd (``scripts/libvirtd.sh``) + libvirt-python (Debian's python3)."""
    result: Result = {"backend": "libvirt", "n": n, "machine": machine, "ok": False}
    script = _bench.HERE.parent / "scripts" / "libvirtd.sh"
    with tempfile.TemporaryDirectory(prefix="aiovirt-lv-", dir="/tmp") as home:
        try:
            proc = subprocess.run(
                ["bash", str(script), "start", home], capture_output=True, text=True, timeout=900
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            result["error"] = f"libvirt unavailable: {script} failed: {exc}"
            return result
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            result["error"] = f"libvirt unavailable: {script} exited {proc.returncode}: {' / '.join(tail)}"
            return result
        socket_path = proc.stdout.strip().splitlines()[-1]
        try:
            daemon = int(Path(home, "libvirtd.pid").read_text().strip())
            version = subprocess.run(["/usr/sbin/libvirtd", "--version"], capture_output=True, text=True)
            result["libvirt_version"] = version.stdout.strip()
            argv = [
                "/usr/bin/python3",
                str(_bench.HERE / "libvirt_fleet.py"),
                str(n),
                "--workers",
                str(workers),
                "--machine",
                machine,
                "--memory-mib",
                str(memory_mib),
                "--uri",
                f"qemu+unix:///system?socket={socket_path}",
                "--daemon-pid",
                str(daemon),
            ]
            result.update(_bench.run_worker(argv))
        finally:
            subprocess.run(["bash", str(script), "stop", home], capture_output=True, timeout=120)
    if result.get("ok"):
        result["kib_per_domain"] = round((result["rss_running_kib"] - result["rss_before_kib"]) / n, 2)
        result["thread_growth"] = result["threads_running"] - result["threads_before"]
    return result


# -- the orchestrator ----------------------------------------------------------------------------


def summarize(runs: list[Result], backends: list[str]) -> dict[str, Result]:
    """Per backend: the median of the repeats (wall times), the maxima (threads), the medians (memory)."""
    out: dict[str, Result] = {}
    for backend in backends:
        ok = [r for r in runs if r["backend"] == backend and r.get("ok")]
        failed = [r for r in runs if r["backend"] == backend and not r.get("ok")]
        if not ok:
            out[backend] = {"ok": False, "error": failed[0].get("error") if failed else "not run"}
            continue
        s: Result = {"ok": True, "runs": len(ok)}
        for key in (
            "start_s",
            "start_p50_s",
            "destroy_s",
            "start_cpu_s",
            "destroy_cpu_s",
            "kib_per_domain",
            "fds_per_domain",
            "max_loop_stall_start_s",
            "max_loop_stall_destroy_s",
        ):
            values = [r[key] for r in ok if r.get(key) is not None]
            s[key] = round(_bench.median(values), 4) if values else None
        for key in ("peak_threads_sampled", "threads_before", "threads_running", "thread_growth"):
            values = [r[key] for r in ok if r.get(key) is not None]
            s[key] = max(values) if values else None
        for key in ("daemon_threads_running", "daemon_kib_per_domain", "workers"):
            values = [r[key] for r in ok if r.get(key) is not None]
            if values:
                s[key] = values[0] if key == "workers" else round(_bench.median(values), 2)
        out[backend] = s
    for backend, s in out.items():
        if backend == "raw" or not s.get("ok"):
            continue
        # Each repeat's ratio against the baseline of the same repeat (run beside it), then the
        # median and the spread of those ratios: the machine's drift between repeats cancels.
        pairs = [("start_ratio", "raw", "start_s"), ("destroy_ratio", "raw", "destroy_s")]
        if backend in AIOVIRT_BACKENDS:
            pairs.append(("start_ratio_vs_raw_qmp", "raw-qmp", "start_s"))
            floor = f"floor-{backend}"
            pairs.append(("start_ratio_vs_floor", floor, "start_s"))
            pairs.append(("destroy_ratio_vs_floor", floor, "destroy_s"))
            pairs.append(("destroy_ratio_vs_duties", f"duties-{backend}", "destroy_s"))
        for name, base, field in pairs:
            _bench.put_ratio(s, name, _bench.paired_ratios(runs, "backend", backend, base, field))
    return out


def markdown(report: Result) -> str:
    n, machine = report["n"], report["machine"]
    env = report["environment"]
    head = (
        f"### Fleet: {n} `machine={machine}` domains, {report['memory_mib']} MiB, TCG "
        f"(median of {report['repeat']}; a ratio is the median (min-max) of each repeat's own; "
        f"python {env['python']}, QEMU {env['qemu']}, "
        f"{env['cpus']} CPUs, load {env['loadavg_at_start'][0]:.2f} at start)\n"
    )
    rows = []
    for backend, s in report["summary"].items():
        if not s.get("ok"):
            rows.append([backend, f"unavailable: {s.get('error')}", *[None] * 13])
            continue
        threads = f"{s['peak_threads_sampled']} (+{s['thread_growth']})"
        if "daemon_threads_running" in s:
            threads += f"; libvirtd {s['daemon_threads_running']:.0f}"
        mem = s.get("kib_per_domain")
        mem_text = _bench.fmt(mem, 1)
        if "daemon_kib_per_domain" in s:
            mem_text += f"; libvirtd {s['daemon_kib_per_domain']:.1f}"
        rows.append(
            [
                backend,
                s["start_s"],
                _bench.with_spread(s, "start_ratio"),
                _bench.with_spread(s, "start_ratio_vs_raw_qmp"),
                _bench.with_spread(s, "start_ratio_vs_floor"),
                s["start_p50_s"],
                s["destroy_s"],
                _bench.with_spread(s, "destroy_ratio"),
                _bench.with_spread(s, "destroy_ratio_vs_floor"),
                _bench.with_spread(s, "destroy_ratio_vs_duties"),
                _cpu_per_domain(s, n),
                threads,
                mem_text,
                s.get("fds_per_domain"),
                _stall(s),
            ]
        )
    table = _bench.markdown_table(
        [
            "backend",
            "start s",
            "start / raw",
            "start / raw-qmp",
            "start / floor",
            "half started s",
            "destroy s",
            "destroy / raw",
            "destroy / floor",
            "destroy / duties",
            "controller CPU ms / domain (start / destroy)",
            "peak threads (growth)",
            "KiB / domain",
            "fds / domain",
            "loop stall s (start / destroy)",
        ],
        rows,
    )
    targets = []
    for backend in AIOVIRT_BACKENDS:
        s = report["summary"].get(backend)
        if not s or not s.get("ok"):
            continue
        targets.append(
            [
                backend,
                f"{_bench.with_spread(s, 'start_ratio')} "
                f"({_bench.verdict(s.get('start_ratio'), TARGET_START_RATIO)})",
                f"{_bench.with_spread(s, 'destroy_ratio')} "
                f"({_bench.verdict(s.get('destroy_ratio'), TARGET_DESTROY_RATIO)})",
                f"+{s['thread_growth']} ({'met' if s['thread_growth'] <= 2 else 'check growth with N'})",
                f"{_bench.fmt(s['kib_per_domain'], 1)} "
                f"({_bench.verdict(s['kib_per_domain'], TARGET_KIB_PER_DOMAIN)})",
            ]
        )
    target_table = _bench.markdown_table(
        [
            "aiovirt on",
            f"start ≤ {TARGET_START_RATIO}x raw",
            f"destroy ≤ {TARGET_DESTROY_RATIO}x raw",
            "threads flat in N",
            f"memory < {TARGET_KIB_PER_DOMAIN:.0f} KiB/domain",
        ],
        targets,
    )
    return head + "\n" + table + "\n\nTargets:\n\n" + target_table


def _cpu_per_domain(s: Result, n: int) -> str | None:
    start, destroy = s.get("start_cpu_s"), s.get("destroy_cpu_s")
    if start is None or destroy is None:
        return None  # libvirt: its daemon's CPU is not the client's
    return f"{1000 * start / n:.2f} / {1000 * destroy / n:.2f}"


def _stall(s: Result) -> str | None:
    start, destroy = s.get("max_loop_stall_start_s"), s.get("max_loop_stall_destroy_s")
    if start is None or destroy is None:
        return None
    return f"{start:.3f} / {destroy:.3f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, help="domains (default: 1000 for none, 100 for pc)")
    p.add_argument("--machine", choices=("none", "pc"), default="none")
    p.add_argument("--memory-mib", type=int, default=32)
    p.add_argument(
        "--backends",
        default=",".join(ALL_BACKENDS),
        help="comma-separated subset of " + ",".join(ALL_BACKENDS),
    )
    p.add_argument("--libvirt", action="store_true", help="also run libvirt (installs and starts libvirtd)")
    p.add_argument("--libvirt-workers", type=int, default=64)
    p.add_argument("--repeat", type=int, default=1, help="run every backend this many times, interleaved")
    p.add_argument("--raw-argv", choices=("aiovirt", "anchor"), default="aiovirt")
    p.add_argument(
        "--state-base",
        metavar="DIR",
        help="where the state directories (and raw's sockets) are made (default: the system's temp dir)",
    )
    p.add_argument(
        "--no-warmup", action="store_true", help="skip the small raw run that warms the page cache"
    )
    p.add_argument(
        "--profile",
        metavar="PREFIX",
        help="profile each worker (cProfile) into PREFIX.BACKEND.prof; timings then include its overhead",
    )
    p.add_argument("--json-out")
    p.add_argument("--md-out")
    p.add_argument("--worker", choices=ALL_BACKENDS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.n is None:
        args.n = DEFAULT_N[args.machine]
    return args


def worker_argv(args: argparse.Namespace, backend: str, n: int) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        backend,
        "--n",
        str(n),
        "--machine",
        args.machine,
        "--memory-mib",
        str(args.memory_mib),
        "--raw-argv",
        args.raw_argv,
        *(["--profile", args.profile] if args.profile else []),
        *(["--state-base", args.state_base] if args.state_base else []),
    ]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _bench.terminate_as_interrupt(event_loop=bool(args.worker))
    if args.worker:
        worker_main(args)
        return
    _bench.become_subreaper()
    _bench.raise_nofile_limit()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(backends) - set(ALL_BACKENDS)
    if unknown:
        sys.exit(f"unknown backend(s): {', '.join(sorted(unknown))}")
    env = _bench.environment()
    if not args.no_warmup:
        _bench.run_worker(worker_argv(args, "raw", min(args.n, 10)))
    runs: list[Result] = []
    for rep in range(args.repeat):
        for backend in backends:
            print(f"[fleet] {backend} n={args.n} machine={args.machine} run {rep + 1}", file=sys.stderr)
            result = _bench.run_worker(worker_argv(args, backend, args.n))
            result.setdefault("backend", backend)
            result["repeat"] = rep
            print(f"[fleet]   {_short(result)}", file=sys.stderr)
            runs.append(result)
    if args.libvirt:
        backends.append("libvirt")
        _bench.become_subreaper(False)  # libvirtd and its QEMUs daemonize: they are not ours to reap
        for rep in range(args.repeat):
            print(f"[fleet] libvirt n={args.n} run {rep + 1}", file=sys.stderr)
            result = run_libvirt(args.n, args.machine, args.memory_mib, args.libvirt_workers)
            result["repeat"] = rep
            print(f"[fleet]   {_short(result)}", file=sys.stderr)
            runs.append(result)
            if not result.get("ok"):
                break
    report: Result = {
        "benchmark": "fleet",
        "n": args.n,
        "machine": args.machine,
        "memory_mib": args.memory_mib,
        "repeat": args.repeat,
        "raw_argv": args.raw_argv,
        "state_base": args.state_base or tempfile.gettempdir(),
        "environment": env,
        "summary": summarize(runs, backends),
        "targets": {
            "start_ratio_max": TARGET_START_RATIO,
            "destroy_ratio_max": TARGET_DESTROY_RATIO,
            "kib_per_domain_max": TARGET_KIB_PER_DOMAIN,
        },
        "runs": runs,
    }
    _bench.write_outputs(report, markdown(report), args.json_out, args.md_out)


def _short(result: Result) -> str:
    if not result.get("ok"):
        return f"FAILED: {result.get('error')}"
    return (
        f"start {result.get('start_s')} s, destroy {result.get('destroy_s')} s, "
        f"threads {result.get('peak_threads_sampled')}, {result.get('kib_per_domain')} KiB/domain"
    )


if __name__ == "__main__":
    main()
