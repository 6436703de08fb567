#!/usr/bin/env python3
"""Throughput of the bulk record layer vs plain TCP, sender and receiver in two processes.

    python bench/bench_records.py [--gib 2] [--runs 3] [--json PATH]

Each mode moves N GiB over loopback TCP from a sender process to a receiver process:

  plain    blocking sockets, 1 MiB src.readinto + sendall / recv_into(MSG_WAITALL) + dst.write
  records  RecordWriter.send_file / RecordReader.receive_file, digest=False
  digest   the same with SHA-256 on both sides

Data: one 1 MiB buffer of os.urandom() (incompressible, though content does not affect AES
or TCP speed) is copied into the reader's buffer by a memory source's readinto() for every
chunk; the sink's write() discards.  Both are identical across modes, so the ratios
compare the transport only.  Wall time runs from the sender's first send to the
receiver's last byte (CLOCK_MONOTONIC is system-wide).  CPU is getrusage(RUSAGE_SELF)
user+sys of each process (all threads) over the transfer.  Median of --runs runs, modes
interleaved.  MB = 10**6 bytes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from holepunch_mig.records import MAX_RECORD, RecordReader, RecordWriter

CHUNK = 1 << 20
GiB = 1 << 30


class MemSource:
    """readinto() copies from one random buffer until `total` bytes have been produced."""

    def __init__(self, total: int) -> None:
        self.left = total
        self.pattern = memoryview(os.urandom(CHUNK))

    def readinto(self, b: Any) -> int:
        n = min(len(b), self.left, CHUNK)
        b[:n] = self.pattern[:n]
        self.left -= n
        return n


class NullSink:
    def write(self, b: Any) -> int:
        return len(b)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _tune(sock: socket.socket, bufsize: int) -> None:
    if bufsize:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)


def sender(mode: str, port: int, total: int, key: bytes, bufsize: int, q: Any) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    _tune(sock, bufsize)
    src = MemSource(total)
    c0 = _cpu()
    t0 = time.perf_counter()
    if mode == "plain":
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while True:
            n = src.readinto(view)
            if not n:
                break
            sock.sendall(view[:n])
    else:
        w = RecordWriter(sock, key)
        w.send_file(1, src, digest=(mode == "digest"))  # type: ignore[arg-type]
        w.close()
    c1 = _cpu()
    q.put(("sender", t0, c1 - c0))
    sock.close()


def receiver(mode: str, lsock: socket.socket, total: int, key: bytes, bufsize: int, q: Any) -> None:
    sock, _ = lsock.accept()
    _tune(sock, bufsize)
    sink = NullSink()
    c0 = _cpu()
    got = 0
    if mode == "plain":
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while got < total:
            n = sock.recv_into(view, min(CHUNK, total - got), socket.MSG_WAITALL)
            if not n:
                raise SystemExit("plain: EOF early")
            sink.write(view[:n])
            got += n
    else:
        r = RecordReader(sock, key)
        got, _ = r.receive_file(1, sink, digest=(mode == "digest"))  # type: ignore[arg-type]
        r.read()  # CLOSE
    t1 = time.perf_counter()
    c1 = _cpu()
    assert got == total, (got, total)
    q.put(("receiver", t1, c1 - c0))
    sock.close()


def one_run(mode: str, total: int, bufsize: int) -> dict[str, float]:
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]
    key = os.urandom(32)
    pr = ctx.Process(target=receiver, args=(mode, lsock, total, key, bufsize, q))
    pr.start()
    ps = ctx.Process(target=sender, args=(mode, port, total, key, bufsize, q))
    ps.start()
    out: dict[str, tuple[float, float]] = {}
    for _ in range(2):
        who, t, cpu = q.get(timeout=300)
        out[who] = (t, cpu)
    ps.join()
    pr.join()
    lsock.close()
    wall = out["receiver"][0] - out["sender"][0]
    gib = total / GiB
    return {
        "mbps": total / wall / 1e6,
        "wall": wall,
        "send_cpu_per_gib": out["sender"][1] / gib,
        "recv_cpu_per_gib": out["receiver"][1] / gib,
    }


def crypto_only(seconds: float = 1.0) -> dict[str, float]:
    import hashlib

    key = os.urandom(32)
    aead = AESGCM(key)
    pt = bytearray(os.urandom(MAX_RECORD))
    frame = bytearray(8 + MAX_RECORD + 16)
    fv = memoryview(frame)
    out = bytearray(MAX_RECORD)
    nonce = bytes(12)

    def rate(fn: Any) -> float:
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn()
            n += 1
        return n * MAX_RECORD / (time.perf_counter() - t0) / 1e6

    aead.encrypt_into(nonce, pt, fv[:8], fv[8:])
    ct = bytes(frame[8:])
    aad = bytes(frame[:8])
    h = hashlib.sha256()
    return {
        "encrypt_into_MBps": rate(lambda: aead.encrypt_into(nonce, pt, fv[:8], fv[8:])),
        "decrypt_into_MBps": rate(lambda: aead.decrypt_into(nonce, ct, aad, out)),
        "sha256_MBps": rate(lambda: h.update(pt)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--modes", default="plain,records,digest")
    ap.add_argument("--bufsize", type=int, default=0, help="SO_SNDBUF/SO_RCVBUF (0: kernel)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    total = int(args.gib * GiB) // CHUNK * CHUNK
    modes = args.modes.split(",")
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    for _ in range(args.runs):
        for m in modes:
            runs[m].append(one_run(m, total, args.bufsize))
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}
    base = med.get("plain", {}).get("mbps")
    print(f"nproc={os.cpu_count()}  {args.gib} GiB per run  median of {args.runs}")
    print(f"{'mode':10} {'MB/s':>8} {'ratio':>6} {'send CPU s/GiB':>15} {'recv CPU s/GiB':>15}")
    for m, r in med.items():
        ratio = f"{r['mbps'] / base:.2f}" if base else "-"
        print(
            f"{m:10} {r['mbps']:8.0f} {ratio:>6} "
            f"{r['send_cpu_per_gib']:15.3f} {r['recv_cpu_per_gib']:15.3f}"
        )
    co = crypto_only()
    print(
        "crypto only, one core, 1 MiB buffers: " + ", ".join(f"{k} {v:.0f}" for k, v in co.items())
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "nproc": os.cpu_count(),
                    "gib": args.gib,
                    "runs": runs,
                    "median": med,
                    "crypto_only": co,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
