"""What a benchmark row is and what a run produces: the row registry
(:func:`measurement`), the configuration, the per-side, per-run, per-cell and whole-run
result records, and the medians a cell reports.

Add a row by decorating a factory that returns a :class:`PairSpec`::

    @measurement("2", "tls", "TLS 1.3, blocking ssl.SSLSocket")
    def _tls(cfg: BenchConfig) -> PairSpec:
        return PairSpec(sender=..., receiver=...)

The sender gets a connected socket and a :class:`PatternSource`; the receiver a socket
and a :class:`CheckingSink`; each returns a :class:`SideResult`.  The rows themselves
are in :mod:`holepunch_mig.bench.rows`.
"""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from holepunch_mig.bench.payload import CHUNK, CheckingSink, PatternSource
from holepunch_mig.wire.digests import Algorithm

__all__ = [
    "GIB",
    "REGISTRY",
    "BenchConfig",
    "BenchResult",
    "LinkTiming",
    "Measurement",
    "PairSpec",
    "QemuCell",
    "RowResult",
    "Sample",
    "SideResult",
    "default_rows",
    "measurement",
    "p95",
    "summarise",
]

GIB = 1 << 30


@dataclass(frozen=True)
class BenchConfig:
    total: int = 2 * GIB
    runs: int = 3
    sockbuf: int = 4 << 20  # SO_SNDBUF/SO_RCVBUF on both ends, every row; 0 = kernel's
    chunk: int = CHUNK  # application buffer of the plain rows
    prefetch: int | None = None  # RecordReader.receive_file; None: its default
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
    hashes: bool = False  # both sides report a digest that must match the payload's
    algorithm: Algorithm = "sha256"  # ... of this algorithm
    port: str = "data"
    self_start: bool = False
    prepare: Callable[[BenchConfig], None] | None = None  # once per run, in the parent
    cap: Callable[[int], int | None] | None = None
    runner: Callable[[Any, BenchConfig, str | None], Sample] | None = None
    """A row that runs its own processes (the real CLI) in the lab: ``runner(lab, cfg,
    expected digest)`` does one run; ``sender``/``receiver`` are then not used, and on
    loopback the row is pending."""


@dataclass(frozen=True)
class Measurement:
    number: str  # the row number of docs/results/performance.md
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


@dataclass
class LinkTiming:
    runs: int = 0
    seconds: list[float] = field(default_factory=list)  # sender's report time_to_link
    recv_seconds: list[float] = field(default_factory=list)
    control_seconds: list[float] = field(default_factory=list)  # sender's control handshake
    rtt_ms: int = 0
    median: float | None = None
    p95: float | None = None
    skipped: str | None = None


def p95(xs: Sequence[float]) -> float:
    s = sorted(xs)
    return s[max(0, math.ceil(0.95 * len(s)) - 1)]


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
    pending: str | None = None  # why the cell was not measured (e.g. no delay stage yet)


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
    qemu: list[Any] = field(default_factory=list)  # QemuCell per (rtt, case, multifd)
    qemu_note: str = ""
    libvirt: list[Any] = field(default_factory=list)  # LibvirtCell per (parallel, row)
    libvirt_note: str = ""
    loadavg_per_rtt: dict[str, list[float]] = field(default_factory=dict)
    steal_pct: dict[str, float] = field(default_factory=dict)
    """Per phase ("rows 0 ms", "QEMU 0 ms", "libvirt", "run"): the share of CPU time the
    hypervisor gave to other guests (/proc/stat steal), in percent; empty off Linux."""
    page_writes: dict[str, float] = field(default_factory=dict)
    """Writing new tmpfs pages (``cli_cells.page_write_costs``) after the 0 ms file rows:
    CPU s/GiB at full speed and paced at row 6's rate; empty when row 6 did not run."""
    started_at: str = ""
    seconds: float = 0.0
    quick: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def summarise(r: RowResult) -> None:
    keys = [k for k, v in asdict(r.samples[0]).items() if isinstance(v, float)]
    r.median = {k: statistics.median(getattr(s, k) for s in r.samples) for k in keys}
    r.mbps_min = min(s.mbps for s in r.samples)
    r.mbps_max = max(s.mbps for s in r.samples)
    r.wall_min = min(s.wall for s in r.samples)
    r.wall_max = max(s.wall for s in r.samples)
    r.verified = r.samples[0].verified
    ttl = [s.time_to_link for s in r.samples if s.time_to_link is not None]
    r.time_to_link = statistics.median(ttl) if ttl else None


@dataclass
class QemuCell:
    rtt_ms: int
    case: str  # "direct" (row 1: QEMU -> QEMU over the opened port) or "proxy" (row 5)
    multifd: int
    mem_mib: int
    walls: list[float] = field(default_factory=list)
    mbps: list[float] = field(default_factory=list)
    qemu_ms: list[int | None] = field(default_factory=list)
    median_wall: float = 0.0
    median_mbps: float = 0.0
    ratio: float | None = None  # proxy / direct wall (proxy cells)
    verified: str = ""
    # CPU seconds per GiB of guest RAM moved (QEMU's ram.transferred), per run: QEMU's own
    # (from /proc, migrate .. completed) and the migrate-proxy process's (its report)
    qemu_cpu_src: list[float] = field(default_factory=list)
    qemu_cpu_dst: list[float] = field(default_factory=list)
    proxy_cpu_src: list[float] = field(default_factory=list)
    proxy_cpu_dst: list[float] = field(default_factory=list)
    links: int = 0  # proxy cells: parallel links the proxies used


def cpu_ticks() -> tuple[int, int] | None:
    """(all CPU ticks, steal ticks) from /proc/stat's first line, or None without it."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice: inside user/nice]
    return sum(fields[:8]), (fields[7] if len(fields) > 7 else 0)


def steal_between(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """Percent of the CPU time between two :func:`cpu_ticks` readings that was stolen."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    return 100.0 * (after[1] - before[1]) / (after[0] - before[0])
