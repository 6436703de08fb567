"""The path decision table against the rules of docs/tunnel.md ("Policy"), every
combination of source policy, destination policy and direct outcome.

Expected values are written from the documented rules, row by row of the docs' table,
not read back from the table under test."""

from __future__ import annotations

import itertools

import pytest

from holepunch_mig.session.policy import OUTCOMES, POLICIES, TABLE, Decision, decide

ALL = list(itertools.product(POLICIES, POLICIES, OUTCOMES))


def test_the_table_has_exactly_every_combination() -> None:
    assert len(ALL) == 27
    assert set(TABLE) == set(ALL)


def test_policies_and_outcomes_are_the_documented_ones() -> None:
    assert set(POLICIES) == {"direct", "auto", "tunnel"}
    assert set(OUTCOMES) == {"untried", "succeeded", "failed"}


def _expected(source: str, destination: str, outcome: str) -> tuple[str, bool, bool, str]:
    """(action, refused, fell_back, reason) as docs/tunnel.md states them."""
    if source == "tunnel":
        # "tunnel (no punching, no STUN)" unless the destination's "direct" forbids it,
        # whatever the direct path would have done
        if destination == "direct":
            return (
                "fail",
                True,
                False,
                "the source asked for the tunnel only (policy 'tunnel') but the "
                "destination's policy 'direct' forbids the tunnel: no path allowed",
            )
        return "tunnel", False, False, "policy 'tunnel': the tunnel was asked for"
    # direct and auto punch first
    if outcome == "untried":
        return "punch", False, False, ""
    if outcome == "succeeded":  # "direct works": direct, for any destination policy
        return "direct", False, False, "direct link authenticated and nominated"
    if source == "direct":  # NoDirectPath, exit 3
        return "fail", False, False, "CAUSE"
    if destination == "direct":  # TunnelRefused (a NoDirectPath)
        return (
            "fail",
            True,
            False,
            "CAUSE; the source allows the tunnel (policy 'auto') but the destination's "
            "policy 'direct' forbids it",
        )
    # tunnel, fell_back; path_reason starts with "fell back to the tunnel (policy auto)"
    return "tunnel", False, True, "fell back to the tunnel (policy auto) because CAUSE"


@pytest.mark.parametrize(("source", "destination", "outcome"), ALL)
def test_every_combination_follows_the_documented_rules(
    source: str, destination: str, outcome: str
) -> None:
    decision = decide(source, destination, outcome)  # type: ignore[arg-type]
    action, refused, fell_back, reason = _expected(source, destination, outcome)
    assert decision.action == action
    assert decision.refused is refused
    assert decision.fell_back is fell_back
    assert decision.reason_for("CAUSE") == reason


@pytest.mark.parametrize("destination", ["auto", "tunnel"])
def test_fallback_reason_names_why_direct_failed(destination: str) -> None:
    decision = decide("auto", destination, "failed")  # type: ignore[arg-type]
    reason = decision.reason_for("no direct link after 3 rounds: 3 timed out")
    assert reason.startswith("fell back to the tunnel (policy auto) because ")
    assert reason.endswith("no direct link after 3 rounds: 3 timed out")


def test_only_a_failed_direct_path_under_auto_falls_back() -> None:
    fell_back = {key for key, decision in TABLE.items() if decision.fell_back}
    assert fell_back == {("auto", "auto", "failed"), ("auto", "tunnel", "failed")}


def test_a_destination_with_policy_direct_never_gets_the_tunnel() -> None:
    for (source, destination, outcome), decision in TABLE.items():
        if destination == "direct":
            assert decision.action != "tunnel", (source, outcome)


def test_a_source_with_policy_tunnel_never_punches() -> None:
    for (source, _destination, _outcome), decision in TABLE.items():
        if source == "tunnel":
            assert decision.action in ("tunnel", "fail")


def test_punching_is_decided_before_the_outcome_only() -> None:
    punch = {key for key, decision in TABLE.items() if decision.action == "punch"}
    assert punch == {
        (s, d, "untried") for s in ("direct", "auto") for d in ("direct", "auto", "tunnel")
    }


def test_a_value_outside_the_table_is_refused() -> None:
    with pytest.raises(KeyError):
        decide("sometimes", "direct", "failed")  # type: ignore[arg-type]


def test_decisions_are_immutable() -> None:
    decision = decide("direct", "direct", "succeeded")
    with pytest.raises(AttributeError):
        decision.action = "tunnel"  # type: ignore[misc]
    assert isinstance(decision, Decision)
