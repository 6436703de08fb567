"""Session orchestration: offer/answer, RTT, synchronised rounds, nomination.

The source (migration source, ``send``) is the controlling side: it measures the RTT,
sends ``sync``, initiates every Noise handshake and nominates the link.  The destination
answers, dials on ``sync``, responds to handshakes and keeps what it is told to keep.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import struct
from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

import trio

from holepunch_mig.errors import (
    ChannelClosed,
    ControlTimeout,
    HandshakeError,
    HolepunchError,
    NoDirectPath,
    PeerAbort,
    ProtocolError,
)
from holepunch_mig.net.control import ControlChannel
from holepunch_mig.net.gather import gather
from holepunch_mig.net.punch import AuthenticatedLink, PunchRound, PunchTiming, open_listener
from holepunch_mig.net.tunnel import Tunnel, TunnelRefused
from holepunch_mig.report import PairReport, Report
from holepunch_mig.roles import POLICIES, Policy, Role
from holepunch_mig.session.diagnosis import diagnose
from holepunch_mig.wire import messages
from holepunch_mig.wire.candidates import Candidate, observed_candidates
from holepunch_mig.wire.credit import DEFAULT_CREDIT_BATCH, DEFAULT_WINDOW, MAX_CHUNK
from holepunch_mig.wire.messages import Message
from holepunch_mig.wire.noise import HandshakeState, generate_keypair

logger = logging.getLogger("holepunch_mig")

_M1 = TypeVar("_M1", bound=Message)
_M2 = TypeVar("_M2", bound=Message)
_M3 = TypeVar("_M3", bound=Message)
_M4 = TypeVar("_M4", bound=Message)

NOISE_PATTERN = "KK"
PROLOGUE_LABEL = b"holepunch_mig/1\x00"
MAX_HANDSHAKE_MESSAGE = 1024
LINK_PAYLOAD = struct.Struct(">II")  # round, link id
_FRAME = struct.Struct(">H")


class SessionLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every line with the session id, so interleaved sessions stay readable."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{self.extra['session'] if self.extra else '?'}] {msg}", kwargs


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

    def check(self) -> None:
        """Raise ValueError naming the first option that is out of range."""
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be 'direct', 'auto' or 'tunnel', not {self.policy!r}")
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


class ControlReader:
    """Typed, deadline-bound access to the control channel."""

    def __init__(self, channel: ControlChannel, timeout: float) -> None:
        self.channel = channel
        self.timeout = timeout
        self._tunnel: Tunnel | None = None

    def attach(self, tunnel: Tunnel) -> None:
        """From now on the tunnel owns the channel's receive side; read its control inbox."""
        self._tunnel = tunnel

    async def _next(self) -> bytes:
        if self._tunnel is not None:
            return await self._tunnel.receive_control()
        return await self.channel.receive_message()

    async def send(self, message: Message, *, step: str = "") -> bytes:
        """Send one control message; a broken channel names what was being sent."""
        data = messages.encode(message)
        try:
            await self.channel.send_message(data)
        except ChannelClosed as exc:
            raise ChannelClosed(f"{exc} while sending {message.TYPE}{_step(step)}") from None
        return data

    @overload
    async def receive(
        self, a: type[_M1], /, *, timeout: float | None = None, step: str = ""
    ) -> tuple[_M1, bytes]: ...

    @overload
    async def receive(
        self, a: type[_M1], b: type[_M2], /, *, timeout: float | None = None, step: str = ""
    ) -> tuple[_M1 | _M2, bytes]: ...

    @overload
    async def receive(
        self,
        a: type[_M1],
        b: type[_M2],
        c: type[_M3],
        /,
        *,
        timeout: float | None = None,
        step: str = "",
    ) -> tuple[_M1 | _M2 | _M3, bytes]: ...

    @overload
    async def receive(
        self,
        a: type[_M1],
        b: type[_M2],
        c: type[_M3],
        d: type[_M4],
        /,
        *,
        timeout: float | None = None,
        step: str = "",
    ) -> tuple[_M1 | _M2 | _M3 | _M4, bytes]: ...

    async def receive(
        self, *expected: type[Message], timeout: float | None = None, step: str = ""
    ) -> tuple[Message, bytes]:
        """Next control message, which must be one of ``expected``; abort raises PeerAbort."""
        limit = self.timeout if timeout is None else timeout
        what = " or ".join(t.TYPE for t in expected)
        try:
            with trio.fail_after(limit):
                raw = await self._next()
        except trio.TooSlowError:
            raise ControlTimeout(
                f"no {what} message from the peer within {limit:.1f} s"
                + (f" ({step})" if step else "")
            ) from None
        except ChannelClosed as exc:
            raise ChannelClosed(f"{exc} while waiting for {what}" + _step(step)) from None
        event = messages.decode(raw)
        if isinstance(event, messages.TunnelData):
            raise ProtocolError(f"tunnel data arrived while waiting for {what}")
        if isinstance(event, messages.Abort) and messages.Abort not in expected:
            raise PeerAbort(f"peer aborted{_step(step)}: {event.reason}")
        if not isinstance(event, expected):
            raise ProtocolError(f"expected {what} message, got {event.type}" + _step(step))
        return event, raw


