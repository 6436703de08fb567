"""One side of a row's transfer and the check of both sides: the clock and CPU meters a
side process runs under (:func:`started`/:func:`finished` for rows that start their own
clock), the side functions bound to a socket and the payload, and :func:`check_pair`,
which turns both sides' records into a verified :class:`Sample` or fails.

The loopback runner (:mod:`holepunch_mig.bench.harness`) and the lab cells
(:mod:`holepunch_mig.bench.lab_cells`) run the same sides in different processes.
"""

from __future__ import annotations

import resource
import socket
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from holepunch_mig.bench.model import GIB, BenchConfig, PairSpec, Sample, SideResult
from holepunch_mig.bench.payload import CheckingSink, PatternSource
from holepunch_mig.errors import BenchError

__all__ = [
    "check_pair",
    "finished",
    "receive_with",
    "run_side",
    "send_with",
    "started",
    "tune_socket",
]


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


def _usage() -> tuple[float, int, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_nvcsw, r.ru_nivcsw


def tune_socket(sock: socket.socket, size: int) -> None:
    """Every row's sockets get the same buffers (``size`` 0: the kernel's), or the rows
    would not compare."""
    if size:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def receive_with(spec: PairSpec, sock: socket.socket, cfg: BenchConfig) -> Callable[[], SideResult]:
    """The receiving side function: the row's receiver into a CheckingSink, whose
    verdict (bytes, stamps, optional full hash) goes into the result."""
    sink = CheckingSink(cfg.seed, full_hash=cfg.full_verify, algorithm=spec.algorithm)

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
                raise BenchError(f"{role} {spec.algorithm} {res['sha256']} != expected {expected}")
        checks.append(f"{spec.algorithm} both ends")
    if cfg.full_verify:
        if rres.get("sink_sha256") != expected:
            raise BenchError(
                f"sink {spec.algorithm} {rres.get('sink_sha256')} != expected {expected}"
            )
        checks.append(f"sink {spec.algorithm}")
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
