"""The project's benchmark harness: a registry of named throughput measurements plus the
"time to link" of the real CLI in the namespace lab.

Every throughput row moves the same generated payload from a sender process to a
receiver process (two forked processes, so two interpreters and two GILs, as in a real
migration) over one loopback TCP connection with the same socket buffer sizes, and
reports wall-clock MB/s (MB = 10**6 B), CPU seconds per GiB of each process (getrusage
user+sys, all threads), socket calls and context switches per GiB, and the ratio to the
baseline row.  Each row runs ``runs`` times (rows interleaved); the median, min and max
are reported.

Nothing fast and wrong counts: the payload is a 1 MiB random pattern whose every 1 MiB
chunk starts with its own index, so the receiver checks the byte count, the chunk stamps
(drops, duplicates, reordering) and the last byte of every chunk; rows that hash must
produce the SHA-256 the harness computed independently beforehand; ``full_verify`` also
hashes everything the sink receives.  A failed check fails the row and the run.

Add a row by decorating a factory that returns a :class:`PairSpec`::

    @measurement("2", "tls", "TLS 1.3, blocking ssl.SSLSocket")
    def _tls(cfg: BenchConfig) -> PairSpec:
        return PairSpec(sender=..., receiver=...)

The sender gets a connected socket and a :class:`PatternSource`; the receiver a socket
and a :class:`CheckingSink`; each returns a :class:`SideResult`.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from holepunch_mig.net.record_io import RecordReader, RecordWriter
from holepunch_mig.wire.records import MAX_RECORD, RecordType

__all__ = [
    "CHUNK",
    "GIB",
    "REGISTRY",
    "BenchConfig",
    "BenchError",
    "BenchResult",
    "CheckingSink",
    "LinkTiming",
    "Measurement",
    "PairSpec",
    "PatternSource",
    "RowResult",
    "Sample",
    "SideResult",
    "crypto_only",
    "expected_sha256",
    "machine_info",
    "measurement",
    "render_markdown",
    "render_text",
    "run_bench",
    "time_to_link",
]

CHUNK = 1 << 20
GIB = 1 << 30
_STAMP = struct.Struct(">Q")


class BenchError(Exception):
    """A measurement failed: a side crashed, timed out, or the payload did not verify."""


# --------------------------------------------------------------------------- payload


def _address(view: memoryview) -> int:
    """Address of a writable contiguous buffer (for the GIL-free memmove)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class PatternSource:
    """``readinto`` yields ``total`` bytes: a fixed 1 MiB random pattern, the first 8
    bytes of chunk k (offset k * CHUNK) replaced by k as u64 BE.  Content does not affect
    AES or TCP speed; the stamps make drops, duplicates and reordering visible.

    The copy is a ctypes memmove, which releases the GIL like a real source's
    ``readinto`` (a file, QEMU's socket) does, instead of a slice assignment holding it."""

    def __init__(self, total: int, seed: bytes) -> None:
        self.total = total
        self.pos = 0
        self._pattern = bytearray(hashlib.shake_256(seed).digest(CHUNK))
        self.pattern = memoryview(self._pattern)
        self._pattern_addr = _address(self.pattern)

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        n = min(len(view), self.total - self.pos)
        done = 0
        while done < n:
            pos = self.pos + done
            k, off = divmod(pos, CHUNK)
            take = min(n - done, CHUNK - off)
            if take >= 4096 and not view.readonly:
                ctypes.memmove(_address(view[done:]), self._pattern_addr + off, take)
            else:
                view[done : done + take] = self.pattern[off : off + take]
            if off < _STAMP.size:  # (part of) the stamp of chunk k is in this piece
                stamp = _STAMP.pack(k)[off : min(_STAMP.size, off + take)]
                view[done : done + len(stamp)] = stamp
            done += take
        self.pos += n
        return n

    # Seekable like the file a migration manager would send (resume re-reads from an
    # offset instead of keeping a replay copy of every byte, as it must for a pipe).
    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence != 0 or not 0 <= offset <= self.total:
            raise ValueError(f"PatternSource.seek({offset}, {whence}): absolute 0..total only")
        self.pos = offset
        return self.pos


def expected_sha256(total: int, seed: bytes) -> str:
    """SHA-256 of what a PatternSource(total, seed) yields, computed independently of any
    transport."""
    src = PatternSource(total, seed)
    buf = memoryview(bytearray(CHUNK))
    h = hashlib.sha256()
    while True:
        n = src.readinto(buf)
        if not n:
            return h.hexdigest()
        h.update(buf[:n])


