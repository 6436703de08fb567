"""Which path a session takes, as one explicit table (pure: no I/O).

Both sides know both policies after offer/answer (the offer carries the source's, the
answer the destination's; the destination follows the source), so both look up the same
row and fail the same way without extra messages.  A row is keyed by the source's
policy, the destination's policy and what the direct path did:

* ``"untried"`` -- asked right after offer/answer: punch first, or go straight to the
  tunnel, or fail because no allowed path exists;
* ``"succeeded"`` / ``"failed"`` -- asked once the punch rounds are over.

The rules are those of docs/tunnel.md ("Policy"); the I/O code only carries out the
:class:`Decision`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from holepunch_mig.session.options import Policy

Outcome = Literal["untried", "succeeded", "failed"]
Action = Literal["punch", "direct", "tunnel", "fail"]

POLICIES: tuple[Policy, ...] = get_args(Policy)
OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)


@dataclass(frozen=True)
class Decision:
    """What to do next and the words for it.

    ``action``: ``"punch"`` (run the direct rounds, then ask again), ``"direct"`` (use
    the nominated link), ``"tunnel"`` (announce or await ``path`` and run the tunnel),
    ``"fail"``.  ``reason``: the report's ``path_reason`` for a path, the error text for
    a failure; ``{cause}`` stands for why the direct path failed.  ``refused``: fail with
    TunnelRefused (the destination's policy forbids the tunnel the source allows) rather
    than the direct path's own NoDirectPath.  ``fell_back``: the tunnel replaces a direct
    path that was asked for first."""

    action: Action
    reason: str = ""
    refused: bool = False
    fell_back: bool = False

    def reason_for(self, cause: object = "") -> str:
        return self.reason.format(cause=cause)


PUNCH = Decision("punch")
USE_DIRECT = Decision("direct", "direct link authenticated and nominated")
NO_DIRECT_PATH = Decision("fail", "{cause}")
FALL_BACK = Decision(
    "tunnel", "fell back to the tunnel (policy auto) because {cause}", fell_back=True
)
FALL_BACK_REFUSED = Decision(
    "fail",
    "{cause}; the source allows the tunnel (policy 'auto') but the destination's "
    "policy 'direct' forbids it",
    refused=True,
)
TUNNEL_ASKED = Decision("tunnel", "policy 'tunnel': the tunnel was asked for")
TUNNEL_REFUSED = Decision(
    "fail",
    "the source asked for the tunnel only (policy 'tunnel') but the destination's "
    "policy 'direct' forbids the tunnel: no path allowed",
    refused=True,
)


#: (source policy, destination policy, direct outcome) -> Decision, every combination
TABLE: dict[tuple[Policy, Policy, Outcome], Decision] = {
    ("direct", "direct", "untried"): PUNCH,
    ("direct", "direct", "succeeded"): USE_DIRECT,
    ("direct", "direct", "failed"): NO_DIRECT_PATH,
    ("direct", "auto", "untried"): PUNCH,
    ("direct", "auto", "succeeded"): USE_DIRECT,
    ("direct", "auto", "failed"): NO_DIRECT_PATH,
    ("direct", "tunnel", "untried"): PUNCH,
    ("direct", "tunnel", "succeeded"): USE_DIRECT,
    ("direct", "tunnel", "failed"): NO_DIRECT_PATH,
    ("auto", "direct", "untried"): PUNCH,
    ("auto", "direct", "succeeded"): USE_DIRECT,
    ("auto", "direct", "failed"): FALL_BACK_REFUSED,
    ("auto", "auto", "untried"): PUNCH,
    ("auto", "auto", "succeeded"): USE_DIRECT,
    ("auto", "auto", "failed"): FALL_BACK,
    ("auto", "tunnel", "untried"): PUNCH,
    ("auto", "tunnel", "succeeded"): USE_DIRECT,
    ("auto", "tunnel", "failed"): FALL_BACK,
    ("tunnel", "direct", "untried"): TUNNEL_REFUSED,
    ("tunnel", "direct", "succeeded"): TUNNEL_REFUSED,
    ("tunnel", "direct", "failed"): TUNNEL_REFUSED,
    ("tunnel", "auto", "untried"): TUNNEL_ASKED,
    ("tunnel", "auto", "succeeded"): TUNNEL_ASKED,
    ("tunnel", "auto", "failed"): TUNNEL_ASKED,
    ("tunnel", "tunnel", "untried"): TUNNEL_ASKED,
    ("tunnel", "tunnel", "succeeded"): TUNNEL_ASKED,
    ("tunnel", "tunnel", "failed"): TUNNEL_ASKED,
}  # fmt: skip


def decide(source: Policy, destination: Policy, outcome: Outcome) -> Decision:
    """The row for these policies and outcome; KeyError for a value outside the table."""
    return TABLE[(source, destination, outcome)]


def direct_rounds(source: Policy, destination: Policy, rounds: int, doomed: bool) -> int:
    """How many punch rounds the source runs: all of them, unless the candidates already
    prove endpoint-dependent mapping (``doomed``) and the tunnel is the fallback, in which
    case one round (it still works when the other side is reachable without punching)
    before falling back, instead of waiting out every round."""
    if doomed and decide(source, destination, "failed").action == "tunnel":
        return 1
    return rounds
