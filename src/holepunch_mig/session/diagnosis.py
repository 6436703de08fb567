"""Why the direct path failed, in plain words, with the fix (pure functions, no I/O).

Input is what one side saw (its :class:`~holepunch_mig.report.Report`: every candidate
pair's outcome and detail, both sides' candidates and punch ports, STUN notes).  Output
is a :class:`Diagnosis`: findings ordered from most to least specific; ``verdict`` is the
text for ``NoDirectPath.verdict``, ``report.verdict`` and the CLI's stderr.

Causes, strongest first (docs/tunnel.md has the table):

=====================  ==============================================================
handshake-rejected     TCP connected but the Noise handshake failed: wrong peer on that
                       address, key mismatch, or interference.
birthday-missed        birthday punching ran (one side symmetric) and no guess met: what
                       was spent and the chance of that miss for the budget.
symmetric-nat          STUN showed endpoint-dependent mapping, or a NAT rewrote the
                       punch port (named side).
unoffered-inbound      a connection arrived from an address the peer never announced:
                       its NAT rewrote the source port.
rst                    SYNs answered with RST: a REJECT rule or nothing listening (side
                       and port named).
syn-timeout            SYNs timed out (both ways: inbound DROP on the far side and no
                       NAT mapping matched).
unreachable            no route to the peer's candidates.
no-pairs               nothing to try at all.
=====================  ==============================================================
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from holepunch_mig.errors import CandidateError
from holepunch_mig.report import HardNatReport, PairReport, Report
from holepunch_mig.wire.candidates import Candidate

Cause = Literal[
    "handshake-rejected",
    "birthday-missed",
    "symmetric-nat",
    "unoffered-inbound",
    "rst",
    "syn-timeout",
    "unreachable",
    "no-pairs",
    "other",
]

DOCTOR = "holepunch-mig doctor"


#: the tunnel advice when neither side allows it yet
TUNNEL_BOTH = "accept the slower tunnel with --policy auto on both sides"


def tunnel_advice(source_policy: str, destination_policy: str, fell_back: bool) -> str | None:
    """What to say about the fallback tunnel, given what each side asked for: nothing
    once it is in use; otherwise which side has to allow it (a destination's "direct"
    forbids it even when the source allows it)."""
    if fell_back or source_policy == "tunnel":
        return None
    source_ok = source_policy == "auto"
    destination_ok = destination_policy != "direct"
    if source_ok and not destination_ok:
        return "start the destination (recv) with --policy auto too, to allow the slower tunnel"
    if destination_ok and not source_ok:
        return "accept the slower tunnel with --policy auto on the source (send)"
    if not source_ok:
        return TUNNEL_BOTH
    return None


def _tunnel_clause(tunnel: str | None) -> str:
    return f", or {tunnel}" if tunnel else ""


def mapping_varies(candidate_lines: Sequence[str]) -> list[str]:
    """The server-reflexive endpoints of one side when STUN servers saw more than one of
    the same address family: proof of endpoint-dependent (symmetric) mapping, visible to
    both sides from the candidates alone."""
    by_family: dict[bool, set[tuple[str, int]]] = {}
    for endpoint in _srflx_ports(candidate_lines):
        by_family.setdefault(":" in endpoint[0], set()).add(endpoint)
    varied = [e for eps in by_family.values() if len(eps) > 1 for e in sorted(eps)]
    return [f"{h}:{p}" if ":" not in h else f"[{h}]:{p}" for h, p in varied]


@dataclass(frozen=True)
class Finding:
    cause: Cause
    text: str


@dataclass(frozen=True)
class Diagnosis:
    """Findings, most specific first; empty when nothing failed."""

    findings: tuple[Finding, ...]

    @property
    def cause(self) -> Cause | None:
        return self.findings[0].cause if self.findings else None

    @property
    def causes(self) -> list[Cause]:
        return [f.cause for f in self.findings]

    @property
    def verdict(self) -> str:
        if not self.findings:
            return "the direct path worked; nothing to diagnose"
        head, *rest = self.findings
        text = head.text
        if rest:
            text += " Also: " + " ".join(f.text for f in rest)
        return text


def _other(role: str) -> str:
    return "destination" if role == "source" else "source"


def _port_of(endpoint: str) -> int | None:
    _, _, port = endpoint.rpartition(":")
    return int(port) if port.isdigit() else None


def _host_of(endpoint: str) -> str:
    host, _, _ = endpoint.rpartition(":")
    return host.strip("[]")


def _join(items: Iterable[str], limit: int = 4) -> str:
    seen: list[str] = []
    for item in items:
        if item not in seen:
            seen.append(item)
    shown = ", ".join(seen[:limit])
    return shown + (f" and {len(seen) - limit} more" if len(seen) > limit else "")


def _srflx_ports(lines: Sequence[str]) -> list[tuple[str, int]]:
    out = []
    for line in lines:
        try:
            cand = Candidate.from_line(line)
        except CandidateError:
            continue
        if cand.kind == "srflx":
            out.append(cand.endpoint)
    return out


def nat_evidence(
    *,
    notes: Sequence[str],
    local_candidates: Sequence[str],
    remote_candidates: Sequence[str],
    local_port: int | None,
    remote_port: int | None,
) -> dict[str, list[str]]:
    """Evidence of endpoint-dependent / port-rewriting NAT per side ("local", "remote")."""
    found: dict[str, list[str]] = {"local": [], "remote": []}
    for note in notes:
        if "endpoint-dependent" in note:
            found["local"].append("STUN servers saw different mappings (endpoint-dependent)")
    for side, lines, port in (
        ("local", local_candidates, local_port),
        ("remote", remote_candidates, remote_port),
    ):
        if port is None:
            continue
        moved = [f"{h}:{p}" for h, p in _srflx_ports(lines) if p != port]
        if moved:
            found[side].append(f"its punch port {port} appeared as {_join(moved)} to STUN")
    return found


def diagnose_pairs(
    pairs: Sequence[PairReport],
    *,
    role: str,
    notes: Sequence[str] = (),
    local_candidates: Sequence[str] = (),
    remote_candidates: Sequence[str] = (),
    local_port: int | None = None,
    remote_port: int | None = None,
    tunnel: str | None = TUNNEL_BOTH,
    hard_nat: HardNatReport | None = None,
) -> Diagnosis:
    """Diagnose a failed direct attempt from one side's view (``role`` is that side).
    ``tunnel`` is the advice about the fallback tunnel that fits what the user did
    (:func:`tunnel_advice`); None when the tunnel is already in use."""
    if any(p.outcome == "nominated" for p in pairs):
        return Diagnosis(())
    peer = _other(role)
    findings: list[Finding] = []
    outbound = [p for p in pairs if p.direction == "outbound"]
    inbound = [p for p in pairs if p.direction == "inbound"]

    # 1. TCP connected, authentication failed
    hs = [p for p in pairs if p.outcome == "rejected" and p.detail.startswith("handshake")]
    if hs:
        ports = _join(str(_port_of(p.remote)) for p in hs)
        findings.append(
            Finding(
                "handshake-rejected",
                f"TCP connected to {_join(p.remote for p in hs)} but the Noise handshake "
                f"failed ({hs[0].detail}): whatever answered is not this session's {peer} "
                "(another process or host on that address and port), its key does not "
                "match the one exchanged over the control channel (a stale or crossed "
                "session), or a middlebox interferes with the connection. Fix: make sure "
                f"the control channel and the candidates lead to the same host, that "
                f"nothing else listens on port {ports} there, and rerun both sides.",
            )
        )

    # 2. birthday punching ran and missed
    if hard_nat is not None:
        miss = 100 * (1 - hard_nat.expected_success)
        knob = "--birthday-sockets" if hard_nat.role == "hard" else "--birthday-probes"
        n = len(hard_nat.rounds) or 1
        where = (
            f" in round{'s' if n != 1 else ''} {', '.join(map(str, hard_nat.rounds))}"
            if hard_nat.rounds
            else ""
        )
        findings.append(
            Finding(
                "birthday-missed",
                f"birthday punching ran with this side ({role}) as the {hard_nat.role} side"
                f"{where}: {hard_nat.spent_syns} SYNs in {hard_nat.seconds:.2f} s "
                f"({hard_nat.refused} refused, {hard_nat.errors} errors), {hard_nat.hits} "
                f"connections came up, none authenticated in time; for a budget of "
                f"{hard_nat.sockets} sockets x {hard_nat.probes} probes a round the chance "
                f"of missing {'both' if n == 2 else 'all' if n > 2 else 'it'} is "
                f"{_percent(miss)} (if fewer SYNs went out than the budget, the time "
                f"budget or the round ended first). Fix: run again, raise {knob} (and the "
                "peer's counterpart), or let the symmetric side's router map the punch port "
                "(PCP / NAT-PMP / UPnP-IGD).",
            )
        )

    # 3. NAT mapping evidence from STUN / candidates
    evidence = nat_evidence(
        notes=notes,
        local_candidates=local_candidates,
        remote_candidates=remote_candidates,
        local_port=local_port,
        remote_port=remote_port,
    )
    sides = []
    if evidence["local"]:
        sides.append(f"this side ({role}): " + "; ".join(evidence["local"]))
    if evidence["remote"]:
        sides.append(f"the {peer}: " + "; ".join(evidence["remote"]))
    if sides:
        who = (
            "both sides are"
            if len(sides) == 2
            else ("this side is" if evidence["local"] else f"the {peer} is")
        )
        findings.append(
            Finding(
                "symmetric-nat",
                f"{who} behind a NAT with endpoint-dependent (symmetric) mapping or "
                f"port rewriting ({' | '.join(sides)}): each destination gets a new "
                "port, so the port STUN saw is not the one the SYNs use and hole punching "
                "cannot work. Fix: give that NAT endpoint-independent, port-preserving "
                "mapping (nft: plain `masquerade`, not `random`/`fully-random`) or a "
                f"static forward of the punch port{_tunnel_clause(tunnel)}. Check the "
                f"mapping with `{DOCTOR}`.",
            )
        )

    # 4. inbound from an address the peer never offered
    unoffered = [p for p in inbound if p.outcome == "rejected" and "not offered" in p.detail]
    if unoffered:
        findings.append(
            Finding(
                "unoffered-inbound",
                f"connections arrived from {_join(p.remote for p in unoffered)}, which the "
                f"{peer} never announced: a NAT in front of the {peer} rewrote its source "
                "port (endpoint-dependent mapping). Fix: port-preserving NAT or a port "
                f"forward there; check with `{DOCTOR}`.",
            )
        )

    # 5. RST
    refused = [p for p in outbound if p.outcome == "refused"]
    if refused:
        ports = _join(str(_port_of(p.remote)) for p in refused)
        hosts = _join(_host_of(p.remote) for p in refused)
        findings.append(
            Finding(
                "rst",
                f"SYNs from this side ({role}) to the {peer} at "
                f"{_join(p.remote for p in refused)} were answered with RST: a firewall "
                f"REJECT rule (or a NAT that resets unsolicited SYNs) in front of the {peer} "
                f"({hosts}), or nothing listening on port {ports} there. Fix: make that "
                "firewall DROP unsolicited inbound TCP instead of rejecting it (a stateful "
                f"DROP is what simultaneous open needs) or allow port {ports}; check that "
                f"holepunch-mig is running on the {peer}.",
            )
        )

    # 6. timeouts
    timed_out = [p for p in outbound if p.outcome == "timed out"]
    unreachable = [p for p in outbound if p.outcome == "unreachable"]
    if timed_out:
        where = _join(p.remote for p in timed_out)
        # unreachable pairs (the peer's private addresses) say nothing about the SYNs
        if len(timed_out) + len(unreachable) == len(outbound) and not inbound:
            findings.append(
                Finding(
                    "syn-timeout",
                    f"SYNs timed out both ways: every SYN this side ({role}) sent to "
                    f"{where} went unanswered and none of the {peer}'s SYNs arrived. An "
                    f"inbound DROP on the {peer}'s side is likely, and no NAT mapping "
                    "matched the SYNs (a symmetric NAT on either side?). Fix: check the "
                    f"NAT mapping on both hosts with `{DOCTOR}` (punching needs "
                    "endpoint-independent mapping), announce a reachable address with "
                    f"--candidate or --stun{_tunnel_clause(tunnel)}.",
                )
            )
        else:
            findings.append(
                Finding(
                    "syn-timeout",
                    f"SYNs from this side ({role}) to {where} timed out: dropped on the "
                    f"way or by the {peer}'s firewall with no matching NAT mapping.",
                )
            )

    # 7. unreachable: worth saying only when nothing else explains the failure (the
    #    peer's private host candidates are unreachable across NATs, and that is normal)
    if unreachable and not findings:
        findings.append(
            Finding(
                "unreachable",
                f"no route from this side ({role}) to {_join(p.remote for p in unreachable)}: "
                "those candidates are not reachable from here (another network's private "
                "addresses). Fix: announce a reachable address with --candidate, or --stun.",
            )
        )

    if not pairs:
        findings.append(
            Finding(
                "no-pairs",
                "no candidate pair could be tried: no usable address was announced on "
                "a common address family. Fix: check the hosts' interfaces, or give "
                "--candidate / --stun.",
            )
        )
    if not findings:
        summary = _join(
            f"{p.remote} {p.outcome}" + (f" ({p.detail})" if p.detail else "") for p in pairs
        )
        findings.append(
            Finding("other", f"no candidate pair produced an authenticated link: {summary}.")
        )
    return Diagnosis(tuple(findings))


def explain_no_path(report: Report, tunnel: str | None = TUNNEL_BOTH) -> Diagnosis:
    """:func:`diagnose_pairs` on a session report."""
    return diagnose_pairs(
        report.pairs,
        tunnel=tunnel,
        role=report.role,
        notes=report.notes,
        local_candidates=report.local_candidates,
        remote_candidates=report.remote_candidates,
        local_port=report.local_port,
        remote_port=report.remote_port,
        hard_nat=report.hard_nat,
    )


def _percent(value: float) -> str:
    """ "1.7 %", "0.03 %": enough digits that a small chance is not shown as 0.0 %."""
    return f"{value:.1f} %" if value >= 1 or value == 0 else f"{value:.2g} %"
