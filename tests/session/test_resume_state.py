"""The resumable transfer's state machine: every legal transition, every illegal one
refused with IllegalTransition, and the bookkeeping each transition does."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from holepunch_mig.errors import IllegalTransition, ProtocolError
from holepunch_mig.report import Interruption
from holepunch_mig.session.resume_state import TRANSITIONS, ResumeEvent, ResumeMachine, ResumeState

S, E = ResumeState, ResumeEvent

#: the transitions the module documents, written out here independently of TRANSITIONS
LEGAL = {
    (S.TRANSFERRING, E.HALT): S.HALTED,
    (S.HALTED, E.HALT): S.HALTED,
    (S.TRANSFERRING, E.FINISH): S.DONE,
    (S.HALTED, E.FINISH): S.DONE,
    (S.TRANSFERRING, E.LOSE): S.LOST,
    (S.HALTED, E.LOSE): S.LOST,
    (S.LOST, E.ATTEMPT): S.REPUNCHING,
    (S.LOST, E.GIVE_UP): S.FAILED,
    (S.REPUNCHING, E.NO_PATH): S.LOST,
    (S.REPUNCHING, E.RESUMED): S.TRANSFERRING,
    **{(state, E.FAIL): S.FAILED for state in (S.TRANSFERRING, S.HALTED, S.LOST, S.REPUNCHING)},
}

#: how to drive a fresh machine into each state
ROUTE: dict[ResumeState, list[ResumeEvent]] = {
    S.TRANSFERRING: [],
    S.HALTED: [E.HALT],
    S.LOST: [E.HALT, E.LOSE],
    S.REPUNCHING: [E.HALT, E.LOSE, E.ATTEMPT],
    S.DONE: [E.FINISH],
    S.FAILED: [E.FAIL],
}


def _fire(machine: ResumeMachine, event: ResumeEvent) -> object:
    actions: dict[ResumeEvent, Callable[[], object]] = {
        E.HALT: lambda: machine.halt("reset by peer", "local"),
        E.FINISH: machine.finish,
        E.LOSE: lambda: machine.lose(at=1.0, acked=10, sent=20),
        E.ATTEMPT: machine.attempt,
        E.GIVE_UP: machine.give_up,
        E.NO_PATH: lambda: machine.no_path("re-punch found no path"),
        E.RESUMED: lambda: machine.resumed(kept=10, seconds=0.5, link="a <-> b"),
        E.FAIL: machine.fail,
    }
    return actions[event]()


def _machine_in(state: ResumeState, attempts: int = 3) -> ResumeMachine:
    machine = ResumeMachine(attempts, [])
    for event in ROUTE[state]:
        _fire(machine, event)
    assert machine.state is state
    return machine


def test_the_table_is_the_documented_one() -> None:
    assert TRANSITIONS == LEGAL


def test_done_and_failed_are_final() -> None:
    assert not [key for key in TRANSITIONS if key[0] in (S.DONE, S.FAILED)]


@pytest.mark.parametrize(("state", "event"), sorted(LEGAL, key=str))
def test_legal_transition(state: ResumeState, event: ResumeEvent) -> None:
    machine = _machine_in(state)
    _fire(machine, event)
    assert machine.state is LEGAL[(state, event)]


ILLEGAL = [key for key in itertools.product(ResumeState, ResumeEvent) if key not in LEGAL]


@pytest.mark.parametrize(("state", "event"), ILLEGAL, ids=str)
def test_illegal_transition_is_refused(state: ResumeState, event: ResumeEvent) -> None:
    machine = _machine_in(state)
    with pytest.raises(IllegalTransition, match=f"{event.value} is not allowed") as info:
        _fire(machine, event)
    assert info.value.state is state
    assert info.value.event is event
    assert machine.state is state


def test_first_halt_reason_wins() -> None:
    machine = ResumeMachine(3, [])
    assert machine.halt("peer: link reset", "peer") is True
    assert machine.halt("OSError: broken pipe", "local") is False
    cut = machine.lose(at=2.5, acked=100, sent=200)
    assert (cut.seen, cut.detected_by) == ("peer: link reset", "peer")
    assert (cut.epoch, cut.acked, cut.sent, cut.at, cut.outcome) == (0, 100, 200, 2.5, "pending")


def test_lose_appends_to_the_reports_interruptions_and_truncates_seen() -> None:
    interruptions: list[Interruption] = []
    machine = ResumeMachine(3, interruptions)
    machine.halt("x" * 600, "local")
    cut = machine.lose(at=0.0, acked=0, sent=0)
    assert interruptions == [cut]
    assert len(cut.seen) == 500
    assert machine.last == "x" * 600


def test_a_resume_round_trip_counts_attempts_and_epochs() -> None:
    machine = ResumeMachine(3, [])
    machine.halt("reset", "local")
    cut = machine.lose(at=0.0, acked=0, sent=5)
    assert machine.attempt() == 1
    machine.no_path("re-punch 1 found no path: 3 timed out")
    assert machine.last == "re-punch 1 found no path: 3 timed out"
    assert machine.seen == "reset"  # the loss, still, for the next resume-offer
    assert machine.attempt() == 2
    machine.resumed(kept=5, seconds=0.25, link="10.0.0.1:1 <-> 10.0.0.2:2")
    assert (machine.state, machine.epoch, machine.attempts) == (S.TRANSFERRING, 2, 2)
    assert (cut.attempts, cut.resumed_from, cut.resume_seconds) == (2, 5, 0.25)
    assert (cut.link, cut.outcome) == ("10.0.0.1:1 <-> 10.0.0.2:2", "resumed")
    assert (machine.seen, machine.detected_by) == ("", "local")  # the new link runs
    machine.finish()
    assert machine.state is S.DONE


def test_the_destination_takes_the_offered_epoch_and_refuses_an_old_one() -> None:
    machine = ResumeMachine(3, [], epoch=2)
    machine.halt("peer: lost", "peer")
    cut = machine.lose(at=0.0, acked=0, sent=0)
    assert machine.attempt(5) == 5
    machine.no_path("none")
    with pytest.raises(ProtocolError, match="resume-offer for link 5, this side is at 5"):
        machine.attempt(5)
    assert cut.attempts == 2  # the refused offer was an attempt too


def test_attempts_run_out_and_give_up_names_them() -> None:
    interruptions: list[Interruption] = []
    machine = ResumeMachine(1, interruptions)
    machine.halt("reset", "local")
    cut = machine.lose(at=0.0, acked=0, sent=0)
    assert not machine.exhausted
    machine.attempt()
    machine.no_path("re-punch 1 found no path: refused")
    assert machine.exhausted
    reason = machine.give_up()
    assert reason == (
        "link lost 1 time; resume attempts exhausted (1 of resume_attempts=1 used); "
        "last: re-punch 1 found no path: refused"
    )
    assert (machine.state, cut.outcome) == (S.FAILED, "failed")


def test_no_attempts_at_all_is_exhausted_at_once() -> None:
    machine = ResumeMachine(0, [])
    machine.halt("reset", "local")
    machine.lose(at=0.0, acked=0, sent=0)
    assert machine.exhausted
    assert "(0 of resume_attempts=0 used)" in machine.give_up()


def test_fail_marks_the_pending_interruption() -> None:
    machine = _machine_in(S.REPUNCHING)
    machine.fail()
    assert machine.cut is not None
    assert machine.cut.outcome == "failed"
    assert machine.state is S.FAILED