def _step(step: str) -> str:
    return f" ({step})" if step else ""


def prologue(session_id: bytes, offer: bytes, answer: bytes) -> bytes:
    """Binds every handshake to this session and to both sides' exact offers."""
    return (
        PROLOGUE_LABEL
        + session_id
        + hashlib.sha256(offer).digest()
        + hashlib.sha256(answer).digest()
    )


async def _send_hs(stream: trio.SocketStream, data: bytes) -> None:
    await stream.send_all(_FRAME.pack(len(data)) + data)


async def _receive_exact(stream: trio.SocketStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise HandshakeError(f"link closed during the handshake after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def _receive_hs(stream: trio.SocketStream) -> bytes:
    (length,) = _FRAME.unpack(await _receive_exact(stream, _FRAME.size))
    if not 0 < length <= MAX_HANDSHAKE_MESSAGE:
        raise HandshakeError(
            f"handshake message length {length} out of range 1-{MAX_HANDSHAKE_MESSAGE}"
        )
    return await _receive_exact(stream, length)


def make_authenticator(
    role: Role, round_no: int, static_private: bytes, remote_public: bytes, pro: bytes
) -> Any:
    """The per-link Noise KK handshake; the source always initiates."""

    async def initiate(stream: trio.SocketStream, link_id: int) -> tuple[int, bytes, bytes]:
        hs = HandshakeState(NOISE_PATTERN, True, pro, s=static_private, rs=remote_public)
        await _send_hs(stream, hs.write_message(LINK_PAYLOAD.pack(round_no, link_id)))
        hs.read_message(await _receive_hs(stream))
        k1, k2 = hs.split()
        return link_id, k1, k2

    async def respond(stream: trio.SocketStream, _proposed: int) -> tuple[int, bytes, bytes]:
        hs = HandshakeState(NOISE_PATTERN, False, pro, s=static_private, rs=remote_public)
        payload = hs.read_message(await _receive_hs(stream))
        if len(payload) != LINK_PAYLOAD.size:
            raise HandshakeError(f"handshake payload of {len(payload)} bytes, expected 8")
        their_round, link_id = LINK_PAYLOAD.unpack(payload)
        if their_round != round_no:
            raise HandshakeError(f"handshake for round {their_round}, this is round {round_no}")
        await _send_hs(stream, hs.write_message(b""))
        k1, k2 = hs.split()
        return link_id, k2, k1

    return initiate if role == "source" else respond


def _choose_bind(options: ConnectOptions, family: int) -> str:
    if options.bind_host:
        return options.bind_host
    return "::" if family == socket.AF_INET6 else "0.0.0.0"


def _is_loopback(host: str | None) -> bool:
    return host is not None and (host.startswith("127.") or host == "::1")


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

    listeners: dict[int, trio.socket.SocketType] = {}
    try:
        port = await _open_listeners(options, listeners)
        return await _negotiate(
            control, role, options, listeners, port, session_id, started, nursery
        )
    finally:
        for sock in listeners.values():
            sock.close()


async def _open_listeners(
    options: ConnectOptions, listeners: dict[int, trio.socket.SocketType]
) -> int:
    """Bind the punch port for every usable family into ``listeners``; return the port."""
    families = [socket.AF_INET]
    if (
        options.ipv6
        and socket.has_ipv6
        and not (options.bind_host and ":" not in options.bind_host)
    ):
        families.append(socket.AF_INET6)
    if options.bind_host and ":" in options.bind_host:
        families = [socket.AF_INET6]
    first = await open_listener(_choose_bind(options, families[0]), options.port, families[0])
    listeners[families[0]] = first
    port = int(first.getsockname()[1])
    for fam in families[1:]:
        # no IPv6 on this host, or the port is taken there: go on with IPv4
        with contextlib.suppress(OSError):
            listeners[fam] = await open_listener(_choose_bind(options, fam), port, fam)
    return port


async def _negotiate(
    control: ControlReader,
    role: Role,
    options: ConnectOptions,
    listeners: dict[int, trio.socket.SocketType],
    port: int,
    session_id: bytes,
    started: float,
    nursery: trio.Nursery | None,
) -> Established:
    include_loopback = options.include_loopback
    if include_loopback is None:
        include_loopback = _is_loopback(control.channel.peer_host)
    if role == "source" and options.policy == "tunnel":
        # no direct attempt will be made: don't spend time on STUN
        local: list[Candidate] = []
        notes = ["policy tunnel: no candidates gathered"]
    else:
        local, notes = await gather(
            port,
            stun_servers=options.stun,
            given=options.candidates,
            include_loopback=include_loopback,
            ipv6=socket.AF_INET6 in listeners,
            stun_timeout=options.stun_timeout,
        )
    static_private, static_public = generate_keypair()
    limits = {"max_record": 1 << 20}
    if options.resume_attempts > 0:
        limits["resume"] = 1
    lines = [c.to_line() for c in local]

    if role == "source":
        offer = await control.send(
            messages.Offer(
                session=session_id.hex(),
                key=static_public.hex(),
                port=port,
                candidates=lines,
                policy=options.policy,
                limits=limits,
            )
        )
        answer_msg, answer = await control.receive(messages.Answer, step="waiting for the answer")
        if answer_msg.session != session_id.hex():
            raise ProtocolError("answer names a different session id")
        peer: messages.Answer | messages.Offer = answer_msg
        policy: Policy = options.policy
        # a destination that does not say (older version) cannot tunnel
        destination_policy: Policy = answer_msg.policy or "direct"
    else:
        offer_msg, offer = await control.receive(messages.Offer, step="waiting for the offer")
        session_id = bytes.fromhex(offer_msg.session)
        answer = await control.send(
            messages.Answer(
                session=session_id.hex(),
                key=static_public.hex(),
                port=port,
                candidates=lines,
                limits=limits,
                policy=options.policy,
            )
        )
        peer = offer_msg
        policy = offer_msg.policy  # the destination follows the source
        destination_policy = options.policy

    sid = session_id.hex()
    log = SessionLog(logger, {"session": sid[:12]})
    report = Report(session=sid, role=role, policy=policy)
    report.local_port, report.remote_port = port, peer.port
    report.local_candidates = lines
    report.remote_candidates = list(peer.candidates)
    report.notes.extend(notes)
    resume = options.resume_attempts > 0 and peer.limits.get("resume", 0) >= 1
    if role == "destination" and options.policy != policy:
        report.notes.append(f"following the source's policy {policy!r} (ours: {options.policy!r})")
    tunnel_allowed = destination_policy != "direct"
    remote_public = bytes.fromhex(peer.key)
    if remote_public == static_public:
        raise HandshakeError("peer announced our own public key")
    pro = prologue(session_id, offer, answer)
    tunnel_args = (control, role, options, nursery, static_private, remote_public, pro, report)

    if policy == "tunnel":
        if not tunnel_allowed:
            exc = TunnelRefused(
                "the source asked for the tunnel only (policy 'tunnel') but the destination's "
                "policy 'direct' forbids the tunnel: no path allowed"
            )
            _fail_report(report, exc, exc.verdict)
            raise exc
        return await _switch_to_tunnel(
            *tunnel_args, started, log, reason="policy 'tunnel': the tunnel was asked for"
        )

    remotes = _remote_endpoints(
        peer.candidates, control.channel.peer_host, peer.port, report, listeners
    )
    log.info("%d local, %d remote candidates", len(local), len(remotes))
    try:
        attempt = _DirectAttempt(
            control,
            options,
            listeners,
            port,
            remotes,
            static_private,
            remote_public,
            pro,
            report,
            log,
        )
        link = await attempt.run(role)
    except NoDirectPath as exc:
        verdict = diagnose(report).verdict
        if policy == "auto" and tunnel_allowed:
            report.verdict = verdict
            log.warning("no direct path (%s); policy auto: falling back to the tunnel", exc)
            return await _switch_to_tunnel(
                *tunnel_args,
                started,
                log,
                reason=f"fell back to the tunnel (policy auto) because {exc}",
                fell_back=True,
            )
        if policy == "auto":
            refused = TunnelRefused(
                f"{exc}; the source allows the tunnel (policy 'auto') but the destination's "
                "policy 'direct' forbids it",
                verdict,
            )
            _fail_report(report, refused, verdict)
            raise refused from exc
        _fail_report(report, exc, verdict)
        raise
    except HolepunchError as exc:
        _fail_report(report, exc, str(exc))
        raise
    report.path = "direct"
    report.path_reason = "direct link authenticated and nominated"
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
    )


async def repunch(
    control: ControlReader,
    role: Role,
    options: ConnectOptions,
    session_id: bytes,
    epoch: int,
    log: SessionLog,
    *,
    kept: int = 0,
    offer: tuple[messages.ResumeOffer, bytes] | None = None,
    reason: str = "",
) -> tuple[AuthenticatedLink, int, Report]:
    """Resume (docs/protocol.md section 6): a new direct link of generation ``epoch`` for
    the same session, with fresh keys, a fresh punch port and fresh candidates.

    The source sends ``resume-offer`` and learns from ``resume-answer`` where the stream
    goes on (returned); the destination passes the ``offer`` it received and the bytes
    it ``kept``.  Then pings, rounds and nomination run exactly as for the first link,
    with the Noise prologue over the resume messages.  Returns the nominated link, the
    offset, and a scratch report holding that negotiation's rounds and pairs."""
    scratch = Report(session=session_id.hex(), role=role)
    listeners: dict[int, trio.socket.SocketType] = {}
    try:
        port = await _open_listeners(options, listeners)
        include_loopback = options.include_loopback
        if include_loopback is None:
            include_loopback = _is_loopback(control.channel.peer_host)
        local, notes = await gather(
            port,
            stun_servers=options.stun,
            given=options.candidates,
            include_loopback=include_loopback,
            ipv6=socket.AF_INET6 in listeners,
            stun_timeout=options.stun_timeout,
        )
        scratch.notes.extend(notes)
        static_private, static_public = generate_keypair()
        lines = [c.to_line() for c in local]
        fields: dict[str, Any] = {
            "session": session_id.hex(),
            "epoch": epoch,
            "key": static_public.hex(),
            "port": port,
            "candidates": lines,
        }
        if role == "source":
            offer_raw = await control.send(messages.ResumeOffer(**fields, reason=reason[:4096]))
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
                        raise PeerAbort(f"destination gave up: {msg.error}")
                    raise ProtocolError("destination sent result ok while a resume was pending")
                if isinstance(msg, messages.ResumeAnswer):
                    break
            if msg.session != session_id.hex() or msg.epoch != epoch:
                raise ProtocolError(
                    f"resume-answer for session {msg.session[:12]} epoch {msg.epoch}, "
                    f"expected {session_id.hex()[:12]} epoch {epoch}"
                )
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
            answer_raw = await control.send(messages.ResumeAnswer(**fields, bytes=kept))
        remote_public = bytes.fromhex(peer.key)
        if remote_public == static_public:
            raise HandshakeError("peer announced our own public key")
        pro = prologue(session_id, offer_raw, answer_raw)
        remotes = _remote_endpoints(
            peer.candidates, control.channel.peer_host, peer.port, scratch, listeners
        )
        attempt = _DirectAttempt(
            control,
            options,
            listeners,
            port,
            remotes,
            static_private,
            remote_public,
            pro,
            scratch,
            log,
        )
        link = await attempt.run(role)
    finally:
        for sock in listeners.values():
            sock.close()
    link.pair.outcome = "nominated"
    scratch.path = "direct"
    scratch.local, scratch.remote = link.local, link.remote
    return link, kept, scratch


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
    static_private: bytes,
    remote_public: bytes,
    pro: bytes,
    report: Report,
    started: float,
    log: SessionLog,
    *,
    reason: str,
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
            reason = msg.reason
        tunnel = Tunnel(
            control.channel,
            window=options.tunnel_window,
            credit_batch=options.tunnel_credit_batch,
        )
        await nursery.start(tunnel.run)
        control.attach(tunnel)
        try:
            stream = tunnel.link_stream()
            auth = make_authenticator(role, 0, static_private, remote_public, pro)
            try:
                with trio.fail_after(options.control_timeout):
                    _, send_key, recv_key = await auth(stream, 0)
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
        stream, send_key, recv_key, report, control, tunnel=tunnel, fell_back=fell_back
    )


