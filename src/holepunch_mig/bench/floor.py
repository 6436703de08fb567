"""The floor of every row: the least CPU and the shortest time its work could take on
this machine, computed from rates measured in the same run, so each row shows how far
it is from what the hardware allows rather than only from another row.

What a row must do per GiB, per side:

* move the bytes through the kernel: what plain TCP (row 1) measured on that side,
  CPU seconds per GiB (sendall on one side, recv_into on the other), same RTT;
* its cryptography: GiB / (AES-256-GCM encrypt rate) on the sender, / decrypt rate on
  the receiver (the crypto-only figures of the run, one thread, 1 MiB buffers);
* its digest, when it verifies: GiB / (SHA-256 or BLAKE3 rate), both sides.

The floor time per GiB is the larger of plain TCP's best time per GiB in the run
(nothing that uses the same sockets can be faster) and the floor CPU of both sides
spread perfectly over the cores (sender and receiver share this machine).  CPU figures
are medians; the crypto-only rates are per CPU second of the measuring thread, so other
sessions' load does not inflate them.  Scheduling, thread hand-offs and
the other sessions' load are what a row loses on top.

QEMU through the proxies (row 5 QEMU) must do what direct QEMU did (QEMU's own CPU per
GiB, from /proc, each side: its RAM work and one TCP hop) plus, per side, one UNIX-socket
hop between QEMU and its proxy (the run's ``unix_hop`` figure: writer and reader of a
socketpair, per CPU second) and the AES-GCM of its direction: the TCP hop moves from
QEMU to the proxies, it is not added.  The floor time is the larger of direct QEMU's
best time per GiB and that CPU over the cores.  (Runs recorded before ``unix_hop`` was
measured charged a plain-TCP send and receive per proxy instead, which overstated the
floor: a proxied cell then beat it.)
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any

from holepunch_mig.bench.model import GIB, BenchResult, RowResult

CRYPTO_WORK: dict[str, tuple[str, ...]] = {
    "plain-tcp": (),
    "tls": ("aes",),
    "rpc-tunnel": ("aes",),
    "tunnel": ("aes",),
    "direct": ("aes",),
    "direct-sha256": ("aes", "sha256"),
    "direct-blake3": ("aes", "blake3"),
    "plain-file": (),
    "cli-blake3": ("aes", "blake3"),  # on top of row 1f's copies, file read/write included
    "records": ("aes",),
    "records-sha256": ("aes", "sha256"),
    "records-blake3": ("aes", "blake3"),
}
"""Row key -> the primitives every byte goes through on each side (beyond the copies)."""


@dataclass(frozen=True)
class Floor:
    send_cpu: float  # CPU s/GiB, sender (source) side
    recv_cpu: float  # CPU s/GiB, receiver (destination) side
    mbps: float  # the fastest this work could run here, MB/s (10**6 B)


def cores(res: BenchResult) -> int:
    return int(res.machine.get("affinity") or res.machine.get("nproc") or 2)


def _seconds_per_gib(res: BenchResult, key: str) -> float:
    rate = res.crypto_only.get(key)
    return GIB / (rate * 1e6) if rate else 0.0


def _primitive(res: BenchResult, name: str, side: str) -> float:
    if name == "aes":
        key = "aes_gcm_encrypt_into_MBps" if side == "send" else "aes_gcm_decrypt_into_MBps"
        return _seconds_per_gib(res, key)
    return _seconds_per_gib(res, f"{name}_MBps")


#: Rows whose bytes come from and go to files: their copies are row 1f's (plain TCP from
#: a file to a file), not row 1's.
FILE_ROWS = frozenset({"plain-file", "cli-blake3"})


def _plain(res: BenchResult, rtt: int, key: str = "plain-tcp") -> RowResult | None:
    for r in res.rows:
        if r.key == key and r.rtt_ms == rtt and not r.pending and r.samples:
            return r
    return None


def pair_floor(res: BenchResult, row: RowResult) -> Floor | None:
    """The row's floor, or None without its plain-TCP row (1, or 1f for the file rows) at
    its RTT."""
    plain = _plain(res, row.rtt_ms, "plain-file" if row.key in FILE_ROWS else "plain-tcp")
    if plain is None or not res.crypto_only:
        return None
    work = CRYPTO_WORK.get(row.key, ("aes",))
    send = plain.median["send_cpu_per_gib"] + sum(_primitive(res, w, "send") for w in work)
    recv = plain.median["recv_cpu_per_gib"] + sum(_primitive(res, w, "recv") for w in work)
    return _spread(res, plain, send, recv)


def _spread(res: BenchResult, plain: RowResult, send: float, recv: float) -> Floor:
    plain_wall = GIB / (max(plain.mbps_max, plain.median["mbps"]) * 1e6)
    wall = max(plain_wall, (send + recv) / cores(res))
    return Floor(send, recv, GIB / 1e6 / wall)


def paced_floor(res: BenchResult, row: RowResult) -> Floor | None:
    """Row 6's floor with its output's page-cache writes charged at what new pages cost
    at row 6's own rate (``res.page_writes``) rather than at row 1f's full speed: on this
    VM a page costs more the longer ago it was freed, so the plain floor assumes writes
    that a writer at row 6's rate does not get.  None without the probe's figures."""
    fl = pair_floor(res, row)
    plain = _plain(res, row.rtt_ms, "plain-file")
    pw = res.page_writes
    if fl is None or plain is None or row.key != "cli-blake3" or not pw:
        return None
    extra = max(0.0, pw["paced_s_per_gib"] - pw["full_s_per_gib"])
    return _spread(res, plain, fl.send_cpu, fl.recv_cpu + extra)


def _cell(c: Any) -> dict[str, Any]:
    return c if isinstance(c, dict) else asdict(c)


def _med(xs: list[float]) -> float | None:
    xs = [x for x in xs if x == x]  # drop NaN (a side that did not report)
    return statistics.median(xs) if xs else None


def qemu_cpu(c: Any) -> tuple[float | None, float | None]:
    """Median CPU s/GiB of each side of a QEMU cell: QEMU plus its proxy (proxy cells)."""
    d = _cell(c)
    src, dst = _med(d.get("qemu_cpu_src", [])), _med(d.get("qemu_cpu_dst", []))
    if d["case"] == "proxy":
        ps, pd = _med(d.get("proxy_cpu_src", [])), _med(d.get("proxy_cpu_dst", []))
        src = src + ps if src is not None and ps is not None else None
        dst = dst + pd if dst is not None and pd is not None else None
    return src, dst


def direct_cell(res: BenchResult, c: Any) -> dict[str, Any] | None:
    """The direct QEMU cell a QEMU cell is compared with (same multifd and RTT), as a dict."""
    d = _cell(c)
    return next(
        (
            x
            for x in map(_cell, res.qemu)
            if (x["case"], x["multifd"], x["rtt_ms"]) == ("direct", d["multifd"], d["rtt_ms"])
        ),
        None,
    )


def qemu_floor(res: BenchResult, c: Any) -> Floor | None:
    """A QEMU cell's floor (None when direct QEMU, plain TCP or the CPU figures are
    missing from the run).  Direct cells: their own measured figures."""
    d = _cell(c)
    direct = direct_cell(res, d)
    if direct is None:
        return None
    qs, qd = _med(direct.get("qemu_cpu_src", [])), _med(direct.get("qemu_cpu_dst", []))
    if qs is None or qd is None or not direct["median_mbps"]:
        return None
    best = max([direct["median_mbps"], *direct.get("mbps", [])])
    direct_wall = GIB / (best * 1e6)
    if d["case"] == "direct":
        return Floor(qs, qd, best)
    plain = _plain(res, d["rtt_ms"])
    if plain is None or not res.crypto_only:
        return None
    hop = _seconds_per_gib(res, "unix_hop_MBps")
    copies = hop or plain.median["send_cpu_per_gib"] + plain.median["recv_cpu_per_gib"]
    send = qs + copies + _primitive(res, "aes", "send")
    recv = qd + copies + _primitive(res, "aes", "recv")
    wall = max(direct_wall, (send + recv) / cores(res))
    return Floor(send, recv, GIB / 1e6 / wall)


@dataclass(frozen=True)
class Stages:
    """Per-GiB CPU seconds of each thread of one link's data path, from this run's rates:
    the source proxy's pump (read QEMU's socket, AES-GCM seal, send on the link: one
    thread, serial) and the destination's reader (receive, open, and write to QEMU's
    socket while it keeps up; the deliverer writes only what did not fit), plus QEMU's
    own CPU per side."""

    pump: float
    reader: float
    deliverer: float
    qemu_src: float
    qemu_dst: float

    @property
    def link_mbps(self) -> float:
        """The most one link carries: its slowest thread on one core (the reader writes
        to QEMU itself while QEMU keeps up; the deliverer only takes the overflow)."""
        return GIB / 1e6 / max(self.pump, self.reader)

    @property
    def source_cpu(self) -> float:
        return self.pump + self.qemu_src

    @property
    def destination_cpu(self) -> float:
        return self.reader + self.qemu_dst


def stages(res: BenchResult) -> Stages | None:
    """The stage costs (None without row 1 at 0 ms or the crypto-only figures)."""
    plain = _plain(res, 0)
    if plain is None or not res.crypto_only:
        return None
    send, recv = plain.median["send_cpu_per_gib"], plain.median["recv_cpu_per_gib"]
    # QEMU's side of a proxy is a UNIX socket: half the measured hop each way (older runs
    # without the figure: plain TCP's receive / send)
    hop = _seconds_per_gib(res, "unix_hop_MBps")
    local_read, local_write = (hop / 2, hop / 2) if hop else (recv, send)
    qs = qd = 0.0
    direct = [_cell(c) for c in res.qemu if _cell(c)["case"] == "direct"]
    if direct:
        qs = _med([x for c in direct for x in c.get("qemu_cpu_src", [])]) or 0.0
        qd = _med([x for c in direct for x in c.get("qemu_cpu_dst", [])]) or 0.0
    return Stages(
        pump=local_read + _primitive(res, "aes", "send") + send,
        reader=recv + _primitive(res, "aes", "recv") + local_write,
        deliverer=local_write,
        qemu_src=qs,
        qemu_dst=qd,
    )


def scale(st: Stages, links: int, host_cores: int, nic_mbps: float) -> tuple[float, str]:
    """MB/s of a migration over ``links`` links on a host with ``host_cores`` cores per
    side and a NIC of ``nic_mbps``, and the stage that bounds it: the NIC, the links'
    slowest thread (one core each), or one side's cores (every thread's CPU, QEMU's own
    included)."""
    bounds = {
        "the NIC": nic_mbps,
        "one thread per link (" + _slowest(st) + ")": links * st.link_mbps,
        "the source's cores": host_cores * GIB / 1e6 / st.source_cpu,
        "the destination's cores": host_cores * GIB / 1e6 / st.destination_cpu,
    }
    stage = min(bounds, key=lambda k: bounds[k])
    return bounds[stage], stage


def _slowest(st: Stages) -> str:
    names = {"the source's pump": st.pump, "the destination's reader": st.reader}
    return max(names, key=lambda k: names[k])
