"""Birthday punching over the rounds of the round plan: each birthday round gets fresh
guesses and adds to the session's one hard_nat report, whose odds cover every round."""

from __future__ import annotations

import logging

import pytest

from holepunch_mig.report import Report
from holepunch_mig.session.rounds import DirectAttempt
from holepunch_mig.wire.birthday import BirthdayPlan, birthday_success


def _attempt(role: str) -> DirectAttempt:
    plan = BirthdayPlan(
        role="easy" if role == "easy" else "hard",
        targets=(("198.51.100.10", 0),) if role == "easy" else (("198.51.100.20", 40000),),
        count=1024 if role == "easy" else 256,
        peer_count=256 if role == "easy" else 1024,
        rate=500,
        seconds=4.0,
        start_delay=0.6 if role == "easy" else 0.0,
        expected_success=birthday_success(256, 1024),
    )
    log = logging.LoggerAdapter(logging.getLogger("test"), {})
    return DirectAttempt(
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        [],
        Report(session="s", role="source"),
        log,
        birthday=plan,
    )


def test_two_rounds_share_one_report_and_draw_fresh_guesses() -> None:
    attempt = _attempt("easy")
    first = attempt._birthday_dial(1)
    assert first is not None
    first.report.spent_syns += 1024
    first.report.seconds += 2.0
    second = attempt._birthday_dial(2)
    assert second is not None and second.report is first.report
    rep = attempt.report.hard_nat
    assert rep is not None and rep.rounds == [1, 2]
    assert rep.spent_syns == 1024  # what round 1 spent is kept; round 2 adds to it
    one = birthday_success(256, 1024)
    assert rep.round_success == pytest.approx(one, abs=1e-4)
    assert 1 - rep.expected_success == pytest.approx((1 - one) ** 2, rel=1e-2)
    assert {p for _h, p in first.remotes} != {p for _h, p in second.remotes}
    assert len(second.remotes) == 1024 and second.start_delay == 0.6


def test_hard_side_repeats_the_easy_endpoint_every_round() -> None:
    attempt = _attempt("hard")
    dials = [attempt._birthday_dial(r) for r in (1, 2)]
    assert all(d is not None and d.remotes == [("198.51.100.20", 40000)] * 256 for d in dials)
    rep = attempt.report.hard_nat
    assert rep is not None and rep.role == "hard" and rep.rounds == [1, 2]
    assert "probes a round, in rounds 1, 2: expected success" in attempt.report.summary()
