"""Re-record tests/data/rpc/: libvirt's own client talking to a real daemon, through a recording proxy.

    /usr/bin/python3 tests/record_rpc.py [OUTPUT_DIR]

Run with Debian's Python, which has libvirt-python (python3-libvirt); it needs nothing of
aiovirt. It starts a private libvirtd (scripts/libvirtd.sh), puts a proxy on a unix socket in
front of it that copies every byte both ways and records them, and runs one scripted session of
libvirt-python against ``test+unix:///default`` through the proxy (see ``session()``). It writes

- ``session.c2s.bin``: every byte the client sent, in order;
- ``session.s2c.bin``: every byte the daemon sent, in order;
- ``session.json``: what libvirt-python itself returned for each step, which the decoded packets
  must match (tests/test_rpc_codec.py).

It waits long enough (12 s) for both sides' keepalive pings to be recorded. The hostname and
library version in the recording are this machine's.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SCRIPT = HERE.parent / "scripts" / "libvirtd.sh"
EXTRA_XML = (
    "<domain type='test'><name>rec-{n}</name><uuid>{uuid}</uuid><memory unit='MiB'>64</memory>"
    "<vcpu>1</vcpu><os><type>hvm</type></os></domain>"
)
DEFINED_UUID = "1b6a7f4e-3d1c-4a8e-9c55-0123456789ab"
TRANSIENT_UUID = "2c7b8e5f-4e2d-4b9f-8d66-123456789abc"


class RecordingProxy:
    """Accepts one client on ``listen_path`` and relays it to ``target_path``, keeping both streams."""

    def __init__(self, listen_path: str, target_path: str) -> None:
        self.c2s = bytearray()
        self.s2c = bytearray()
        self._target = target_path
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(listen_path)
        self._listener.listen(1)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        client, _ = self._listener.accept()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.connect(self._target)
        pairs = {client: (server, self.c2s), server: (client, self.s2c)}
        open_ends = 2
        while open_ends:
            readable, _, _ = select.select(list(pairs), [], [])
            for sock in readable:
                data = sock.recv(65536)
                peer, record = pairs[sock]
                if not data:
                    open_ends -= 1
                    del pairs[sock]
                    peer.shutdown(socket.SHUT_WR)
                    continue
                record += data
                peer.sendall(data)
        client.close()
        server.close()

    def join(self) -> None:
        self._thread.join(timeout=30)
        self._listener.close()


def session(uri: str) -> dict[str, Any]:
    """The scripted conversation; returns what libvirt-python saw at each step."""
    libvirt: Any = importlib.import_module("libvirt")
    libvirt_qemu: Any = importlib.import_module("libvirt_qemu")
    libvirt.registerErrorHandler(lambda *_: None, None)
    libvirt.virEventRegisterDefaultImpl()  # also makes libvirt start keepalive on the connection

    def loop() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=loop, daemon=True).start()
    events: list[list[Any]] = []
    cond = threading.Condition()

    def on_lifecycle(_conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        with cond:
            events.append([dom.name(), event, detail])
            cond.notify_all()

    def wait_events(count: int) -> None:
        with cond:
            if not cond.wait_for(lambda: len(events) >= count, timeout=10):
                raise RuntimeError(f"expected {count} events, got {events}")

    def error_of(call: Any) -> dict[str, Any]:
        try:
            call()
        except libvirt.libvirtError as exc:
            return {
                "code": exc.get_error_code(),
                "domain": exc.get_error_domain(),
                "message": exc.get_error_message(),
            }
        raise RuntimeError("expected a libvirt error")

    out: dict[str, Any] = {"uri": uri}
    conn = libvirt.open(uri)
    callback_id = conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_lifecycle, None)
    out["hostname"] = conn.getHostname()
    out["connect_uri"] = conn.getURI()
    out["lib_version"] = conn.getLibVersion()
    out["list_all"] = [[d.name(), d.UUIDString(), d.ID()] for d in conn.listAllDomains(0)]
    dom = conn.lookupByName("test")
    out["lookup"] = [dom.name(), dom.UUIDString(), dom.ID()]
    out["info"] = list(dom.info())
    out["state"] = list(dom.state())
    out["xml"] = dom.XMLDesc(0)
    out["autostart"] = dom.autostart()
    out["lookup_by_uuid"] = conn.lookupByUUID(dom.UUID()).name()
    out["missing"] = error_of(lambda: conn.lookupByName("no-such-domain"))
    out["monitor_error"] = error_of(
        lambda: libvirt_qemu.qemuMonitorCommand(dom, '{"execute":"query-status"}', 0)
    )
    dom.suspend()
    dom.resume()
    dom.destroy()
    wait_events(3)
    out["state_after_destroy"] = list(dom.state())
    defined = conn.defineXML(EXTRA_XML.format(n=1, uuid=DEFINED_UUID))
    out["duplicate"] = error_of(
        lambda: conn.defineXML(EXTRA_XML.format(n=1, uuid="3d8c9f60-5f3e-4ca0-9e77-23456789abcd"))
    )
    defined.create()
    out["create_again"] = error_of(defined.create)
    defined.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)
    defined.undefine()
    transient = conn.createXML(EXTRA_XML.format(n=2, uuid=TRANSIENT_UUID), 0)
    transient.destroy()
    wait_events(9)  # defined, started, stopped, undefined, started, stopped
    time.sleep(12)  # idle: both sides send keepalive pings (5 s interval) and answer them
    conn.domainEventDeregisterAny(callback_id)
    conn.close()
    out["events"] = events
    return out


def main() -> None:
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "data" / "rpc"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rec", dir="/tmp") as tmp:
        socket_path = subprocess.run(
            [str(SCRIPT), "start", tmp], check=True, capture_output=True, text=True
        ).stdout.strip()
        try:
            proxy_path = os.path.join(tmp, "proxy.sock")
            proxy = RecordingProxy(proxy_path, socket_path)
            result = session(f"test+unix:///default?socket={proxy_path}")
            proxy.join()
        finally:
            subprocess.run([str(SCRIPT), "stop", tmp], check=True)
    result["uri"] = "test+unix:///default?socket=PROXY"
    (out_dir / "session.c2s.bin").write_bytes(proxy.c2s)
    (out_dir / "session.s2c.bin").write_bytes(proxy.s2c)
    (out_dir / "session.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"recorded {len(proxy.c2s)} bytes sent and {len(proxy.s2c)} received into {out_dir}")


if __name__ == "__main__":
    main()
