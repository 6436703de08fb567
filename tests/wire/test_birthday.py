"""Birthday punching plan (sans-IO): NAT classes, who is hard/easy, budgets, the bound."""

from __future__ import annotations

import random

import pytest

from holepunch_mig.wire.birthday import (
    LIMIT_MAPPING,
    LIMIT_PROBES,
    LIMIT_SOCKETS,
    PORT_HIGH,
    PORT_LOW,
    ROLES,
    ROUND_PLAN,
    BirthdayBudget,
    BirthdayPlan,
    NatClass,
    announce,
    announced_class,
    birthday_in_round,
    birthday_rounds,
    birthday_success,
    guess_ports,
    nat_class,
    plan,
    success_over_rounds,
)
from holepunch_mig.wire.candidates import make_candidate
from holepunch_mig.wire.stun import MappingProbe, classify_mapping

S1, S2 = ("198.51.100.3", 3478), ("198.51.100.4", 3478)


def _cls(port: int, mapped: list[tuple[str, int]], own: list[str]) -> NatClass:
    servers = [S1, S2][: len(mapped)]
    verdict = classify_mapping(MappingProbe(port, tuple(zip(servers, mapped, strict=True))))
    return nat_class(verdict, mapped, own, port)


def test_nat_class_from_stun_answers() -> None:
    own = ["10.1.0.2"]
    # fully-random NAT: each server saw another port
    assert _cls(4000, [("198.51.100.10", 40001), ("198.51.100.10", 51234)], own) == "dependent"
    # port-preserving NAT seen by two servers
    assert _cls(4000, [("198.51.100.10", 4000), ("198.51.100.10", 4000)], own) == "independent"
    # one server, port kept
    assert _cls(4000, [("198.51.100.10", 4000)], own) == "independent"
    # one server, port rewritten: cannot tell
    assert _cls(4000, [("198.51.100.10", 4001)], own) == "unknown"
    # mapped address is our own: no NAT
    assert _cls(4000, [("10.1.0.2", 4000), ("10.1.0.2", 4000)], own) == "none"
    assert _cls(4000, [], own) == "unknown"


def test_announce_round_trip() -> None:
    for nat in ("unknown", "none", "independent", "dependent"):
        limits = announce(nat, BirthdayBudget())
        assert announced_class(limits) == nat
    assert LIMIT_SOCKETS not in announce("dependent", None)
    assert announced_class({}) == "unknown"
    assert announced_class({LIMIT_MAPPING: 99}) == "unknown"


def _lines(kind: str, endpoints: list[tuple[str, int]]) -> list[str]:
    return [make_candidate(h, p, kind).to_line() for h, p in endpoints]  # type: ignore[arg-type]


HARD_LINES = _lines("host", [("10.1.0.2", 4000)]) + _lines(
    "srflx", [("198.51.100.10", 40001), ("198.51.100.10", 51234)]
)
EASY_LINES = _lines("host", [("10.2.0.2", 5000)]) + _lines("srflx", [("198.51.100.20", 5000)])


def _both(
    hard_budget: BirthdayBudget | None, easy_budget: BirthdayBudget | None
) -> tuple[BirthdayPlan | None, BirthdayPlan | None]:
    hard_limits = announce("dependent", hard_budget)
    easy_limits = announce("independent", easy_budget)
    hard, _ = plan(
        local_class="dependent",
        local_limits=hard_limits,
        peer_limits=easy_limits,
        peer_candidates=EASY_LINES,
        peer_port=5000,
        peer_host="198.51.100.20",
        local_budget=hard_budget,
    )
    easy, _ = plan(
        local_class="independent",
        local_limits=easy_limits,
        peer_limits=hard_limits,
        peer_candidates=HARD_LINES,
        peer_port=4000,
        peer_host="198.51.100.10",
        local_budget=easy_budget,
    )
    return hard, easy


def test_both_sides_agree_on_roles_and_budget() -> None:
    hard_budget = BirthdayBudget(sockets=128, probes=999, rate=300)
    easy_budget = BirthdayBudget(sockets=7, probes=2048, rate=600)
    hard, easy = _both(hard_budget, easy_budget)
    assert hard is not None and easy is not None
    assert hard.role == "hard" and easy.role == "easy"
    # the hard side's sockets and the easy side's probes count, on both sides
    for p in (hard, easy):
        assert p.sockets == 128 and p.probes == 2048
        assert p.expected_success == birthday_success(128, 2048)
    # the hard side aims at the easy side's STUN mapping; the easy side at the hard
    # side's public address (any port)
    assert hard.targets == (("198.51.100.20", 5000),)
    assert easy.targets == (("198.51.100.10", 0),)
    # the easy side waits until the hard side's 128 sockets (at 300/s) are open
    assert easy.start_delay >= 128 / 300
    assert hard.start_delay == 0


