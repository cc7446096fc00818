"""A VM per test, with aiovirt's fixtures: ``aiovirt_domains`` boots it on a fresh connection and
destroys whatever the test leaves running, even when the test fails; a QEMU that escapes fails the test.
"""

from __future__ import annotations

import anyio
import pytest

import aiovirt
from aiovirt.pytest_plugin import DomainFactory
from aiovirt.testing import TinyGuest

pytestmark = pytest.mark.anyio

BOOT_TIMEOUT = 180  # seconds: a TCG boot takes a few seconds, far more on a loaded machine
POWEROFF_TIMEOUT = 60


async def test_guest_boots_and_powers_off_cleanly(aiovirt_domains: DomainFactory, guest: TinyGuest) -> None:
    async with aiovirt_domains(guest.domain_config("guest")) as dom, dom.subscribe() as events:
        async with dom.console() as con:
            with anyio.fail_after(BOOT_TIMEOUT):
                await con.expect(guest.shell_prompt.encode())  # booted, a shell on the console
            assert guest.ready_marker in con.text
        await dom.shutdown()  # the ACPI power button
        with anyio.fail_after(POWEROFF_TIMEOUT):
            await dom.wait_for_state(aiovirt.DomainState.SHUTOFF)
        assert dom.reason is aiovirt.StateReason.SHUTDOWN
        assert dom.shutdown_reason == "guest-shutdown"  # the guest powered itself off
        kinds = []
        while (event := events.receive_nowait()) is not None:
            kinds.append((event.kind, event.detail))
        assert kinds[-1] == (aiovirt.EventKind.STOPPED, aiovirt.EventDetail.SHUTDOWN)


async def test_guest_without_os_ignores_the_button(
    aiovirt_domains: DomainFactory,
) -> None:
    dom = await aiovirt_domains.create()  # machine="none": a QEMU with nothing to power off
    with dom.monitor_events() as qemu_events:
        await dom.shutdown()
        with anyio.fail_after(POWEROFF_TIMEOUT):
            while (await qemu_events.receive()).name != "POWERDOWN":
                pass
    assert dom.state is aiovirt.DomainState.RUNNING  # QEMU took the press; nobody acted on it
    # no cleanup: the fixture destroys it at teardown
