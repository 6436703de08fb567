"""Birthday punching across one hard (endpoint-dependent) NAT: the plan, without I/O.

When exactly one side sits behind a NAT that gives every destination a new random port
(symmetric, endpoint-dependent mapping) and the other side's mapping is predictable
(endpoint-independent, or no NAT at all), ordinary hole punching cannot meet: the port the
hard side's SYNs leave from is unknown.  Birthday punching makes a meeting likely instead
of certain:

* the **hard** side opens ``sockets`` connections towards the easy side's one public
  endpoint, each from its own local port, so its NAT opens ``sockets`` mappings on random
  public ports;
* the **easy** side dials ``probes`` distinct guessed ports on the hard side's public
  address from its one punch port, at a rate limit.

A guess that equals one of the open mappings passes the hard NAT as reply traffic and
meets a socket in SYN_SENT: a TCP simultaneous open, authenticated by Noise as usual.
With ``n`` mappings uniformly among ``m`` ports and ``k`` distinct guesses the chance
that no guess hits is ``C(m-n, k) / C(m, k)`` (:func:`birthday_success`); 256 sockets and
1,024 probes over the 64,512 ports Linux NAT draws from give about 98 %.

Each side classifies its own NAT from its STUN answers (:func:`nat_class`) and announces
the class and its budget in the offer/answer ``limits`` (:func:`announce`); both sides
then run the same decision (:func:`plan`), so they agree on who is hard, who is easy and
what will be spent, without extra messages.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from holepunch_mig.errors import CandidateError
from holepunch_mig.wire.candidates import Candidate
from holepunch_mig.wire.stun import MappingVerdict

NatClass = Literal["unknown", "none", "independent", "dependent", "mapped"]
"""What a side's STUN answers say about its NAT: ``none`` (the mapped address is one of
its own), ``independent`` (every server saw the same mapping, or the one answer kept the
port), ``dependent`` (servers saw different mappings), ``unknown`` (no STUN, or one
answer with a rewritten port); ``mapped``: whatever its NAT does, its router forwards a
public port to the punch port (PCP / NAT-PMP), so it can be dialed directly."""

Role = Literal["hard", "easy"]
Endpoint = tuple[str, int]

#: ``limits`` keys of the offer/answer (docs/protocol.md section 1.2).
LIMIT_MAPPING = "mapping"
LIMIT_SOCKETS = "birthday_sockets"
LIMIT_PROBES = "birthday_probes"
LIMIT_RATE = "birthday_rate"

MAPPING_CODES: dict[NatClass, int] = {
    "unknown": 0,
    "none": 1,
    "independent": 2,
    "dependent": 3,
    "mapped": 4,
}
_CODE_CLASSES: dict[int, NatClass] = {v: k for k, v in MAPPING_CODES.items()}

#: The ranges a budget must lie in (:meth:`BirthdayBudget.check`; a peer's announced
#: budget outside them turns birthday punching off).
LIMIT_RANGES: dict[str, tuple[int, int]] = {
    LIMIT_SOCKETS: (1, 4096),
    LIMIT_PROBES: (1, 16384),
    LIMIT_RATE: (1, 10000),
}

#: Ports a Linux NAT picks from for sources above 1023 (nf_nat's default range).
PORT_LOW = 1024
PORT_HIGH = 65535
#: At most this many easy-side endpoints are aimed at by the hard side's sockets.
MAX_TARGETS = 4


#: The punch rounds of a session's first negotiation, and whether each carries birthday
#: punching (rounds not listed: ordinary rounds only).  Both sides read this table, so
#: nothing on the wire says it.  Each birthday round spends the whole agreed budget again
#: on fresh random mappings and guesses: the rounds miss independently, so the default
#: budget's miss chance (~1.7 % a round) falls to ~0.03 % over two.
ROUND_PLAN: dict[int, bool] = {1: True, 2: True, 3: False}


def birthday_in_round(round_no: int) -> bool:
    """Whether punch round ``round_no`` of the first negotiation runs birthday dials."""
    return ROUND_PLAN.get(round_no, False)


def birthday_rounds(rounds: int) -> tuple[int, ...]:
    """The rounds among ``1..rounds`` that run birthday dials."""
    return tuple(r for r in range(1, rounds + 1) if birthday_in_round(r))


def success_over_rounds(one_round: float, rounds: int) -> float:
    """The chance that at least one of ``rounds`` independent birthday rounds meets."""
    return 1.0 - (1.0 - one_round) ** max(0, rounds)


@dataclass(frozen=True)
class BirthdayBudget:
    """What one side may spend on birthday punching in each birthday round of a session
    (:data:`ROUND_PLAN`).

    ``sockets``: connections the side opens when it is the hard side; ``probes``: guessed
    ports it dials when it is the easy side; ``rate``: SYNs per second it starts at most
    (either role); ``seconds``: how long its probing may last (never past the round)."""

    sockets: int = 256
    probes: int = 1024
    rate: int = 500
    seconds: float = 4.0

    def check(self) -> None:
        """Raise ValueError naming the first field out of range."""
        for name, key in (
            ("sockets", LIMIT_SOCKETS),
            ("probes", LIMIT_PROBES),
            ("rate", LIMIT_RATE),
        ):
            low, high = LIMIT_RANGES[key]
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(f"birthday {name} must be in {low}..{high}, not {value}")
        if not 0.1 <= self.seconds <= 60:
            raise ValueError(f"birthday seconds must be in 0.1..60, not {self.seconds}")


@dataclass(frozen=True)
class BirthdayPlan:
    """This side's part of birthday punching, agreed by both sides from offer/answer.

    ``targets``: for the hard side, the easy side's endpoints its sockets dial; for the
    easy side, the hard side's public addresses (port 0) its guesses go to.  ``count``:
    sockets (hard) or probes (easy) this side spends; ``peer_count`` the other side's.
    ``start_delay``: seconds the easy side waits after the round starts, so that the
    hard side's mappings exist before the first guess arrives."""

    role: Role
    targets: tuple[Endpoint, ...]
    count: int
    peer_count: int
    rate: int
    seconds: float
    start_delay: float
    expected_success: float
    port_low: int = PORT_LOW
    port_high: int = PORT_HIGH

    @property
    def sockets(self) -> int:
        return self.count if self.role == "hard" else self.peer_count

    @property
    def probes(self) -> int:
        return self.count if self.role == "easy" else self.peer_count


