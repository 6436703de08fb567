"""The session report: what path was used, why, and what every candidate pair did.

One object serves people (``summary()``) and machines (``to_json()``); it never holds
key material, only public facts about the session.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from holepunch_mig.roles import Role


def write_file_atomically(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all, never through a symlink: a
    temporary file beside it (created exclusively, so a name planted in a shared
    directory is never opened), fsync'ed, then renamed over ``path`` -- rename replaces
    a symlink that sits at ``path`` instead of following it.  A directory at ``path`` or
    an entry another user owns in a sticky directory fails with OSError."""
    target = os.fspath(path)
    folder, name = os.path.split(target)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISDIR(os.lstat(target).st_mode):
            raise IsADirectoryError(f"{target} is a directory")
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            os.fchmod(fh.fileno(), 0o644)  # reports hold no secrets (see docs/security.md)
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


Outcome = Literal[
    "connected",  # TCP connected and the Noise handshake succeeded
    "nominated",  # connected, authenticated and chosen
    "refused",  # RST seen (ECONNREFUSED): a reject rule or nothing listening
    "timed out",  # no answer to our SYNs within the attempt's deadline
    "rejected",  # TCP connected but the peer failed authentication or was not offered
    "crossed",  # our connect lost to the peer's SYN: its connection holds the 4-tuple
    "unreachable",  # no route / network unreachable
    "error",  # any other socket error (detail says which)
    "abandoned",  # still trying when another pair won the race
]


@dataclass
class PairReport:
    """One candidate pair as this side saw it."""

    round: int
    local: str
    remote: str
    outcome: Outcome
    detail: str = ""
    seconds: float = 0.0
    direction: Literal["outbound", "inbound"] = "outbound"


@dataclass
class Interruption:
    """One loss of the data link during a resumable stream transfer, as this side saw it.

    ``at``: seconds since the transfer started; ``epoch``: the link generation that died
    (0 = the first link); ``detected_by``: "local" (this side's socket failed) or "peer"
    (the peer said so over the control channel); ``seen``: what failed, in words;
    ``acked``: bytes the destination had acknowledged at that moment (on the destination:
    bytes it had written); ``sent``: bytes this side had sent (source) or received
    (destination); ``resumed_from``: the offset the stream went on from; ``resume_seconds``:
    from the detection to the new link nominated; ``attempts``: re-negotiations this
    interruption took; ``link``: the new link's endpoints; ``outcome``: "resumed" or
    "failed"."""

    at: float
    epoch: int
    detected_by: Literal["local", "peer"]
    seen: str
    acked: int
    sent: int
    resumed_from: int | None = None
    resume_seconds: float | None = None
    attempts: int = 0
    link: str | None = None
    outcome: Literal["resumed", "failed", "pending"] = "pending"


@dataclass
class HardNatReport:
    """Birthday punching in this session, as this side saw it: the plan and what was spent.

    ``role``: "hard" (this side opened many sockets towards the peer's one port) or
    "easy" (this side dialed guessed ports on the peer's public address); ``sockets`` and
    ``probes``: the two sides' agreed budget for each birthday round; ``round_success``:
    the birthday bound for one round; ``rounds``: the punch rounds birthday punching ran
    in; ``expected_success``: the chance over those rounds (they miss independently).
    Summed over the rounds: ``spent_syns`` (connect() calls, first SYNs; kernel
    retransmissions not counted), ``refused``/``errors`` (attempts that ended in RST /
    another socket error), ``hits`` (birthday connections that came up, before
    authentication), ``seconds`` (from the first to the last SYN sent, per round);
    ``spent_sockets``: the most birthday sockets this side held open at once."""

    role: Literal["hard", "easy"]
    sockets: int
    probes: int
    expected_success: float
    rate: int
    spent_sockets: int = 0
    spent_syns: int = 0
    refused: int = 0
    errors: int = 0
    hits: int = 0
    seconds: float = 0.0
    reason: str = ""
    rounds: list[int] = field(default_factory=list)
    round_success: float = 0.0


