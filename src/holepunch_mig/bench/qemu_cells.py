"""QEMU migration measurements: the benchmark's QEMU cells (:func:`run_qemu_cells`, direct
vs migrate-proxy in the lab), and a developer tool for this host: direct, and through
the stream mux.

Migrates a guest with random (non-zero) RAM over a UNIX socket or loopback TCP
(``unix:N``/``tcp:N``, N = multifd channels), or through holepunch_mig's mux over ONE
AES-256-GCM record link on loopback TCP (``mux:N``), and prints the median of N runs:
wall seconds measured around ``migrate``..``completed``, QEMU's own ``total-time``
and MB/s (10**6 bytes of ``ram.transferred`` per wall second).

``--synthetic`` instead measures the mux alone: S streams of random bytes through one
link versus S links (one stream each).

``--lab`` (root) compares, in the namespace lab, the same guest
migrated (a) through ``holepunch-mig migrate-proxy`` processes over the punched,
encrypted link between two firewalled hosts and (b) directly, unencrypted, QEMU to QEMU
over a TCP port the destination's firewall lets in; interleaved in one run, median of
``--runs``, without and with multifd.  ``--handoff`` adds (c) the proxies in handoff
mode (the punched socket handed to QEMU, QEMU's own TLS 1.3-PSK; one channel, so only
in the multifd=0 group).  Functions for a harness: :func:`lab_direct_run`,
:func:`lab_proxy_run`, :func:`lab_handoff_run`, :func:`lab_compare`.

    sudo python -m holepunch_mig.bench.qemu_cells --mem 512 --runs 3
    sudo python -m holepunch_mig.bench.qemu_cells --cases mux:0,mux:4
    sudo python -m holepunch_mig.bench.qemu_cells --lab --mem 512 --runs 3
    sudo python -m holepunch_mig.bench.qemu_cells --lab --handoff --lab-multifd 0
    python -m holepunch_mig.bench.qemu_cells --synthetic --streams 1,2,4
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import math
import os
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio

from holepunch_mig.bench.model import QemuCell
from holepunch_mig.errors import BenchError, QemuError, QmpError
from holepunch_mig.lab import CONTROL_PORT, Lab, LabSpec, SideSpec, presets
from holepunch_mig.lab.qemu_lab import migrate_in_lab
from holepunch_mig.migration.mux import Mux
from holepunch_mig.migration.proxy import run_destination, run_source
from holepunch_mig.migration.qemu import (
    MigrationResult,
    QemuVM,
    make_ram_image,
    migrate,
    start_incoming,
    wait_status,
)
from holepunch_mig.net.record_io import RecordReader, RecordWriter


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def tcp_link() -> tuple[Any, Any]:
    """A loopback TCP connection with record writer/reader on both ends (random keys)."""
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        a = socket.create_connection(lst.getsockname())
        b, _ = lst.accept()
    k1, k2 = os.urandom(32), os.urandom(32)
    end_a = (a, RecordWriter(a, k1), RecordReader(a, k2))
    end_b = (b, RecordWriter(b, k2), RecordReader(b, k1))
    return end_a, end_b


async def mux_run(
    work: Path, image: Path, mem: int, multifd: int, digest: bool = True
) -> MigrationResult:
    (a, wa, ra), (b, wb, rb) = tcp_link()
    try:
        async with (
            QemuVM(work, name="src", mem_mib=mem, ram_image=image) as src,
            QemuVM(work, name="dst", mem_mib=mem, ram_image=image, incoming="defer") as dst,
        ):
            ready = trio.Event()
            out: list[MigrationResult] = []

            async def source() -> None:
                await ready.wait()
                result, _ = await run_source(
                    src.qmp, a, wa, ra, multifd_channels=multifd, digest=digest
                )
                out.append(result)

            async with trio.open_nursery() as n:
                n.start_soon(
                    partial(
                        run_destination, multifd_channels=multifd, ready=ready.set, digest=digest
                    ),
                    dst.qmp,
                    b,
                    wb,
                    rb,
                )
                n.start_soon(source)
            await wait_status(dst.qmp, "running", timeout=20)
            return out[0]
    finally:
        a.close()
        b.close()


def synthetic(streams: int, links: int, total: int, digest: bool = True) -> float:
    """Push ``total`` random bytes split over ``streams`` streams through ``links`` mux
    links (streams spread round-robin); returns MB/s."""
    per = total // streams
    block = os.urandom(1 << 20)
    pairs = [tcp_link() for _ in range(links)]
    sinks: list[socket.socket] = []
    got = [0] * streams
    lock = threading.Lock()

    def sink(i: int, s: socket.socket) -> None:
        buf = bytearray(1 << 20)
        n = 0
        while True:
            k = s.recv_into(buf)
            if not k:
                break
            n += k
        s.shutdown(socket.SHUT_WR)
        with lock:
            got[i] = n

    def connector(base: int) -> Callable[[int], socket.socket]:
        def connect(sid: int) -> socket.socket:
            mine, theirs = socket.socketpair()
            idx = base + (sid - 1) * links
            t = threading.Thread(target=sink, args=(idx, theirs), daemon=True)
            t.start()
            sinks.append(mine)
            return mine

        return connect

    srcs, dsts = [], []
    for li, ((a, wa, ra), (b, wb, rb)) in enumerate(pairs):
        srcs.append(Mux(a, wa, ra, name=f"s{li}", digest=digest))
        dsts.append(Mux(b, wb, rb, connect=connector(li), name=f"d{li}", digest=digest))
    for m in srcs + dsts:
        m.start()
    clients = []
    for i in range(streams):
        c, s = socket.socketpair()
        srcs[i % links].add_stream(s)
        clients.append(c)

    def push(c: socket.socket) -> None:
        left = per
        view = memoryview(block)
        while left:
            k = min(left, len(block))
            c.sendall(view[:k])
            left -= k
        c.shutdown(socket.SHUT_WR)
        while c.recv(65536):
            pass

    t0 = time.perf_counter()
    threads = [threading.Thread(target=push, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with concurrent.futures.ThreadPoolExecutor(2 * links) as ex:
        list(ex.map(lambda m: m.finish(60), srcs + dsts))
    dt = time.perf_counter() - t0
    assert sum(got) == per * streams, (got, per)
    for (a, _, _), (b, _, _) in pairs:
        a.close()
        b.close()
    return per * streams / dt / 1e6


async def one_run(
    work: Path, image: Path, mem: int, transport: str, multifd: int
) -> MigrationResult:
    async with (
        QemuVM(work, name="src", mem_mib=mem, ram_image=image) as src,
        QemuVM(work, name="dst", mem_mib=mem, ram_image=image, incoming="defer") as dst,
    ):
        if transport == "unix":
            sock = work / "mig.sock"
            sock.unlink(missing_ok=True)
            uri = f"unix:{sock}"
        else:
            uri = f"tcp:127.0.0.1:{free_tcp_port()}"
        result = await migrate(src.qmp, uri, dst=dst.qmp, multifd_channels=multifd, timeout=300)
        await wait_status(dst.qmp, "running", timeout=20)
        return result


DIRECT_PORT = 7071


def lab_spec(rtt_ms: int = 0) -> LabSpec:
    """fw-fw, plus one inbound port on the destination for the direct baseline."""
    base = presets()["fw-fw"]
    return LabSpec(
        left=base.left,
        right=SideSpec(firewall="drop", allow_inbound_tcp=(CONTROL_PORT, DIRECT_PORT)),
        stun=False,
        rtt_ms=rtt_ms,
        name="fw-fw+direct",
    )


RAM_SAMPLES = ((16 << 20, 32 << 20),)  # (guest physical start, size) compared after migration


async def same_ram(src: QemuVM, dst: QemuVM, work: Path) -> str:
    """pmemsave the same guest RAM ranges on both sides and compare SHA-256 (the source
    is in postmigrate; the RAM image is random, so a wrong page shows).  Raises
    RuntimeError on a mismatch; returns what was checked."""
    for start, size in RAM_SAMPLES:
        digests = []
        for vm in (src, dst):
            f = work / f"{vm.name}.mem"
            await vm.qmp.execute("pmemsave", {"val": start, "size": size, "filename": str(f)})
            digests.append(hashlib.sha256(f.read_bytes()).hexdigest())
            f.unlink()
        if digests[0] != digests[1]:
            raise RuntimeError(f"destination RAM at {start:#x}+{size:#x} differs from the source")
    return ", ".join(
        f"RAM {start >> 20}-{(start + size) >> 20} MiB equal" for start, size in RAM_SAMPLES
    )


async def lab_direct_run(
    lab: Lab,
    work: Path,
    image: Path,
    mem: int,
    multifd: int,
    verify: bool = False,
    cpu: dict[str, float] | None = None,
) -> Any:
    """Plain QEMU -> QEMU over TCP through the destination's open port (no crypto).
    Returns the MigrationResult, or with ``verify`` (result, what was checked) after
    comparing guest RAM on both sides.  ``cpu`` gets each QEMU's CPU seconds from
    migrate to completed (keys qemu_src, qemu_dst)."""
    async with (
        QemuVM(work, name="src", mem_mib=mem, ram_image=image, netns=lab.netns("left")) as src,
        QemuVM(
            work,
            name="dst",
            mem_mib=mem,
            ram_image=image,
            incoming="defer",
            netns=lab.netns("right"),
        ) as dst,
    ):
        await start_incoming(dst.qmp, f"tcp:0.0.0.0:{DIRECT_PORT}", multifd_channels=multifd)
        host, port = lab.control_endpoint("right", DIRECT_PORT)
        c0 = src.cpu_seconds(), dst.cpu_seconds()
        result = await migrate(src.qmp, f"tcp:{host}:{port}", multifd_channels=multifd)
        await wait_status(dst.qmp, "running", timeout=20)
        if cpu is not None:
            cpu.update(qemu_src=src.cpu_seconds() - c0[0], qemu_dst=dst.cpu_seconds() - c0[1])
        if verify:
            return result, "completed, destination running, " + await same_ram(src, dst, work)
        return result


async def lab_proxy_run(
    lab: Lab,
    work: Path,
    image: Path,
    mem: int,
    multifd: int,
    digest: bool = False,
    verify: bool = False,
    cpu: dict[str, float] | None = None,
    links: int | None = None,
) -> Any:
    """Through ``holepunch-mig migrate-proxy`` on both firewalled hosts (punched links,
    Noise KK, AES-256-GCM; ``links`` parallel links, default one per QEMU connection).
    Wall time is QEMU's migrate..completed, as for direct; the punch happens before (the
    proxy says ready first).  With ``verify``: (result, what was checked), guest RAM
    compared on both sides and the proxies' byte counts.  ``cpu`` gets QEMU's CPU
    seconds (qemu_src, qemu_dst), the proxies' (proxy_src, proxy_dst) and ``links``."""
    checked: list[str] = []

    async def after(src: QemuVM, dst: QemuVM) -> None:
        checked.append(await same_ram(src, dst, work))

    outcome = await migrate_in_lab(
        lab,
        work,
        mem_mib=mem,
        multifd=multifd,
        ram_image=image,
        proxy_args=("--digest",) if digest else (),
        after=after if verify else None,
        links=links,
    )
    if outcome.qemu.status != "completed" or outcome.destination_status != "running":
        raise RuntimeError(f"proxied migration failed: {outcome}")
    if outcome.source_exit != 0 or outcome.destination_exit != 0:
        raise RuntimeError(f"a proxy failed: {outcome.source_report} {outcome.destination_report}")
    result: MigrationResult = outcome.qemu
    if cpu is not None:
        s, d = outcome.source_report or {}, outcome.destination_report or {}
        cpu.update(
            qemu_src=outcome.qemu_cpu.get("source", math.nan),
            qemu_dst=outcome.qemu_cpu.get("destination", math.nan),
            proxy_src=s.get("cpu_seconds") or math.nan,
            proxy_dst=d.get("cpu_seconds") or math.nan,
            links=float(s.get("links") or 1),
        )
    if verify:
        s, d = outcome.source_report or {}, outcome.destination_report or {}
        if not (s.get("ok") and d.get("ok")) or s.get("bytes_sent") != d.get("bytes_received"):
            raise RuntimeError(f"proxy reports disagree: {s} {d}")
        checked.insert(0, f"completed, destination running, proxies ok, {s['bytes_sent']} bytes")
        return result, ", ".join(checked)
    return result