def _remote_endpoints(
    lines: Sequence[str],
    peer_host: str | None,
    peer_port: int,
    report: Report,
    families: Container[int],
) -> list[tuple[str, int]]:
    """The peer's candidates plus the observed one, deduplicated, of the address families
    this side has a listener for; bad lines are noted in the report and skipped."""
    out: list[tuple[str, int]] = []
    cands: list[Candidate] = []
    for line in lines:
        try:
            cands.append(Candidate.from_line(line))
        except Exception as exc:
            report.notes.append(f"ignored remote candidate {line[:80]!r}: {exc}")
    cands.extend(observed_candidates(peer_host, [peer_port]))
    for cand in cands:
        endpoint = (cand.host, cand.port)
        family = socket.AF_INET6 if ":" in cand.host else socket.AF_INET
        if endpoint not in out and family in families:
            out.append(endpoint)
    return out


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
class _DirectAttempt:
    """Everything the punch rounds of one session share; the two roles' round loops."""

    control: ControlReader
    options: ConnectOptions
    listeners: dict[int, trio.socket.SocketType]
    port: int
    remotes: list[tuple[str, int]]
    static_private: bytes
    remote_public: bytes
    prologue: bytes
    report: Report
    log: SessionLog

    def _round(self, role: Role, round_no: int, first_link_id: int = 1) -> PunchRound:
        return PunchRound(
            round_no=round_no,
            listeners=self.listeners,
            bind_host={f: _choose_bind(self.options, f) for f in self.listeners},
            port=self.port,
            remotes=self.remotes,
            authenticate=make_authenticator(
                role, round_no, self.static_private, self.remote_public, self.prologue
            ),
            timing=self.options.timing,
            log=self.log,
            first_link_id=first_link_id,
            dial_delay=self.options.dial_delay,
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
        rounds = self.options.rounds
        for round_no in range(1, rounds + 1):
            self.report.rounds = round_no
            await self.control.send(messages.Sync(round=round_no), step=f"round {round_no}")
            await trio.sleep(rtt / 2)
            punch = self._round("source", round_no, first_link_id=1 + 1000 * (round_no - 1))
            winner = await _race(punch, self.options.timing.round_timeout)
            self.report.pairs.extend(punch.pairs)
            if winner is not None:
                await self.control.send(
                    messages.Nominate(round=round_no, link=winner.link_id), step=f"round {round_no}"
                )
                return winner
            reason = _round_reason(punch.pairs)
            self.log.info("round %d failed: %s", round_no, reason)
            await self.control.send(
                messages.RoundFailed(round=round_no, retry=round_no < rounds, reason=reason),
                step=f"round {round_no}",
            )
        raise NoDirectPath(
            f"no direct link after {rounds} rounds: {_round_reason(self.report.pairs)}"
        )

    async def _as_destination(self) -> AuthenticatedLink:
        """Dial on each sync, answer handshakes, keep what the source nominates."""
        timing = self.options.timing
        wait = timing.round_timeout * 2 + self.options.control_timeout
        sync, _ = await self.control.receive(messages.Sync, step="waiting for sync")
        while True:
            round_no = sync.round
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
                return chosen
            if not msg.retry:
                raise NoDirectPath(f"no direct link: {msg.reason}")
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
    """ "2 refused, 1 timed out": what the pairs did, for round-failed and NoDirectPath."""
    if not pairs:
        return "no candidate pairs to try"
    counts: dict[str, int] = {}
    for pair in pairs:
        counts[pair.outcome] = counts.get(pair.outcome, 0) + 1
    return ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))
