"""libvirt's lifecycle events -> aiovirt's happenings (the remote driver's one translation), pair by pair,
and the whole path through aiovirt's lifecycle table: what state and events the caller gets."""

from __future__ import annotations

import itertools

import pytest

from aiovirt import DomainState as S
from aiovirt import EventDetail as D
from aiovirt import EventKind as K
from aiovirt import StateReason as R
from aiovirt._lifecycle import TABLE, Happening, Lifecycle, Operation
from aiovirt.drivers.remote._happenings import (
    RunState,
    state_from_libvirt,
    stopped_detail_from_reason,
    translate,
)

H = Happening
RUN, PAUSED, DOWN, OFF = RunState.RUNNING, RunState.PAUSED, RunState.SHUTDOWN, RunState.SHUTOFF
# virDomainEventType
STARTED, SUSPENDED, RESUMED, STOPPED, SHUTDOWN, PMSUSPENDED, CRASHED = 2, 3, 4, 5, 6, 7, 8
DEFINED, UNDEFINED = 0, 1

CASES = [
    # (event, detail, state before, destroying) -> (state after, happenings)
    ((SUSPENDED, 0, RUN, False), (PAUSED, [(H.PAUSED, None)])),
    ((SUSPENDED, 2, RUN, False), (PAUSED, [(H.PAUSED, None)])),  # I/O error: paused all the same
    ((SUSPENDED, 0, DOWN, False), (DOWN, [(H.PAUSED, None)])),  # QEMU stops the CPUs as it shuts down
    ((RESUMED, 0, PAUSED, False), (RUN, [(H.RESUMED, None)])),
    ((RESUMED, 0, RUN, False), (RUN, [(H.RESUMED, None)])),  # the start's own resume
    ((SHUTDOWN, 0, RUN, False), (DOWN, [(H.SHUTDOWN_UNKNOWN, None)])),
    ((SHUTDOWN, 1, RUN, False), (DOWN, [(H.SHUTDOWN_GUEST, "guest-shutdown")])),
    ((SHUTDOWN, 2, PAUSED, False), (DOWN, [(H.SHUTDOWN_HOST, "host-signal")])),
    ((SHUTDOWN, 9, RUN, False), (DOWN, [(H.SHUTDOWN_UNKNOWN, None)])),  # a detail from a newer libvirt
    ((STOPPED, 0, DOWN, False), (OFF, [(H.EXITED, None)])),
    ((STOPPED, 0, RUN, False), (OFF, [(H.SHUTDOWN_UNKNOWN, None), (H.EXITED, None)])),  # no SHUTDOWN first
    ((STOPPED, 1, RUN, True), (OFF, [(H.EXITED, None)])),  # our destroy
    ((STOPPED, 1, RUN, False), (OFF, [(H.SHUTDOWN_HOST, None), (H.EXITED, None)])),  # someone else's
    ((STOPPED, 1, DOWN, False), (OFF, [(H.EXITED, None)])),
    ((STOPPED, 2, RUN, False), (OFF, [(H.EXITED, None)])),  # crashed
    ((STOPPED, 5, PAUSED, False), (OFF, [(H.EXITED, None)])),  # failed
    ((STOPPED, 4, RUN, False), (OFF, [(H.SHUTDOWN_HOST, None), (H.EXITED, None)])),  # saved
    ((STOPPED, 0, RUN, True), (OFF, [(H.EXITED, None)])),
    ((STARTED, 0, RUN, False), (RUN, [])),
    ((DEFINED, 1, RUN, False), (RUN, [])),
    ((UNDEFINED, 0, PAUSED, False), (PAUSED, [])),
    ((PMSUSPENDED, 0, RUN, False), (RUN, [])),
    ((CRASHED, 0, RUN, False), (RUN, [])),
    ((SUSPENDED, 0, OFF, False), (OFF, [])),  # nothing happens to a run that has ended
    ((STOPPED, 0, OFF, False), (OFF, [])),
]


