"""Stopping many domains within one deadline: StopPolicy, StopResult, stop_all.

Every domain runs the same stages concurrently, so a fleet costs one timeout, not one per guest:

1. ACPI: press the power button (QMP ``system_powerdown``), again every ``repress_interval``
   (guests still booting miss the first press), until ``acpi_timeout``.
2. SIGTERM: QEMU flushes its disks and exits; wait ``term_timeout``.
3. SIGKILL, unless ``graceful``: wait ``kill_timeout`` for the kernel to end it.

Guarantees:

- The stages start for all domains together: every first press is queued when the call starts,
  before any stage can time out. ``limit`` bounds how many QMP requests are in flight at once,
  never how many domains wait: a request holds its slot until QEMU answers, at most
  ``_REQUEST_HOLD`` seconds, so QEMUs that do not answer their monitor (stopped, stuck) cannot
  hold up the others' presses for long; and a press still queued when its ACPI stage ends is
  dropped for the SIGTERM, which is sent on time. So every domain gets a request within the
  deadline, whatever the queue.
- With an overall ``deadline`` that is shorter than the stages' timeouts together, every stage's
  timeout is scaled down by the same factor (``deadline / sum``): the ACPI stage always leaves the
  later stages their share, however long it lasts, and the call returns by the deadline. Only the
  wait after a signal is never shorter than ``_MIN_SIGNAL_WAIT`` (or its stage's own timeout, if
  that is shorter), so that a process that reacts at once is seen to: the call may outlast the
  deadline by about a second at most.
- A paused domain cannot take a button press (QEMU would queue it and fire it at resume): it is
  resumed then pressed, sent straight to the signal stages, or reported and left alone
  (``StopPolicy.paused``). It is never pressed while paused.
- ``graceful`` never sends SIGKILL, whatever the deadline or a cancellation. Cancelling the call
  sends no further request; each domain's supervisor still observes and reaps its exit.
- One result per requested domain. ``stopped`` is true only once the process exit was seen.
  Failures of single domains are in their results, never raised.
"""

from __future__ import annotations

import contextlib
import enum
import math
import signal
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import anyio
from pydantic import Field

from ._errors import AiovirtError, ConfigError, ConnectionLostError, InvalidStateError, QMPError
from ._states import DomainState, StateReason
from .config._base import ConfigModel

if TYPE_CHECKING:
    from ._domain import Domain

__all__ = ["StopPolicy", "StopResult", "StopStage", "stop_all", "stop_domain"]

#: The longest one QMP request (a press, a resume) keeps its ``limit`` slot waiting for the reply.
#: The request has been written by then; QEMU acts on it whenever it reads its monitor again.
_REQUEST_HOLD = 1.0
#: The shortest wait for the exit after a signal, even when the deadline has passed.
_MIN_SIGNAL_WAIT = 0.5


class StopStage(str, enum.Enum):
    """The last request sent before the domain's process exited; NONE when it was not stopped."""

    ACPI = "acpi"
    SIGTERM = "sigterm"
    SIGKILL = "sigkill"
    NONE = "none"

    def __str__(self) -> str:
        return self.value


class StopPolicy(ConfigModel):
    """How to stop domains. Defaults follow Nova (ACPI re-pressed every 10 s for 60 s) and libvirt
    (SIGTERM, 10 s, SIGKILL, up to 30 s). Times are seconds; ``acpi_timeout=0`` skips ACPI."""

    graceful: bool = False
    """Never send SIGKILL: a domain that outlives SIGTERM is reported not stopped
    (:class:`~aiovirt.DestroyTimeoutError` in its result)."""
    acpi_timeout: float = Field(60.0, ge=0)
    repress_interval: float | None = Field(10.0, gt=0)
    """Press again this often during the ACPI stage; None presses once (for guests that cancel a
    double press)."""
    term_timeout: float = Field(10.0, ge=0)
    kill_timeout: float = Field(30.0, ge=0)
    deadline: float | None = Field(None, gt=0)
    """Overall seconds for the whole call. When the stages' timeouts add up to more, each is scaled
    down by the same factor, so the ACPI stage leaves the later stages their share."""
    paused: Literal["resume", "signal", "report"] = "resume"
    """A paused domain cannot take a button press: ``resume`` it and press, skip to the ``signal``
    stages, or ``report`` it not stopped (:class:`~aiovirt.InvalidStateError`) and leave it alone."""