@pytest.mark.parametrize("off", ["hard", "easy"])
def test_either_side_can_turn_it_off(off: str) -> None:
    budget = BirthdayBudget()
    hard, easy = _both(None if off == "hard" else budget, None if off == "easy" else budget)
    assert hard is None and easy is None


def test_roles_table() -> None:
    classes: list[NatClass] = ["unknown", "none", "independent", "dependent"]
    for a in classes:
        for b in classes:
            mine, theirs = ROLES.get((a, b)), ROLES.get((b, a))
            # exactly one hard and one easy side, or neither
            assert (mine is None) == (theirs is None)
            if mine is not None:
                assert {mine, theirs} == {"hard", "easy"}
                assert "dependent" in (a, b) and a != b
    both, why = plan(
        local_class="dependent",
        local_limits=announce("dependent", BirthdayBudget()),
        peer_limits=announce("dependent", BirthdayBudget()),
        peer_candidates=HARD_LINES,
        peer_port=4000,
        peer_host=None,
        local_budget=BirthdayBudget(),
    )
    assert both is None and "both sides" in why


def test_easy_side_without_nat_is_aimed_at_its_observed_address() -> None:
    budget = BirthdayBudget()
    hard, _ = plan(
        local_class="dependent",
        local_limits=announce("dependent", budget),
        peer_limits=announce("none", budget),
        peer_candidates=_lines("host", [("198.51.100.20", 5000)]),
        peer_port=5000,
        peer_host="198.51.100.20",
        local_budget=budget,
    )
    assert hard is not None and hard.targets == (("198.51.100.20", 5000),)


def test_birthday_bound_matches_a_simulation() -> None:
    """The closed form against the thing it describes: random mappings, random guesses."""
    rng = random.Random(1234)
    space, sockets, probes, trials = 2000, 20, 60, 4000
    hits = 0
    for _ in range(trials):
        mapped = set(rng.sample(range(space), sockets))
        guesses = rng.sample(range(space), probes)
        hits += any(g in mapped for g in guesses)
    expected = birthday_success(sockets, probes, space)
    assert abs(hits / trials - expected) < 0.03
    # the default budget over Linux's NAT port range: what docs/traversal.md promises
    default = BirthdayBudget()
    assert 0.97 < birthday_success(default.sockets, default.probes) < 0.99
    assert birthday_success(0, 10) == 0.0
    assert birthday_success(10, space, space) == 1.0


def test_guess_ports() -> None:
    rng = random.Random(7)
    ports = guess_ports(rng, 1024, exclude=[PORT_LOW, 40000])
    assert len(ports) == len(set(ports)) == 1024
    assert all(PORT_LOW <= p <= PORT_HIGH for p in ports)
    assert PORT_LOW not in ports and 40000 not in ports
    assert sorted(guess_ports(rng, 10, low=100, high=104)) == [100, 101, 102, 103, 104]
    with pytest.raises(ValueError, match="bad port range"):
        guess_ports(rng, 1, low=10, high=5)


def test_budget_check() -> None:
    BirthdayBudget().check()
    with pytest.raises(ValueError, match="birthday sockets"):
        BirthdayBudget(sockets=0).check()
    with pytest.raises(ValueError, match="birthday rate"):
        BirthdayBudget(rate=0).check()
    with pytest.raises(ValueError, match="birthday probes"):
        BirthdayBudget(probes=100000).check()


@pytest.mark.parametrize(
    ("key", "value"), [(LIMIT_PROBES, 2**62), (LIMIT_SOCKETS, 100_000), ("birthday_rate", 0)]
)
def test_a_peer_budget_out_of_range_turns_it_off(key: str, value: int) -> None:
    """A peer announcing 2**62 probes must not make this side compute (or spend) them."""
    budget = BirthdayBudget()
    peer = announce("independent", budget) | {key: value}
    hard, why = plan(
        local_class="dependent",
        local_limits=announce("dependent", budget),
        peer_limits=peer,
        peer_candidates=EASY_LINES,
        peer_port=5000,
        peer_host=None,
        local_budget=budget,
    )
    assert hard is None and f"the peer announced {key} {value}" in why


def test_round_plan_runs_birthday_in_the_first_two_rounds() -> None:
    assert [r for r, on in sorted(ROUND_PLAN.items()) if on] == [1, 2]
    assert [birthday_in_round(r) for r in (0, 1, 2, 3, 4)] == [False, True, True, False, False]
    assert birthday_rounds(1) == (1,) and birthday_rounds(3) == (1, 2)
    assert birthday_rounds(0) == ()


def test_two_rounds_square_the_miss_chance() -> None:
    one = birthday_success(256, 1024)
    assert 0.98 < one < 0.99  # ~1.7 % miss a round
    two = success_over_rounds(one, len(birthday_rounds(3)))
    assert (1 - two) == pytest.approx((1 - one) ** 2)
    assert 0.0002 < 1 - two < 0.0004  # ~0.03 %
    assert success_over_rounds(one, 1) == pytest.approx(one)
    assert success_over_rounds(one, 0) == 0.0
