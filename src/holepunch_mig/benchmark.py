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
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .records import MAX_RECORD, RecordReader, RecordType, RecordWriter

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


@dataclass
class SideResult:
    nbytes: int = 0
    sha256: str | None = None  # what the side computed, when it hashed
    socket_calls: int = 0
    error: str | None = None
    sink_bytes: int = 0  # filled in by the harness from the CheckingSink
    sink_bad: str | None = None
    sink_sha256: str | None = None


SenderFn = Callable[[socket.socket, PatternSource, BenchConfig], SideResult]
ReceiverFn = Callable[[socket.socket, CheckingSink, BenchConfig], SideResult]


@dataclass(frozen=True)
class PairSpec:
    sender: SenderFn
    receiver: ReceiverFn
    hashes: bool = False  # both sides report a SHA-256 that must match the payload's


@dataclass(frozen=True)
class Measurement:
    number: str  # the row number in DESIGN.md / docs/performance.md
    key: str
    title: str
    factory: Callable[[BenchConfig], PairSpec]
    baseline: bool = False


REGISTRY: dict[str, Measurement] = {}


def measurement(
    number: str, key: str, title: str, *, baseline: bool = False
) -> Callable[[Callable[[BenchConfig], PairSpec]], Callable[[BenchConfig], PairSpec]]:
    """Register a row (decorator).  Rows run in registration order; one may be the
    baseline the ratios refer to."""

    def deco(factory: Callable[[BenchConfig], PairSpec]) -> Callable[[BenchConfig], PairSpec]:
        if key in REGISTRY:
            raise ValueError(f"benchmark row {key!r} registered twice")
        REGISTRY[key] = Measurement(number, key, title, factory, baseline)
        return factory

    return deco


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


@measurement("5a", "records", "holepunch_mig records, AES-256-GCM, no digest")
def _records_row(cfg: BenchConfig) -> PairSpec:
    return _records_pair(False)


@measurement("5b", "records-sha256", "holepunch_mig records, AES-256-GCM + SHA-256 both ends")
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


def _side_main(role: str, fn: Callable[[], SideResult], sock: socket.socket, q: Any) -> None:
    """Runs in the child.  The receiver starts its meters, then releases the sender with
    one byte; the sender starts the clock when it has that byte."""
    try:
        if role == "receiver":
            u0 = _usage()
            sock.sendall(b"G")
        else:
            if sock.recv(1) != b"G":
                raise BenchError("no go byte from the receiver")
            u0 = _usage()
        t = time.clock_gettime(time.CLOCK_MONOTONIC)
        res = fn()
        if role == "receiver":
            t = time.clock_gettime(time.CLOCK_MONOTONIC)
        u1 = _usage()
        q.put((role, t, u1[0] - u0[0], u1[1] - u0[1], u1[2] - u0[2], asdict(res)))
    except BaseException as exc:  # report, never hang the parent
        q.put((role, 0.0, 0.0, 0, 0, asdict(SideResult(error=f"{type(exc).__name__}: {exc}"))))
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
    verified: str  # what was checked


