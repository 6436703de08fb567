"""The throughput rows of the benchmark, registered in order with
:func:`~holepunch_mig.bench.model.measurement`: 1 plain TCP (the baseline), 2 TLS 1.3,
3 the RPC-style stop-and-wait tunnel, 4 holepunch_mig's tunnel, 5a-5c holepunch_mig's
direct link (5b with SHA-256, 5c with BLAKE3), 6 the real ``send``/``recv`` commands
with files (:mod:`holepunch_mig.bench.cli_cells`, lab only), and R/Rs/Rb the record
layer alone (only when named).

Each row is a sender and a receiver function; the same functions run over loopback
(:mod:`holepunch_mig.bench.harness`) and between two namespaces of the lab
(:mod:`holepunch_mig.bench.lab_cells`).
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from typing import Any

from holepunch_mig.bench.cli_cells import TMPFS, run_cli_lab, warm_pages, write_payload_file
from holepunch_mig.bench.model import BenchConfig, PairSpec, SideResult, measurement
from holepunch_mig.bench.pair import finished, started
from holepunch_mig.bench.payload import CheckingSink, PatternSource
from holepunch_mig.errors import BenchError
from holepunch_mig.net.record_io import RecordReader, RecordWriter
from holepunch_mig.wire.digests import Algorithm
from holepunch_mig.wire.records import RecordType

__all__ = ["TLS_CIPHER", "TLS_NAME", "make_tls_cert"]


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


def _session_options(policy: str, stop_and_wait: bool, algorithm: str) -> dict[str, Any]:
    opts: dict[str, Any] = {"policy": policy, "digest": algorithm}
    if stop_and_wait:
        from holepunch_mig.wire.credit import MAX_CHUNK

        opts.update(tunnel_window=MAX_CHUNK, tunnel_credit_batch=MAX_CHUNK)
    return opts


def _unhashed(res: Any, digest: bool, row_policy: str) -> None:
    """A row without a digest that hashed anyway (a resumable link always does) would
    measure another path than it names: fail the run."""
    if not digest and res.sha256 is not None:
        raise BenchError(
            f"{row_policy} row asked for no digest but the link hashed its stream "
            f"({res.digest}): resume was left on"
        )


def _link_extra(link: Any) -> dict[str, Any]:
    extra: dict[str, Any] = {"path": link.path, "resumable": link.resumable}
    if link.tunnel is not None:
        st = link.tunnel.stats
        extra.update(
            tunnel_messages=st.messages_sent,
            tunnel_credits=st.credits_received,
            tunnel_credits_sent=st.credits_sent,
        )
    return extra


def _session_pair(
    policy: str, digest: bool, stop_and_wait: bool = False, algorithm: str = "auto"
) -> PairSpec:
    """Source and destination each run ``api.connect`` over the control connection they
    are handed (the punch, Noise KK, nomination, or the tunnel), then send/receive the
    payload with ``Link.send_file``/``receive_file``.  Clock and CPU meters start once
    the link is up; time to link comes from the session's report."""
    import trio

    from holepunch_mig.net.control import StreamChannel
    from holepunch_mig.session import api

    opts = _session_options(policy, stop_and_wait, algorithm)
    if not digest and policy == "direct":
        # A resumable link always hashes its stream (resume needs the whole-stream
        # digest): without resume_attempts=0 "no digest" would still hash with BLAKE3
        # and keep the resume buffer, and 5a would not be the bare link it names.
        opts["resume_attempts"] = 0
    want_path = "direct" if policy == "direct" else "tunnel"

    def send(sock: socket.socket, src: PatternSource, cfg: BenchConfig) -> SideResult:
        async def main() -> SideResult:
            channel = StreamChannel(trio.SocketStream(trio.socket.from_stdlib_socket(sock)))
            async with api.connect(channel, role="source", **opts) as link:
                if link.path != want_path:
                    raise BenchError(f"link path {link.path}, want {want_path}")
                ttl = link.report.time_to_link
                await trio.to_thread.run_sync(started)
                res = await link.send_file(src, digest=digest, pipeline=cfg.pipeline)  # type: ignore[arg-type]
                _unhashed(res, digest, policy)
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
                res = await link.receive_file(sink, digest=digest, prefetch=cfg.prefetch)  # type: ignore[arg-type]
                finished()
                _unhashed(res, digest, policy)
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
    return PairSpec(
        send,
        recv,
        hashes=digest,
        algorithm="blake3" if algorithm == "blake3" else "sha256",
        port="control",
        self_start=True,
        cap=cap,
    )


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
    return _session_pair("direct", digest=True, algorithm="sha256")


