"""Resource limits under attack: garbage connections on the punch port during a session,
oversized control frames, and a control peer that sends one byte every 100 ms.

Each attack must leave memory and time bounded; the real session either succeeds or fails
cleanly at a deadline with a specific error.  Outcomes are recorded in docs/security.md
("Attacks tried").
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import trio

from holepunch_mig.errors import ControlTimeout, ProtocolError
from holepunch_mig.net.control import StreamChannel
from holepunch_mig.net.keyfiles import pinned_pair
from holepunch_mig.session import api
from holepunch_mig.wire import messages

CLI = [sys.executable, "-m", "holepunch_mig.cli"]


async def _stream_pair() -> tuple[StreamChannel, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    return StreamChannel(trio.SocketStream(a), peer_host="127.0.0.1"), trio.SocketStream(b)


# ------------------------------------------------------------------ oversized control frames


@pytest.mark.parametrize(
    ("prefix", "needle"),
    [
        (b"\xff\xff\xff\xff", "frame of 4294967295 bytes exceeds the 65553-byte limit"),
        ((65554).to_bytes(4, "big"), "frame of 65554 bytes exceeds"),
        (b"\x00\x00\x00\x00", "zero-length frame"),
    ],
)
async def test_oversized_frame_is_refused_before_buffering(prefix: bytes, needle: str) -> None:
    channel, attacker = await _stream_pair()
    tracemalloc.start()
    try:
        with trio.fail_after(5):
            # the length arrives, then the attacker keeps streaming junk it claims is body
            await attacker.send_all(prefix + b"A" * 60000)
            with pytest.raises(ProtocolError, match=needle):
                async with api.connect(channel, role="destination", control_timeout=3):
                    pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        await attacker.aclose()
        await channel.aclose()
    assert peak < 4 << 20, f"peak {peak} bytes"


async def test_maximal_frame_of_junk_is_one_protocol_error() -> None:
    channel, attacker = await _stream_pair()
    body = b"\x01" + b"[" * (messages.MAX_MESSAGE - 1)  # deepest JSON nesting that fits
    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(attacker.send_all, messages.frame(body))
                with pytest.raises(ProtocolError, match="not JSON"):
                    async with api.connect(channel, role="destination", control_timeout=3):
                        pass
    finally:
        await attacker.aclose()
        await channel.aclose()


# ------------------------------------------------------------------ slowloris


async def test_slowloris_control_peer_hits_the_message_deadline() -> None:
    """A valid offer, one byte every 100 ms: the deadline is per message, not per byte,
    so the destination gives up after control_timeout however steadily bytes trickle."""
    channel, attacker = await _stream_pair()
    offer = messages.frame(
        messages.encode(
            messages.Offer(
                session="ab" * 16,
                key="cd" * 32,
                port=40000,
                candidates=[],
                policy="direct",
                limits={},
            )
        )
    )
    sent = 0

    async def trickle() -> None:
        nonlocal sent
        for byte in offer:  # bounded: len(offer) bytes, 100 ms apart
            await attacker.send_all(bytes([byte]))
            sent += 1
            await trio.sleep(0.1)

    started = trio.current_time()
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trickle)
                with pytest.raises(ControlTimeout, match=r"no offer message .* within 2.0 s"):
                    async with api.connect(channel, role="destination", control_timeout=2.0):
                        pass
                nursery.cancel_scope.cancel()
    finally:
        await attacker.aclose()
        await channel.aclose()
    elapsed = trio.current_time() - started
    assert 1.9 < elapsed < 3.0
    assert 10 < sent < len(offer)  # it was trickling, and had not finished


# ------------------------------------------------------------------ punch-port flood, lab

PUNCH_PORT = 40000

FLOOD = r"""
import os, socket, sys, time, selectors
target = (sys.argv[1], int(sys.argv[2]))
deadline = time.monotonic() + float(sys.argv[3])
max_open = int(sys.argv[4])
opened = refused = garbage = 0
live = []
sel = selectors.DefaultSelector()
while time.monotonic() < deadline:
    # keep up to max_open connections: half silent, half spewing garbage
    while len(live) < max_open and time.monotonic() < deadline:
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(target)
        except BlockingIOError:
            pass
        except OSError:
            refused += 1
            s.close()
            break
        live.append(s)
        opened += 1
    time.sleep(0.01)
    keep = []
    for i, s in enumerate(live):
        try:
            if i % 2:
                s.send(os.urandom(512))
                garbage += 1
            keep.append(s)
        except (BlockingIOError, InterruptedError):
            keep.append(s)
        except OSError:
            s.close()
    # connections the receiver closed are dropped and replaced next turn
    live = keep[-max_open:]
    for s in keep[: len(keep) - max_open]:
        s.close()
for s in live:
    s.close()
print(opened, refused, garbage)
"""


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


@pytest.mark.netns
def test_flood_on_the_punch_port_during_a_session(tmp_path: Path) -> None:
    from testsupport.lab import require_netns

    from holepunch_mig.lab import CONTROL_PORT, Lab, presets

    require_netns()
    data = os.urandom(8 << 20)
    payload = tmp_path / "in.bin"
    payload.write_bytes(data)
    out = tmp_path / "out.bin"
    with Lab(presets()["open-open"]) as lab:
        target = lab.public_address("right")
        receiver = lab.popen(
            "right",
            [*CLI, "recv", "--control-listen", f"0.0.0.0:{CONTROL_PORT}", "--output", str(out),
             *pinned_pair(tmp_path).destination,
             "--port", str(PUNCH_PORT), "--dial-delay", "2", "--report",
             str(tmp_path / "recv.json"), "-q"],
        )  # fmt: skip
        attacker = lab.popen(
            "public",
            [sys.executable, "-c", FLOOD, target, str(PUNCH_PORT), "8", "200"],
            stdout=subprocess.PIPE,
        )
        lab.wait_listening("right", CONTROL_PORT, timeout=15, proc=receiver)
        host, port = lab.control_endpoint("right", CONTROL_PORT)
        started = time.monotonic()
        sender = lab.popen(
            "left",
            [*CLI, "send", "--control", f"{host}:{port}", "--input", str(payload),
             *pinned_pair(tmp_path).source,
             "--dial-delay", "2", "--report", str(tmp_path / "send.json"), "-q"],
        )  # fmt: skip
        peak = 0
        try:
            deadline = time.monotonic() + 60
            while sender.poll() is None and time.monotonic() < deadline:
                peak = max(peak, _rss_kib(receiver.pid))
                time.sleep(0.05)  # sampling, bounded by the deadline
            assert sender.wait(timeout=5) == 0
            assert receiver.wait(timeout=30) == 0
            elapsed = time.monotonic() - started
            opened, _refused, garbage = map(int, attacker.communicate(timeout=30)[0].split())
        finally:
            for proc in (sender, receiver, attacker):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    assert opened > 100, "the flood never reached the punch port: the test proved nothing"
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()
    report = json.loads((tmp_path / "recv.json").read_text())
    assert report["ok"] is True and report["path"] == "direct"
    flood = [p for p in report["pairs"] if p["remote"].startswith(lab.address("public") + ":")]
    assert flood and all(p["outcome"] == "rejected" for p in flood)
    assert all("not offered" in p["detail"] for p in flood)
    assert peak < 200 * 1024, f"receiver RSS peaked at {peak} KiB"
    print(
        json.dumps(
            {
                "attacker_connections": opened,
                "attacker_garbage_sends": garbage,
                "rejected_pairs_in_report": len(flood),
                "receiver_peak_rss_mib": round(peak / 1024, 1),
                "session_seconds": round(elapsed, 2),
            }
        )
    )
