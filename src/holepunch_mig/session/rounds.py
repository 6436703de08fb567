"""The punch rounds of one negotiation: RTT, synchronised rounds, racing, nomination.

The source measures the RTT, sends ``sync`` and nominates the first authenticated link
of a round; the destination dials on ``sync`` and keeps what it is told to keep.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from holepunch_mig.errors import HolepunchError, NoDirectPath, ProtocolError
from holepunch_mig.net.punch import AuthenticatedLink, BirthdayDial, PunchRound
from holepunch_mig.report import HardNatReport, PairReport, Report, count_outcomes
from holepunch_mig.roles import Role
from holepunch_mig.session.control_reader import ControlReader
from holepunch_mig.session.handshake import make_authenticator
from holepunch_mig.session.options import ConnectOptions
from holepunch_mig.session.prepare import PeerKeys, Prepared
from holepunch_mig.wire import messages
from holepunch_mig.wire.birthday import (
    BirthdayPlan,
    birthday_in_round,
    guess_ports,
    success_over_rounds,
)


async def _measure_rtt(control: ControlReader, count: int) -> float:
    samples = []
    for seq in range(count):
        t0 = trio.current_time()
        await control.send(messages.Ping(seq=seq))
        msg, _ = await control.receive(messages.Pong, step="measuring RTT")
        if msg.seq != seq:
            raise ProtocolError(f"pong for ping {msg.seq}, expected {seq}")
        samples.append(trio.current_time() - t0)
    return min(samples)


async def _answer_pings(control: ControlReader, count: int) -> None:
    for _ in range(count):
        msg, _raw = await control.receive(messages.Ping, step="measuring RTT")
        await control.send(messages.Pong(seq=msg.seq))


@dataclass
class DirectAttempt:
    """Everything the punch rounds of one session share; the two roles' round loops."""

    control: ControlReader
    prepared: Prepared
    keys: PeerKeys
    remotes: list[tuple[str, int]]
    report: Report
    log: logging.LoggerAdapter[logging.Logger]
    rounds: int | None = None
    """The source's round count when not the options' (see policy.direct_rounds)."""
    birthday: BirthdayPlan | None = None
    """Birthday punching for the rounds wire.birthday.ROUND_PLAN names (both sides agreed
    on it from offer/answer)."""
    accept_hosts: frozenset[str] = frozenset()
    """The peer's public addresses when its NAT picks source ports (endpoint-dependent):
    inbound connections from them are accepted from any port."""
    dial: bool = True
    """False when this side holds a router port mapping the peer dials (docs/protocol.md
    section 2): it only accepts."""

    @property
    def options(self) -> ConnectOptions:
        return self.prepared.options

    def __post_init__(self) -> None:
        self.answered: set[int] = set()
        """Link ids the destination answered in this negotiation (replays are refused)."""

    def _round(self, role: Role, round_no: int, first_link_id: int = 1) -> PunchRound:
        listeners = self.prepared.listeners
        keys = self.keys
        return PunchRound(
            round_no=round_no,
            listeners=listeners,
            bind_host={f: self.prepared.bind_host(f) for f in listeners},
            port=self.prepared.port,
            remotes=self.remotes,
            authenticate=make_authenticator(
                role,
                round_no,
                keys.static_private,
                keys.remote_public,
                keys.prologue,
                self.answered,
            ),
            timing=self.options.timing,
            log=self.log,
            first_link_id=first_link_id,
            dial_delay=self.options.dial_delay,
            birthday=self._birthday_dial(round_no) if birthday_in_round(round_no) else None,
            accept_hosts=self.accept_hosts,
            dial=self.dial,
        )

    def _birthday_dial(self, round_no: int) -> BirthdayDial | None:
        """The plan made concrete for one round: which endpoints to dial (fresh guessed
        ports for the easy side, the easy side's endpoints repeated for the hard side).
        Every round adds to the session's one report (wire.birthday.ROUND_PLAN)."""
        plan = self.birthday
        if plan is None:
            return None
        rep = self.report.hard_nat
        if rep is None:
            rep = HardNatReport(
                role=plan.role,
                sockets=plan.sockets,
                probes=plan.probes,
                expected_success=0.0,
                rate=plan.rate,
                round_success=round(plan.expected_success, 4),
            )
            self.report.hard_nat = rep
        rep.rounds.append(round_no)
        rep.expected_success = round(success_over_rounds(plan.expected_success, len(rep.rounds)), 6)
        hosts = [h for h, _p in plan.targets]
        if plan.role == "hard":
            remotes = [plan.targets[i % len(plan.targets)] for i in range(plan.count)]
        else:
            ports = guess_ports(
                random.SystemRandom(), plan.count, low=plan.port_low, high=plan.port_high
            )
            remotes = [(hosts[i % len(hosts)], port) for i, port in enumerate(ports)]
        return BirthdayDial(
            role=plan.role,
            remotes=remotes,
            rate=plan.rate,
            seconds=plan.seconds,
            report=rep,
            start_delay=plan.start_delay,
        )

    async def run(self, role: Role) -> AuthenticatedLink:
        if role == "source":
            self.report.rtt = await _measure_rtt(self.control, self.options.pings)
            return await self._as_source(self.report.rtt)
        await _answer_pings(self.control, self.options.pings)
        return await self._as_destination()

    async def _as_source(self, rtt: float) -> AuthenticatedLink:
        """Sync, wait RTT/2 (the destination dials on receipt), race, nominate the first
        authenticated link; a fresh synchronisation each round."""
        rounds = self.rounds or self.options.rounds
        for round_no in range(1, rounds + 1):
            self.report.rounds = round_no
            await self.control.send(messages.Sync(round=round_no), step=f"round {round_no}")
            await trio.sleep(rtt / 2)
            punch = self._round("source", round_no, first_link_id=1 + 1000 * (round_no - 1))
            winner = await _race(punch, self.options.timing.round_timeout)
            self.report.pairs.extend(punch.pairs)
            if winner is not None:
                nominate = messages.Nominate(
                    round=round_no, link=winner.link_id, handshake=winner.handshake_hash.hex()
                )
                await self.control.send(nominate, step=f"round {round_no}")
                return winner
            reason = _round_reason(punch.pairs)
            self.log.info("round %d failed: %s", round_no, reason)
            await self.control.send(
                messages.RoundFailed(round=round_no, retry=round_no < rounds, reason=reason),
                step=f"round {round_no}",
            )
        raise NoDirectPath(_no_link(rounds, self.report.pairs))

    async def _as_destination(self) -> AuthenticatedLink:
        """Dial on each sync, answer handshakes, keep what the source nominates."""
        timing = self.options.timing
        wait = timing.round_timeout * 2 + self.options.control_timeout
        sync, _ = await self.control.receive(messages.Sync, step="waiting for sync")
        expected = 1
        while True:
            round_no = sync.round
            # this side's own limit: a source that keeps retrying cannot make it dial on
            if round_no != expected:
                raise ProtocolError(f"sync for round {round_no}, expected round {expected}")
            if round_no > self.options.rounds:
                raise ProtocolError(
                    f"sync for round {round_no}: this side allows at most "
                    f"{self.options.rounds} rounds"
                )
            expected += 1
            self.report.rounds = round_no
            punch = self._round("destination", round_no)
            links = _LinkBox()
            send, receive = trio.open_memory_channel[AuthenticatedLink](64)
            failure: HolepunchError | None = None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(punch.run, send)
                nursery.start_soon(links.collect, receive)
                try:
                    msg, _ = await self.control.receive(
                        messages.Nominate,
                        messages.RoundFailed,
                        timeout=wait,
                        step=f"round {round_no}",
                    )
                except HolepunchError as exc:  # raised below, not as an exception group
                    failure = exc
                else:
                    if isinstance(msg, messages.Nominate):
                        # the initiator has finished, so our side of that handshake has sent
                        # its last message; the collector may not have filed it yet
                        with trio.move_on_after(timing.handshake_timeout):
                            await links.wait_for(msg.link)
                nursery.cancel_scope.cancel()
            self.report.pairs.extend(punch.pairs)
            if failure is not None:
                links.close_all()
                _close_losers(punch, None)
                raise failure
            chosen = links.take(msg.link) if isinstance(msg, messages.Nominate) else None
            links.close_all()
            _close_losers(punch, chosen)
            if isinstance(msg, messages.Nominate):
                if chosen is None or msg.round != round_no:
                    raise ProtocolError(
                        f"peer nominated link {msg.link} of round {msg.round}, "
                        "which this side never authenticated"
                    )
                if chosen.handshake_hash.hex() != msg.handshake:
                    chosen.stream.socket.close()
                    raise ProtocolError(
                        f"peer nominated link {msg.link} with another handshake than the "
                        "one this side completed for it (a replayed first message?)"
                    )
                return chosen
            if not msg.retry:
                # this side's own count over every round (the source's reason is its
                # last round's view)
                raise NoDirectPath(_no_link(round_no, self.report.pairs))
            sync, _ = await self.control.receive(messages.Sync, step="waiting for the next round")


