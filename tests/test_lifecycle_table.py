"""The lifecycle table, exhaustively: every (phase, happening) pair and every (phase, operation) pair."""

from __future__ import annotations

import itertools

import pytest

import aiovirt
from aiovirt import DomainState as S
from aiovirt import EventDetail as D
from aiovirt import EventKind as K
from aiovirt import StateReason as R
from aiovirt._lifecycle import ALLOWED, TABLE, Happening, Lifecycle, Operation, Phase, Transition

PAIRS = list(itertools.product(Phase, Happening))


def _in(phase: Phase) -> Lifecycle:
    """A lifecycle in ``phase``, reached the way a domain reaches it."""
    lc = Lifecycle("vm")
    if phase is Phase.SHUTOFF:
        return lc
    lc.request(Operation.START)
    if phase is Phase.STARTING:
        return lc
    lc.happen(Happening.BOOTED)
    if phase is Phase.PAUSED:
        lc.happen(Happening.PAUSED)
    elif phase is Phase.SHUTDOWN:
        lc.happen(Happening.SHUTDOWN_GUEST)
    assert lc.phase is phase
    return lc


@pytest.mark.parametrize(("phase", "happening"), PAIRS, ids=[f"{p.value}-{h.value}" for p, h in PAIRS])
def test_every_pair(phase: Phase, happening: Happening) -> None:
    lc = _in(phase)
    before = (lc.phase, lc.reason)
    if (phase, happening) not in TABLE:
        with pytest.raises(aiovirt.LocalProtocolError, match=happening.value):
            lc.happen(happening)
        assert (lc.phase, lc.reason) == before  # an impossible report changes nothing
        return
    expected = TABLE[(phase, happening)]
    got = lc.happen(happening)
    if expected is None:
        assert got is None and (lc.phase, lc.reason) == before
        return
    assert got is not None and lc.phase is got.phase and lc.reason is got.reason
    if happening is Happening.ABORTED:
        assert (got.state, got.reason, got.event) == (S.SHUTOFF, R.UNKNOWN, None)  # as it was before
    else:
        assert got == expected


EXPECTED = {
    # the events libvirt users know, pair by pair
    (Phase.STARTING, Happening.BOOTED): (S.RUNNING, R.BOOTED, (K.STARTED, D.BOOTED)),
    (Phase.STARTING, Happening.EXITED): (S.SHUTOFF, R.FAILED, (K.STOPPED, D.FAILED)),
    (Phase.RUNNING, Happening.PAUSED): (S.PAUSED, R.USER, (K.SUSPENDED, D.PAUSED)),
    (Phase.PAUSED, Happening.RESUMED): (S.RUNNING, R.UNPAUSED, (K.RESUMED, D.UNPAUSED)),
    (Phase.RUNNING, Happening.SHUTDOWN_GUEST): (S.SHUTDOWN, R.USER, (K.SHUTDOWN, D.GUEST)),
    (Phase.RUNNING, Happening.SHUTDOWN_HOST): (S.SHUTDOWN, R.USER, (K.SHUTDOWN, D.HOST)),
    (Phase.RUNNING, Happening.SHUTDOWN_UNKNOWN): (S.SHUTDOWN, R.USER, (K.SHUTDOWN, D.FINISHED)),
    (Phase.SHUTDOWN, Happening.EXITED): (S.SHUTOFF, R.SHUTDOWN, (K.STOPPED, D.SHUTDOWN)),
    (Phase.RUNNING, Happening.EXITED): (S.SHUTOFF, R.CRASHED, (K.STOPPED, D.CRASHED)),
    (Phase.PAUSED, Happening.EXITED): (S.SHUTOFF, R.CRASHED, (K.STOPPED, D.CRASHED)),
    (Phase.SHUTOFF, Happening.GONE): (S.SHUTOFF, R.DAEMON, (K.STOPPED, D.FAILED)),
    (Phase.SHUTOFF, Happening.ADOPTED_RUNNING): (S.RUNNING, R.UNKNOWN, None),
    (Phase.SHUTOFF, Happening.ADOPTED_BOOTED): (S.RUNNING, R.BOOTED, (K.STARTED, D.BOOTED)),
}


@pytest.mark.parametrize("pair", list(EXPECTED), ids=[f"{p.value}-{h.value}" for p, h in EXPECTED])
def test_libvirts_names(pair: tuple[Phase, Happening]) -> None:
    t = TABLE[pair]
    assert isinstance(t, Transition)
    assert (t.state, t.reason, t.event) == EXPECTED[pair]


@pytest.mark.parametrize(
    ("phase", "operation"),
    list(itertools.product(Phase, Operation)),
    ids=[f"{p.value}-{o.name}" for p, o in itertools.product(Phase, Operation)],
)
def test_every_operation_in_every_phase(phase: Phase, operation: Operation) -> None:
    lc = _in(phase)
    if phase not in ALLOWED[operation]:
        with pytest.raises(aiovirt.InvalidStateError, match=f"cannot {operation.value} domain 'vm'") as info:
            lc.request(operation)
        assert (info.value.state, info.value.reason) == (lc.state, lc.reason)
        return
    got = lc.request(operation)
    if operation is Operation.START:
        assert got is not None and (lc.state, lc.reason) == (S.PAUSED, R.STARTING_UP)
    elif operation is Operation.DESTROY:
        assert got is None and lc.destroying
    else:
        assert got is None and lc.phase is phase


@pytest.mark.parametrize("phase", [Phase.STARTING, Phase.RUNNING, Phase.PAUSED, Phase.SHUTDOWN])
def test_an_exit_after_a_destroy_is_destroyed(phase: Phase) -> None:
    lc = _in(phase)
    lc.request(Operation.DESTROY)
    t = lc.happen(Happening.EXITED)
    assert t is not None and (t.state, t.reason, t.event) == (
        S.SHUTOFF,
        R.DESTROYED,
        (K.STOPPED, D.DESTROYED),
    )
    assert not lc.destroying  # the next run starts clean


def test_a_failed_start_before_any_process_leaves_the_domain_as_it_was() -> None:
    lc = _in(Phase.RUNNING)
    lc.happen(Happening.EXITED)
    assert lc.reason is R.CRASHED
    lc.request(Operation.START)
    assert lc.happen(Happening.ABORTED) == Transition(Phase.SHUTOFF, R.CRASHED)
