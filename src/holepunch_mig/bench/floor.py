"""The floor of every row: the least CPU and the shortest time its work could take on
this machine, computed from rates measured in the same run, so each row shows how far
it is from what the hardware allows rather than only from another row.

What a row must do per GiB, per side:

* move the bytes through the kernel: what plain TCP (row 1) measured on that side,
  CPU seconds per GiB (sendall on one side, recv_into on the other), same RTT;
* its cryptography: GiB / (AES-256-GCM encrypt rate) on the sender, / decrypt rate on
  the receiver (the crypto-only figures of the run, one thread, 1 MiB buffers);
* its digest, when it verifies: GiB / (SHA-256 or BLAKE3 rate), both sides.

The floor time per GiB is the larger of plain TCP's time per GiB (nothing that uses
the same sockets can be faster) and the floor CPU of both sides spread perfectly over
the cores (sender and receiver share this machine).  Scheduling, thread hand-offs and
the other sessions' load are what a row loses on top.

QEMU through the proxies (row 5 QEMU) must do what direct QEMU did (QEMU's own CPU per
GiB, from /proc, each side) plus, per proxy, one more read and one more write of every
byte (plain TCP's receive and send CPU per GiB) and the AES-GCM of its direction; the
floor time is the larger of direct QEMU's time per GiB and that CPU over the cores.
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
    "records": ("aes",),
    "records-sha256": ("aes", "sha256"),
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


def _plain(res: BenchResult, rtt: int) -> RowResult | None:
    for r in res.rows:
        if r.key == "plain-tcp" and r.rtt_ms == rtt and not r.pending and r.samples:
            return r
    return None


def pair_floor(res: BenchResult, row: RowResult) -> Floor | None:
    """The row's floor, or None without a measured plain-TCP row at its RTT."""
    plain = _plain(res, row.rtt_ms)
    if plain is None or not res.crypto_only:
        return None
    work = CRYPTO_WORK.get(row.key, ("aes",))
    send = plain.median["send_cpu_per_gib"] + sum(_primitive(res, w, "send") for w in work)
    recv = plain.median["recv_cpu_per_gib"] + sum(_primitive(res, w, "recv") for w in work)
    plain_wall = GIB / (plain.median["mbps"] * 1e6)
    wall = max(plain_wall, (send + recv) / cores(res))
    return Floor(send, recv, GIB / 1e6 / wall)


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


def qemu_floor(res: BenchResult, c: Any) -> Floor | None:
    """A QEMU cell's floor (None when direct QEMU, plain TCP or the CPU figures are
    missing from the run).  Direct cells: their own measured figures."""
    d = _cell(c)
    direct = next(
        (
            _cell(x)
            for x in res.qemu
            if _cell(x)["case"] == "direct"
            and _cell(x)["multifd"] == d["multifd"]
            and _cell(x)["rtt_ms"] == d["rtt_ms"]
        ),
        None,
    )
    if direct is None:
        return None
    qs, qd = _med(direct.get("qemu_cpu_src", [])), _med(direct.get("qemu_cpu_dst", []))
    if qs is None or qd is None or not direct["median_mbps"]:
        return None
    direct_wall = GIB / (direct["median_mbps"] * 1e6)
    if d["case"] == "direct":
        return Floor(qs, qd, direct["median_mbps"])
    plain = _plain(res, d["rtt_ms"])
    if plain is None or not res.crypto_only:
        return None
    copies = plain.median["send_cpu_per_gib"] + plain.median["recv_cpu_per_gib"]
    send = qs + copies + _primitive(res, "aes", "send")
    recv = qd + copies + _primitive(res, "aes", "recv")
    wall = max(direct_wall, (send + recv) / cores(res))
    return Floor(send, recv, GIB / 1e6 / wall)