class CheckingSink:
    """``write`` checks every chunk stamp and the last byte of every chunk against the
    pattern as the bytes arrive, counts them, and with ``full_hash`` hashes them all."""

    def __init__(self, seed: bytes, *, full_hash: bool = False) -> None:
        self.pattern = hashlib.shake_256(seed).digest(CHUNK)
        self.pos = 0
        self.bad: str | None = None
        self.hash = hashlib.sha256() if full_hash else None

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        n = len(view)
        pos = self.pos
        if self.hash is not None:
            self.hash.update(view)
        if self.bad is None and n:
            for k in range(pos // CHUNK, (pos + n - 1) // CHUNK + 1):
                base = k * CHUNK
                lo, hi = max(pos, base), min(pos + n, base + _STAMP.size)
                if lo < hi and view[lo - pos : hi - pos] != _STAMP.pack(k)[lo - base : hi - base]:
                    self.bad = f"chunk stamp at offset {base} is wrong (dropped/reordered data)"
                    break
                last = base + CHUNK - 1
                if pos <= last < pos + n and view[last - pos] != self.pattern[-1]:
                    self.bad = f"byte at offset {last} is wrong"
                    break
        self.pos = pos + n
        return n

    def flush(self) -> None:
        """Nothing is buffered; resumable receives flush at every acknowledgement."""


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class BenchConfig:
    total: int = 2 * GIB
    runs: int = 3
    sockbuf: int = 4 << 20  # SO_SNDBUF/SO_RCVBUF on both ends, every row; 0 = kernel's
    chunk: int = CHUNK  # application buffer of the plain rows
    prefetch: int = 3  # RecordReader.receive_file
    pipeline: int = 3  # RecordWriter.send_file
    full_verify: bool = False
    seed: bytes = b"holepunch-mig bench"
    key: bytes = field(default_factory=lambda: os.urandom(32))
    timeout: float = 300.0
    workdir: str = ""  # per-run scratch directory (the TLS row's throwaway certificate)
    rtt_ms: int = 0  # the lab's round-trip delay for this cell (0 on loopback)


@dataclass
class SideResult:
    nbytes: int = 0
    sha256: str | None = None  # what the side computed, when it hashed
    socket_calls: int = 0
    error: str | None = None
    sink_bytes: int = 0  # filled in by the harness from the CheckingSink
    sink_bad: str | None = None
    sink_sha256: str | None = None
    time_to_link: float | None = None  # session rows: the Report's time_to_link
    extra: dict[str, Any] = field(default_factory=dict)  # row-specific facts (cipher, ...)


SenderFn = Callable[[socket.socket, PatternSource, BenchConfig], SideResult]
ReceiverFn = Callable[[socket.socket, CheckingSink, BenchConfig], SideResult]


@dataclass(frozen=True)
class PairSpec:
    """How one row moves the payload.

    ``port`` says what socket the harness hands both sides: ``"data"`` a TCP connection
    to an opened inbound port (rows 1, 2), ``"control"`` the control connection (rows
    3-5 run the real session over it).  Rows with ``self_start`` call :func:`started`
    themselves once their link is up (the clock and the CPU meters start there; time to
    link is reported separately) and the receiver calls :func:`finished` when the
    payload is verified; otherwise the harness does both around the side function.
    ``cap(rtt_ms)`` bounds the payload of a row that would take minutes at that RTT
    (stop-and-wait at 20 ms); the table says when a cell used a smaller payload."""

    sender: SenderFn
    receiver: ReceiverFn
    hashes: bool = False  # both sides report a SHA-256 that must match the payload's
    port: str = "data"
    self_start: bool = False
    prepare: Callable[[BenchConfig], None] | None = None  # once per run, in the parent
    cap: Callable[[int], int | None] | None = None


@dataclass(frozen=True)
class Measurement:
    number: str  # the row number in docs/results/performance.md
    key: str
    title: str
    factory: Callable[[BenchConfig], PairSpec]
    baseline: bool = False
    default: bool = True  # part of a run without --rows


REGISTRY: dict[str, Measurement] = {}


def measurement(
    number: str, key: str, title: str, *, baseline: bool = False, default: bool = True
) -> Callable[[Callable[[BenchConfig], PairSpec]], Callable[[BenchConfig], PairSpec]]:
    """Register a row (decorator).  Rows run in registration order; one may be the
    baseline the ratios refer to; ``default=False`` rows run only when named."""

    def deco(factory: Callable[[BenchConfig], PairSpec]) -> Callable[[BenchConfig], PairSpec]:
        if key in REGISTRY:
            raise ValueError(f"benchmark row {key!r} registered twice")
        REGISTRY[key] = Measurement(number, key, title, factory, baseline, default)
        return factory

    return deco


def default_rows() -> list[str]:
    return [k for k, m in REGISTRY.items() if m.default]


# --------------------------------------------------------------------------- side clock


class _Meter:
    """The clock and CPU meters of one side process.  ``start`` first waits for the
    harness's go (both sides ready), ``finish`` reads them; both are idempotent."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.t0: float | None = None
        self.t1: float | None = None
        self.u0 = self.u1 = (0.0, 0, 0)

    def start(self) -> None:
        if self.t0 is None:
            self.sync()
            self.u0 = _usage()
            self.t0 = time.clock_gettime(time.CLOCK_MONOTONIC)

    def finish(self) -> None:
        if self.t1 is None:
            self.t1 = time.clock_gettime(time.CLOCK_MONOTONIC)
            self.u1 = _usage()

    def report(self, role: str, res: SideResult) -> tuple[Any, ...]:
        u0, u1 = self.u0, self.u1
        return (
            role,
            self.t0 or 0.0,
            self.t1 or 0.0,
            u1[0] - u0[0],
            u1[1] - u0[1],
            u1[2] - u0[2],
            asdict(res),
        )


_METER: _Meter | None = None


def started() -> None:
    """Called by a side once its link is up: wait for the go, start clock and meters."""
    if _METER is not None:
        _METER.start()


def finished() -> None:
    """Called by a receiving side when the payload is verified: stop clock and meters."""
    if _METER is not None:
        _METER.finish()


def run_side(
    role: str, spec: PairSpec, fn: Callable[[], SideResult], sync: Callable[[], None]
) -> tuple[Any, ...]:
    """Run one side function under a fresh meter; returns the record the harness checks
    (role, t_start, t_end, cpu s, voluntary and involuntary context switches, result)."""
    global _METER
    meter = _METER = _Meter(sync)
    try:
        if not spec.self_start:
            meter.start()
        res = fn()
        meter.start()  # a side that never called started() (e.g. failed early)
        meter.finish()
        return meter.report(role, res)
    finally:
        _METER = None


def _plain_send(sock: socket.socket, src: PatternSource, cfg: BenchConfig) -> SideResult:
    view = memoryview(bytearray(cfg.chunk))
    calls = sent = 0
    while True:
        n = src.readinto(view)
        if not n:
            break
        sock.sendall(view[:n])
        calls += 1
        sent += n
    sock.shutdown(socket.SHUT_WR)
    return SideResult(nbytes=sent, socket_calls=calls)


def _plain_recv(sock: socket.socket, sink: CheckingSink, cfg: BenchConfig) -> SideResult:
    view = memoryview(bytearray(cfg.chunk))
    calls = got = 0
    while True:
        n = sock.recv_into(view, cfg.chunk, socket.MSG_WAITALL)
        calls += 1
        if not n:
            break
        sink.write(view[:n])
        got += n
    return SideResult(nbytes=got, socket_calls=calls)


@measurement(
    "1", "plain-tcp", "plain TCP, blocking sendall / recv_into(MSG_WAITALL)", baseline=True
)
def _plain_row(cfg: BenchConfig) -> PairSpec:
    return PairSpec(_plain_send, _plain_recv)


# ---- row 2: TLS 1.3 (Python ssl, blocking sockets) with a throwaway certificate

TLS_NAME = "bench.holepunch-mig.invalid"
TLS_CIPHER = "TLS_AES_256_GCM_SHA384"


def _tls_paths(cfg: BenchConfig) -> tuple[Path, Path]:
    d = Path(cfg.workdir or tempfile.gettempdir())
    return d / "bench-tls-cert.pem", d / "bench-tls-key.pem"


def make_tls_cert(cfg: BenchConfig) -> None:
    """A self-signed P-256 certificate for TLS_NAME, valid one day, written next to its
    key in ``cfg.workdir`` (generated at run time; never reused)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    cert_path, key_path = _tls_paths(cfg)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TLS_NAME)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(TLS_NAME)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _tls_check(tls: Any) -> dict[str, Any]:
    cipher = tls.cipher()
    if tls.version() != "TLSv1.3" or cipher is None or cipher[0] != TLS_CIPHER:
        raise BenchError(f"TLS negotiated {tls.version()} {cipher}, want TLSv1.3 {TLS_CIPHER}")
    return {"cipher": f"{tls.version()} {cipher[0]}"}


