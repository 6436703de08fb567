"""The benchmark's outputs from one :class:`BenchResult`: the table printed on the
terminal, docs/results/performance.md (the Markdown page), and the ``--json`` file read back.
The chart is :mod:`holepunch_mig.bench.chart`.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from holepunch_mig.bench.floor import (
    direct_cell,
    paced_floor,
    pair_floor,
    qemu_cpu,
    qemu_floor,
    scale,
    stages,
)
from holepunch_mig.bench.libvirt_cells import cell_from, libvirt_targets, render_libvirt_table
from holepunch_mig.bench.model import GIB, BenchResult, LinkTiming, RowResult, Sample
from holepunch_mig.net.record_io import HASHED_PREFETCH

__all__ = [
    "HEAD",
    "QEMU_HEAD",
    "context_lines",
    "fmt_rows",
    "link_line",
    "load_result",
    "measured_cell",
    "qemu_rows",
    "render_markdown",
    "render_text",
    "targets",
]

RESULTS_2009 = [
    ("1 plain qemu->qemu TCP", "29 s", "~106"),
    ("2 direct TLS->TLS stream", "44 s (host CPU 0 % idle)", "~70"),
    ("3 tunnel in 64 KB RPC chunks over the daemon link", "42 s", "~73"),
    ("4 STREAM_DATA over the daemon link", "112 s (racy prototype)", "~27"),
]


def measured_cell(res: BenchResult, key: str, rtt: int) -> RowResult | None:
    for r in res.rows:
        if r.key == key and r.rtt_ms == rtt and not r.pending and r.samples:
            return r
    return None


def _cpu_per_gib(r: RowResult) -> float:
    return r.median["send_cpu_per_gib"] + r.median["recv_cpu_per_gib"]


def _ceiling(r: RowResult, cores: int) -> float:
    """MB/s this row could reach if its measured CPU per GiB were spread perfectly over
    ``cores`` (sender and receiver share them here)."""
    return GIB / 1e6 * cores / max(1e-9, _cpu_per_gib(r))


def _mib(n: int) -> str:
    return f"{n / GIB:g} GiB" if n >= GIB else f"{n >> 20} MiB"


def fmt_rows(res: BenchResult, rtt: int | None = None) -> list[list[str]]:
    """Table cells of the measured (or pending) rows, optionally of one RTT."""
    out = []
    for r in res.rows:
        if rtt is not None and r.rtt_ms != rtt:
            continue
        if r.pending:
            out.append([r.number, r.title, f"{r.rtt_ms}", "pending", *["-"] * (len(HEAD) - 4)])
            continue
        m = r.median
        cap = "" if r.total == res.config["total"] else " (capped)"
        fl = pair_floor(res, r)
        out.append(
            [
                r.number,
                r.title,
                f"{r.rtt_ms}",
                _mib(r.total) + cap,
                f"{m['wall']:.2f} ({r.wall_min:.2f}-{r.wall_max:.2f})",
                f"{m['mbps']:.0f} ({r.mbps_min:.0f}-{r.mbps_max:.0f})",
                f"{r.ratio:.2f}" if r.ratio is not None else "-",
                f"{m['send_cpu_per_gib']:.2f} / {m['recv_cpu_per_gib']:.2f}",
                f"{fl.send_cpu:.2f} / {fl.recv_cpu:.2f}" if fl else "-",
                f"{fl.mbps:.0f}" if fl else "-",
                f"{m['mbps'] / fl.mbps:.2f}" if fl else "-",
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
    "CPU s/GiB send / recv",
    "floor CPU s/GiB send / recv",
    "floor MB/s",
    "of floor",
    "time to link s",
    "runs",
]


def link_line(res: BenchResult) -> str:
    link = res.time_to_link
    if link is None:
        return "time to link of the real CLI: not run (--lab-runs 0)"
    if link.skipped:
        return f"time to link of the real CLI: skipped - {link.skipped}"
    line = (
        f"time to link (real `holepunch-mig send`/`recv`, fw-fw lab, {link.rtt_ms} ms, "
        f"{link.runs} runs, sender's report): median {link.median:.3f} s, p95 {link.p95:.3f} s "
        f"(receiver's: median {statistics.median(link.recv_seconds):.3f} s)"
    )
    if link.control_seconds:
        line += (
            "; before it, the control handshake (pinned keys, sender's report): median "
            f"{statistics.median(link.control_seconds):.3f} s (at 0 and 20 ms: "
            "[control-handshake.md](control-handshake.md))"
        )
    return line


def context_lines(res: BenchResult) -> list[str]:
    mc = res.machine
    cfg = res.config
    where = (
        "two network namespaces of the lab (fw-fw; sender in left, receiver in right)"
        if res.where == "lab"
        else f"loopback, one namespace ({res.where_reason})"
    )
    prefetch = cfg["prefetch"]
    if prefetch is None:
        prefetch = f"default ({HASHED_PREFETCH} hashed, 0 bare)"
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
        f"send_file pipeline={cfg['pipeline']}, receive_file prefetch={prefetch}",
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
        if c["case"] == "proxy" and c.get("links"):
            label += f", {c['links']} link{'s' if c['links'] != 1 else ''}"
        src, dst = qemu_cpu(c)
        fl = qemu_floor(res, c)
        qs = _median_or_none(c.get("qemu_cpu_src", []))
        qd = _median_or_none(c.get("qemu_cpu_dst", []))
        out.append(
            [
                label,
                f"{c['rtt_ms']}",
                f"x{c['multifd']}" if c["multifd"] else "-",
                f"{c['median_wall']:.3f} ({min(c['walls']):.3f}-{max(c['walls']):.3f})",
                f"{c['median_mbps']:.0f}",
                f"{c['ratio']:.2f}" if c["ratio"] is not None else "1.00",
                f"{src:.2f} / {dst:.2f}" if src is not None and dst is not None else "-",
                f"{qs:.2f} / {qd:.2f}" if qs is not None and qd is not None else "-",
                f"{fl.send_cpu:.2f} / {fl.recv_cpu:.2f}" if fl else "-",
                f"{fl.mbps:.0f}" if fl else "-",
                f"{c['median_mbps'] / fl.mbps:.2f}" if fl else "-",
                f"{len(c['walls'])}",
            ]
        )
    return out


def _median_or_none(xs: list[float]) -> float | None:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else None


QEMU_HEAD = [
    "QEMU path",
    "RTT ms",
    "multifd",
    "wall s median (min-max)",
    "MB/s",
    "wall / direct",
    "CPU s/GiB src / dst (QEMU + proxy)",
    "of which QEMU",
    "floor CPU s/GiB src / dst",
    "floor MB/s",
    "of floor",
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
    if res.libvirt:
        lines.append("libvirt migrations (wall s, ratio to libvirt direct):")
        lines.append(render_libvirt_table([cell_from(c) for c in res.libvirt]))
    elif res.libvirt_note:
        lines.append(f"libvirt: {res.libvirt_note}")
    co = res.crypto_only
    lines.append(
        "crypto only (1 MiB buffers, MB/s): "
        + ", ".join(f"{k.removesuffix('_MBps')} {v:.0f}" for k, v in co.items())
    )
    lines.append(link_line(res))
    lines.append(
        "payload checks: "
        + "; ".join(f"{r.key}@{r.rtt_ms}ms: {r.verified}" for r in res.rows if not r.pending)
    )
    return "\n".join(lines)


def targets(res: BenchResult) -> list[tuple[str, str, str]]:
    """(target, measured, verdict with the measured cause) for each throughput target
    (the link's, and the fallback tunnel's)."""
    out: list[tuple[str, str, str]] = []
    cores = int(res.machine.get("affinity") or res.machine.get("nproc") or 2)
    plain, direct, tunnel = (measured_cell(res, k, 0) for k in ("plain-tcp", "direct", "tunnel"))
    if plain and direct:
        ratio = direct.median["mbps"] / plain.median["mbps"]
        cause = ""
        if ratio < 0.85:
            cause = (
                f" Cause (measured): 5a needs {_cpu_per_gib(direct):.2f} CPU s/GiB (send "
                f"{direct.median['send_cpu_per_gib']:.2f} + recv "
                f"{direct.median['recv_cpu_per_gib']:.2f}) against plain's "
                f"{_cpu_per_gib(plain):.2f}; with sender and receiver on {cores} cores "
                f"that bounds it at ~{_ceiling(direct, cores):.0f} MB/s "
                f"({_ceiling(direct, cores) / plain.median['mbps']:.2f}x of plain's median) "
                "before scheduling losses and other sessions' load."
            )
        out.append(
            (
                "row 5 (direct) >= 0.85x row 1 at 0 ms",
                f"{ratio:.2f}x ({direct.median['mbps']:.0f} vs {plain.median['mbps']:.0f} MB/s)",
                ("met" if ratio >= 0.85 else "**missed**") + cause,
            )
        )
    worst: list[str] = []
    measured: list[str] = []
    for rtt in res.rtts:
        tls, d = measured_cell(res, "tls", rtt), measured_cell(res, "direct", rtt)
        if tls and d:
            q = d.median["mbps"] / tls.median["mbps"]
            measured.append(f"{rtt} ms: {q:.2f}x")
            if q < 1 / 1.5:
                worst.append(f"{rtt} ms")
    if measured:
        out.append(
            (
                "row 5 not slower than row 2 (TLS) by 1.5x or more, at every RTT",
                "5a / 2 = " + ", ".join(measured),
                "met" if not worst else f"**missed** at {', '.join(worst)}",
            )
        )
    if plain and tunnel:
        ratio = tunnel.median["mbps"] / plain.median["mbps"]
        cause = ""
        if ratio < 0.6:
            cause = (
                f" Cause (measured): the tunnel needs {_cpu_per_gib(tunnel):.2f} CPU s/GiB "
                f"(send {tunnel.median['send_cpu_per_gib']:.2f}, recv "
                f"{tunnel.median['recv_cpu_per_gib']:.2f}), a 2-core ceiling of "
                f"~{_ceiling(tunnel, cores):.0f} MB/s: on top of the direct link's AES-GCM "
                "and TCP work, every byte goes through the control connection's frames (64 KiB "
                "messages, credit accounting) in a worker-thread pump and one extra copy out "
                "of the pump's buffers on the receiving side (docs/dev/tunnel-notes.md)."
            )
        out.append(
            (
                "row 4 (tunnel) >= 0.6x row 1 at 0 ms",
                f"{ratio:.2f}x ({tunnel.median['mbps']:.0f} vs {plain.median['mbps']:.0f} MB/s)",
                ("met" if ratio >= 0.6 else "**missed**") + cause,
            )
        )
    # the fallback tunnel's own targets
    if direct and tunnel:
        ratio = tunnel.median["mbps"] / direct.median["mbps"]
        out.append(
            (
                "row 4 (tunnel) >= 0.6x row 5a (direct link) at 0 ms",
                f"{ratio:.2f}x ({tunnel.median['mbps']:.0f} vs {direct.median['mbps']:.0f} MB/s)",
                "met" if ratio >= 0.6 else "**missed**",
            )
        )
    slow, windowed = measured_cell(res, "rpc-tunnel", 20), measured_cell(res, "tunnel", 20)
    if slow and windowed:
        ratio = windowed.median["mbps"] / max(slow.median["mbps"], 1e-9)
        out.append(
            (
                "row 4 (tunnel) >= 10x row 3 (stop-and-wait) at 20 ms",
                f"{ratio:.0f}x ({windowed.median['mbps']:.0f} vs {slow.median['mbps']:.1f} MB/s)",
                "met" if ratio >= 10 else "**missed**",
            )
        )
    blake, sha = measured_cell(res, "direct-blake3", 0), measured_cell(res, "direct-sha256", 0)
    cli, plain_file = measured_cell(res, "cli-blake3", 0), measured_cell(res, "plain-file", 0)
    if cli and plain_file:
        # the command moving a file against plain TCP moving the same file (row 1f)
        ratio = cli.median["mbps"] / plain_file.median["mbps"]
        extra = "".join(
            f"; {what} {c.median['mbps'] / base.median['mbps']:.2f}x row 1"
            for what, c, base in (
                ("row 6", cli, plain),
                ("the session alone, no files (5c)", blake, plain),
                ("SHA-256 (5b)", sha, plain),
            )
            if c is not None and base is not None
        )
        out.append(
            (
                "`send`/`recv` of a file (row 6, the real CLI: BLAKE3 both ends, resume on) "
                ">= 0.60x plain TCP moving the same file (row 1f) at 0 ms",
                f"{ratio:.2f}x ({cli.median['mbps']:.0f} vs "
                f"{plain_file.median['mbps']:.0f} MB/s){extra}",
                "met"
                if ratio >= 0.60
                else "**missed**" + _floor_cause(res, cli) + _page_cause(res, cli),
            )
        )
    elif plain and blake:
        ratio = blake.median["mbps"] / plain.median["mbps"]
        extra = f"; SHA-256 (5b) {sha.median['mbps'] / plain.median['mbps']:.2f}x" if sha else ""
        out.append(
            (
                "verified stream (5c, BLAKE3 both ends, send/recv's default) >= 0.60x "
                "row 1 at 0 ms",
                f"{ratio:.2f}x ({blake.median['mbps']:.0f} vs {plain.median['mbps']:.0f} MB/s)"
                + extra,
                "met" if ratio >= 0.60 else "**missed**" + _floor_cause(res, blake),
            )
        )
    if direct:
        fl = pair_floor(res, direct)
        if fl:
            of = direct.median["mbps"] / fl.mbps
            out.append(
                (
                    "row 5a (direct, no digest) within 10 % of its floor at 0 ms",
                    f"{of:.2f} of floor ({direct.median['mbps']:.0f} vs {fl.mbps:.0f} MB/s)",
                    "met" if of >= 0.90 else "**missed**" + _floor_cause(res, direct),
                )
            )
    for q in res.qemu:
        c = q if isinstance(q, dict) else asdict(q)
        if c["case"] != "proxy" or c["ratio"] is None:
            continue
        limit = 1.25 if c["multifd"] else 1.05
        fl = qemu_floor(res, c)
        cause = ""
        if c["ratio"] > limit and fl is not None:
            src, dst = qemu_cpu(c)
            twin = direct_cell(res, c) or {}
            best = max([twin.get("median_mbps") or 0.0, *twin.get("mbps", [])])
            bound = (
                "direct QEMU's best run bounds it"
                if fl.mbps >= best * 0.995
                else f"the CPU bounds it{_floor_ratio(res, c, fl.mbps)}"
            )
            of = c["median_mbps"] / fl.mbps
            spent = (
                f" with {src:.2f} + {dst:.2f} CPU s/GiB measured"
                if src is not None and dst is not None
                else ""
            )
            rest = (
                "; the rest is the proxies' per-record work and hand-offs and scheduling on "
                "the two shared cores (load average and steal in the header)"
                if of <= 1.0
                else "; the cell beat this floor, so the floor's model (direct QEMU's CPU, "
                "one UNIX-socket hop and AES-GCM per side) is too pessimistic here"
            )
            cause = (
                f". Cause (measured): the floor of this work here is {fl.mbps:.0f} MB/s "
                f"({fl.send_cpu:.2f} + {fl.recv_cpu:.2f} CPU s/GiB on {cores_of(res)} "
                f"cores shared by both QEMUs and both proxies; {bound}); the cell reached "
                f"{of:.2f} of it{spent}{rest}"
            )
        out.append(
            (
                f"QEMU via migrate-proxy <= {limit:.2f}x direct (wall), multifd "
                f"{('x' + str(c['multifd'])) if c['multifd'] else 'off'}, {c['rtt_ms']} ms",
                f"{c['ratio']:.2f}x",
                ("met" if c["ratio"] <= limit else "**missed**") + cause,
            )
        )
    out += libvirt_targets([cell_from(c) for c in res.libvirt])
    return out


def libvirt_section(res: BenchResult) -> list[str]:
    """The libvirt rows: one random-RAM domain migrated by libvirt in each way."""
    L = ["### libvirt live migration, fw-fw lab", ""]
    cells = [cell_from(c) for c in res.libvirt]
    if not cells:
        L += [f"Not measured in this run: {res.libvirt_note or 'not run'}.", ""]
        return L
    mem = cells[0].mem_mib
    L.append(
        f"Two libvirt daemons (left, right; each in its own network and mount namespace), "
        f"a {mem} MiB TCG domain with random file-backed RAM migrated memory only, left to "
        "right, each row in turn after one unmeasured warm-up. Wall = libvirt's migrate "
        "call (for holepunch_mig without the punching before it, shown as time to link), "
        "median of the runs; ratio = wall / libvirt direct's in the same parallel group. "
        "Rows: direct = libvirt's native transport over plain TCP into an opened port "
        "(unencrypted); tunnelled = inside the libvirt RPC connection (not with parallel "
        "connections); tls = the native transport with QEMU's TLS (certificates made at "
        "run time); holepunch_mig = `holepunch-mig migrate` through the punched AES-GCM "
        "link, no migration port open. Checked each run: destination running, 1 MiB of "
        "its RAM equal to the source's."
    )
    L.append("")
    L.append(render_libvirt_table(cells))
    ttl = [t for c in cells for t in c.time_to_link]
    if ttl:
        L.append("")
        L.append(
            f"holepunch_mig's time to link before libvirt's call: median "
            f"{statistics.median(ttl) * 1000:.0f} ms over {len(ttl)} runs."
        )
    L.append("")
    return L


def _floor_ratio(res: BenchResult, c: dict[str, Any], floor_mbps: float) -> str:
    """When the floor is below direct QEMU's median: the best wall ratio it allows, since
    a target under it cannot be met here by any proxy that copies and seals each byte once
    ("" when the floor is direct QEMU's own rate: then the CPU does not rule it out)."""
    direct = direct_cell(res, c)
    best = direct["median_mbps"] / floor_mbps if direct and direct["median_mbps"] else 0.0
    if best > 1.005:
        return f", so no proxy doing this work could beat {best:.2f}x direct on this machine"
    return ""


def cores_of(res: BenchResult) -> int:
    return int(res.machine.get("affinity") or res.machine.get("nproc") or 2)


def _floor_cause(res: BenchResult, r: RowResult) -> str:
    fl = pair_floor(res, r)
    if fl is None:
        return ""
    return (
        f". Floor {fl.mbps:.0f} MB/s ({fl.send_cpu:.2f} + {fl.recv_cpu:.2f} CPU s/GiB on "
        f"{cores_of(res)} shared cores); measured {r.median['send_cpu_per_gib']:.2f} + "
        f"{r.median['recv_cpu_per_gib']:.2f} CPU s/GiB"
    )


def _page_cause(res: BenchResult, cli: RowResult) -> str:
    """Why row 6's floor is out of reach on this VM, from the page-write probe."""
    fl, pw = paced_floor(res, cli), res.page_writes
    if fl is None:
        return ""
    costs = (
        f"writing new tmpfs pages costs {pw['paced_s_per_gib']:.2f} CPU s/GiB at row 6's "
        f"{pw['paced_MBps']:.0f} MB/s and {pw['full_s_per_gib']:.2f} at full speed (row 1f's "
        "case)"
    )
    if pw["paced_s_per_gib"] - pw["full_s_per_gib"] < 0.05:
        return f". Page cache (measured): {costs}, so the output's pages do not explain the miss"
    return (
        f". Cause (measured): {costs}: this VM hands freed pages back to its host (free page "
        "reporting) and the first touch of each is a host fault, so a slower writer pays "
        "more per byte (cli_cells.warm_pages). Charged at that cost, the floor is "
        f"{fl.mbps:.0f} MB/s ({fl.send_cpu:.2f} + {fl.recv_cpu:.2f}) and row 6 reached "
        f"{cli.median['mbps'] / fl.mbps:.2f} of it; on a host that does not report its free "
        "pages (bare metal) the full-speed figure is the one that applies"
    )


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def _shape_paragraph(res: BenchResult) -> str:
    parts = []
    rpc = {r.rtt_ms: r for r in res.rows if r.key == "rpc-tunnel" and not r.pending and r.samples}
    if rpc:
        parts.append(
            "RPC stop-and-wait (row 3) moves one 64 KiB chunk per round trip, so its rate is "
            "at most 64 KiB / (RTT + per-chunk processing): "
            + ", ".join(f"{r.median['mbps']:.0f} MB/s at {t} ms" for t, r in sorted(rpc.items()))
            + " (64 KiB / 1 ms = 65 MB/s, / 20 ms = 3.3 MB/s), which is why the 2009 tunnel "
            "collapses as soon as the hosts are not in one rack; the windowed tunnel (row 4) "
            "keeps 16 MiB in flight (credit per 4 MiB), enough for 16 MiB / 20 ms = 840 MB/s, "
            "and plain/TLS/direct TCP are bounded by their 4 MiB socket buffers "
            "(window ~ buffer / RTT) and by the lab's userspace delay stage."
        )
    plain, direct = measured_cell(res, "plain-tcp", 0), measured_cell(res, "direct", 0)
    if plain and direct:
        cores = int(res.machine.get("affinity") or 2)
        parts.append(
            f"At 0 ms every row is CPU-bound on this {cores}-core machine, where sender, "
            "receiver (and the lab's routing) share the cores: plain TCP costs "
            f"{_cpu_per_gib(plain):.2f} CPU s per GiB over both sides, the product (5a) "
            f"{_cpu_per_gib(direct):.2f} (AES-256-GCM seal/open ~0.1 s/GiB per side, record "
            "framing and thread hand-offs), so 5a's ceiling is "
            f"~{_ceiling(direct, cores):.0f} MB/s against plain's measured "
            f"{plain.median['mbps']:.0f}; SHA-256 on both ends (5b) adds "
            f"~{GIB / max(1.0, res.crypto_only.get('sha256_MBps', 0) * 1e6):.2f} s/GiB per "
            "side at this run's rate, BLAKE3 (5c, the default of send/recv) "
            f"~{GIB / max(1.0, res.crypto_only.get('blake3_MBps', 0) * 1e6):.2f}, which is "
            "why 5c verifies at close to 5a's rate and 5b does not. On real hosts each side "
            "has its own cores and the crypto overlaps "
            "the copy (pipelined writer), so the link is bounded by the sender's sendall, "
            "as plain TCP is."
        )
    tls = measured_cell(res, "tls", 0)
    if tls:
        parts.append(
            f"TLS (row 2) costs {_cpu_per_gib(tls):.2f} CPU s/GiB: Python's ssl reads one "
            "16 KiB record per recv call and encrypts in the caller's thread, with no "
            "overlap between crypto and I/O."
        )
    return " ".join(parts)


HOST_CORES = 16
NIC_GBPS = 25
NIC_PAYLOAD = 0.95
"""TCP/IP headers at MTU 1500 take ~5 % of the wire."""


def scaling_section(res: BenchResult) -> list[str]:
    """How the data path scales, from this run's stage costs (bench.floor.stages)."""
    st = stages(res)
    if st is None:
        return ["(needs row 1 at 0 ms and the crypto-only figures of the same run)"]
    nic = NIC_GBPS * 1e9 / 8 / 1e6 * NIC_PAYLOAD
    here = cores_of(res)
    L = [
        "Each parallel link is one TCP connection with its own threads on each side: the "
        "source proxy's pump (read QEMU's socket, seal, send), the destination's reader "
        "(receive, open, write to QEMU while its socket has room) and deliverer (writes "
        "what did not fit, so the reader never blocks on QEMU). Socket calls, AES-GCM and the "
        "digests release the GIL (Python's own share is a few microseconds per 1 MiB "
        "record), so N links keep up to N cores per side busy; one link is one thread "
        "chain, bounded by its slowest thread on one core. QEMU opens one connection per "
        "multifd channel plus the main channel, and the proxy gives each its own link, so "
        "a migration with K multifd channels scales like K links (the main channel carries "
        "little once multifd is on).",
        "",
        f"Stage costs measured in this run (CPU s per GiB; row 1's copies on the link, "
        f"half the UNIX-socket hop on QEMU's side, AES-GCM at the crypto-only rates): pump "
        f"{st.pump:.2f}, reader {st.reader:.2f} (of which {st.deliverer:.2f} the write to "
        f"QEMU); one link therefore carries at most {st.link_mbps:.0f} MB/s. "
        + (
            f"QEMU's own CPU (direct QEMU cells, TCG): {st.qemu_src:.2f} source, "
            f"{st.qemu_dst:.2f} destination; under KVM it is lower, so the core-bound "
            "figures below are pessimistic."
            if st.qemu_src or st.qemu_dst
            else "QEMU's own CPU was not measured in this run (no QEMU cells): the core "
            "bounds below count the proxies only."
        )
        + f" Per GiB a side spends {st.source_cpu:.2f} (source) / "
        f"{st.destination_cpu:.2f} (destination) CPU seconds.",
        "",
        f"A host with {HOST_CORES} cores per side and a {NIC_GBPS} Gb/s NIC "
        f"(~{nic:.0f} MB/s of payload after TCP/IP headers):",
        "",
    ]
    rows = []
    for n in (1, 2, 3, 4, 8, 16):
        mbps, stage = scale(st, n, HOST_CORES, nic)
        rows.append([f"{n}", f"{mbps:.0f}", f"{mbps * 8 / 1e3:.1f}", stage])
    L += _table(["links", "MB/s", "Gb/s", "bound by"], rows)
    at_nic = nic * 1e6 / GIB
    L += [
        "",
        f"At the NIC's rate the proxies keep about {at_nic * st.pump:.1f} cores busy on the "
        f"source and {at_nic * st.reader:.1f} on the destination, QEMU "
        f"about {at_nic * st.qemu_src:.1f} / {at_nic * st.qemu_dst:.1f} more (TCG figures), "
        f"well inside {HOST_CORES} cores: the links' threads, then the NIC, bound such a "
        "host, not its cores. `send`/`recv` move a stream over one link, so they are bound "
        "by one pump-like chain (the sender's read, seal and send; plus the digest in its "
        "own thread), about the single-link figure above; striping a stream over links "
        "is not implemented: measured here, 1 GiB as two concurrent 0.5 GiB record streams "
        "(two links, no reassembly cost) took a median 1.90 s against 1.52 s for one "
        "stream (3 interleaved runs each, loopback socketpairs, load 1.2-2.0): one link "
        "already keeps both cores busy with the sender's and the receiver's work, so a "
        "second link only adds contention on this 2-core machine.",
    ]
    both = here * GIB / 1e6 / (st.source_cpu + st.destination_cpu)
    L += [
        "",
        f"This machine ({here} cores shared by both sides, both QEMUs and the lab): "
        f"at most {both:.0f} MB/s however many links, because every link's work lands on "
        "the same cores; more links only help while a single thread chain, not the cores, "
        "is the limit. That is why the QEMU cells above stay far from direct QEMU here: the "
        "proxies' copies and AES-GCM are on top of QEMU's own CPU on the same two cores "
        "(see each cell's floor). With one side per host and more cores than links, "
        "throughput grows with the links until the NIC is the limit.",
    ]
    return L


def render_markdown(res: BenchResult) -> str:
    """The whole docs/results/performance.md."""
    L: list[str] = []
    L.append("# Performance")
    L.append("")
    L.append(
        "Generated by `make bench` (`holepunch-mig bench`; package "
        "`holepunch_mig.bench`: rows `rows.py`, runner `harness.py`, lab cells "
        "`lab_cells.py`, QEMU cells `qemu_cells.py`, this page `report.py`, chart "
        "`chart.py`). Do not edit by hand: rerun."
    )
    L.append("")
    L.append("![throughput per RTT](performance.png)")
    L.append("")
    L.append("## Method")
    L.append("")
    L.append(
        "Every row moves the same payload, a stand-in for guest memory: incompressible "
        "(a 1 MiB random pattern, every 1 MiB chunk stamped with its index), from a sender "
        "process to a receiver process. In the lab the sender runs in the namespace of "
        "host `left` and the receiver in `right` (`ip netns exec`, one process per side "
        "and run), both firewalled (inbound NEW dropped); the receiver's control port and "
        "one data port (rows 1-2) are let in. RTT is the lab's delay stage. Each side "
        "sets up its connection (TLS handshake; punch + Noise KK, or the tunnel), says "
        "ready, and both start on the harness's go: wall = sender's go to the receiver's "
        "last verified byte; CPU = getrusage of each side process (all threads) over the "
        "same span; time to link = the session report's `time_to_link` (punch start to "
        "nominated link). Rows are interleaved, median of the runs with min and max; "
        "ratios are to row 1 at the same RTT. MB = 10^6 B. Every run is verified: byte "
        "counts on both ends and in the sink, every chunk stamp and chunk tail, the TLS "
        "version and cipher, the session's path (direct/tunnel), and for 5b both ends' "
        "SHA-256 (5c: BLAKE3) against one computed beforehand. A failed check fails the "
        "run. CPU is per GiB of payload, per side; the floor of a row is what its work "
        "costs at the rates measured in the same run (row 1's CPU per GiB on each side for "
        "the copies, plus AES-256-GCM and the digest at the crypto-only rates below), and "
        "its fastest possible rate is that CPU spread over the cores, never above row 1's "
        "best rate in the run; `of floor` is the row's MB/s over that "
        "(`holepunch_mig.bench.floor`)."
    )
    L.append("")
    L.append(
        "Rows: 1 plain TCP to an opened port (blocking sendall / recv_into MSG_WAITALL, 1 MiB); "
        "2 TLS 1.3 TLS_AES_256_GCM_SHA384, Python ssl, blocking, throwaway self-signed P-256 "
        "certificate made at run time; 3 the 2009 RPC tunnel: the real library's tunnel "
        "with a one-chunk window (64 KiB) and a credit reply per chunk, over the control "
        'connection; 4 holepunch_mig\'s fallback tunnel, `policy="tunnel"` (16 MiB window, '
        'credit per 4 MiB); 5a holepunch_mig direct, `policy="direct"`: punched TCP + '
        "Noise KK + AES-256-GCM records, `digest=False` and `resume_attempts=0` (a "
        "resumable link always hashes its stream, so the bare link needs resume off; the run "
        "fails if it hashed); 5b the same with SHA-256 of the payload on both ends, resume on; "
        "5c with BLAKE3 on both ends, resume on (what `send`/`recv` run by default: the "
        "resume bookkeeping, and for a pipe the resume buffer's copy, are in 5b/5c). "
        "Rows 3-5 are `api.connect` + `Link.send_file`/`receive_file` "
        "in each namespace. Row 6 is the command itself, `holepunch-mig send --input FILE` "
        "in `left` and `recv --output FILE` in `right` with their defaults (BLAKE3, resume "
        "on, the output fsynced and renamed into place before `ok`), the payload written "
        "to a tmpfs file beforehand and the output on tmpfs: wall is the sender report's "
        "`seconds` (first record to the destination's verdict), CPU each report's "
        "`cpu_seconds`; checked: exit codes, both reports `ok` on the direct path with the "
        "payload's BLAKE3, the output file's size and chunk stamps. Row 1f is its plain "
        "twin: plain TCP from a tmpfs file (written before the clock starts) to a new "
        "tmpfs file, fsynced and closed before the clock stops; row 6's floor is built on "
        "1f's copies, not row 1's. "
        "Row 3 at 1/20 ms RTT uses a smaller payload (marked capped): "
        "at 3 MB/s 2 GiB would take 11 minutes per run; MB/s is comparable, wall is for "
        "that payload."
    )
    L.append("")
    L.append("## Results")
    L.append("")
    L += [f"- {x}" for x in context_lines(res)]
    L.append(f"- command: `{res.command}`")
    if res.loadavg_per_rtt:
        L.append(
            "- load average (1/5/15 min) when each RTT's cells started: "
            + "; ".join(
                f"{k} ms: " + " ".join(f"{x:.2f}" for x in v)
                for k, v in res.loadavg_per_rtt.items()
            )
        )
    if res.steal_pct:
        L.append(
            "- CPU time the hypervisor gave to other guests (steal, /proc/stat) during: "
            + "; ".join(f"{k}: {v:.1f} %" for k, v in res.steal_pct.items())
            + " — this machine is a VM on a shared host: cells with more steal ran on "
            "less CPU than their neighbours"
        )
    L.append("")
    for rtt in res.rtts:
        L.append(f"### {rtt} ms RTT")
        L.append("")
        L += _table(HEAD, fmt_rows(res, rtt))
        pend = [r.pending for r in res.rows if r.rtt_ms == rtt and r.pending]
        if pend:
            L.append("")
            L.append(f"Pending: {pend[0]}")
        L.append("")
    L.append("### QEMU, 512 MiB non-zero guest, fw-fw lab")
    L.append("")
    if res.qemu:
        L.append(
            "Source QEMU in `left`, destination in `right` (TCG, random RAM image, "
            "max-bandwidth 10^10). Row 1 = QEMU `tcp:` straight to the destination's opened "
            "port, no crypto; row 5 = through `holepunch-mig migrate-proxy` on both hosts "
            "(punched links, one per QEMU connection, Noise KK, AES-256-GCM, count-only "
            "END). Wall = `migrate` .. `completed` (the punch happens before). Interleaved, "
            "after one unmeasured warm-up of each. "
            "Checked: status completed, destination running, 32 MiB of guest RAM equal on "
            "both sides (pmemsave), proxies' byte counts agree. CPU per GiB of guest RAM "
            "moved (QEMU's `ram.transferred`), per side: QEMU's own (user + system of the "
            "QEMU process from /proc, migrate .. completed) plus the migrate-proxy "
            "process's (its report's `cpu_seconds`); the floor is direct QEMU's CPU (its "
            "TCP hop included, which the proxies take over) plus, per side, one UNIX-socket "
            "hop between QEMU and its proxy (`unix_hop` below, measured alone) and "
            "AES-GCM, over the cores, but never faster than direct QEMU's best run "
            "(`holepunch_mig.bench.floor`)."
        )
        L.append("")
        L += _table(QEMU_HEAD, qemu_rows(res))
    else:
        L.append(f"Not measured in this run: {res.qemu_note}.")
    L.append("")
    L += libvirt_section(res)
    L.append("### Targets")
    L.append("")
    tg = targets(res)
    if tg:
        L += _table(["target", "measured", "verdict"], [list(t) for t in tg])
    else:
        L.append("No target could be evaluated (rows missing).")
    L.append("")
    L.append(
        '("Not worse than row 2 by less than 1.5x" is read as: row 5 may be slower than '
        "TLS, but by less than a factor 1.5, i.e. 5a/2 > 0.67.)"
    )
    L.append("")
    L.append("### Other figures of this run")
    L.append("")
    co = res.crypto_only
    L.append(
        "Crypto only, 1 MiB buffers, one thread unless noted: "
        + ", ".join(f"{k.removesuffix('_MBps')} {v:.0f} MB/s" for k, v in co.items())
        + "."
    )
    L.append("")
    pw = res.page_writes
    if pw:
        L.append(
            "New tmpfs pages (row 6's payload size in 1 MiB writes, begun right after "
            "freeing as much touched memory, `cli_cells.page_write_costs`, after the 0 ms "
            "rows; row 6's output starts later, after the sender's start-up and punch, so "
            "its pages are at least this cold): "
            f"{pw['full_s_per_gib']:.2f} CPU s/GiB at full speed, "
            f"{pw['paced_s_per_gib']:.2f} paced at row 6's {pw['paced_MBps']:.0f} MB/s."
        )
        L.append("")
    L.append(link_line(res) + ".")
    L.append("")
    checks = sorted({f"{r.number} {r.key}: {r.verified}" for r in res.rows if r.verified})
    L.append("Payload checks per row: " + "; ".join(checks) + ".")
    L.append("")
    L.append("## The 2009 comparison (context)")
    L.append("")
    L.append(
        "From the libvirt-list thread that started this project: a "
        "3 GB guest, 2009 hardware, one run each. MB/s derived here as 3e9 B / wall."
    )
    L.append("")
    L += _table(["2009 option", "wall", "MB/s (derived)"], [list(x) for x in RESULTS_2009])
    L.append("")
    plain, tls, rpc, direct = (
        measured_cell(res, k, 0) for k in ("plain-tcp", "tls", "rpc-tunnel", "direct")
    )
    if plain and tls and rpc:
        L.append(
            f"2009 ratios to plain: TLS 0.66x, RPC tunnel 0.69x. Here at 0 ms: TLS "
            f"{tls.ratio:.2f}x, RPC tunnel {rpc.ratio:.2f}x"
            + (f", holepunch_mig direct {direct.ratio:.2f}x." if direct and direct.ratio else ".")
            + " The 2009 tunnel looked acceptable because the test hosts sat on one LAN "
            "(sub-millisecond RTT); the RTT columns show what it does on anything longer."
        )
        L.append("")
    L.append("## Shape of the results")
    L.append("")
    L.append(_shape_paragraph(res) or "(not enough rows measured to explain)")
    L.append("")
    L.append("## Scaling with cores and links (on paper)")
    L.append("")
    L += scaling_section(res)
    L.append("")
    L.append("## How to run")
    L.append("")
    L.append(
        "`make bench` (full: 2 GiB, 3 runs, 0/1/20 ms, QEMU 3 runs; writes this page, "
        "`docs/results/performance.png` and `build/bench.json`), or `holepunch-mig bench --quick` "
        "(1 GiB, 3 runs, 0 ms + 20 ms, QEMU 1 run at 0 ms; < 5 minutes). Options: `--rows`, "
        "`--rtts`, `--runs`, `--gib`, `--qemu-runs`, `--loopback`, `--lab-runs`, "
        "`--sockbuf`, `--pipeline`, `--prefetch`, `--full-verify`, `--markdown`, `--png`, "
        "`--json`. Without root only the loopback rows run (and the page says so). The "
        "machine is shared: the load average is printed with every table; compare ratios "
        "within one run, not absolute MB/s across runs. `--from-json build/bench.json` "
        "re-renders this page and the chart without measuring. The earlier loopback-only "
        "analysis of the record layer (pipeline/prefetch A/B, 256 KiB vs 1 MiB records) is "
        "in this file's history (commit 768d58c) and docs/dev/records-notes.md; rows R/Rs/Rb "
        "(`--rows records,records-sha256,records-blake3 --loopback`) still measure the record "
        "layer alone."
    )
    return "\n".join(L) + "\n"


def load_result(path: str | Path) -> BenchResult:
    """A BenchResult back from ``--json`` output (to re-render the page and chart)."""
    d = json.loads(Path(path).read_text())
    rows = []
    for r in d.pop("rows"):
        r["samples"] = [Sample(**x) for x in r["samples"]]
        rows.append(RowResult(**r))
    link = d.pop("time_to_link")
    return BenchResult(rows=rows, time_to_link=LinkTiming(**link) if link else None, **d)