async def lab_handoff_run(lab: Lab, work: Path, image: Path, mem: int, verify: bool = False) -> Any:
    """Through ``migrate-proxy --mode handoff`` on both firewalled hosts: the proxies
    punch and authenticate the link, then hand the socket to QEMU with a TLS-PSK from the
    session keys; QEMU encrypts (GnuTLS).  The source proxy issues ``migrate`` itself, so
    the manager's wall clock starts a little late: compare ``total_time_ms`` (QEMU's
    migrate..completed, the same clock for every case) first."""
    checked: list[str] = []

    async def after(src: QemuVM, dst: QemuVM) -> None:
        checked.append(await same_ram(src, dst, work))

    outcome = await migrate_in_lab(
        lab,
        work,
        mem_mib=mem,
        ram_image=image,
        mode="handoff",
        after=after if verify else None,
    )
    if outcome.qemu.status != "completed" or outcome.destination_status != "running":
        raise RuntimeError(f"handoff migration failed: {outcome}")
    if outcome.source_exit != 0 or outcome.destination_exit != 0:
        raise RuntimeError(f"a proxy failed: {outcome.source_report} {outcome.destination_report}")
    result: MigrationResult = outcome.qemu
    if verify:
        s = outcome.source_report or {}
        checked.insert(0, f"completed, destination running, proxies ok, {s['bytes_sent']} bytes")
        return result, ", ".join(checked)
    return result


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


