"""Stopping many domains within one deadline: StopPolicy, StopResult, stop_all.

Every domain runs the same stages concurrently, so a fleet costs one timeout, not one per guest:

1. ACPI: press the power button (QMP ``system_powerdown``), again every ``repress_interval``
   (guests still booting miss the first press), until ``acpi_timeout``.
2. SIGTERM: QEMU flushes its disks and exits; wait ``term_timeout``.
3. SIGKILL, unless ``graceful``: wait ``kill_timeout`` for the kernel to end it.

With an overall ``deadline`` the ACPI stage is cut short to leave ``term_timeout`` for SIGTERM, and
the SIGTERM stage ends at the deadline; SIGKILL (never with ``graceful``) is then sent at once.
Every domain gets its first request before any stage timeout can expire: the stages start for all
domains together. ``limit`` bounds how many QMP requests run at once, never how many domains wait.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import anyio
from pydantic import BaseModel, ConfigDict, Field

from ._errors import AiovirtError, InvalidStateError, QMPError
from ._states import DomainState

if TYPE_CHECKING:
    from ._domain import Domain

__all__ = ["StopPolicy", "StopResult", "StopStage", "stop_all", "stop_domain"]


class StopStage(str, enum.Enum):
    """The request that ended a domain, or NONE when it was not stopped."""

    ACPI = "acpi"
    SIGTERM = "sigterm"
    SIGKILL = "sigkill"
    NONE = "none"

    def __str__(self) -> str:
        return self.value


class StopPolicy(BaseModel):
    """How to stop domains. Defaults follow Nova (ACPI re-pressed every 10 s for 60 s) and libvirt
    (SIGTERM, 10 s, SIGKILL, up to 30 s). Times are seconds; ``acpi_timeout=0`` skips ACPI."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    graceful: bool = False
    """Never send SIGKILL: a domain that outlives SIGTERM is reported not stopped."""
    acpi_timeout: float = Field(60.0, ge=0)
    repress_interval: float | None = Field(10.0, gt=0)
    """Press again this often during the ACPI stage; None presses once (for guests that cancel a
    double press)."""
    term_timeout: float = Field(10.0, ge=0)
    kill_timeout: float = Field(30.0, ge=0)
    deadline: float | None = Field(None, gt=0)
    """Overall seconds for the whole call; the ACPI stage yields time to the later stages."""
    paused: Literal["resume", "signal", "report"] = "resume"
    """A paused domain cannot take a button press: ``resume`` it and press, skip to the ``signal``
    stages, or ``report`` it not stopped and leave it alone."""


@dataclass(frozen=True)
class StopResult:
    """What happened to one domain. ``stopped`` is true only when its process exit was observed."""

    name: str
    stopped: bool
    stage: StopStage
    reason: str | None  # QEMU's shutdown reason ("guest-shutdown", "host-signal"...), if there was one
    elapsed: float  # seconds from the call to the exit (or to giving up)
    error: AiovirtError | None = None


async def stop_domain(
    dom: Domain, policy: StopPolicy, limiter: anyio.CapacityLimiter, started_at: float
) -> StopResult:
    """Run the stages for one domain. Never raises for the domain's own failures: they are in the result."""
    deadline_at = math.inf if policy.deadline is None else started_at + policy.deadline

    def result(stopped: bool, stage: StopStage, error: AiovirtError | None = None) -> StopResult:
        return StopResult(dom.name, stopped, stage, dom.shutdown_reason, anyio.current_time() - started_at, error)

    exited = dom._exited
    if not dom.active or exited is None:
        return result(False, StopStage.NONE, InvalidStateError(dom.name, "stop", dom.state, dom.reason))

    stage = StopStage.NONE  # the last request sent
    try:
        acpi = policy.acpi_timeout > 0
        if dom.state == DomainState.PAUSED:
            if policy.paused == "report":
                return result(False, StopStage.NONE, InvalidStateError(dom.name, "stop", dom.state, dom.reason))
            if policy.paused == "signal":
                acpi = False
            elif acpi:
                async with limiter:
                    await dom.resume()
        if acpi:
            stage = StopStage.ACPI
            acpi_end = min(started_at + policy.acpi_timeout, deadline_at - policy.term_timeout)
            if await _press_until(dom, exited, acpi_end, policy.repress_interval, limiter):
                return result(True, StopStage.ACPI)
        stage = StopStage.SIGTERM
        term_timeout = max(0.0, min(policy.term_timeout, deadline_at - anyio.current_time()))
        killed = await dom._terminate(policy.graceful, term_timeout, policy.kill_timeout)
        return result(True, StopStage.SIGKILL if killed else StopStage.SIGTERM)
    except AiovirtError as exc:
        if exited.is_set() and isinstance(exc, InvalidStateError):
            return result(True, stage)  # it exited between two of our steps, after our last request
        return result(exited.is_set(), StopStage.NONE, exc)


async def _press_until(
    dom: Domain, exited: anyio.Event, end: float, repress: float | None, limiter: anyio.CapacityLimiter
) -> bool:
    """Press the power button (again every ``repress`` s) until ``end``. True if the process exited."""
    while anyio.current_time() < end:
        try:
            async with limiter:
                await dom.shutdown()
        except QMPError:
            pass  # the monitor closed: QEMU is exiting, which the wait below sees
        next_press = end if repress is None else min(end, anyio.current_time() + repress)
        with anyio.move_on_after(max(0.0, next_press - anyio.current_time())):
            await exited.wait()
        if exited.is_set():
            return True
    return exited.is_set()


async def stop_all(
    domains: Iterable[Domain],
    policy: StopPolicy,
    limit: int,
    on_result: Callable[[StopResult], object] | None = None,
) -> list[StopResult]:
    """Stop ``domains`` concurrently; one result per domain, in the order given.

    ``on_result`` is called with each result as it completes (for progress). Cancelling the call
    sends no further requests; exits are still observed and reaped by each domain's supervisor.
    """
    doms = list(domains)
    limiter = anyio.CapacityLimiter(max(1, limit))
    started_at = anyio.current_time()
    results: list[StopResult | None] = [None] * len(doms)

    async def one(i: int, dom: Domain) -> None:
        res = await stop_domain(dom, policy, limiter, started_at)
        results[i] = res
        if on_result is not None:
            on_result(res)

    async with anyio.create_task_group() as tg:
        for i, dom in enumerate(doms):
            tg.start_soon(one, i, dom)
    return [r for r in results if r is not None]
