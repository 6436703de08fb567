"""Benchmark direct QEMU-to-QEMU migration on this host (no holepunch_mig link).

Migrates a guest with random (non-zero) RAM over a UNIX socket and over loopback
TCP, optionally with multifd, and prints the median of N runs: wall seconds measured
around ``migrate``..``completed``, QEMU's own ``total-time`` and MB/s (10**6 bytes
of ``ram.transferred`` per wall second).

    sudo PYTHONPATH=src python bench/bench_qemu.py --mem 512 --runs 3
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
from pathlib import Path

import trio

from holepunch_mig.qemu import MigrationResult, QemuVM, make_ram_image, migrate, wait_status


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


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


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mem", type=int, default=512, help="guest RAM in MiB")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--cases",
        default="unix:0,tcp:0,unix:4,tcp:4",
        help="comma list of transport:multifd_channels",
    )
    args = ap.parse_args()
    print(f"nproc={os.cpu_count()} mem={args.mem} MiB runs={args.runs}")
    with tempfile.TemporaryDirectory(prefix="hpm-bench-") as tmp:
        work = Path(tmp)
        image = await trio.to_thread.run_sync(make_ram_image, work / "ram.img", args.mem)
        print(f"{'case':<12} {'wall s':>8} {'qemu ms':>8} {'MB/s':>8}  transferred")
        for case in args.cases.split(","):
            transport, _, mf = case.partition(":")
            multifd = int(mf or 0)
            results = [
                await one_run(work, image, args.mem, transport, multifd) for _ in range(args.runs)
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