@measurement(
    "5c",
    "direct-blake3",
    "holepunch_mig direct, + BLAKE3 of the payload both ends (send/recv's default)",
)
def _direct_blake3_row(cfg: BenchConfig) -> PairSpec:
    return _session_pair("direct", digest=True, algorithm="blake3")


def _plain_file_send(sock: socket.socket, src: PatternSource, cfg: BenchConfig) -> SideResult:
    """Row 1f's sender: the payload is first written to a tmpfs file (before the clock
    starts), then read from it and sent, as ``nc < FILE`` would."""
    path = write_payload_file(cfg, prefix="hpm-bench-1f-in-")
    try:
        view = memoryview(bytearray(cfg.chunk))
        calls = sent = 0
        with open(path, "rb", buffering=0) as fh:
            started()
            while n := fh.readinto(view):
                sock.sendall(view[:n])
                calls += 1
                sent += n
        sock.shutdown(socket.SHUT_WR)
        finished()
    finally:
        path.unlink(missing_ok=True)
    return SideResult(nbytes=sent, socket_calls=calls)


def _plain_file_recv(sock: socket.socket, sink: CheckingSink, cfg: BenchConfig) -> SideResult:
    """Row 1f's receiver: into a new tmpfs file, fsynced and closed before the clock
    stops (as ``recv`` commits its output); the sink checks the stamps on the way."""
    fd, name = tempfile.mkstemp(prefix="hpm-bench-1f-out-", dir=TMPFS)
    view = memoryview(bytearray(cfg.chunk))
    calls = got = 0
    try:
        with warm_pages(cfg.total):  # as row 6 does for its output (see warm_pages)
            pass
        started()
        while True:
            n = sock.recv_into(view, cfg.chunk, socket.MSG_WAITALL)
            calls += 1
            if not n:
                break
            chunk = view[:n]
            while chunk:
                chunk = chunk[os.write(fd, chunk) :]
            sink.write(view[:n])
            got += n
        os.fsync(fd)
        os.close(fd)
        fd = -1
        finished()
    finally:
        if fd >= 0:
            os.close(fd)
        os.unlink(name)
    return SideResult(nbytes=got, socket_calls=calls)


@measurement(
    "1f",
    "plain-file",
    "plain TCP, file to file: read a tmpfs file / sendall, recv_into / write a tmpfs file",
    default=True,
)
def _plain_file_row(cfg: BenchConfig) -> PairSpec:
    return PairSpec(_plain_file_send, _plain_file_recv, self_start=True)


def _no_side(*_: Any) -> SideResult:
    raise BenchError("row 6 runs the real CLI processes, not side functions")


@measurement(
    "6",
    "cli-blake3",
    "the real CLI: `holepunch-mig send FILE` -> `recv --output FILE` (tmpfs; BLAKE3, resume)",
)
def _cli_row(cfg: BenchConfig) -> PairSpec:
    return PairSpec(_no_side, _no_side, hashes=True, algorithm="blake3", runner=run_cli_lab)


def _records_pair(digest: bool, algorithm: Algorithm = "sha256") -> PairSpec:
    def send(sock: socket.socket, src: PatternSource, cfg: BenchConfig) -> SideResult:
        w = RecordWriter(sock, cfg.key)
        count, dig = w.send_file(
            1,
            src,  # type: ignore[arg-type]
            digest=digest,
            pipeline=cfg.pipeline,
            algorithm=algorithm,
        )
        w.close()
        return SideResult(count, dig.hex() if dig else None, w.records_sent)

    def recv(sock: socket.socket, sink: CheckingSink, cfg: BenchConfig) -> SideResult:
        r = RecordReader(sock, cfg.key)
        count, dig = r.receive_file(
            1,
            sink,  # type: ignore[arg-type]
            digest=digest,
            prefetch=cfg.prefetch,
            algorithm=algorithm,
        )
        if r.read().type != RecordType.CLOSE:
            return SideResult(count, error="expected CLOSE after END")
        # a header and a body recv_into per record (MSG_WAITALL: one syscall each)
        return SideResult(count, dig.hex() if dig else None, 2 * r.records_received)

    return PairSpec(send, recv, hashes=digest, algorithm=algorithm)


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


@measurement(
    "Rb", "records-blake3", "records layer alone, AES-256-GCM + BLAKE3 both ends", default=False
)
def _records_blake3_row(cfg: BenchConfig) -> PairSpec:
    return _records_pair(True, "blake3")