def run_pair(spec: PairSpec, cfg: BenchConfig, expected: str | None) -> Sample:
    """One transfer of ``cfg.total`` bytes between two forked processes over loopback."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    lsock = socket.socket()
    _tune(lsock, cfg.sockbuf)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    csock = socket.socket()
    _tune(csock, cfg.sockbuf)
    csock.connect(lsock.getsockname())
    ssock, _ = lsock.accept()
    lsock.close()
    _tune(ssock, cfg.sockbuf)
    for s in (csock, ssock):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sink = CheckingSink(cfg.seed, full_hash=cfg.full_verify)
    src = PatternSource(cfg.total, cfg.seed)

    def receive() -> SideResult:
        res = spec.receiver(ssock, sink, cfg)
        res.sink_bytes = sink.pos
        res.sink_bad = sink.bad
        res.sink_sha256 = sink.hash.hexdigest() if sink.hash is not None else None
        return res

    procs = [
        ctx.Process(
            target=_side_main,
            args=("receiver", receive, ssock, q),
            daemon=True,
        ),
        ctx.Process(
            target=_side_main,
            args=("sender", lambda: spec.sender(csock, src, cfg), csock, q),
            daemon=True,
        ),
    ]
    try:
        for p in procs:
            p.start()
        csock.close()
        ssock.close()
        out: dict[str, tuple[Any, ...]] = {}
        deadline = time.monotonic() + cfg.timeout
        while len(out) < 2:
            try:
                item = q.get(timeout=max(0.1, deadline - time.monotonic()))
            except Exception:
                raise BenchError(f"timed out after {cfg.timeout:.0f} s") from None
            out[item[0]] = item
            if item[5]["error"]:
                raise BenchError(f"{item[0]} failed: {item[5]['error']}")
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        q.close()
    (_, t0, scpu, svcsw, sivcsw, sres), (_, t1, rcpu, rvcsw, rivcsw, rres) = (
        out["sender"],
        out["receiver"],
    )
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
    wall = t1 - t0
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
        verified=", ".join(checks),
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
    from .lab import CONTROL_PORT, Lab, LabError, presets

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
    samples: list[Sample] = field(default_factory=list)
    median: dict[str, float] = field(default_factory=dict)
    mbps_min: float = 0.0
    mbps_max: float = 0.0
    ratio: float | None = None  # median MB/s over the baseline's
    verified: str = ""


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

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def run_bench(
    cfg: BenchConfig,
    *,
    rows: Sequence[str] | None = None,
    lab_runs: int = 20,
    command: str = "",
    log: Callable[[str], None] = lambda s: None,
) -> BenchResult:
    """Run the chosen rows (default: all registered), interleaved ``cfg.runs`` times, then
    crypto-only figures and (when ``lab_runs``) time to link."""
    machine = machine_info()
    chosen = [REGISTRY[k] for k in (rows if rows is not None else list(REGISTRY))]
    specs = {m.key: m.factory(cfg) for m in chosen}
    expected = (
        expected_sha256(cfg.total, cfg.seed)
        if cfg.full_verify or any(s.hashes for s in specs.values())
        else None
    )
    results = {m.key: RowResult(m.number, m.key, m.title, m.baseline) for m in chosen}
    for run in range(cfg.runs):
        for m in chosen:
            sample = run_pair(specs[m.key], cfg, expected)
            results[m.key].samples.append(sample)
            log(f"run {run + 1}/{cfg.runs} {m.key:16} {sample.mbps:8.0f} MB/s")
    base: float | None = None
    for r in results.values():
        keys = [k for k, v in asdict(r.samples[0]).items() if isinstance(v, float)]
        r.median = {k: statistics.median(getattr(s, k) for s in r.samples) for k in keys}
        r.mbps_min = min(s.mbps for s in r.samples)
        r.mbps_max = max(s.mbps for s in r.samples)
        r.verified = r.samples[0].verified
        if r.baseline:
            base = r.median["mbps"]
    for r in results.values():
        r.ratio = r.median["mbps"] / base if base else None
    crypto = crypto_only()
    link = time_to_link(lab_runs) if lab_runs else None
    conf = asdict(cfg)
    del conf["key"], conf["seed"]
    return BenchResult(
        machine=machine,
        config=conf,
        command=command,
        rows=list(results.values()),
        crypto_only=crypto,
        time_to_link=link,
        loadavg_end=list(os.getloadavg()),
    )


def _fmt_rows(res: BenchResult) -> list[list[str]]:
    out = []
    for r in res.rows:
        m = r.median
        out.append(
            [
                r.number,
                r.title,
                f"{m['mbps']:.0f}",
                f"{r.mbps_min:.0f}-{r.mbps_max:.0f}",
                f"{r.ratio:.2f}" if r.ratio is not None else "-",
                f"{m['send_cpu_per_gib']:.3f}",
                f"{m['recv_cpu_per_gib']:.3f}",
                f"{m['send_calls_per_gib']:.0f} / {m['recv_calls_per_gib']:.0f}",
                f"{m['send_vcsw_per_gib']:.0f} / {m['recv_vcsw_per_gib']:.0f}",
            ]
        )
    return out


_HEAD = [
    "#",
    "row",
    "MB/s (median)",
    "min-max",
    "ratio",
    "send CPU s/GiB",
    "recv CPU s/GiB",
    "socket calls/GiB send / recv",
    "vol. ctx switches/GiB send / recv",
]


def _link_line(res: BenchResult) -> str:
    link = res.time_to_link
    if link is None:
        return "time to link: not run (--lab-runs 0)"
    if link.skipped:
        return f"time to link: skipped - {link.skipped}"
    return (
        f"time to link (real CLI, fw-fw lab, {link.runs} runs, sender's report): "
        f"median {link.median:.3f} s, p95 {link.p95:.3f} s "
        f"(receiver's: median {statistics.median(link.recv_seconds):.3f} s)"
    )


def _context_lines(res: BenchResult) -> list[str]:
    mc = res.machine
    cfg = res.config
    return [
        f"machine: nproc={mc['nproc']}, {mc['cpu_model']}, load average at start "
        + " ".join(f"{x:.2f}" for x in mc["loadavg_start"])
        + ", at end "
        + " ".join(f"{x:.2f}" for x in res.loadavg_end),
        f"Python {mc['python']}, cryptography {mc['cryptography']}, {mc['openssl']}, "
        f"Linux {mc['kernel']}",
        f"{cfg['total'] / GIB:g} GiB per run, median of {cfg['runs']}, "
        f"socket buffers {cfg['sockbuf'] or 'kernel default'}, "
        f"send_file pipeline={cfg['pipeline']}, receive_file prefetch={cfg['prefetch']}",
    ]


def render_text(res: BenchResult) -> str:
    rows = [_HEAD, *_fmt_rows(res)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_HEAD))]
    lines = _context_lines(res)
    for r in rows:
        lines.append(
            "  ".join(
                c.rjust(w) if i != 1 else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    co = res.crypto_only
    lines.append(
        "crypto only (1 MiB buffers, MB/s): "
        + ", ".join(f"{k.removesuffix('_MBps')} {v:.0f}" for k, v in co.items())
    )
    lines.append(_link_line(res))
    lines.append("payload checks: " + "; ".join(f"{r.key}: {r.verified}" for r in res.rows))
    return "\n".join(lines)


def render_markdown(res: BenchResult) -> str:
    lines = [f"- {line}" for line in _context_lines(res)]
    lines.append(f"- command: `{res.command}`")
    lines.append("")
    lines.append("| " + " | ".join(_HEAD) + " |")
    lines.append("|" + "---|" * len(_HEAD))
    for r in _fmt_rows(res):
        lines.append("| " + " | ".join(r) + " |")
    lines.append("")
    co = res.crypto_only
    lines.append(
        "Crypto only, 1 MiB buffers: "
        + ", ".join(f"{k.removesuffix('_MBps')} {v:.0f} MB/s" for k, v in co.items())
        + "."
    )
    lines.append("")
    lines.append(_link_line(res) + ".")
    return "\n".join(lines) + "\n"
