"""Boot a tiny Linux guest, press its power button, and wait for it to power off.

    scripts/setup.sh && .venv/bin/python examples/demo.py [--backend trio]

The guest (a Debian kernel and a busybox initramfs) is built on first use and cached.
State lives in a temporary directory (``qemu:///embed``), removed at the end.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import anyio

import aiovirt
from aiovirt.testing import ensure_tiny_guest


async def main() -> None:
    guest = ensure_tiny_guest()
    with tempfile.TemporaryDirectory(prefix="aiovirt-demo-") as root:
        async with aiovirt.connect(f"qemu:///embed?root={root}") as conn:
            cfg = guest.domain_config("demo", memory_mib=256)  # pc, TCG, its kernel and initrd
            t0 = time.monotonic()
            async with conn.subscribe() as events, conn.run(cfg) as dom:
                print(f"started {dom.name} (pid {dom.pid}) in {time.monotonic() - t0:.2f} s")
                console = dom.console_path
                assert console is not None
                with anyio.fail_after(180):
                    while guest.ready_marker not in console.read_text(errors="replace"):
                        await anyio.sleep(0.2)
                print(f"guest ready after {time.monotonic() - t0:.2f} s; pressing the power button")
                await dom.shutdown()
                with anyio.fail_after(60):
                    await dom.wait_for_state(aiovirt.DomainState.SHUTOFF)
                print(
                    f"{dom.name} is {dom.state}/{dom.reason} ({dom.shutdown_reason}) "
                    f"after {time.monotonic() - t0:.2f} s"
                )
                while (event := events.receive_nowait()) is not None:
                    print(f"  event: {event.kind}/{event.detail}")
            if dom.reason != aiovirt.StateReason.SHUTDOWN:
                raise SystemExit(f"expected a guest shutdown, got {dom.reason}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    anyio.run(main, backend=parser.parse_args().backend)
