"""This suite's own fixtures: the guest it boots, and the event loops it runs on."""

from __future__ import annotations

import pytest

from aiovirt.testing import TinyGuest, ensure_tiny_guest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every test runs twice: on asyncio and on trio."""
    return str(request.param)


@pytest.fixture(scope="session")
def guest() -> TinyGuest:
    """A small Linux guest that powers off when its ACPI button is pressed (built once, cached)."""
    return ensure_tiny_guest()