class _LinkBox:
    """The destination's authenticated links of one round, keyed by the source's link id."""

    def __init__(self) -> None:
        self.links: dict[int, AuthenticatedLink] = {}
        self._changed = trio.Event()

    async def collect(self, receive: trio.MemoryReceiveChannel[AuthenticatedLink]) -> None:
        async with receive:
            async for link in receive:
                self.links[link.link_id] = link
                self._changed.set()
                self._changed = trio.Event()

    async def wait_for(self, link_id: int) -> None:
        while link_id not in self.links:
            await self._changed.wait()

    def take(self, link_id: int) -> AuthenticatedLink | None:
        return self.links.pop(link_id, None)

    def close_all(self) -> None:
        for link in self.links.values():
            link.stream.socket.close()
        self.links.clear()


async def _race(punch: PunchRound, timeout: float) -> AuthenticatedLink | None:
    """The first authenticated link within ``timeout``; every other one is closed."""
    send, receive = trio.open_memory_channel[AuthenticatedLink](64)
    winner: AuthenticatedLink | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(punch.run, send)
        with trio.move_on_after(timeout):
            winner = await receive.receive()
        nursery.cancel_scope.cancel()
    while True:  # links that finished after the winner are still queued: close them
        try:
            late = receive.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            break
        late.stream.socket.close()
    receive.close()
    _close_losers(punch, winner)
    return winner


def _close_losers(punch: PunchRound, winner: AuthenticatedLink | None) -> None:
    for pair in punch.pairs:
        if pair.outcome == "connected" and (winner is None or pair is not winner.pair):
            pair.outcome = "abandoned"
            pair.detail = "authenticated, not nominated"


def _round_reason(pairs: Sequence[PairReport]) -> str:
    """ "2 refused, 1 timed out": what the pairs did, for round-failed."""
    if not pairs:
        return "no candidate pairs to try"
    return count_outcomes(list(pairs))


def _no_link(rounds: int, pairs: Sequence[PairReport]) -> str:
    """ "no direct link after 3 rounds (12 pairs: 9 timed out, 3 unreachable)"."""
    plural = "s" if rounds != 1 else ""
    if not pairs:
        return f"no direct link after {rounds} round{plural}: no candidate pairs to try"
    return (
        f"no direct link after {rounds} round{plural} "
        f"({len(pairs)} pair{'s' if len(pairs) != 1 else ''}: {count_outcomes(list(pairs))})"
    )