def _tls_send(sock: socket.socket, src: PatternSource, cfg: BenchConfig) -> SideResult:
    import ssl

    cert, _ = _tls_paths(cfg)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=str(cert))
    tls = ctx.wrap_socket(sock, server_hostname=TLS_NAME)  # handshake, certificate verified
    extra = _tls_check(tls)
    started()
    view = memoryview(bytearray(cfg.chunk))
    calls = sent = 0
    while n := src.readinto(view):
        tls.sendall(view[:n])
        calls += 1
        sent += n
    # FIN without close_notify (the receiver counts bytes), then drain until the receiver
    # closes: closing with the server's unread session tickets queued would send RST and
    # discard data still in flight (the check caught exactly that).
    tls.shutdown(socket.SHUT_WR)
    while tls.recv(65536):  # plain socket recv once shut down
        pass
    return SideResult(nbytes=sent, socket_calls=calls, extra=extra)


def _tls_recv(sock: socket.socket, sink: CheckingSink, cfg: BenchConfig) -> SideResult:
    import ssl

    cert, key = _tls_paths(cfg)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(cert), str(key))
    tls = ctx.wrap_socket(sock, server_side=True)
    extra = _tls_check(tls)
    started()
    view = memoryview(bytearray(cfg.chunk))
    calls = got = 0
    while True:
        n = tls.recv_into(view)  # one TLS record (<= 16 KiB) per call
        calls += 1
        if not n:
            break
        sink.write(view[:n])
        got += n
    finished()
    return SideResult(nbytes=got, socket_calls=calls, extra=extra)


@measurement("2", "tls", "TLS 1.3 AES-256-GCM, Python ssl, blocking sockets, opened port")
def _tls_row(cfg: BenchConfig) -> PairSpec:
    return PairSpec(_tls_send, _tls_recv, self_start=True, prepare=make_tls_cert)


# ---- rows 3-5: the real holepunch_mig session over the control connection


def _session_options(policy: str, stop_and_wait: bool) -> dict[str, Any]:
    opts: dict[str, Any] = {"policy": policy}
    if stop_and_wait:
        from holepunch_mig.wire.credit import MAX_CHUNK

        opts.update(tunnel_window=MAX_CHUNK, tunnel_credit_batch=MAX_CHUNK)
    return opts


def _link_extra(link: Any) -> dict[str, Any]:
    extra: dict[str, Any] = {"path": link.path}
    if link.tunnel is not None:
        st = link.tunnel.stats
        extra.update(
            tunnel_messages=st.messages_sent,
            tunnel_credits=st.credits_received,
            tunnel_credits_sent=st.credits_sent,
        )
    return extra


def _session_pair(policy: str, digest: bool, stop_and_wait: bool = False) -> PairSpec:
    """Source and destination each run ``api.connect`` over the control connection they
    are handed (the punch, Noise KK, nomination, or the tunnel), then send/receive the
    payload with ``Link.send_file``/``receive_file``.  Clock and CPU meters start once
    the link is up; time to link comes from the session's report."""
    import trio

    from holepunch_mig.net.control import StreamChannel
    from holepunch_mig.session import api

    opts = _session_options(policy, stop_and_wait)
    want_path = "direct" if policy == "direct" else "tunnel"

    def send(sock: socket.socket, src: PatternSource, cfg: BenchConfig) -> SideResult:
        async def main() -> SideResult:
            channel = StreamChannel(trio.SocketStream(trio.socket.from_stdlib_socket(sock)))
            async with api.connect(channel, role="source", **opts) as link:
                if link.path != want_path:
                    raise BenchError(f"link path {link.path}, want {want_path}")
                ttl = link.report.time_to_link
                await trio.to_thread.run_sync(started)
                res = await link.send_file(src, digest=digest)  # type: ignore[arg-type]
                extra = _link_extra(link)
            await channel.aclose()
            return SideResult(
                nbytes=res.bytes,
                sha256=res.sha256,
                socket_calls=link.writer.records_sent,
                time_to_link=ttl,
                extra=extra,
            )

        return trio.run(main)

    def recv(sock: socket.socket, sink: CheckingSink, cfg: BenchConfig) -> SideResult:
        async def main() -> SideResult:
            channel = StreamChannel(trio.SocketStream(trio.socket.from_stdlib_socket(sock)))
            async with api.connect(channel, role="destination", **opts) as link:
                ttl = link.report.time_to_link
                await trio.to_thread.run_sync(started)
                res = await link.receive_file(sink, digest=digest)  # type: ignore[arg-type]
                finished()
                extra = _link_extra(link)
            await channel.aclose()
            return SideResult(
                nbytes=res.bytes,
                sha256=res.sha256,
                socket_calls=2 * link.reader.records_received,
                time_to_link=ttl,
                extra=extra,
            )

        return trio.run(main)

    cap = (
        (lambda rtt: (32 << 20) if rtt >= 10 else (256 << 20) if rtt > 0 else None)
        if (stop_and_wait)
        else None
    )
    return PairSpec(send, recv, hashes=digest, port="control", self_start=True, cap=cap)