def nat_class(
    verdict: MappingVerdict, mapped: Sequence[Endpoint], own_addresses: Iterable[str], port: int
) -> NatClass:
    """Classify this side from the STUN answers for its punch ``port``."""
    own = set(own_addresses)
    if any(host in own and p == port for host, p in mapped):
        return "none"
    if verdict.mapping == "endpoint-dependent":
        return "dependent"
    if verdict.mapping == "endpoint-independent":
        return "independent"
    if len(mapped) == 1 and mapped[0][1] == port:
        return "independent"  # one server, port kept: what a port-preserving NAT does
    return "unknown"


def announce(nat: NatClass, budget: BirthdayBudget | None) -> dict[str, int]:
    """The ``limits`` members this side sends: its NAT class and (when birthday punching
    is on) its budget."""
    out = {LIMIT_MAPPING: MAPPING_CODES[nat]}
    if budget is not None:
        out[LIMIT_SOCKETS] = budget.sockets
        out[LIMIT_PROBES] = budget.probes
        out[LIMIT_RATE] = budget.rate
    return out


def announced_class(limits: Mapping[str, int]) -> NatClass:
    """The NAT class a peer announced (``unknown`` when absent or out of range)."""
    return _CODE_CLASSES.get(limits.get(LIMIT_MAPPING, 0), "unknown")


def birthday_success(sockets: int, probes: int, space: int = PORT_HIGH - PORT_LOW + 1) -> float:
    """Chance that ``probes`` distinct guesses hit at least one of ``sockets`` distinct
    ports drawn uniformly from ``space``: ``1 - C(space-sockets, probes) / C(space, probes)``."""
    if sockets <= 0 or probes <= 0:
        return 0.0
    if sockets + probes > space:
        return 1.0
    log_miss = sum(math.log((space - sockets - i) / (space - i)) for i in range(probes))
    return 1.0 - math.exp(log_miss)


#: (this side's class, the peer's class) -> this side's role; pairs absent: no birthday.
ROLES: dict[tuple[NatClass, NatClass], Role] = {
    ("dependent", "independent"): "hard",
    ("dependent", "none"): "hard",
    ("independent", "dependent"): "easy",
    ("none", "dependent"): "easy",
}

WHY_NOT: dict[tuple[NatClass, NatClass], str] = {
    ("dependent", "dependent"): (
        "both sides are behind endpoint-dependent (symmetric) NATs: birthday punching "
        "needs one side with predictable mapping"
    ),
}


