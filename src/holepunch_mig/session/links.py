"""More links for one session (docs/protocol.md section 9): parallel, independently
punched and authenticated TCP links beside the first, so bulk data can use one link
(and one pair of worker threads) per stream instead of one reader for everything.

Each extra link ``i`` gets a fresh punch port, fresh candidates and a fresh static key
on both sides (``link-offer`` / ``link-answer``, all offers sent before the first answer
is awaited, so the exchange costs one round trip however many links there are); then the
ordinary synchronised rounds and nomination of the first link run for link 1, link 2 ...
in turn, with the Noise prologue over that link's own offer and answer, so a connection
meant for one link never authenticates as another.  A link that finds no path within its
rounds is skipped on both sides (both saw the same ``round-failed``): the caller gets the
links that exist, in index order.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from dataclasses import dataclass

import trio

from holepunch_mig.errors import NoDirectPath, ProtocolError
from holepunch_mig.net.punch import AuthenticatedLink
from holepunch_mig.net.record_io import RecordReader, RecordWriter
from holepunch_mig.report import Report
from holepunch_mig.roles import Role
from holepunch_mig.session.control_reader import ControlReader
from holepunch_mig.session.negotiate import control_binding
from holepunch_mig.session.options import ConnectOptions
from holepunch_mig.session.prepare import Listeners, Prepared, prepare_round
from holepunch_mig.session.resume import tune_link
from holepunch_mig.session.rounds import DirectAttempt
from holepunch_mig.wire import messages
from holepunch_mig.wire.messages import MAX_LINKS

SOCKET_BUFFER = 4 << 20


@dataclass
class DataLink:
    """One authenticated link in blocking mode: the socket and its record writer/reader
    (what a bulk-data worker needs).  ``index`` 0 is the session's first link."""

    index: int
    sock: socket.socket
    writer: RecordWriter
    reader: RecordReader
    local: str
    remote: str

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def blocking_socket(stream: trio.SocketStream) -> socket.socket:
    """Take the socket out of trio: blocking, with large kernel buffers."""
    fd = stream.socket.detach()
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
    return sock


def data_link(index: int, link: AuthenticatedLink, link_timeout: float) -> DataLink:
    sock = blocking_socket(link.stream)
    tune_link(sock, link_timeout)
    return DataLink(
        index,
        sock,
        RecordWriter(sock, link.send_key),
        RecordReader(sock, link.recv_key),
        link.local,
        link.remote,
    )


async def punch_links(
    control: ControlReader,
    role: Role,
    options: ConnectOptions,
    session_id: bytes,
    count: int,
    report: Report,
    log: logging.LoggerAdapter[logging.Logger],
) -> list[DataLink]:
    """Punch ``count`` more links (indices 1..count) for the session; both sides call
    this with the same ``count`` at the same point of the control conversation (the
    source initiates).  Returns the links that were nominated; their rounds and pairs
    are added to ``report`` (round numbers as on the wire, pairs' detail names the link)."""
    if count <= 0:
        return []
    if count >= MAX_LINKS:  # pragma: no cover - the migrate messages bound it
        raise ValueError(f"at most {MAX_LINKS - 1} more links, not {count}")
    rtt = report.rtt or 0.0
    listeners: list[Listeners] = [{} for _ in range(count)]
    prepared: list[Prepared | None] = [None] * count
    out: list[DataLink] = []
    try:

        async def prepare(i: int) -> None:
            prepared[i] = await prepare_round(options, control.channel.peer_host, listeners[i])

        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(prepare, i)
        ready = [p for p in prepared if p is not None]
        raws: list[tuple[bytes, bytes]] = []
        peers: list[messages.LinkOffer | messages.LinkAnswer] = []
        sid = session_id.hex()
        if role == "source":
            offers = []
            for i, prep in enumerate(ready, 1):
                offers.append(
                    await control.send(
                        messages.LinkOffer(
                            session=sid,
                            index=i,
                            key=prep.static_public.hex(),
                            port=prep.port,
                            candidates=prep.lines,
                        )
                    )
                )
            for i, offer_raw in enumerate(offers, 1):
                answer, answer_raw = await control.receive(
                    messages.LinkAnswer, step=f"waiting for link-answer {i}"
                )
                _check(answer, sid, i)
                peers.append(answer)
                raws.append((offer_raw, answer_raw))
        else:
            for i, prep in enumerate(ready, 1):
                offer, offer_raw = await control.receive(
                    messages.LinkOffer, step=f"waiting for link-offer {i}"
                )
                _check(offer, sid, i)
                answer_raw = await control.send(
                    messages.LinkAnswer(
                        session=sid,
                        index=i,
                        key=prep.static_public.hex(),
                        port=prep.port,
                        candidates=prep.lines,
                    )
                )
                peers.append(offer)
                raws.append((offer_raw, answer_raw))
        for i, (prep, peer, (offer_raw, answer_raw)) in enumerate(
            zip(ready, peers, raws, strict=True), 1
        ):
            keys = prep.keys_for(
                peer.key, session_id, offer_raw, answer_raw, control_binding(control)
            )
            scratch = Report(session=sid, role=role, rtt=rtt)
            remotes = prep.remotes(peer.candidates, control.channel.peer_host, peer.port, scratch)
            attempt = DirectAttempt(control, prep, keys, remotes, scratch, log)
            try:
                link = await (
                    attempt._as_source(rtt) if role == "source" else attempt._as_destination()
                )
            except NoDirectPath as exc:
                report.notes.append(f"link {i}: no direct path ({exc}); carried without it")
                log.warning("link %d: no direct path: %s", i, exc)
                continue
            finally:
                for pair in scratch.pairs:
                    pair.detail = f"link {i}" + (f": {pair.detail}" if pair.detail else "")
                report.pairs.extend(scratch.pairs)
                report.notes.extend(f"link {i}: {note}" for note in scratch.notes)
            link.pair.outcome = "nominated"
            out.append(data_link(i, link, options.link_timeout))
            log.info("link %d %s <-> %s nominated", i, link.local, link.remote)
    except BaseException:
        for dl in out:
            dl.close()
        raise
    finally:
        for group in listeners:
            for sock in group.values():
                sock.close()
    return out


def _check(msg: messages.LinkOffer | messages.LinkAnswer, session: str, index: int) -> None:
    if msg.session != session or msg.index != index:
        raise ProtocolError(
            f"{msg.type} for session {msg.session[:12]} link {msg.index}, expected "
            f"{session[:12]} link {index}"
        )
