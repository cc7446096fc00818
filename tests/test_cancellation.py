"""The caller's cancel scope firing at points chosen by hypothesis inside start, shutdown, destroy,
stop_all and run, against real QEMU on both backends. Afterwards: no leaked QEMU, no unreaped
child, no torn record, and every domain's state matches its process.

``AIOVIRT_FUZZ_EXAMPLES=N`` runs N examples per backend instead of the default run's few.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import aiovirt
from aiovirt import DomainState as S

from .conftest import none_config, pid_alive, qemu_pids

EXAMPLES = int(os.environ.get("AIOVIRT_FUZZ_EXAMPLES", "8"))
OPERATIONS = ["start", "shutdown", "destroy", "graceful-destroy", "stop_all", "run"]
HANG = 30


def _zombie_children() -> list[int]:
    me = str(os.getpid())
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2 :].split()
        if fields[0] == b"Z" and fields[1].decode() == me:
            out.append(int(entry))
    return out


async def _scenario(root: Path, operation: str, delay: float) -> None:
    uri = f"qemu:///embed?root={root}"
    async with aiovirt.connect(uri) as conn:
        dom = await conn.define(none_config("victim"))
        if operation != "start":
            await dom.start()
        zombies_before = set(_zombie_children())
        with anyio.move_on_after(delay):
            if operation == "start":
                await dom.start()
            elif operation == "shutdown":
                await dom.shutdown()
                await dom.wait_for_state(S.SHUTOFF)  # no OS: it never comes
            elif operation == "destroy":
                await dom.destroy()
            elif operation == "graceful-destroy":
                await dom.destroy(graceful=True)
            elif operation == "stop_all":
                await conn.stop_all(policy=aiovirt.StopPolicy(acpi_timeout=0.2, term_timeout=2))
            else:
                async with conn.run(none_config("transient")):
                    await anyio.sleep_forever()
        # A signal sent before the cancellation still acts: let each exit be observed.
        for d in await conn.list_domains(active=True):
            if d.pid is None or not pid_alive(d.pid):
                with anyio.fail_after(HANG):
                    await d.wait_for_state(S.SHUTOFF)
        doms = await conn.list_domains()
        active = {d.name: d.pid for d in doms if d.active}
        for d in doms:
            if d.active:
                assert d.pid is not None and pid_alive(d.pid), d
                assert d.state in (S.RUNNING, S.PAUSED, S.SHUTDOWN), d
            else:
                assert d.state == S.SHUTOFF and d.pid is None, d
        assert "transient" not in {d.name for d in doms if not d.active}  # gone once stopped
        records = {p.stem: json.loads(p.read_bytes()) for p in (root / "run").glob("*.json")}  # none torn
        assert set(records) == set(active), (records, active)
        for name, record in records.items():
            assert record["pid"] in (None, active[name])
        assert {p for p in qemu_pids(str(root)) if pid_alive(p)} == {p for p in active.values() if p}
        assert set(_zombie_children()) <= zombies_before, "an exit was not reaped"
        for d in await conn.list_domains(active=True):
            with anyio.fail_after(HANG):
                await d.destroy(timeout=5)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("operation", OPERATIONS)
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None)
@given(delay=st.floats(min_value=0.0, max_value=0.4))
def test_cancellation_anywhere_leaves_nothing_behind(backend: str, operation: str, delay: float) -> None:
    root = Path(tempfile.mkdtemp(prefix="aiovirt-cancel-"))
    try:
        anyio.run(_scenario, root, operation, delay, backend=backend)
    finally:
        leaked = {p for p in qemu_pids(str(root)) if pid_alive(p)}
        for pid in leaked:
            os.kill(pid, 9)
        shutil.rmtree(root, ignore_errors=True)
    assert not leaked, f"{operation} cancelled after {delay:.3f} s leaked QEMU {sorted(leaked)}"
