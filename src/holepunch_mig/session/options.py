"""What a caller chooses for one session: its role, its path policy and the knobs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from holepunch_mig.net.punch import PunchTiming
from holepunch_mig.roles import Policy, Role
from holepunch_mig.wire.birthday import BirthdayBudget
from holepunch_mig.wire.credit import DEFAULT_CREDIT_BATCH, DEFAULT_WINDOW, MAX_CHUNK
from holepunch_mig.wire.digests import PREFERENCES, Preference

__all__ = ["BirthdayBudget", "ConnectOptions", "HardNat", "Policy", "PortMapMode", "Role"]

HardNat = Literal["off", "birthday"]
PortMapMode = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class ConnectOptions:
    """Knobs of one session; defaults suit a migration manager on a LAN or across NATs."""

    port: int = 0
    bind_host: str | None = None
    stun: Sequence[tuple[str, int]] = ()
    candidates: Sequence[tuple[str, int]] = ()
    policy: Policy = "direct"
    include_loopback: bool | None = None
    ipv6: bool = True
    rounds: int = 3
    timing: PunchTiming = field(default_factory=PunchTiming)
    control_timeout: float = 15.0
    pings: int = 3
    stun_timeout: float = 2.0
    hard_nat: HardNat = "birthday"
    """One side behind an endpoint-dependent (symmetric) NAT and the other not: "birthday"
    lets the first round try birthday punching within ``birthday`` (both sides must
    allow it); "off" never does (docs/traversal.md, "Hard NATs")."""
    birthday: BirthdayBudget = field(default_factory=BirthdayBudget)
    """Birthday punching budget: sockets (hard side), probes (easy side), SYNs per second,
    seconds."""
    port_mapping: PortMapMode = "auto"
    """Ask the default gateway (PCP, then NAT-PMP) to forward a public port to the punch
    port while the punch port is open, and announce that address: "auto" when STUN
    servers are given (a NATed deployment), "on" always, "off" never."""
    port_mapping_timeout: float = 1.0
    """How long the gateway may take to answer (it runs beside STUN)."""
    dial_delay: float = 0.0
    """Lab knob: hold this side's dials after sync, to prove skew tolerance."""
    tunnel_window: int = DEFAULT_WINDOW
    """Bytes this side lets the peer have in flight in the tunnel (flow-control window)."""
    tunnel_credit_batch: int = DEFAULT_CREDIT_BATCH
    """This side returns tunnel credit once this many bytes reached the link."""
    resume_attempts: int = 3
    """Stream transfers (send_file/receive_file) over a direct link: how many times one
    transfer may re-punch a lost link (fresh keys) and go on from the last byte the
    destination kept; 0 turns resume off (and this side does not offer it)."""
    link_timeout: float = 10.0
    """Direct links: a path that answers nothing for this long is declared dead
    (TCP_USER_TIMEOUT + keepalive probes); 0 leaves the kernel's defaults (minutes)."""
    idle_timeout: float = 120.0
    """Longest silence on the data link during send_file/receive_file: a peer that is
    alive (answers keepalives) but stuck sends nothing for this long -> the transfer
    fails (or resumes) instead of hanging."""
    ack_interval: int = 8 << 20
    """Resumable transfers: the destination reports bytes written every this many bytes."""
    resume_buffer: int = 64 << 20
    """Resumable transfers from an input that cannot seek (a pipe): the most bytes kept in
    memory for replay; reading the input pauses while that much is unacknowledged."""

    digest: Preference = "auto"
    """End-to-end digest of stream transfers: "auto" (BLAKE3 when both sides have it, else
    SHA-256), "blake3" (fail when the peer cannot) or "sha256" (comparable with sha256sum)."""

    def check(self) -> None:
        """Raise ValueError naming the first option that is out of range."""
        if self.digest not in PREFERENCES:
            raise ValueError(f"digest must be one of {', '.join(PREFERENCES)}, not {self.digest!r}")
        if self.policy not in ("direct", "auto", "tunnel"):
            raise ValueError(f"policy must be 'direct', 'auto' or 'tunnel', not {self.policy!r}")
        if self.port_mapping not in ("auto", "on", "off"):
            raise ValueError(
                f"port_mapping must be 'auto', 'on' or 'off', not {self.port_mapping!r}"
            )
        if self.hard_nat not in ("off", "birthday"):
            raise ValueError(f"hard_nat must be 'off' or 'birthday', not {self.hard_nat!r}")
        self.birthday.check()  # (its seconds never outlast the round: the round ends it)
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, not {self.rounds}")
        if self.tunnel_window < MAX_CHUNK:
            raise ValueError(
                f"tunnel_window must be >= {MAX_CHUNK} bytes (one chunk), not {self.tunnel_window}"
            )
        if not 0 < self.tunnel_credit_batch <= self.tunnel_window:
            raise ValueError(
                f"tunnel_credit_batch must be in 1..tunnel_window, not {self.tunnel_credit_batch}"
            )
        if self.resume_attempts < 0:
            raise ValueError(f"resume_attempts must be >= 0, not {self.resume_attempts}")
        if self.link_timeout < 0:
            raise ValueError(f"link_timeout must be >= 0 (0 = kernel's), not {self.link_timeout}")
        if self.ack_interval < 1 << 20:
            raise ValueError(f"ack_interval must be >= 1 MiB, not {self.ack_interval}")
        if self.resume_buffer < 2 * self.ack_interval + (1 << 20):
            raise ValueError(
                f"resume_buffer must be >= 2 * ack_interval + 1 MiB "
                f"({2 * self.ack_interval + (1 << 20)}), not {self.resume_buffer}"
            )
