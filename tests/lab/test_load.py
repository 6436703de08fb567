"""Load: many sessions at once between two lab hosts, and many in a row in one process.

* 50 concurrent sessions between the two hosts of a "fw-fw" lab (both firewalls drop
  unsolicited inbound; the destination opens 50 control ports), one process per side,
  all sessions in one trio nursery: every one must complete with a verified digest.
* N sequential in-process loopback sessions (memory_channel_pair, small payload) must not
  leak file descriptors, threads or memory (1000 in CI, ~30 s); standalone:

      PYTHONPATH=src python tests/lab/test_load.py --sessions 1000

Figures: docs/reliability.md.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import resource
import subprocess
import sys
import threading
import time
import tracemalloc
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import blake3
import pytest
import trio

from holepunch_mig.session import api
from holepunch_mig.testing import memory_channel_pair

SEQUENTIAL_CI = 1000
PAYLOAD = 64 << 10

# ------------------------------------------------------------------ sequential, in-process


async def one_session(data: bytes) -> None:
    a, b = memory_channel_pair()
    out = io.BytesIO()
    digest = blake3.blake3(data).hexdigest()

    async def source() -> None:
        async with api.connect(a, role="source", ipv6=False) as link:
            result = await link.send_file(io.BytesIO(data))
            assert result.sha256 == digest

    async def destination() -> None:
        async with api.connect(b, role="destination", ipv6=False) as link:
            result = await link.receive_file(out)
            assert result.sha256 == digest

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(source)
            nursery.start_soon(destination)
    await a.aclose()
    await b.aclose()
    assert out.getvalue() == data


@dataclass
class Usage:
    fds: int
    threads: int
    traced: int  # bytes allocated by Python and still live (tracemalloc)
    rss: int  # resident set size, bytes


def usage() -> Usage:
    gc.collect()
    with open("/proc/self/statm") as fh:
        rss = int(fh.read().split()[1]) * resource.getpagesize()
    traced = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else 0
    return Usage(len(os.listdir("/proc/self/fd")), threading.active_count(), traced, rss)


async def sequential(n: int, warmup: int = 20) -> dict[str, Any]:
    """Run ``warmup`` sessions (thread pool, caches), measure, run ``n``, measure."""
    data = os.urandom(PAYLOAD)
    for _ in range(warmup):
        await one_session(data)
    tracemalloc.start()
    before = usage()
    started = time.monotonic()
    for _ in range(n):
        await one_session(data)
    seconds = time.monotonic() - started
    after = usage()
    tracemalloc.stop()
    return {
        "sessions": n,
        "seconds": round(seconds, 2),
        "ms_per_session": round(1000 * seconds / n, 1),
        "fds": [before.fds, after.fds],
        "threads": [before.threads, after.threads],
        "traced_kib": [before.traced >> 10, after.traced >> 10],
        "rss_mib": [round(before.rss / 2**20, 1), round(after.rss / 2**20, 1)],
    }


def check_bounded(fig: dict[str, Any]) -> None:
    fds, threads, traced, rss = fig["fds"], fig["threads"], fig["traced_kib"], fig["rss_mib"]
    assert fds[1] == fds[0], f"file descriptors leaked: {fds}"
    # trio's worker-thread cache may hold a few idle threads more after the warm-up
    assert threads[1] <= threads[0] + 4, f"threads grew: {threads}"
    # no per-session residue: well under 1 KiB of live Python objects per session
    assert traced[1] - traced[0] < max(256, fig["sessions"] // 2), f"memory grew: {traced} KiB"
    assert rss[1] - rss[0] < 32, f"RSS grew: {rss} MiB"


async def test_sequential_sessions_leak_nothing() -> None:
    fig = await sequential(SEQUENTIAL_CI)
    print(json.dumps(fig))
    check_bounded(fig)


# ------------------------------------------------------------------ 50 concurrent, lab

CONCURRENT = 50
BASE_PORT = 7100
CONCURRENT_PAYLOAD = 2 << 20

SIDE = r"""
import hashlib, io, json, socket, sys, time
import blake3
import trio
from holepunch_mig.session import api
from holepunch_mig.net.control import StreamChannel, open_tcp_channel

