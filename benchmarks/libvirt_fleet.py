# mypy: ignore-errors
# (Run by Debian's /usr/bin/python3 with python3-libvirt, which the project's venv has no stubs for.)
"""libvirt's number for the fleet benchmark: libvirtd + libvirt-python, a pool of client threads.

    /usr/bin/python3 benchmarks/libvirt_fleet.py N [--workers 64] [--machine pc] [--daemon-pid PID]

As /work/shared/anchors/libvirt_fleet.py: N domains (32 MiB, no disk, TCG) are defined (not timed),
then ``create`` for all through the thread pool (timed), then ``destroyFlags`` for all (timed).
Adds: the client's and libvirtd's threads and resident memory before and with all N running, and
cleanup of every domain it made even on error or Ctrl-C. Prints one JSON line.
"""

import argparse
import gc
import json
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import libvirt

PREFIX = "aiovirtbench"
XML = """<domain type='qemu'><name>{name}</name><memory unit='MiB'>{mib}</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='{machine}'>hvm</type></os><features><acpi/></features>
<devices><memballoon model='none'/></devices></domain>"""


def status(pid="self"):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def sample(pid="self"):
    try:
        st = status(pid)
    except OSError:
        return None, None
    return int(st["Threads"]), int(st.get("VmRSS", "0 kB").split()[0])


def cleanup(conn):
    """Destroy and undefine every domain this benchmark may have left, from any run."""
    for dom in conn.listAllDomains():
        if not dom.name().startswith(PREFIX):
            continue
        try:
            if dom.isActive():
                dom.destroy()
        except libvirt.libvirtError as exc:
            print(f"cleanup: destroy {dom.name()}: {exc}", file=sys.stderr)
        try:
            dom.undefine()
        except libvirt.libvirtError as exc:
            print(f"cleanup: undefine {dom.name()}: {exc}", file=sys.stderr)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("n", type=int)
    p.add_argument("--workers", type=int, default=64)
    p.add_argument("--machine", default="pc")
    p.add_argument("--memory-mib", type=int, default=32)
    p.add_argument("--daemon-pid", type=int)
    p.add_argument("--uri", default="qemu:///system")
    args = p.parse_args()
    result = {
        "backend": "libvirt",
        "n": args.n,
        "machine": args.machine,
        "workers": args.workers,
        "ok": False,
    }
    libvirt.registerErrorHandler(lambda *a: None, None)
    conn = libvirt.open(args.uri)
    try:
        result["libvirt_library"] = conn.getLibVersion()
        cleanup(conn)
        names = [f"{PREFIX}{i}" for i in range(args.n)]
        xml = [XML.format(name=n, mib=args.memory_mib, machine=args.machine) for n in names]
        doms = [conn.defineXML(x) for x in xml]
        gc.collect()
        result["threads_before"], result["rss_before_kib"] = sample()
        if args.daemon_pid:
            result["daemon_threads_before"], result["daemon_rss_before_kib"] = sample(args.daemon_pid)
        with ThreadPoolExecutor(args.workers) as ex:
            t0 = time.perf_counter()
            list(ex.map(lambda d: d.create(), doms))
            t1 = time.perf_counter()
            gc.collect()
            result["threads_running"], result["rss_running_kib"] = sample()
            if args.daemon_pid:
                result["daemon_threads_running"], result["daemon_rss_running_kib"] = sample(args.daemon_pid)
                result["daemon_kib_per_domain"] = round(
                    (result["daemon_rss_running_kib"] - result["daemon_rss_before_kib"]) / args.n, 2
                )
            t2 = time.perf_counter()
            list(ex.map(lambda d: d.destroyFlags(0), doms))
            t3 = time.perf_counter()
        result.update(start_s=round(t1 - t0, 4), destroy_s=round(t3 - t2, 4), ok=True)
        result["start_p50_s"] = None
    except Exception as exc:
        traceback.print_exc()
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        cleanup(conn)
        conn.close()
    result["fds_per_domain"] = None
    print(json.dumps(result), flush=True)
    if not result["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