@dataclass
class Report:
    """Everything a caller, a log or a person needs to know about one session."""

    session: str
    role: Role
    policy: str = "direct"
    path: Literal["direct", "tunnel", "none"] = "none"
    path_reason: str = ""
    fell_back: bool = False
    """True when policy "auto" had to use the tunnel because the direct path failed."""
    local: str | None = None
    remote: str | None = None
    time_to_link: float | None = None
    rtt: float | None = None
    rounds: int = 0
    local_port: int | None = None
    """This side's punch port (what its candidates' base port is)."""
    remote_port: int | None = None
    """The punch port the peer announced."""
    local_candidates: list[str] = field(default_factory=list)
    remote_candidates: list[str] = field(default_factory=list)
    pairs: list[PairReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ok: bool | None = None
    verdict: str | None = None
    bytes: int | None = None
    sha256: str | None = None
    """Hex digest of the transferred stream, of the algorithm ``digest`` names."""
    digest: str | None = None
    """The session's end-to-end digest: "blake3" or "sha256" (both 32 bytes)."""
    seconds: float | None = None
    cpu_seconds: float | None = None
    """CPU seconds this process spent from the transfer's start to its end (every
    thread: reading, sealing or opening, hashing, writing), for CPU per GiB."""
    links: int = 1
    """Direct links this session carried (the first and those of ``open_links``)."""
    resume: bool = False
    """True when both sides agreed that a lost link may be re-punched (stream transfers)."""
    interruptions: list[Interruption] = field(default_factory=list)
    hard_nat: HardNatReport | None = None
    """Birthday punching, when the two sides' NATs called for it (None otherwise)."""
    port_mapping: str | None = None
    """The protocol this side's router mapped the punch port with: "pcp", "nat-pmp" or
    "upnp-igd" (None: no mapping asked for, or none granted; the notes say why)."""
    control_peer: str | None = None
    """Who the control channel authenticated: a pinned key's name, "holder of the
    pre-shared secret", "holder of the pairing code", or "trusted by the caller" (SSH,
    or a channel a library caller authenticated itself)."""
    control_handshake: float | None = None
    """Seconds the control handshake took on this side (before the offer; not part of
    ``time_to_link``)."""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        extra = data.pop("extra")
        data.update(extra)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def summary(self, *, verdict: bool = True) -> str:
        """A few plain lines for stderr.  Once a path is up only the nominated pair is
        shown and the others are counted (the JSON has them all: an unreachable private
        address of the peer is normal, not news); a failed session lists every pair.
        ``verdict=False`` leaves the verdict out for a caller that prints it itself."""
        lines = [f"session {self.session} ({self.role}): path {self.path}"]
        if self.fell_back:
            lines[0] += " (FALLBACK: the direct path failed)"
        if self.path_reason:
            lines.append(f"  why: {self.path_reason}")
        if self.control_peer:
            lines.append(f"  control peer: {self.control_peer}")
        if self.local and self.remote and self.path == "direct":
            lines.append(f"  link {self.local} <-> {self.remote}")
        if self.time_to_link is not None:
            rtt = f"{self.rtt * 1000:.2f} ms" if self.rtt is not None else "n/a"
            rounds = f"{self.rounds} round{'s' if self.rounds != 1 else ''}"
            lines.append(f"  time to link {self.time_to_link:.3f} s, control RTT {rtt}, {rounds}")
        if self.path == "none":
            for pair in self.pairs:
                detail = f" ({pair.detail})" if pair.detail else ""
                lines.append(
                    f"  round {pair.round} {pair.direction:8} {pair.local} -> {pair.remote}: "
                    f"{pair.outcome}{detail}"
                )
        else:
            others = [p for p in self.pairs if p.outcome != "nominated"]
            if others:
                lines.append(
                    f"  {len(others)} other pair{'s' if len(others) != 1 else ''} tried: "
                    f"{count_outcomes(others)} (every pair is in the JSON report)"
                )
        if self.bytes is not None:
            rate = ""
            if self.seconds:
                rate = f", {self.bytes / self.seconds / 1e6:.1f} MB/s"
            lines.append(f"  {self.bytes} bytes in {self.seconds or 0:.3f} s{rate}")
        if self.sha256:
            lines.append(f"  {self.digest or 'sha256'} {self.sha256}")
        for i, cut in enumerate(self.interruptions, 1):
            how = (
                f"resumed from byte {cut.resumed_from} in {cut.resume_seconds or 0:.3f} s"
                f" ({cut.attempts} attempt{'s' if cut.attempts != 1 else ''}"
                + (f", link {cut.link}" if cut.link else "")
                + ")"
                if cut.outcome == "resumed"
                else f"{cut.outcome} after {cut.attempts} attempt(s)"
            )
            lines.append(
                f"  interruption {i} at {cut.at:.3f} s (link {cut.epoch}, seen {cut.detected_by}"
                f": {cut.seen}); acknowledged {cut.acked} of {cut.sent} bytes; {how}"
            )
        if self.hard_nat is not None:
            hn = self.hard_nat
            rounds = ", ".join(map(str, hn.rounds)) or "none"
            plural = "s" if len(hn.rounds) != 1 else ""
            lines.append(
                f"  birthday punching ({hn.role} side): budget {hn.sockets} sockets x "
                f"{hn.probes} probes a round, in round{plural} {rounds}: expected success "
                f"{100 * hn.expected_success:.2f} %; spent {hn.spent_syns} SYNs in "
                f"{hn.seconds:.2f} s (at most {hn.spent_sockets} sockets open), {hn.hits} met"
            )
        for note in self.notes:
            lines.append(f"  note: {note}")
        if self.verdict and verdict:
            lines.append(f"  verdict: {self.verdict}")
        return "\n".join(lines)


def count_outcomes(pairs: list[PairReport]) -> str:
    """ "9 timed out, 3 unreachable": how many pairs ended which way, most first."""
    if not pairs:
        return "no candidate pairs"
    counts: dict[str, int] = {}
    for pair in pairs:
        counts[pair.outcome] = counts.get(pair.outcome, 0) + 1
    return ", ".join(f"{n} {o}" for o, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