@measurement(
    "3", "rpc-tunnel", "RPC-style tunnel: 64 KiB chunks, one reply each, over the control link"
)
def _rpc_row(cfg: BenchConfig) -> PairSpec:
    return _session_pair("tunnel", digest=False, stop_and_wait=True)


@measurement("4", "tunnel", "holepunch_mig fallback tunnel (windowed) over the control link")
def _tunnel_row(cfg: BenchConfig) -> PairSpec:
    return _session_pair("tunnel", digest=False)


@measurement("5a", "direct", "holepunch_mig direct: punched + Noise KK + AES-256-GCM records")
def _direct_row(cfg: BenchConfig) -> PairSpec:
    return _session_pair("direct", digest=False)


@measurement("5b", "direct-sha256", "holepunch_mig direct, + SHA-256 of the payload both ends")
def _direct_digest_row(cfg: BenchConfig) -> PairSpec:
    return _session_pair("direct", digest=True)


def _records_pair(digest: bool) -> PairSpec:
    def send(sock: socket.socket, src: PatternSource, cfg: BenchConfig) -> SideResult:
        w = RecordWriter(sock, cfg.key)
        count, dig = w.send_file(1, src, digest=digest, pipeline=cfg.pipeline)  # type: ignore[arg-type]
        w.close()
        return SideResult(count, dig.hex() if dig else None, w.records_sent)

    def recv(sock: socket.socket, sink: CheckingSink, cfg: BenchConfig) -> SideResult:
        r = RecordReader(sock, cfg.key)
        count, dig = r.receive_file(1, sink, digest=digest, prefetch=cfg.prefetch)  # type: ignore[arg-type]
        if r.read().type != RecordType.CLOSE:
            return SideResult(count, error="expected CLOSE after END")
        # a header and a body recv_into per record (MSG_WAITALL: one syscall each)
        return SideResult(count, dig.hex() if dig else None, 2 * r.records_received)

    return PairSpec(send, recv, hashes=digest)


@measurement(
    "R", "records", "records layer alone on a given socket, AES-256-GCM, no digest", default=False
)
def _records_row(cfg: BenchConfig) -> PairSpec:
    return _records_pair(False)


@measurement(
    "Rs", "records-sha256", "records layer alone, AES-256-GCM + SHA-256 both ends", default=False
)
def _records_digest_row(cfg: BenchConfig) -> PairSpec:
    return _records_pair(True)


# --------------------------------------------------------------------------- runner