role, host = sys.argv[1], sys.argv[2]
base, count, size = (int(x) for x in sys.argv[3:6])
results = {}

def payload(i):
    return hashlib.sha256(str(i).encode()).digest() * (size // 32)

async def accept(port):
    listener = trio.socket.socket()
    with listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await listener.bind((host, port))
        listener.listen(1)
        print(f"listening {port}", file=sys.stderr, flush=True)
        sock, _ = await listener.accept()
    return StreamChannel(trio.SocketStream(sock))

async def session(i):
    t0 = time.monotonic()
    try:
        if role == "destination":
            channel = await accept(base + i)
        else:
            channel = await open_tcp_channel(host, base + i, wait=30)
        try:
            async with api.connect(channel, role=role, ipv6=False) as link:
                if role == "source":
                    r = await link.send_file(io.BytesIO(payload(i)))
                else:
                    out = io.BytesIO()
                    r = await link.receive_file(out)
                    assert out.getvalue() == payload(i)
                ok = r.sha256 == blake3.blake3(payload(i)).hexdigest()
                results[i] = {"ok": ok, "seconds": time.monotonic() - t0,
                              "link": link.report.time_to_link, "rounds": link.report.rounds}
        finally:
            await channel.aclose()
    except BaseException as exc:
        results[i] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        if not isinstance(exc, Exception):
            raise

async def main():
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(session, i)

t0 = time.monotonic()
trio.run(main)
print(json.dumps({"wall": time.monotonic() - t0, "results": results}))
"""


@pytest.mark.netns
def test_fifty_concurrent_sessions_fw_fw(tmp_path: Path) -> None:
    from testsupport.lab import require_netns

    from holepunch_mig.lab import Lab, presets

    require_netns()
    base = presets()["fw-fw"]
    ports = tuple(range(BASE_PORT, BASE_PORT + CONCURRENT))
    spec = replace(base, right=replace(base.right, allow_inbound_tcp=ports), name="fw-fw-50")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    args = [str(BASE_PORT), str(CONCURRENT), str(CONCURRENT_PAYLOAD)]
    with Lab(spec) as lab:
        dst_host = lab.address("right")
        dst = lab.popen(
            "right",
            [sys.executable, "-c", SIDE, "destination", dst_host, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        lab.wait_listening("right", BASE_PORT + CONCURRENT - 1, timeout=30, proc=dst)
        host, _ = lab.control_endpoint("right", BASE_PORT)
        src = lab.popen(
            "left",
            [sys.executable, "-c", SIDE, "source", host, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        try:
            src_out, src_err = src.communicate(timeout=180)
            dst_out, dst_err = dst.communicate(timeout=60)
        finally:
            for proc in (src, dst):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    assert src.returncode == 0, src_err.decode()[-3000:]
    assert dst.returncode == 0, dst_err.decode()[-3000:]
    figures = {}
    for side, out in (("source", src_out), ("destination", dst_out)):
        doc = json.loads(out)
        results = doc["results"]
        bad = {i: r for i, r in results.items() if not r["ok"]}
        assert len(results) == CONCURRENT and not bad, bad
        secs = sorted(r["seconds"] for r in results.values())
        links = sorted(r["link"] for r in results.values())
        figures[side] = {
            "wall": round(doc["wall"], 2),
            "session_median": round(secs[len(secs) // 2], 2),
            "session_max": round(secs[-1], 2),
            "time_to_link_max": round(links[-1], 2),
            "rounds_max": max(r["rounds"] for r in results.values()),
        }
    print(json.dumps(figures))


# ------------------------------------------------------------------ benchmark entry point


def main() -> None:
    p = argparse.ArgumentParser(description="sequential-session leak benchmark")
    p.add_argument("--sessions", type=int, default=1000)
    args = p.parse_args()
    fig = trio.run(sequential, args.sessions)
    print(json.dumps(fig))
    check_bounded(fig)


if __name__ == "__main__":
    main()