async def lab_compare(
    mem: int = 512,
    runs: int = 3,
    multifd: tuple[int, ...] = (0, 4),
    digest: bool = False,
    rtt_ms: int = 0,
    handoff: bool = False,
) -> list[dict[str, Any]]:
    """Rows {case, multifd, median_wall, median_qemu_ms, mb_per_s, walls, qemu_ms, ratio,
    ratio_qemu, load}: direct, proxied (mux) and, with ``handoff`` at multifd=0, handoff
    runs interleaved (so all see the same machine state), median of ``runs``.  ``ratio``
    is wall / direct's wall, ``ratio_qemu`` QEMU total-time / direct's; ``load`` the
    1-minute load average before and after the group."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="hpm-bench-lab-") as tmp, Lab(lab_spec(rtt_ms)) as lab:
        work = Path(tmp)
        image = await trio.to_thread.run_sync(make_ram_image, work / "ram.img", mem)
        for mf in multifd:
            load_before = _load()
            got: dict[str, list[MigrationResult]] = {"direct": [], "proxy": []}
            if handoff and mf == 0:
                got["handoff"] = []
            for _ in range(runs):
                got["direct"].append(await lab_direct_run(lab, work, image, mem, mf))
                got["proxy"].append(await lab_proxy_run(lab, work, image, mem, mf, digest))
                if "handoff" in got:
                    got["handoff"].append(await lab_handoff_run(lab, work, image, mem))
            load = f"{load_before} -> {_load()}"
            base: dict[str, float] = {}
            for case, results in got.items():
                walls = sorted(r.wall_seconds for r in results)
                # total-time is occasionally absent from the manager's completed poll
                qemu_ms = sorted(r.total_time_ms for r in results if r.total_time_ms) or [0]
                m = sorted(results, key=lambda r: r.wall_seconds)[len(results) // 2]
                med_q = statistics.median(qemu_ms)
                row = {
                    "case": case,
                    "multifd": mf,
                    "median_wall": m.wall_seconds,
                    "median_qemu_ms": med_q,
                    "mb_per_s": m.mb_per_s,
                    "walls": walls,
                    "qemu_ms": qemu_ms,
                    "load": load,
                }
                if case == "direct":
                    base = {"wall": m.wall_seconds, "qemu": med_q}
                else:
                    row["ratio"] = m.wall_seconds / base["wall"]
                    row["ratio_qemu"] = med_q / base["qemu"] if base["qemu"] else math.nan
                rows.append(row)
    return rows


_ATTEMPTS = 3
"""Tries per QEMU run before the bench gives up on it."""


def run_qemu_cells(
    lab: Lab,
    work: Path,
    mem: int,
    runs: int,
    multifd: tuple[int, ...],
    log: Any,
    warmup: bool = True,
) -> list[QemuCell]:
    """Migrate a ``mem`` MiB random-RAM guest left -> right directly (row 1) and through
    migrate-proxy (row 5), interleaved, ``runs`` times each, without/with multifd.

    ``warmup``: each case runs once more first, unmeasured.  The first migration of a
    setting pays for what later ones find ready (the RAM image and QEMU's binary in the
    page cache, the lab's routes and neighbours, fresh guest pages from the hypervisor):
    without it, one direct single-channel cell spread from 0.41 to 1.06 s."""
    rtt = lab.spec.rtt_ms

    async def main() -> list[QemuCell]:
        image = await trio.to_thread.run_sync(make_ram_image, work / "ram.img", mem)
        cells: list[QemuCell] = []
        for mf in multifd:
            got = {c: QemuCell(rtt, c, mf, mem) for c in ("direct", "proxy")}
            for i in range(-1 if warmup else 0, runs):
                for case, cell in got.items():
                    cpu: dict[str, float] = {}
                    for attempt in range(1, _ATTEMPTS + 1):
                        # One QEMU that fails to start must not discard the whole run:
                        # the run is retried, and only a run failing every attempt fails.
                        try:
                            run = lab_direct_run if case == "direct" else lab_proxy_run
                            r, checked = await run(lab, work, image, mem, mf, verify=True, cpu=cpu)
                            if (
                                r.status != "completed"
                                or not r.transferred
                                or r.transferred < mem << 19
                            ):
                                raise BenchError(f"QEMU {case} mf={mf}: {r}")
                            break
                        except (BenchError, QemuError, QmpError, OSError) as exc:
                            log(f"rtt {rtt} ms qemu-{case} mf={mf} attempt {attempt} failed: {exc}")
                            if attempt == _ATTEMPTS:
                                raise
                            cpu = {}
                    if i < 0:
                        log(f"rtt {rtt} ms warm-up qemu-{case} mf={mf} {r.wall_seconds:.3f} s")
                        continue
                    gib = r.transferred / (1 << 30)
                    cell.qemu_cpu_src.append(cpu["qemu_src"] / gib)
                    cell.qemu_cpu_dst.append(cpu["qemu_dst"] / gib)
                    if case == "proxy":
                        cell.proxy_cpu_src.append(cpu["proxy_src"] / gib)
                        cell.proxy_cpu_dst.append(cpu["proxy_dst"] / gib)
                        cell.links = int(cpu["links"])
                    cell.walls.append(r.wall_seconds)
                    cell.mbps.append(r.mb_per_s)
                    cell.qemu_ms.append(r.total_time_ms)
                    cell.verified = checked
                    log(
                        f"rtt {rtt} ms run {i + 1}/{runs} qemu-{case} mf={mf} "
                        f"{r.wall_seconds:.3f} s {r.mb_per_s:.0f} MB/s"
                    )
            for cell in got.values():
                cell.median_wall = statistics.median(cell.walls)
                cell.median_mbps = statistics.median(cell.mbps)
            got["proxy"].ratio = got["proxy"].median_wall / got["direct"].median_wall
            cells += got.values()
        return cells

    result: list[QemuCell] = trio.run(main)
    return result


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mem", type=int, default=512, help="guest RAM in MiB")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--synthetic", action="store_true", help="mux only, no QEMU")
    ap.add_argument("--streams", default="1,2,4,5", help="synthetic: stream counts")
    ap.add_argument("--no-digest", action="store_true", help="mux: no SHA-256 in END")
    ap.add_argument("--total-mib", type=int, default=1024, help="synthetic: bytes per run")
    ap.add_argument(
        "--cases",
        default="unix:0,tcp:0,mux:0,unix:4,tcp:4,mux:4",
        help="comma list of transport:multifd_channels",
    )
    ap.add_argument("--lab", action="store_true", help="namespace lab: proxy vs direct")
    ap.add_argument("--digest", action="store_true", help="lab: SHA-256 in END")
    ap.add_argument("--handoff", action="store_true", help="lab: add handoff mode (mf=0)")
    ap.add_argument(
        "--lab-multifd", default="0,4", help="lab: comma list of multifd channel counts"
    )
    args = ap.parse_args()
    print(f"nproc={os.cpu_count()} mem={args.mem} MiB runs={args.runs} load {_load()}")
    if args.lab:
        rows = await lab_compare(
            args.mem,
            args.runs,
            multifd=tuple(int(x) for x in args.lab_multifd.split(",")),
            digest=args.digest,
            handoff=args.handoff,
        )
        for row in rows:
            walls = " ".join(f"{w:.3f}" for w in row["walls"])
            qms = " ".join(f"{q:.0f}" for q in row["qemu_ms"])
            ratio = (
                f"  /direct wall {row['ratio']:.2f}x qemu {row['ratio_qemu']:.2f}x"
                if "ratio" in row
                else ""
            )
            print(
                f"{row['case']:<7} mf={row['multifd']} wall {row['median_wall']:.3f} s "
                f"qemu {row['median_qemu_ms']:.0f} ms {row['mb_per_s']:.0f} MB/s "
                f"(walls {walls}; qemu ms {qms}){ratio}  load {row['load']}"
            )
        return
    if args.synthetic:
        total = args.total_mib << 20
        print(f"synthetic: {args.total_mib} MiB of random bytes per run, median MB/s")
        for n in (int(x) for x in args.streams.split(",")):
            dig = not args.no_digest
            one = statistics.median(synthetic(n, 1, total, dig) for _ in range(args.runs))
            many = statistics.median(synthetic(n, n, total, dig) for _ in range(args.runs))
            print(f"streams={n}: one link {one:7.0f} MB/s   {n} links {many:7.0f} MB/s")
        return
    with tempfile.TemporaryDirectory(prefix="hpm-bench-") as tmp:
        work = Path(tmp)
        image = await trio.to_thread.run_sync(make_ram_image, work / "ram.img", args.mem)
        print(f"{'case':<12} {'wall s':>8} {'qemu ms':>8} {'MB/s':>8}  transferred")
        for case in args.cases.split(","):
            transport, _, mf = case.partition(":")
            multifd = int(mf or 0)
            if transport == "mux":
                results = [
                    await mux_run(work, image, args.mem, multifd, not args.no_digest)
                    for _ in range(args.runs)
                ]
            else:
                results = [
                    await one_run(work, image, args.mem, transport, multifd)
                    for _ in range(args.runs)
                ]
            results.sort(key=lambda r: r.wall_seconds)
            med = results[len(results) // 2]
            walls = " ".join(f"{r.wall_seconds:.3f}" for r in results)
            print(
                f"{transport + ' mf=' + str(multifd):<12} {med.wall_seconds:8.3f} "
                f"{med.total_time_ms:8} {med.mb_per_s:8.0f}  {med.transferred}  "
                f"(walls {walls})"
            )


if __name__ == "__main__":
    trio.run(main)