def _usage() -> tuple[float, int, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_nvcsw, r.ru_nivcsw


def _tune(sock: socket.socket, size: int) -> None:
    if size:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def _side_main(
    role: str,
    spec: PairSpec,
    fn: Callable[[], SideResult],
    sock: socket.socket,
    other: socket.socket,
    q: Any,
    go: Any,
) -> None:
    """Runs in a forked child: closes its copy of the peer's socket (or the peer would
    never see EOF), tells the parent it is ready, waits for the go (so both sides start
    together), runs the side function and reports."""
    other.close()

    def sync() -> None:
        q.put(("ready", role))
        if not go.wait(600):
            raise BenchError("no go from the harness")

    try:
        q.put(run_side(role, spec, fn, sync))
    except BaseException as exc:  # report, never hang the parent
        err = asdict(SideResult(error=f"{type(exc).__name__}: {exc}"))
        q.put((role, 0.0, 0.0, 0.0, 0, 0, err))
    finally:
        sock.close()


@dataclass
class Sample:
    mbps: float
    wall: float
    send_cpu_per_gib: float
    recv_cpu_per_gib: float
    send_calls_per_gib: float
    recv_calls_per_gib: float
    send_vcsw_per_gib: float
    recv_vcsw_per_gib: float
    send_ivcsw_per_gib: float
    recv_ivcsw_per_gib: float
    send_cpu: float  # CPU seconds of the whole transfer, sender / receiver
    recv_cpu: float
    verified: str  # what was checked
    total: int = 0  # payload bytes of this run (smaller than the config's when capped)
    time_to_link: float | None = None  # session rows (source's report)
    extra: dict[str, Any] = field(default_factory=dict)


def _loopback_pair(sockbuf: int) -> tuple[socket.socket, socket.socket]:
    lsock = socket.socket()
    _tune(lsock, sockbuf)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    csock = socket.socket()
    _tune(csock, sockbuf)
    csock.connect(lsock.getsockname())
    ssock, _ = lsock.accept()
    lsock.close()
    _tune(ssock, sockbuf)
    for s in (csock, ssock):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return csock, ssock


def receive_with(spec: PairSpec, sock: socket.socket, cfg: BenchConfig) -> Callable[[], SideResult]:
    """The receiving side function: the row's receiver into a CheckingSink, whose
    verdict (bytes, stamps, optional full hash) goes into the result."""
    sink = CheckingSink(cfg.seed, full_hash=cfg.full_verify)

    def receive() -> SideResult:
        res = spec.receiver(sock, sink, cfg)
        res.sink_bytes = sink.pos
        res.sink_bad = sink.bad
        res.sink_sha256 = sink.hash.hexdigest() if sink.hash is not None else None
        return res

    return receive


def send_with(spec: PairSpec, sock: socket.socket, cfg: BenchConfig) -> Callable[[], SideResult]:
    src = PatternSource(cfg.total, cfg.seed)
    return lambda: spec.sender(sock, src, cfg)


def run_pair(spec: PairSpec, cfg: BenchConfig, expected: str | None) -> Sample:
    """One transfer of ``cfg.total`` bytes between two forked processes over loopback."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    go = ctx.Event()
    csock, ssock = _loopback_pair(cfg.sockbuf)
    procs = [
        ctx.Process(
            target=_side_main,
            args=("receiver", spec, receive_with(spec, ssock, cfg), ssock, csock, q, go),
            daemon=True,
        ),
        ctx.Process(
            target=_side_main,
            args=("sender", spec, send_with(spec, csock, cfg), csock, ssock, q, go),
            daemon=True,
        ),
    ]
    try:
        for p in procs:
            p.start()
        csock.close()
        ssock.close()
        out: dict[str, tuple[Any, ...]] = {}
        ready: set[str] = set()
        deadline = time.monotonic() + cfg.timeout
        while len(out) < 2:
            try:
                item = q.get(timeout=max(0.1, deadline - time.monotonic()))
            except Exception:
                raise BenchError(f"timed out after {cfg.timeout:.0f} s") from None
            if item[0] == "ready":
                ready.add(item[1])
                if len(ready) == 2:
                    go.set()
                continue
            out[item[0]] = item
            if item[6]["error"]:
                raise BenchError(f"{item[0]} failed: {item[6]['error']}")
    finally:
        go.set()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        q.close()
    return check_pair(spec, cfg, expected, out["sender"], out["receiver"])


def check_pair(
    spec: PairSpec,
    cfg: BenchConfig,
    expected: str | None,
    sender: tuple[Any, ...],
    receiver: tuple[Any, ...],
) -> Sample:
    """Verify one transfer from both sides' records and turn it into a Sample.  Raises
    BenchError on any mismatch: a fast wrong answer is a failure, not a result."""
    (_, t0, _, scpu, svcsw, sivcsw, sres) = sender
    (_, _, t1, rcpu, rvcsw, rivcsw, rres) = receiver
    checks = [f"{cfg.total} bytes"]
    if not sres["nbytes"] == rres["nbytes"] == rres["sink_bytes"] == cfg.total:
        raise BenchError(
            f"byte count: sent {sres['nbytes']}, received {rres['nbytes']}, "
            f"sink got {rres['sink_bytes']}, want {cfg.total}"
        )
    if rres.get("sink_bad"):
        raise BenchError(str(rres["sink_bad"]))
    checks.append("chunk stamps")
    if spec.hashes:
        for role, res in (("sender", sres), ("receiver", rres)):
            if res["sha256"] != expected:
                raise BenchError(f"{role} SHA-256 {res['sha256']} != expected {expected}")
        checks.append("sha256 both ends")
    if cfg.full_verify:
        if rres.get("sink_sha256") != expected:
            raise BenchError(f"sink SHA-256 {rres.get('sink_sha256')} != expected {expected}")
        checks.append("sink sha256")
    extra = {**sres.get("extra", {}), **{f"recv_{k}": v for k, v in rres.get("extra", {}).items()}}
    for what in ("cipher", "path"):
        if what in extra:
            checks.append(f"{what} {extra[what]}")
    wall = t1 - t0
    if wall <= 0:
        raise BenchError(f"non-positive wall time {wall}")
    g = cfg.total / GIB
    return Sample(
        mbps=cfg.total / wall / 1e6,
        wall=wall,
        send_cpu_per_gib=scpu / g,
        recv_cpu_per_gib=rcpu / g,
        send_calls_per_gib=sres["socket_calls"] / g,
        recv_calls_per_gib=rres["socket_calls"] / g,
        send_vcsw_per_gib=svcsw / g,
        recv_vcsw_per_gib=rvcsw / g,
        send_ivcsw_per_gib=sivcsw / g,
        recv_ivcsw_per_gib=rivcsw / g,
        send_cpu=scpu,
        recv_cpu=rcpu,
        verified=", ".join(checks),
        total=cfg.total,
        time_to_link=sres.get("time_to_link"),
        extra=extra,
    )


# --------------------------------------------------------------------------- context


def machine_info() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import cryptography

    return {
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "loadavg_start": list(os.getloadavg()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cryptography": cryptography.__version__,
        "openssl": __import__("ssl").OPENSSL_VERSION,
    }


def crypto_only(seconds: float = 0.5) -> dict[str, float]:
    """MB/s of the primitives alone, 1 MiB buffers, one thread (AES-GCM and SHA-256), and
    AES-GCM encrypt in two threads (it releases the GIL)."""
    aead = AESGCM(os.urandom(32))
    pt = memoryview(bytearray(os.urandom(MAX_RECORD)))
    nonce = bytes(12)
    ct = aead.encrypt(nonce, bytes(pt), b"hdr")

    def rate(fn: Callable[[], object], threads: int = 1) -> float:
        counts = [0] * threads

        def loop(i: int, out: memoryview) -> None:
            t_end = time.perf_counter() + seconds
            while time.perf_counter() < t_end:
                fn() if out is None else aead.encrypt_into(nonce, pt, b"hdr", out)
                counts[i] += 1

        t0 = time.perf_counter()
        if threads == 1:
            loop(0, None)  # type: ignore[arg-type]
        else:
            ts = [
                threading.Thread(target=loop, args=(i, memoryview(bytearray(MAX_RECORD + 16))))
                for i in range(threads)
            ]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        return sum(counts) * MAX_RECORD / (time.perf_counter() - t0) / 1e6

    enc_out = memoryview(bytearray(MAX_RECORD + 16))
    dec_out = memoryview(bytearray(MAX_RECORD))
    h = hashlib.sha256()
    return {
        "aes_gcm_encrypt_into_MBps": rate(lambda: aead.encrypt_into(nonce, pt, b"hdr", enc_out)),
        "aes_gcm_decrypt_into_MBps": rate(lambda: aead.decrypt_into(nonce, ct, b"hdr", dec_out)),
        "sha256_MBps": rate(lambda: h.update(pt)),
        "aes_gcm_encrypt_2threads_MBps": rate(lambda: None, threads=2),
    }


# --------------------------------------------------------------------------- time to link


@dataclass
class LinkTiming:
    runs: int = 0
    seconds: list[float] = field(default_factory=list)  # sender's report time_to_link
    recv_seconds: list[float] = field(default_factory=list)
    median: float | None = None
    p95: float | None = None
    skipped: str | None = None


def _p95(xs: Sequence[float]) -> float:
    s = sorted(xs)
    return s[max(0, math.ceil(0.95 * len(s)) - 1)]


def time_to_link(runs: int = 20, preset: str = "fw-fw", payload_bytes: int = 1 << 20) -> LinkTiming:
    """Run the real ``holepunch-mig recv``/``send`` in the namespace lab ``runs`` times and
    collect ``time_to_link`` from each side's ``--report`` JSON (the payload is checked
    too).  Skipped, with the reason, when the lab cannot run here."""
    res = LinkTiming(runs=runs)
    if os.geteuid() != 0:
        res.skipped = "not root: the namespace lab needs root (time to link not measured)"
        return res
    from holepunch_mig.lab import CONTROL_PORT, Lab, LabError, presets

    cli = [sys.executable, "-m", "holepunch_mig.cli"]
    try:
        with tempfile.TemporaryDirectory(prefix="hpm-bench-") as tmp, Lab(presets()[preset]) as lab:
            payload = Path(tmp) / "payload.bin"
            data = os.urandom(payload_bytes)
            payload.write_bytes(data)
            want = hashlib.sha256(data).hexdigest()
            host, port = lab.control_endpoint("right", CONTROL_PORT)
            for i in range(runs):
                out, rrep, srep = (Path(tmp) / f"{n}{i}" for n in ("out", "recv.json", "send.json"))
                recv = lab.popen(
                    "right",
                    [*cli, "recv", "--control-listen", f"0.0.0.0:{CONTROL_PORT}",
                     "--output", str(out), "--report", str(rrep), "-q"],
                    stderr=subprocess.PIPE,
                )  # fmt: skip
                send = lab.popen(
                    "left",
                    [*cli, "send", "--control", f"{host}:{port}", "--input", str(payload),
                     "--report", str(srep), "-q"],
                    stderr=subprocess.PIPE,
                )  # fmt: skip
                try:
                    _, serr = send.communicate(timeout=60)
                    _, rerr = recv.communicate(timeout=30)
                finally:
                    for proc in (send, recv):
                        if proc.poll() is None:
                            proc.kill()
                            proc.wait()
                if send.returncode or recv.returncode:
                    raise BenchError(
                        f"lab run {i}: send exit {send.returncode}, recv exit {recv.returncode}: "
                        + serr.decode(errors="replace")[-400:]
                        + rerr.decode(errors="replace")[-400:]
                    )
                srepj, rrepj = json.loads(srep.read_text()), json.loads(rrep.read_text())
                for rep in (srepj, rrepj):
                    if not rep.get("ok") or rep.get("sha256") != want:
                        raise BenchError(
                            f"lab run {i}: transfer not verified: {rep.get('verdict')}"
                        )
                if out.read_bytes() != data:
                    raise BenchError(f"lab run {i}: output differs from the payload")
                res.seconds.append(float(srepj["time_to_link"]))
                res.recv_seconds.append(float(rrepj["time_to_link"]))
    except LabError as exc:
        res.skipped = f"lab unavailable: {exc}"
        return res
    res.median = statistics.median(res.seconds)
    res.p95 = _p95(res.seconds)
    return res


# --------------------------------------------------------------------------- whole run


@dataclass
class RowResult:
    number: str
    key: str
    title: str
    baseline: bool
    rtt_ms: int = 0
    where: str = "loopback"  # "lab" (two namespaces) or "loopback"
    total: int = 0  # payload bytes per run of this cell
    samples: list[Sample] = field(default_factory=list)
    median: dict[str, float] = field(default_factory=dict)
    mbps_min: float = 0.0
    mbps_max: float = 0.0
    wall_min: float = 0.0
    wall_max: float = 0.0
    ratio: float | None = None  # median MB/s over the baseline's (same RTT)
    time_to_link: float | None = None  # median, session rows
    verified: str = ""
    pending: str | None = None  # why the cell was not measured (e.g. an RTT the lab cannot emulate)


@dataclass
class BenchResult:
    machine: dict[str, Any]
    config: dict[str, Any]
    command: str
    rows: list[RowResult]
    crypto_only: dict[str, float]
    time_to_link: LinkTiming | None
    loadavg_end: list[float]
    ok: bool = True
    where: str = "loopback"
    where_reason: str = ""
    rtts: list[int] = field(default_factory=lambda: [0])
    qemu: list[Any] = field(default_factory=list)  # bench_lab.QemuCell per (rtt, case, multifd)
    qemu_note: str = ""
    loadavg_per_rtt: dict[str, list[float]] = field(default_factory=dict)
    started_at: str = ""
    seconds: float = 0.0
    quick: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _summarise(r: RowResult) -> None:
    keys = [k for k, v in asdict(r.samples[0]).items() if isinstance(v, float)]
    r.median = {k: statistics.median(getattr(s, k) for s in r.samples) for k in keys}
    r.mbps_min = min(s.mbps for s in r.samples)
    r.mbps_max = max(s.mbps for s in r.samples)
    r.wall_min = min(s.wall for s in r.samples)
    r.wall_max = max(s.wall for s in r.samples)
    r.verified = r.samples[0].verified
    ttl = [s.time_to_link for s in r.samples if s.time_to_link is not None]
    r.time_to_link = statistics.median(ttl) if ttl else None


def lab_possible() -> str | None:
    """None when the namespace lab can run here, else why not."""
    if os.geteuid() != 0:
        return "not root: network namespaces need root, so only loopback rows ran"
    for tool in ("ip", "nft", "sysctl"):
        if not shutil.which(tool):
            return f"{tool} not installed: only loopback rows ran"
    return None


def run_bench(
    cfg: BenchConfig,
    *,
    rows: Sequence[str] | None = None,
    lab_runs: int = 20,
    command: str = "",
    log: Callable[[str], None] = lambda s: None,
    rtts: Sequence[int] = (0,),
    where: str = "auto",
    qemu_runs: int = 0,
    qemu_mem: int = 512,
    qemu_rtts: Sequence[int] | None = None,
    qemu_multifd: Sequence[int] = (0, 4),
    quick: bool = False,
) -> BenchResult:
    """Run the chosen rows (default: the default rows) at each RTT, interleaved
    ``cfg.runs`` times, in the namespace lab (``where="lab"``; ``"auto"`` = lab when
    root) or over loopback; then QEMU cells (``qemu_runs``), crypto-only figures and
    (when ``lab_runs``) the real CLI's time to link."""
    t_start = time.monotonic()
    started_at = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    machine = machine_info()
    reason = lab_possible()
    if where == "auto":
        where = "loopback" if reason else "lab"
    elif where == "lab" and reason:
        raise BenchError(reason)
    if where == "loopback":
        reason = reason or "loopback requested (--loopback)"
        rtts = [r for r in rtts if r == 0] or [0]
        qemu_runs = 0
    chosen = [REGISTRY[k] for k in (rows if rows is not None else default_rows())]
    results: list[RowResult] = []
    qemu: list[Any] = []
    qemu_note = (
        "" if qemu_runs else "not run (--qemu-runs 0" + (", no lab)" if where != "lab" else ")")
    )
    load_per_rtt: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="hpm-bench-") as tmp:
        cfg = replace(cfg, workdir=tmp)
        specs = {m.key: m.factory(cfg) for m in chosen}
        for sp in {id(s.prepare): s.prepare for s in specs.values() if s.prepare}.values():
            sp(cfg)
        hashes: dict[int, str] = {}

        def expected_for(total: int, spec: PairSpec) -> str | None:
            if not (cfg.full_verify or spec.hashes):
                return None
            if total not in hashes:
                hashes[total] = expected_sha256(total, cfg.seed)
            return hashes[total]

        for rtt in rtts:
            cells = {
                m.key: RowResult(m.number, m.key, m.title, m.baseline, rtt, where) for m in chosen
            }
            cell_cfg: dict[str, BenchConfig] = {}
            for m in chosen:
                cap = specs[m.key].cap
                limit = cap(rtt) if cap else None
                total = min(cfg.total, limit) if limit else cfg.total
                cell_cfg[m.key] = replace(cfg, rtt_ms=rtt, total=total)
                cells[m.key].total = total
            results += cells.values()
            load_per_rtt[str(rtt)] = list(os.getloadavg())
            lab = None
            if where == "lab":
                from holepunch_mig.bench.lab_cells import lab_spec
                from holepunch_mig.lab import Lab, LabUnsupported

                try:
                    lab = Lab(lab_spec(rtt)).build()
                except LabUnsupported as exc:
                    for c in cells.values():
                        c.pending = f"lab cannot emulate {rtt} ms RTT yet: {exc}"
                    log(f"rtt {rtt} ms: pending ({exc})")
                    continue
            try:
                for run in range(cfg.runs):
                    for m in chosen:
                        ccfg = cell_cfg[m.key]
                        exp = expected_for(ccfg.total, specs[m.key])
                        if lab is not None:
                            from holepunch_mig.bench.lab_cells import run_pair_lab

                            sample = run_pair_lab(lab, m.key, ccfg, exp)
                        else:
                            sample = run_pair(specs[m.key], ccfg, exp)
                        cells[m.key].samples.append(sample)
                        log(
                            f"rtt {rtt} ms run {run + 1}/{cfg.runs} {m.key:14} "
                            f"{sample.mbps:8.0f} MB/s  {sample.wall:7.2f} s  "
                            f"load {os.getloadavg()[0]:.2f}"
                        )
                if (
                    lab is not None
                    and qemu_runs
                    and rtt in (qemu_rtts if qemu_rtts is not None else rtts)
                ):
                    from holepunch_mig.bench.lab_cells import qemu_cells
                    from holepunch_mig.migration.qemu import qemu_available

                    if not qemu_available():
                        qemu_note = "qemu-system-x86_64 not installed"
                    else:
                        qemu += qemu_cells(
                            lab, Path(tmp), qemu_mem, qemu_runs, tuple(qemu_multifd), log
                        )
            finally:
                if lab is not None:
                    lab.teardown()
            base = next((c for c in cells.values() if c.baseline), None)
            for c in cells.values():
                _summarise(c)
            for c in cells.values():
                c.ratio = c.median["mbps"] / base.median["mbps"] if base else None
    crypto = crypto_only()
    link = time_to_link(lab_runs) if lab_runs else None
    conf = asdict(cfg)
    del conf["key"], conf["seed"], conf["workdir"]
    return BenchResult(
        machine=machine,
        config=conf,
        command=command,
        rows=results,
        crypto_only=crypto,
        time_to_link=link,
        loadavg_end=list(os.getloadavg()),
        where=where,
        where_reason=reason or "",
        rtts=list(rtts),
        qemu=qemu,
        qemu_note=qemu_note,
        loadavg_per_rtt=load_per_rtt,
        started_at=started_at,
        seconds=time.monotonic() - t_start,
        quick=quick,
    )


