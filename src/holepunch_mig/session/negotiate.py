"""Session orchestration: offer/answer, the path decision, and resume's re-punch.

The source (migration source, ``send``) is the controlling side: it measures the RTT,
sends ``sync``, initiates every Noise handshake and nominates the link.  The destination
answers, dials on ``sync``, responds to handshakes and keeps what it is told to keep.
Which path is taken is :mod:`~holepunch_mig.session.policy`'s table; the rounds are in
:mod:`~holepunch_mig.session.rounds`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import trio

from holepunch_mig.errors import (
    ChannelClosed,
    HandshakeError,
    HolepunchError,
    NoDirectPath,
    PeerAbort,
    ProtocolError,
    TunnelRefused,
)
from holepunch_mig.net.control import ControlChannel
from holepunch_mig.net.punch import AuthenticatedLink
from holepunch_mig.net.secure_control import SecureChannel
from holepunch_mig.net.tunnel import Tunnel
from holepunch_mig.report import Report
from holepunch_mig.roles import Policy, Role
from holepunch_mig.session.control_reader import ControlReader
from holepunch_mig.session.diagnosis import explain_no_path, mapping_varies, tunnel_advice
from holepunch_mig.session.handshake import make_authenticator
from holepunch_mig.session.options import ConnectOptions
from holepunch_mig.session.policy import decide, direct_rounds
from holepunch_mig.session.prepare import Listeners, PeerKeys, prepare_round, release
from holepunch_mig.session.rounds import DirectAttempt
from holepunch_mig.wire import messages
from holepunch_mig.wire.birthday import (
    announce,
    announced_class,
    birthday_rounds,
    public_addresses,
)
from holepunch_mig.wire.birthday import plan as plan_birthday
from holepunch_mig.wire.digests import Algorithm, offers_blake3
from holepunch_mig.wire.digests import choose as choose_digest
from holepunch_mig.wire.messages import MAX_LINKS
from holepunch_mig.wire.portmap import PortMapping
from holepunch_mig.wire.resume_auth import check_resume_mac, resume_mac
from holepunch_mig.wire.text import printable

logger = logging.getLogger("holepunch_mig")


class SessionLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every line with the session id, so interleaved sessions stay readable."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{self.extra['session'] if self.extra else '?'}] {msg}", kwargs


@dataclass
class Established:
    """An authenticated link (direct, or the tunnel's end) and what it took to get it."""

    stream: trio.SocketStream
    send_key: bytes
    recv_key: bytes
    report: Report
    control: ControlReader
    tunnel: Tunnel | None = None
    """The running tunnel when the path is "tunnel" (closed with the link)."""
    fell_back: bool = False
    """True when the policy was "auto" and the direct path failed: the caller asked for
    direct first and got the tunnel."""
    session_id: bytes = b""
    options: ConnectOptions | None = None
    resume: bool = False
    """Both sides offered resume (``limits.resume``) and the path is direct."""
    digest: Algorithm = "sha256"
    """The stream transfers' end-to-end digest (BLAKE3 when both offered it)."""
    max_links: int = 1
    """Most links (the first included) the session may carry: 1 unless both sides
    announced ``limits.links`` (docs/protocol.md section 9)."""


async def establish(
    channel: ControlChannel,
    role: Role,
    options: ConnectOptions,
    *,
    nursery: trio.Nursery | None = None,
) -> Established:
    """Negotiate a path as the policy says: a nominated direct link, or (policy "auto"
    after the direct path failed, or policy "tunnel") the tunnel over ``channel``, which
    runs in ``nursery`` until the link is closed.  Raises NoDirectPath (TunnelRefused when
    the destination's policy forbids the tunnel) with ``.report`` and ``.verdict``."""
    options.check()
    control = ControlReader(channel, options.control_timeout)
    session_id = os.urandom(16) if role == "source" else b""
    started = trio.current_time()

    listeners: Listeners = {}
    mappings: list[PortMapping] = []
    try:
        return await _negotiate(
            control, role, options, listeners, mappings, session_id, started, nursery
        )
    except HolepunchError as exc:
        await _tell_abort(control, exc)
        raise
    finally:
        await release(listeners, mappings)


async def _tell_abort(control: ControlReader, exc: HolepunchError) -> None:
    """A failure this side found (a malformed or unexpected message, a deadline, a
    handshake) is told to the peer with ``abort`` before the channel closes, so it fails
    with the reason instead of a closed channel.  Not for what the peer already knows:
    its own abort, a closed channel, or no direct path (round-failed said so)."""
    if isinstance(exc, PeerAbort | ChannelClosed | NoDirectPath):
        return
    with trio.move_on_after(1.0), contextlib.suppress(HolepunchError):
        await control.send(messages.Abort(reason=str(exc)[:4096] or type(exc).__name__))


async def _negotiate(
    control: ControlReader,
    role: Role,
    options: ConnectOptions,
    listeners: Listeners,
    mappings: list[PortMapping],
    session_id: bytes,
    started: float,
    nursery: trio.Nursery | None,
) -> Established:
    prepared = await prepare_round(
        options,
        control.channel.peer_host,
        listeners,
        mappings=mappings,
        # the destination asks before the offer brings the session id
        label=session_id.hex()[:12],
        # no direct attempt will be made: don't spend time on STUN
        skip_gather=(
            "policy tunnel: no candidates gathered"
            if role == "source" and options.policy == "tunnel"
            else None
        ),
    )
    port, lines = prepared.port, prepared.lines
    limits = {"max_record": 1 << 20}
    if options.resume_attempts > 0:
        limits["resume"] = 1
    budget = options.birthday if options.hard_nat == "birthday" else None
    limits.update(announce(prepared.nat, budget))
    if offers_blake3(options.digest):
        limits["blake3"] = 1
    limits["links"] = MAX_LINKS  # this side takes part in link-offer/link-answer (section 9)

    if role == "source":
        offer = await control.send(
            messages.Offer(
                session=session_id.hex(),
                key=prepared.static_public.hex(),
                port=port,
                candidates=lines,
                policy=options.policy,
                limits=limits,
            )
        )
        answer_msg, answer = await control.receive(messages.Answer, step="waiting for the answer")
        exchanged = trio.current_time()
        if answer_msg.session != session_id.hex():
            raise ProtocolError("answer names a different session id")
        peer: messages.Answer | messages.Offer = answer_msg
        policy: Policy = options.policy
        # a destination that does not say (older version) cannot tunnel
        destination_policy: Policy = answer_msg.policy or "direct"
    else:
        offer_msg, offer = await control.receive(messages.Offer, step="waiting for the offer")
        exchanged = trio.current_time()
        session_id = bytes.fromhex(offer_msg.session)
        answer = await control.send(
            messages.Answer(
                session=session_id.hex(),
                key=prepared.static_public.hex(),
                port=port,
                candidates=lines,
                limits=limits,
                policy=options.policy,
            )
        )
        peer = offer_msg
        policy = offer_msg.policy  # the destination follows the source
        destination_policy = options.policy

    # time to link counts this side's own preparation and everything after the
    # offer/answer exchange, not the wait for the peer to come up (ssh, a late start)
    started = exchanged - prepared.seconds
    sid = session_id.hex()
    log = SessionLog(logger, {"session": sid[:12]})
    report = Report(session=sid, role=role, policy=policy)
    report.local_port, report.remote_port = port, peer.port
    report.local_candidates = lines
    report.remote_candidates = list(peer.candidates)
    report.notes.extend(prepared.notes)
    report.port_mapping = prepared.mapping_protocol
    resume = options.resume_attempts > 0 and peer.limits.get("resume", 0) >= 1
    try:
        digest = choose_digest(options.digest, peer.limits.get("blake3", 0) >= 1)
    except ValueError as bad_digest:
        proto = ProtocolError(str(bad_digest))
        _fail_report(report, proto, str(bad_digest))
        raise proto from None
    report.digest = digest
    max_links = max(1, min(MAX_LINKS, peer.limits.get("links", 1)))
    if role == "destination" and options.policy != policy:
        report.notes.append(f"following the source's policy {policy!r} (ours: {options.policy!r})")
    keys = prepared.keys_for(peer.key, session_id, offer, answer, control_binding(control))
    _note_control(report, control, log)

    first = decide(policy, destination_policy, "untried")
    if first.action == "fail":
        exc = TunnelRefused(first.reason_for())
        _fail_report(report, exc, exc.verdict)
        raise exc
    if first.action == "tunnel":
        return await _switch_to_tunnel(
            control, role, options, nursery, keys, report, started, log, first.reason_for()
        )

    remotes = prepared.remotes(peer.candidates, control.channel.peer_host, peer.port, report)
    log.info("%d local, %d remote candidates", len(prepared.local), len(remotes))
    birthday, why = plan_birthday(
        local_class=prepared.nat,
        local_limits=limits,
        peer_limits=peer.limits,
        peer_candidates=peer.candidates,
        peer_port=peer.port,
        peer_host=control.channel.peer_host,
        local_budget=budget,
    )
    if birthday is not None:
        report.notes.append(
            f"birthday punching: {why} ({birthday.sockets} sockets x {birthday.probes} "
            f"probes a round, expected success {100 * birthday.expected_success:.1f} % a "
            f"round, in rounds {', '.join(map(str, birthday_rounds(options.rounds)))})"
        )
        log.info("birthday punching as the %s side", birthday.role)
    elif prepared.nat == "dependent" or announced_class(peer.limits) == "dependent":
        report.notes.append(f"birthday punching not used: {why}")
    rounds = options.rounds
    if role == "source":
        varied = {
            side: mapping_varies(lines)
            for side, lines in (("source", lines), ("destination", list(peer.candidates)))
        }
        doomed = [side for side, eps in varied.items() if eps]
        rounds = direct_rounds(policy, destination_policy, options.rounds, bool(doomed))
        if birthday is not None:
            # birthday punching crosses the symmetric side: keep its rounds
            rounds = max((rounds, *birthday_rounds(options.rounds)))
        if rounds < options.rounds:
            report.notes.append(
                f"STUN showed endpoint-dependent mapping on the {' and '.join(doomed)} side "
                f"({', '.join(varied[doomed[0]])}) before round 1: "
                f"{'one direct round' if rounds == 1 else f'{rounds} direct rounds'} instead "
                f"of {options.rounds}, then the tunnel"
            )
    try:
        accept = (
            frozenset(public_addresses(peer.candidates))
            if announced_class(peer.limits) == "dependent"
            else frozenset()
        )
        mapped = prepared.nat == "mapped"
        listen_only = mapped and (announced_class(peer.limits) != "mapped" or role == "destination")
        if listen_only:
            report.notes.append(
                "this side holds a router port mapping: it only accepts (the peer dials it)"
            )
        attempt = DirectAttempt(
            control,
            prepared,
            keys,
            remotes,
            report,
            log,
            rounds,
            birthday=birthday,
            accept_hosts=accept,
            dial=not listen_only,
        )
        link = await attempt.run(role)
    except NoDirectPath as exc:
        after = decide(policy, destination_policy, "failed")
        advice = tunnel_advice(policy, destination_policy, after.action == "tunnel")
        verdict = explain_no_path(report, advice).verdict
        if after.action == "tunnel":
            report.verdict = verdict
            log.warning("no direct path (%s); policy auto: falling back to the tunnel", exc)
            return await _switch_to_tunnel(
                control,
                role,
                options,
                nursery,
                keys,
                report,
                started,
                log,
                after.reason_for(exc),
                fell_back=after.fell_back,
            )
        if after.refused:
            refused = TunnelRefused(after.reason_for(exc), verdict)
            _fail_report(report, refused, verdict)
            raise refused from exc
        _fail_report(report, exc, verdict)
        raise
    except HolepunchError as exc:
        _fail_report(report, exc, str(exc))
        raise
    report.path = "direct"
    report.path_reason = decide(policy, destination_policy, "succeeded").reason_for()
    report.local, report.remote = link.local, link.remote
    report.time_to_link = trio.current_time() - started
    report.resume = resume
    link.pair.outcome = "nominated"
    log.info("link %s <-> %s nominated in %.3f s", link.local, link.remote, report.time_to_link)
    return Established(
        link.stream,
        link.send_key,
        link.recv_key,
        report,
        control,
        session_id=session_id,
        options=options,
        resume=resume,
        digest=digest,
        max_links=max_links,
    )


async def repunch(
    control: ControlReader,
    role: Role,
    options: ConnectOptions,
    session_id: bytes,
    epoch: int,
    log: SessionLog,
    *,
    mac_key: bytes,
    kept: int = 0,
    offer: tuple[messages.ResumeOffer, bytes] | None = None,
    reason: str = "",
) -> tuple[AuthenticatedLink, int, Report]:
    """Resume (docs/protocol.md section 7): a new direct link of generation ``epoch`` for
    the same session, with fresh keys, a fresh punch port and fresh candidates.

    The source sends ``resume-offer`` and learns from ``resume-answer`` where the stream
    goes on (returned); the destination passes the ``offer`` it received and the bytes
    it ``kept``.  Then pings, rounds and nomination run exactly as for the first link,
    with the Noise prologue over the resume messages.  Both resume messages carry a MAC
    under ``mac_key`` (the session's last link's resume key, wire.resume_auth); one that
    does not verify is a ProtocolError.  Returns the nominated link, the offset, and a
    scratch report holding that negotiation's rounds and pairs."""
    scratch = Report(session=session_id.hex(), role=role)
    listeners: Listeners = {}
    mappings: list[PortMapping] = []
    try:
        prepared = await prepare_round(
            options, control.channel.peer_host, listeners, mappings=mappings
        )
        scratch.notes.extend(prepared.notes)
        fields: dict[str, Any] = {
            "session": session_id.hex(),
            "epoch": epoch,
            "key": prepared.static_public.hex(),
            "port": prepared.port,
            "candidates": prepared.lines,
        }
        if role == "source":
            mac = resume_mac(mac_key, "resume-offer", **fields)
            offer_raw = await control.send(
                messages.ResumeOffer(**fields, reason=reason[:4096], mac=mac)
            )
            while True:
                msg, answer_raw = await control.receive(
                    messages.ResumeAnswer,
                    messages.Progress,
                    messages.LinkLost,
                    messages.Result,
                    step=f"waiting for resume-answer {epoch}",
                )
                if isinstance(msg, messages.Result):
                    if not msg.ok:
                        raise PeerAbort(f"destination gave up: {printable(msg.error or '')}")
                    raise ProtocolError("destination sent result ok while a resume was pending")
                if isinstance(msg, messages.ResumeAnswer):
                    break
            if msg.session != session_id.hex() or msg.epoch != epoch:
                raise ProtocolError(
                    f"resume-answer for session {msg.session[:12]} epoch {msg.epoch}, "
                    f"expected {session_id.hex()[:12]} epoch {epoch}"
                )
            _check_mac(mac_key, msg, msg.bytes)
            peer: messages.ResumeAnswer | messages.ResumeOffer = msg
            kept = msg.bytes
        else:
            if offer is None:
                raise ValueError("the destination needs the resume-offer it received")
            peer, offer_raw = offer
            if peer.session != session_id.hex() or peer.epoch != epoch:
                raise ProtocolError(
                    f"resume-offer for session {peer.session[:12]} epoch {peer.epoch}, "
                    f"expected {session_id.hex()[:12]} epoch {epoch}"
                )
            _check_mac(mac_key, peer, 0)
            mac = resume_mac(mac_key, "resume-answer", **fields, offset=kept)
            answer_raw = await control.send(messages.ResumeAnswer(**fields, bytes=kept, mac=mac))
        keys = prepared.keys_for(
            peer.key, session_id, offer_raw, answer_raw, control_binding(control)
        )
        remotes = prepared.remotes(peer.candidates, control.channel.peer_host, peer.port, scratch)
        attempt = DirectAttempt(control, prepared, keys, remotes, scratch, log)
        link = await attempt.run(role)
    finally:
        await release(listeners, mappings)
    link.pair.outcome = "nominated"
    scratch.path = "direct"
    scratch.local, scratch.remote = link.local, link.remote
    return link, kept, scratch


def _check_mac(
    mac_key: bytes, msg: messages.ResumeOffer | messages.ResumeAnswer, offset: int
) -> None:
    check_resume_mac(
        mac_key,
        msg.TYPE,
        msg.mac,
        session=msg.session,
        epoch=msg.epoch,
        key=msg.key,
        port=msg.port,
        candidates=msg.candidates,
        offset=offset,
    )


def control_binding(control: ControlReader) -> bytes:
    """The control handshake hash when this side authenticated the channel, else b""."""
    channel = control.channel
    return channel.binding if isinstance(channel, SecureChannel) else b""


def _note_control(report: Report, control: ControlReader, log: SessionLog) -> None:
    channel = control.channel
    if isinstance(channel, SecureChannel):
        report.control_peer = channel.session.peer
        report.control_handshake = channel.handshake_seconds
        report.notes.extend(channel.notes)
        log.info("control peer: %s", channel.session.peer)
    else:
        report.control_peer = "trusted by the caller"


def _fail_report(report: Report, exc: HolepunchError, verdict: str) -> None:
    exc.report = report
    if isinstance(exc, NoDirectPath):
        exc.verdict = verdict
    report.ok = False
    report.verdict = verdict


async def _switch_to_tunnel(
    control: ControlReader,
    role: Role,
    options: ConnectOptions,
    nursery: trio.Nursery | None,
    keys: PeerKeys,
    report: Report,
    started: float,
    log: SessionLog,
    reason: str,
    *,
    fell_back: bool = False,
) -> Established:
    """Announce (source) or accept (destination) the switch with a ``path`` message, start
    the tunnel and run the same Noise KK handshake over it (round 0, link 0)."""
    try:
        if nursery is None:
            raise HolepunchError(
                "the tunnel needs a nursery to run in: call establish(..., nursery=...) "
                "or use holepunch_mig.connect"
            )
        if role == "source":
            await control.send(messages.Path(path="tunnel", reason=reason[:4096]))
        else:
            msg, _ = await control.receive(
                messages.Path, step="waiting for the switch to the tunnel"
            )
            if msg.path != "tunnel":
                raise ProtocolError(f"source announced path {msg.path!r}, expected 'tunnel'")
            reason = printable(msg.reason)
        tunnel = Tunnel(
            control.channel,
            window=options.tunnel_window,
            credit_batch=options.tunnel_credit_batch,
        )
        await nursery.start(tunnel.run)
        control.attach(tunnel)
        try:
            stream = tunnel.link_stream()
            auth = make_authenticator(
                role, 0, keys.static_private, keys.remote_public, keys.prologue
            )
            try:
                with trio.fail_after(options.control_timeout):
                    _, send_key, recv_key, _hash = await auth(stream, 0)
            except trio.TooSlowError:
                raise HandshakeError(
                    f"Noise handshake over the tunnel did not finish within "
                    f"{options.control_timeout:.1f} s"
                ) from None
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise HandshakeError(
                    f"tunnel closed during the Noise handshake: {tunnel.error or exc}"
                ) from None
        except BaseException:
            await tunnel.aclose()
            raise
    except HolepunchError as exc:
        _fail_report(report, exc, report.verdict or str(exc))
        raise
    report.path = "tunnel"
    report.path_reason = reason
    report.fell_back = fell_back
    report.local, report.remote = "tunnel", "tunnel"
    report.time_to_link = trio.current_time() - started
    log.info("using the tunnel over the control channel: %s", reason)
    return Established(
        stream,
        send_key,
        recv_key,
        report,
        control,
        tunnel=tunnel,
        fell_back=fell_back,
        digest="blake3" if report.digest == "blake3" else "sha256",
    )