@dataclass(frozen=True)
class StopResult:
    """What happened to one domain. ``stopped`` is true only when its process exit was observed."""

    name: str
    stopped: bool
    stage: StopStage  # the last request sent before the exit; NONE when not stopped
    reason: str | None  # QEMU's shutdown reason ("guest-shutdown", "host-signal"...), if there was one
    elapsed: float  # seconds from the call to the exit (or to giving up)
    error: AiovirtError | None = None
    by_other: bool = False
    """True when the action that ended it was not this call's (another task destroyed it): then
    ``stage`` is that action (SIGTERM or SIGKILL), not the stage this call had reached."""


async def stop_domain(
    dom: Domain, policy: StopPolicy, limiter: anyio.CapacityLimiter, started_at: float
) -> StopResult:
    """Run the stages for one domain. Never raises for the domain's own failures: they are in the result."""
    deadline_at = math.inf if policy.deadline is None else started_at + policy.deadline
    stage = StopStage.NONE  # the last request this call sent
    stopped = False

    def result(error: AiovirtError | None = None) -> StopResult:
        if not stopped:
            return StopResult(dom.name, False, StopStage.NONE, None, anyio.current_time() - started_at, error)
        ended_by, by_other = stage, False
        if (
            dom.reason is StateReason.DESTROYED
            and stage is not StopStage.SIGTERM
            and stage is not StopStage.SIGKILL
        ):
            # Someone else's destroy ended it: QEMU reports a SIGTERM as its own shutdown
            # ("host-signal"); a SIGKILL leaves no such word.
            by_other = True
            ended_by = StopStage.SIGTERM if dom.shutdown_reason == "host-signal" else StopStage.SIGKILL
        return StopResult(
            dom.name,
            True,
            ended_by,
            dom.shutdown_reason,
            anyio.current_time() - started_at,
            None,
            by_other=by_other,
        )

    if not dom.active:
        return result(InvalidStateError(dom.name, "stop", dom.state, dom.reason))

    async def wait_exit(timeout: float) -> bool:
        with anyio.move_on_after(max(0.0, timeout)):
            await dom.wait_for_state(DomainState.SHUTOFF)
            return True
        return False

    try:
        acpi = policy.acpi_timeout > 0
        if dom.state == DomainState.PAUSED and dom.reason is StateReason.STARTING_UP:
            acpi = False  # still starting: its guest has not run, a press would wait for it
        elif dom.state == DomainState.PAUSED:
            if policy.paused == "report":
                return result(InvalidStateError(dom.name, "stop", dom.state, dom.reason))
            if policy.paused == "signal" or not acpi:
                acpi = False
            else:
                with contextlib.suppress(InvalidStateError):  # resumed or stopped by someone else
                    await _request(dom.resume, limiter, deadline_at)
                if not dom.active:
                    stopped = True
                    return result()
                # Still paused: it could not be resumed (its monitor did not answer): signals only.
                acpi = dom.state != DomainState.PAUSED

        # The stages' timeouts, scaled down together when the deadline is shorter than their sum.
        acpi_t = policy.acpi_timeout if acpi else 0.0
        term_t = policy.term_timeout
        kill_t = 0.0 if policy.graceful else policy.kill_timeout
        total = acpi_t + term_t + kill_t
        scale = 1.0 if policy.deadline is None or total <= policy.deadline else policy.deadline / total

        if acpi:
            stage = StopStage.ACPI
            end = min(anyio.current_time() + acpi_t, deadline_at - (term_t + kill_t) * scale)
            if await _press_until(dom, end, policy.repress_interval, limiter, wait_exit):
                stopped = True
                return result()

        # No checkpoint from here to the SIGTERM: the process cannot exit unseen in between.
        if not dom.active:
            stopped = True
            return result()
        now = anyio.current_time()
        term_wait = max(min(term_t, _MIN_SIGNAL_WAIT), min(term_t, deadline_at - kill_t * scale - now))
        kill_max = policy.kill_timeout
        kill_wait = max(min(kill_max, _MIN_SIGNAL_WAIT), min(kill_max, deadline_at - now - term_wait))
        stage = StopStage.SIGTERM
        sent = await dom.destroy(policy.graceful, term_wait, kill_timeout=kill_wait)
        stopped = True
        if sent == signal.SIGKILL:
            stage = StopStage.SIGKILL
        return result()
    except AiovirtError as exc:
        # DestroyTimeoutError (graceful), ProcessBusyError (survived SIGKILL), or a state that
        # forbids the next step (someone else stopped or paused it meanwhile).
        stopped = not dom.active and stage is not StopStage.NONE and isinstance(exc, InvalidStateError)
        return result(exc)