def _mib(n: int) -> str:
    return f"{n / GIB:g} GiB" if n >= GIB else f"{n >> 20} MiB"


def fmt_rows(res: BenchResult, rtt: int | None = None) -> list[list[str]]:
    """Table cells of the measured (or pending) rows, optionally of one RTT."""
    out = []
    for r in res.rows:
        if rtt is not None and r.rtt_ms != rtt:
            continue
        if r.pending:
            out.append([r.number, r.title, f"{r.rtt_ms}", "pending", *["-"] * 6])
            continue
        m = r.median
        cap = "" if r.total == res.config["total"] else " (capped)"
        out.append(
            [
                r.number,
                r.title,
                f"{r.rtt_ms}",
                _mib(r.total) + cap,
                f"{m['wall']:.2f} ({r.wall_min:.2f}-{r.wall_max:.2f})",
                f"{m['mbps']:.0f} ({r.mbps_min:.0f}-{r.mbps_max:.0f})",
                f"{r.ratio:.2f}" if r.ratio is not None else "-",
                f"{m['send_cpu']:.2f} / {m['recv_cpu']:.2f}",
                f"{r.time_to_link:.3f}" if r.time_to_link is not None else "-",
                f"{len(r.samples)}",
            ]
        )
    return out


HEAD = [
    "#",
    "row",
    "RTT ms",
    "payload",
    "wall s median (min-max)",
    "MB/s median (min-max)",
    "ratio to 1",
    "CPU s send / recv",
    "time to link s",
    "runs",
]