@pytest.mark.parametrize(("given", "expected"), CASES, ids=[str(c[0]) for c in CASES])
def test_translate(given: tuple[int, int, RunState, bool], expected: tuple[RunState, list[object]]) -> None:
    event, detail, state, destroying = given
    after, reports = translate(event, detail, state, destroying=destroying)
    assert (after, list(reports)) == expected


def test_every_translation_is_a_possible_pair_of_the_lifecycle() -> None:
    """Whatever libvirt sends, in whatever order, the domain's lifecycle never meets an impossible pair."""
    phases_for = {  # the lifecycle phases a run in this libvirt state can be in
        RUN: ["running", "starting"],
        PAUSED: ["paused", "starting"],
        DOWN: ["shutdown", "starting"],
    }
    for event, detail in itertools.product(range(10), range(8)):
        for state, phases in phases_for.items():
            for phase_name, destroying in itertools.product(phases, (False, True)):
                life = Lifecycle("x")
                life.request(Operation.START)
                if phase_name != "starting":
                    life.happen(H.BOOTED)
                    if phase_name == "paused":
                        life.happen(H.PAUSED)
                    elif phase_name == "shutdown":
                        life.happen(H.SHUTDOWN_GUEST)
                if destroying:
                    life.request(Operation.DESTROY)
                _, reports = translate(event, detail, state, destroying=destroying)
                for happening, _ in reports:
                    assert (life.phase, happening) in TABLE
                    life.happen(happening)


def _run(events: list[tuple[int, int]], *, destroying: bool = False) -> tuple[S, R, list[tuple[K, D]]]:
    """A booted domain fed ``events`` through translate and the lifecycle: its end state and events."""
    life = Lifecycle("x")
    life.request(Operation.START)
    life.happen(H.BOOTED)
    if destroying:
        life.request(Operation.DESTROY)
    state, emitted = RUN, []
    for event, detail in events:
        state, reports = translate(event, detail, state, destroying=destroying)
        for happening, _ in reports:
            transition = life.happen(happening)
            if transition is not None and transition.event is not None:
                emitted.append(transition.event)
    return life.state, life.reason, emitted


def test_what_the_caller_gets() -> None:
    # libvirt's QEMU driver, a destroy of ours: SHUTDOWN/host, STOPPED/destroyed (libvirt 9.0's order).
    assert _run([(SHUTDOWN, 2), (STOPPED, 1)], destroying=True) == (
        S.SHUTOFF,
        R.DESTROYED,
        [(K.SHUTDOWN, D.HOST), (K.STOPPED, D.DESTROYED)],
    )
    # libvirt's test driver: a destroy sends STOPPED/destroyed alone.
    assert _run([(STOPPED, 1)], destroying=True) == (S.SHUTOFF, R.DESTROYED, [(K.STOPPED, D.DESTROYED)])
    # The test driver's shutdown: STOPPED/shutdown at once, no SHUTDOWN event: a shutdown, not a crash.
    assert _run([(STOPPED, 0)]) == (
        S.SHUTOFF,
        R.SHUTDOWN,
        [(K.SHUTDOWN, D.FINISHED), (K.STOPPED, D.SHUTDOWN)],
    )
    # Another client destroyed it: the host ended it.
    assert _run([(STOPPED, 1)]) == (S.SHUTOFF, R.SHUTDOWN, [(K.SHUTDOWN, D.HOST), (K.STOPPED, D.SHUTDOWN)])
    assert _run([(STOPPED, 2)]) == (S.SHUTOFF, R.CRASHED, [(K.STOPPED, D.CRASHED)])
    assert _run([(SUSPENDED, 0), (RESUMED, 0)])[:2] == (S.RUNNING, R.UNPAUSED)


def test_states_and_missed_stops() -> None:
    assert [state_from_libvirt(n) for n in range(9)] == [RUN, RUN, RUN, PAUSED, DOWN, OFF, RUN, RUN, RUN]
    # virDomainShutoffReason -> the STOPPED detail that would have said it
    assert [stopped_detail_from_reason(n) for n in range(9)] == [1, 0, 1, 2, 3, 4, 5, 6, 1]
