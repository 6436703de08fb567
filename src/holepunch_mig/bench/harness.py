"""Running the benchmark: side processes, payload verification and a whole suite
(:func:`run_bench`), plus the "time to link" of the real CLI in the namespace lab.

Every throughput row (:mod:`holepunch_mig.bench.rows`) moves the same generated payload
from a sender process to a receiver process (two forked processes, so two interpreters
and two GILs, as in a real migration) over one TCP connection with the same socket
buffer sizes, on loopback or between two namespaces of the lab
(:mod:`holepunch_mig.bench.lab_cells`), and reports wall-clock MB/s (MB = 10**6 B),
CPU seconds per GiB of each process (getrusage user+sys, all threads), socket calls and
context switches per GiB, and the ratio to the baseline row.  Each row runs ``runs``
times (rows interleaved); the median, min and max are reported.

Nothing fast and wrong counts: the receiver checks the byte count, the chunk stamps
(drops, duplicates, reordering) and the last byte of every chunk
(:mod:`holepunch_mig.bench.payload`); rows that hash must produce the SHA-256 the
harness computed independently beforehand; ``full_verify`` also hashes everything the
sink receives.  A failed check fails the row and the run.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from holepunch_mig.bench import rows as _rows  # noqa: F401  (importing it registers the rows)
from holepunch_mig.bench.cli_cells import page_write_costs
from holepunch_mig.bench.lab_cells import lab_spec, run_pair_lab
from holepunch_mig.bench.libvirt_cells import ROWS as LIBVIRT_ROWS
from holepunch_mig.bench.libvirt_cells import libvirt_possible, run_libvirt_cells
from holepunch_mig.bench.model import (
    REGISTRY,
    BenchConfig,
    BenchResult,
    LinkTiming,
    PairSpec,
    RowResult,
    Sample,
    SideResult,
    cpu_ticks,
    default_rows,
    p95,
    steal_between,
    summarise,
)
from holepunch_mig.bench.pair import check_pair, receive_with, run_side, send_with, tune_socket
from holepunch_mig.bench.payload import expected_sha256
from holepunch_mig.bench.qemu_cells import run_qemu_cells
from holepunch_mig.errors import BenchError, QemuError, QmpError
from holepunch_mig.net.keyfiles import pinned_pair
from holepunch_mig.wire.digests import blake3_available, hexdigest, new_hash
from holepunch_mig.wire.records import MAX_RECORD

__all__ = [
    "crypto_only",
    "lab_possible",
    "machine_info",
    "run_bench",
    "run_pair",
    "time_to_link",
]


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


def _loopback_pair(sockbuf: int) -> tuple[socket.socket, socket.socket]:
    lsock = socket.socket()
    tune_socket(lsock, sockbuf)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    csock = socket.socket()
    tune_socket(csock, sockbuf)
    csock.connect(lsock.getsockname())
    ssock, _ = lsock.accept()
    lsock.close()
    tune_socket(ssock, sockbuf)
    for s in (csock, ssock):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return csock, ssock


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
    """MB/s of the primitives alone, 1 MiB buffers, one thread (AES-GCM, SHA-256 and
    BLAKE3; per CPU second of the thread), and AES-GCM encrypt in two threads (it
    releases the GIL; per wall second)."""
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
            # per CPU second of this thread: the rate of the primitive, not of the share
            # of a core that other sessions left it
            c0 = time.thread_time()
            loop(0, None)  # type: ignore[arg-type]
            return counts[0] * MAX_RECORD / max(1e-9, time.thread_time() - c0) / 1e6
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
    hop = {"unix_hop_MBps": unix_hop_rate(seconds)}
    h = hashlib.sha256()
    b3 = new_hash("blake3") if blake3_available() else None
    extra = {"blake3_MBps": rate(lambda: b3.update(pt))} if b3 is not None else {}
    return {
        "aes_gcm_encrypt_into_MBps": rate(lambda: aead.encrypt_into(nonce, pt, b"hdr", enc_out)),
        "aes_gcm_decrypt_into_MBps": rate(lambda: aead.decrypt_into(nonce, ct, b"hdr", dec_out)),
        "sha256_MBps": rate(lambda: h.update(pt)),
        "aes_gcm_encrypt_2threads_MBps": rate(lambda: None, threads=2),
        **extra,
        **hop,
    }


def unix_hop_rate(seconds: float = 0.5) -> float:
    """MB per CPU second of moving bytes through a UNIX stream socket, writer and reader
    together (sendall of 1 MiB / recv_into, two threads of this process): the cost of
    the hop between QEMU and its proxy, for the QEMU cells' floor."""
    a, b = socket.socketpair()
    chunk = memoryview(bytearray(MAX_RECORD))
    moved = [0]

    def read() -> None:
        buf = memoryview(bytearray(MAX_RECORD))
        while n := b.recv_into(buf):
            moved[0] += n

    with a, b:
        reader = threading.Thread(target=read, name="unix-hop-read", daemon=True)
        c0 = time.process_time()
        reader.start()
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            a.sendall(chunk)
        a.shutdown(socket.SHUT_WR)
        reader.join()
        cpu = time.process_time() - c0
    return moved[0] / max(1e-9, cpu) / 1e6