def _link_line(res: BenchResult) -> str:
    link = res.time_to_link
    if link is None:
        return "time to link of the real CLI: not run (--lab-runs 0)"
    if link.skipped:
        return f"time to link of the real CLI: skipped - {link.skipped}"
    return (
        f"time to link (real `holepunch-mig send`/`recv`, fw-fw lab, 0 ms, {link.runs} runs, "
        f"sender's report): median {link.median:.3f} s, p95 {link.p95:.3f} s "
        f"(receiver's: median {statistics.median(link.recv_seconds):.3f} s)"
    )


def context_lines(res: BenchResult) -> list[str]:
    mc = res.machine
    cfg = res.config
    where = (
        "two network namespaces of the lab (fw-fw; sender in left, receiver in right)"
        if res.where == "lab"
        else f"loopback, one namespace ({res.where_reason})"
    )
    return [
        f"machine: nproc={mc['nproc']}, {mc['cpu_model']}; load average at start "
        + " ".join(f"{x:.2f}" for x in mc["loadavg_start"])
        + ", at end "
        + " ".join(f"{x:.2f}" for x in res.loadavg_end),
        f"Python {mc['python']}, cryptography {mc['cryptography']}, {mc['openssl']}, "
        f"Linux {mc['kernel']}",
        f"where: {where}",
        f"{_mib(cfg['total'])} per run, median of {cfg['runs']} runs, rows interleaved, "
        f"socket buffers {cfg['sockbuf'] or 'kernel default'}, "
        f"send_file pipeline={cfg['pipeline']}, receive_file prefetch={cfg['prefetch']}",
        f"started {res.started_at}, took {res.seconds:.0f} s" + (" (--quick)" if res.quick else ""),
    ]