def plan(
    *,
    local_class: NatClass,
    local_limits: Mapping[str, int],
    peer_limits: Mapping[str, int],
    peer_candidates: Sequence[str],
    peer_port: int,
    peer_host: str | None,
    local_budget: BirthdayBudget | None,
) -> tuple[BirthdayPlan | None, str]:
    """This side's plan (None when birthday punching does not apply) and why, in words.

    Both sides call this with mirrored arguments and reach mirrored plans: the roles come
    from the announced classes (:data:`ROLES`), the counts from the announced budgets."""
    peer_class = announced_class(peer_limits)
    pair = (local_class, peer_class)
    role = ROLES.get(pair)
    if role is None:
        if "mapped" in pair:
            who = "this side" if local_class == "mapped" else "the peer"
            return None, f"not needed: {who} has a router port mapping of its punch port"
        reason = WHY_NOT.get(pair, f"not needed (this side {local_class}, peer {peer_class})")
        return None, reason
    if local_budget is None:
        return None, "turned off on this side (hard-nat off)"
    hard_limits, easy_limits = (
        (local_limits, peer_limits) if role == "hard" else (peer_limits, local_limits)
    )
    sockets = hard_limits.get(LIMIT_SOCKETS, 0)
    probes = easy_limits.get(LIMIT_PROBES, 0)
    if sockets == 0 or probes == 0:
        return None, "turned off on the peer (hard-nat off, or a version without it)"
    for key, (low, high) in LIMIT_RANGES.items():
        value = peer_limits.get(key)
        if value is not None and not low <= value <= high:
            return None, f"the peer announced {key} {value}, outside {low}..{high}"
    cands = _parse(peer_candidates)
    hard_rate = max(1, hard_limits.get(LIMIT_RATE, local_budget.rate))
    if role == "hard":
        targets = _easy_targets(cands, peer_port, peer_host)
        count = local_budget.sockets
    else:
        targets = tuple((h, 0) for h in public_addresses(peer_candidates))
        count = local_budget.probes
    if not targets:
        return None, "no public IPv4 address of the peer to aim at"
    start_delay = min(sockets / hard_rate, local_budget.seconds / 2) + 0.1
    return (
        BirthdayPlan(
            role=role,
            targets=targets,
            count=count,
            peer_count=probes if role == "hard" else sockets,
            rate=local_budget.rate,
            seconds=local_budget.seconds,
            start_delay=start_delay if role == "easy" else 0.0,
            expected_success=birthday_success(sockets, probes),
        ),
        f"this side is the {role} side",
    )


def guess_ports(
    rng: random.Random,
    count: int,
    *,
    low: int = PORT_LOW,
    high: int = PORT_HIGH,
    exclude: Iterable[int] = (),
) -> list[int]:
    """``count`` distinct ports in ``low..high`` (minus ``exclude``), in random order."""
    if not 1 <= low <= high <= 65535:
        raise ValueError(f"bad port range {low}..{high}")
    skip = set(exclude)
    space = [p for p in range(low, high + 1) if p not in skip]
    return rng.sample(space, min(count, len(space)))


def _parse(lines: Sequence[str]) -> list[Candidate]:
    out = []
    for line in lines:
        try:
            out.append(Candidate.from_line(line))
        except CandidateError:
            continue
    return out


def _is_v4(host: str) -> bool:
    return ":" not in host


def _easy_targets(
    cands: Sequence[Candidate], port: int, observed: str | None
) -> tuple[Endpoint, ...]:
    """Where the easy side can be reached from its punch port: its STUN mappings, else the
    address its control connection comes from, else its own IPv4 addresses."""
    out: list[Endpoint] = []
    srflx = [c.endpoint for c in cands if c.kind == "srflx" and _is_v4(c.host)]
    if srflx:
        out.extend(srflx)
    elif observed is not None and _is_v4(observed) and not observed.startswith("127."):
        out.append((observed, port))
    else:
        out.extend(
            c.endpoint
            for c in cands
            if c.kind in ("host", "given") and _is_v4(c.host) and not c.host.startswith("127.")
        )
    return tuple(dict.fromkeys(out))[:MAX_TARGETS]


def public_addresses(lines: Sequence[str]) -> tuple[str, ...]:
    """A side's public IPv4 addresses, from the STUN mappings among its candidate lines."""
    hosts = [c.host for c in _parse(lines) if c.kind == "srflx" and _is_v4(c.host)]
    return tuple(dict.fromkeys(hosts))[:MAX_TARGETS]