async def _request(call: Callable[[], Awaitable[None]], limiter: anyio.CapacityLimiter, end: float) -> bool:
    """Run one QMP request in a ``limit`` slot, waiting for its reply at most ``_REQUEST_HOLD`` s.

    Neither the wait for a slot nor the one for the reply goes past ``end`` (the stage's end): a
    queue behind QEMUs that do not answer never delays the next stage. True if QEMU answered; False
    if it refused, did not answer in time, or its monitor is gone (QEMU is exiting: the caller sees
    it). Raises :class:`InvalidStateError` if the domain's state forbids the request.
    """
    with anyio.CancelScope(deadline=end):
        async with limiter:
            with anyio.move_on_after(_REQUEST_HOLD):
                try:
                    await call()
                except (QMPError, ConnectionLostError):
                    return False
                return True
    return False


async def _press_until(
    dom: Domain,
    end: float,
    repress: float | None,
    limiter: anyio.CapacityLimiter,
    wait_exit: Callable[[float], Awaitable[bool]],
) -> bool:
    """Press the power button (again every ``repress`` s) until ``end``. True if the process exited.

    Returns False early when the domain cannot take a press any more (someone paused it).
    """
    while dom.active and anyio.current_time() < end:
        try:
            await _request(dom.shutdown, limiter, end)
        except InvalidStateError:
            return not dom.active
        next_press = end if repress is None else min(end, anyio.current_time() + repress)
        if await wait_exit(next_press - anyio.current_time()):
            return True
    return not dom.active


async def stop_all(
    domains: Iterable[Domain],
    policy: StopPolicy,
    limit: int,
    on_result: Callable[[StopResult], object] | None = None,
) -> list[StopResult]:
    """Stop ``domains`` concurrently; one result per domain, in the order given.

    ``on_result`` is called with each result as it completes (for progress); an exception it raises
    cancels the remaining stops (sending nothing further) and propagates, unwrapped. Cancelling the
    call sends no further requests; exits are still observed and reaped by each domain's supervisor.
    """
    if limit < 1:
        raise ConfigError(f"limit must be at least 1, not {limit}", [("limit", "must be at least 1")])
    doms = list(domains)
    limiter = anyio.CapacityLimiter(limit)
    started_at = anyio.current_time()
    results: list[StopResult | None] = [None] * len(doms)
    callback_error: list[Exception] = []

    async def one(i: int, dom: Domain) -> None:
        res = await stop_domain(dom, policy, limiter, started_at)
        results[i] = res
        if on_result is not None and not callback_error:
            try:
                on_result(res)
            except Exception as exc:
                callback_error.append(exc)
                tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        for i, dom in enumerate(doms):
            tg.start_soon(one, i, dom)
    if callback_error:
        raise callback_error[0]
    done = [r for r in results if r is not None]
    assert len(done) == len(doms)
    return done