def qemu_rows(res: BenchResult) -> list[list[str]]:
    out = []
    for c in res.qemu:
        c = c if isinstance(c, dict) else asdict(c)
        label = (
            "1: QEMU tcp to the opened port"
            if c["case"] == "direct"
            else ("5: QEMU via migrate-proxy (punched, Noise, AES-GCM)")
        )
        out.append(
            [
                label,
                f"{c['rtt_ms']}",
                f"x{c['multifd']}" if c["multifd"] else "-",
                f"{c['median_wall']:.3f} ({min(c['walls']):.3f}-{max(c['walls']):.3f})",
                f"{c['median_mbps']:.0f}",
                f"{c['ratio']:.2f}" if c["ratio"] is not None else "1.00",
                f"{len(c['walls'])}",
            ]
        )
    return out


QEMU_HEAD = [
    "QEMU path",
    "RTT ms",
    "multifd",
    "wall s median (min-max)",
    "MB/s",
    "wall / direct",
    "runs",
]


def render_text(res: BenchResult) -> str:
    lines = context_lines(res)
    rows = [HEAD, *fmt_rows(res)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEAD))]
    for r in rows:
        lines.append(
            "  ".join(
                c.rjust(w) if i != 1 else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    if res.qemu:
        q = [QEMU_HEAD, *qemu_rows(res)]
        widths = [max(len(r[i]) for r in q) for i in range(len(QEMU_HEAD))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in q]
    elif res.qemu_note:
        lines.append(f"QEMU: {res.qemu_note}")
    co = res.crypto_only
    lines.append(
        "crypto only (1 MiB buffers, MB/s): "
        + ", ".join(f"{k.removesuffix('_MBps')} {v:.0f}" for k, v in co.items())
    )
    lines.append(_link_line(res))
    lines.append(
        "payload checks: "
        + "; ".join(f"{r.key}@{r.rtt_ms}ms: {r.verified}" for r in res.rows if not r.pending)
    )
    return "\n".join(lines)


def render_markdown(res: BenchResult) -> str:
    """The whole docs/results/performance.md (see :mod:`holepunch_mig.bench.report`)."""
    from holepunch_mig.bench.report import render_document

    return render_document(res)
