"""A third party racing to the punched port is rejected and the real peer's link wins.

The receiver's punch port is fixed and both sides hold their dials for a second, so the
attacker (a host on the public segment, in its own namespace) reaches the listener first.
One attacker comes from an address nobody offered; the other from an address the source
did offer and speaks a well-formed Noise KK first message with its own keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from testsupport.lab import require_netns

from holepunch_mig.lab import CONTROL_PORT, Lab, presets
from holepunch_mig.net.keyfiles import pinned_pair

pytestmark = pytest.mark.netns

CLI = [sys.executable, "-m", "holepunch_mig.cli"]
PUNCH_PORT = 40000
ATTACKER_PORT = 41000

ATTACKER = """
import socket, struct, sys, time
from holepunch_mig.wire.noise import HandshakeState, generate_keypair
target = (sys.argv[1], int(sys.argv[2]))
source_port = int(sys.argv[3])
deadline = time.monotonic() + float(sys.argv[4])
hits = 0
while time.monotonic() < deadline:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.settimeout(0.5)
    try:
        if source_port:
            s.bind(("0.0.0.0", source_port))
        s.connect(target)
        priv, _ = generate_keypair()
        _, theirs = generate_keypair()
        hs = HandshakeState("KK", True, b"guess", s=priv, rs=theirs)
        msg = hs.write_message(struct.pack(">II", 1, 1))
        s.sendall(struct.pack(">H", len(msg)) + msg)
        hits += 1
        s.recv(100)
    except OSError:
        pass
    finally:
        s.close()
    time.sleep(0.02)
print(hits)
"""


@pytest.mark.parametrize("offered", [False, True], ids=["unoffered-address", "offered-address"])
def test_third_party_is_rejected_and_real_peer_wins(tmp_path: Path, offered: bool) -> None:
    require_netns()
    data = os.urandom(8 << 20)
    payload = tmp_path / "in.bin"
    payload.write_bytes(data)
    out = tmp_path / "out.bin"
    with Lab(presets()["open-open"]) as lab:
        attacker_host = lab.address("public")
        target = lab.public_address("right")
        attacker = lab.popen(
            "public",
            [
                sys.executable,
                "-c",
                ATTACKER,
                target,
                str(PUNCH_PORT),
                str(ATTACKER_PORT if offered else 0),
                "6",
            ],
            stdout=subprocess.PIPE,
        )
        extra = ["--candidate", f"{attacker_host}:{ATTACKER_PORT}"] if offered else []
        receiver = lab.popen(
            "right",
            [
                *CLI,
                "recv",
                "--control-listen",
                f"0.0.0.0:{CONTROL_PORT}",
                *pinned_pair(tmp_path).destination,
                "--output",
                str(out),
                "--port",
                str(PUNCH_PORT),
                "--dial-delay",
                "1",
                "--report",
                str(tmp_path / "recv.json"),
                "-q",
            ],
        )
        host, port = lab.control_endpoint("right", CONTROL_PORT)
        sender = lab.popen(
            "left",
            [
                *CLI,
                "send",
                "--control",
                f"{host}:{port}",
                *pinned_pair(tmp_path).source,
                "--input",
                str(payload),
                "--dial-delay",
                "1",
                "--report",
                str(tmp_path / "send.json"),
                "-q",
                *extra,
            ],
        )
        try:
            assert sender.wait(timeout=60) == 0
            assert receiver.wait(timeout=30) == 0
            hits = int(attacker.communicate(timeout=30)[0] or b"0")
        finally:
            for proc in (sender, receiver, attacker):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    assert hits > 0, "the attacker never reached the punch port: the test proved nothing"
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()
    report = json.loads((tmp_path / "recv.json").read_text())
    assert report["path"] == "direct" and report["ok"] is True
    from_attacker = [p for p in report["pairs"] if p["remote"].startswith(attacker_host + ":")]
    inbound = [p for p in from_attacker if p["direction"] == "inbound"]
    assert inbound, report["pairs"]
    assert {p["outcome"] for p in inbound} <= {"rejected", "abandoned"}
    assert any(p["outcome"] == "rejected" for p in inbound)
    expected = "handshake failed" if offered else "not offered"
    assert any(expected in p["detail"] for p in inbound), inbound
    nominated = [p for p in report["pairs"] if p["outcome"] == "nominated"]
    assert len(nominated) == 1
    assert nominated[0]["remote"].startswith(lab.public_address("left") + ":")