def time_to_link(
    runs: int = 20, preset: str = "fw-fw", payload_bytes: int = 1 << 20, rtt_ms: int = 0
) -> LinkTiming:
    """Run the real ``holepunch-mig recv``/``send`` in the namespace lab ``runs`` times and
    collect ``time_to_link`` from each side's ``--report`` JSON (the payload is checked
    too).  Skipped, with the reason, when the lab cannot run here."""
    res = LinkTiming(runs=runs, rtt_ms=rtt_ms)
    if os.geteuid() != 0:
        res.skipped = "not root: the namespace lab needs root (time to link not measured)"
        return res
    from holepunch_mig.lab import CONTROL_PORT, Lab, LabError, presets

    cli = [sys.executable, "-m", "holepunch_mig.cli"]
    try:
        with (
            tempfile.TemporaryDirectory(prefix="hpm-bench-") as tmp,
            Lab(replace(presets()[preset], rtt_ms=rtt_ms)) as lab,
        ):
            payload = Path(tmp) / "payload.bin"
            data = os.urandom(payload_bytes)
            payload.write_bytes(data)
            want = {alg: hexdigest(alg, data) for alg in ("sha256", "blake3")}
            host, port = lab.control_endpoint("right", CONTROL_PORT)
            keys = pinned_pair(Path(tmp))
            for i in range(runs):
                out, rrep, srep = (Path(tmp) / f"{n}{i}" for n in ("out", "recv.json", "send.json"))
                recv = lab.popen(
                    "right",
                    [*cli, "recv", "--control-listen", f"0.0.0.0:{CONTROL_PORT}",
                     "--output", str(out), "--report", str(rrep), "-q", *keys.destination],
                    stderr=subprocess.PIPE,
                )  # fmt: skip
                send = lab.popen(
                    "left",
                    [*cli, "send", "--control", f"{host}:{port}", "--input", str(payload),
                     "--report", str(srep), "-q", *keys.source],
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
                    alg = rep.get("digest") or "sha256"  # the session's, in the report
                    if not rep.get("ok") or rep.get("sha256") != want.get(alg):
                        raise BenchError(
                            f"lab run {i}: transfer not verified: {rep.get('verdict')}"
                        )
                if out.read_bytes() != data:
                    raise BenchError(f"lab run {i}: output differs from the payload")
                res.seconds.append(float(srepj["time_to_link"]))
                res.recv_seconds.append(float(rrepj["time_to_link"]))
                res.control_seconds.append(float(srepj.get("control_handshake") or 0.0))
    except LabError as exc:
        res.skipped = f"lab unavailable: {exc}"
        return res
    res.median = statistics.median(res.seconds)
    res.p95 = p95(res.seconds)
    return res


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
    libvirt_runs: int = 0,
    libvirt_mem: int = 256,
    libvirt_rows: Sequence[str] = LIBVIRT_ROWS,
    libvirt_parallel: Sequence[int] = (0,),
) -> BenchResult:
    """Run the chosen rows (default: the default rows) at each RTT, interleaved
    ``cfg.runs`` times, in the namespace lab (``where="lab"``; ``"auto"`` = lab when
    root) or over loopback; then QEMU cells (``qemu_runs``), the libvirt rows
    (``libvirt_runs``, in the lab when :func:`libvirt_possible`), crypto-only figures
    and (when ``lab_runs``) the real CLI's time to link."""
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
    steal: dict[str, float] = {}
    page_writes: dict[str, float] = {}
    run_ticks = cpu_ticks()

    def record_steal(phase: str, since: tuple[int, int] | None) -> None:
        pct = steal_between(since, cpu_ticks())
        if pct is not None:
            steal[phase] = pct

    with tempfile.TemporaryDirectory(prefix="hpm-bench-") as tmp:
        cfg = replace(cfg, workdir=tmp)
        specs = {m.key: m.factory(cfg) for m in chosen}
        for sp in {id(s.prepare): s.prepare for s in specs.values() if s.prepare}.values():
            sp(cfg)
        hashes: dict[tuple[int, str], str] = {}

        def expected_for(total: int, spec: PairSpec) -> str | None:
            if not (cfg.full_verify or spec.hashes):
                return None
            key = (total, spec.algorithm)
            if key not in hashes:
                hashes[key] = expected_sha256(total, cfg.seed, spec.algorithm)
            return hashes[key]

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
            if where != "lab":
                for m in chosen:
                    if specs[m.key].runner is not None:
                        cells[m.key].pending = "runs the real CLI in the lab only (root)"
            load_per_rtt[str(rtt)] = list(os.getloadavg())
            lab = None
            if where == "lab":
                from holepunch_mig.lab import Lab, LabUnsupported

                try:
                    lab = Lab(lab_spec(rtt)).build()
                except LabUnsupported as exc:
                    for c in cells.values():
                        c.pending = f"lab cannot emulate {rtt} ms RTT yet: {exc}"
                    log(f"rtt {rtt} ms: pending ({exc})")
                    continue
            try:
                rows_ticks = cpu_ticks()
                for run in range(cfg.runs):
                    for m in chosen:
                        ccfg = cell_cfg[m.key]
                        spec = specs[m.key]
                        if cells[m.key].pending:
                            continue
                        exp = expected_for(ccfg.total, spec)
                        if spec.runner is not None:
                            sample = spec.runner(lab, ccfg, exp)
                        elif lab is not None:
                            sample = run_pair_lab(lab, m.key, ccfg, exp)
                        else:
                            sample = run_pair(spec, ccfg, exp)
                        cells[m.key].samples.append(sample)
                        log(
                            f"rtt {rtt} ms run {run + 1}/{cfg.runs} {m.key:14} "
                            f"{sample.mbps:8.0f} MB/s  {sample.wall:7.2f} s  "
                            f"load {os.getloadavg()[0]:.2f}"
                        )
                record_steal(f"rows {rtt} ms", rows_ticks)
                if (
                    lab is not None
                    and qemu_runs
                    and rtt in (qemu_rtts if qemu_rtts is not None else rtts)
                ):
                    from holepunch_mig.migration.qemu import qemu_available

                    if not qemu_available():
                        qemu_note = "qemu-system-x86_64 not installed"
                    else:
                        qemu_ticks = cpu_ticks()
                        try:
                            qemu += run_qemu_cells(
                                lab, Path(tmp), qemu_mem, qemu_runs, tuple(qemu_multifd), log
                            )
                        except (BenchError, QemuError, QmpError, OSError) as exc:
                            # Reported as failed; the rows already measured are kept.
                            log(f"rtt {rtt} ms QEMU cells failed: {exc}")
                            qemu_note = f"QEMU cells failed at {rtt} ms: {exc}"
                        record_steal(f"QEMU {rtt} ms", qemu_ticks)
            finally:
                if lab is not None:
                    lab.teardown()
            measured = [c for c in cells.values() if c.samples]  # not the pending ones
            base = next((c for c in measured if c.baseline), None)
            for c in measured:
                summarise(c)
            for c in measured:
                c.ratio = c.median["mbps"] / base.median["mbps"] if base else None
            cli = cells.get("cli-blake3")
            if rtt == 0 and cli is not None and cli.samples:
                page_writes = page_write_costs(cli.median["mbps"], cli.total)
                log(
                    "new tmpfs pages, CPU s/GiB: "
                    f"{page_writes['full_s_per_gib']:.2f} at full speed, "
                    f"{page_writes['paced_s_per_gib']:.2f} at row 6's "
                    f"{page_writes['paced_MBps']:.0f} MB/s"
                )
    libvirt: list[Any] = []
    if not libvirt_runs:
        libvirt_note = "not run (--no-libvirt)"
    elif where != "lab":
        libvirt_note = "not run (no lab)"
    elif (why := libvirt_possible()) is not None:
        libvirt_note = f"not run: {why}"
    else:
        libvirt_note = ""
        libvirt_ticks = cpu_ticks()
        try:
            libvirt = run_libvirt_cells(
                mem=libvirt_mem,
                runs=libvirt_runs,
                rows=libvirt_rows,
                parallel=libvirt_parallel,
                log=log,
            )
        except Exception as exc:  # libvirt's errors are plain Exceptions; keep the rows
            log(f"libvirt rows failed: {type(exc).__name__}: {exc}")
            libvirt_note = f"libvirt rows failed: {type(exc).__name__}: {exc}"
        record_steal("libvirt", libvirt_ticks)
    crypto = crypto_only()
    link = time_to_link(lab_runs) if lab_runs else None
    record_steal("run", run_ticks)
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
        libvirt=libvirt,
        libvirt_note=libvirt_note,
        loadavg_per_rtt=load_per_rtt,
        steal_pct=steal,
        page_writes=page_writes,
        started_at=started_at,
        seconds=time.monotonic() - t_start,
        quick=quick,
    )
