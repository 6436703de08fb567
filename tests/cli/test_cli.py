"""The command on loopback: TCP and subprocess control channels, the JSON report, exit
codes, and that a failed receive never leaves a file that looks complete."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import blake3

from holepunch_mig.net.keyfiles import pinned_pair

CLI = [sys.executable, "-m", "holepunch_mig.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _connect_when_listening(port: int, timeout: float = 15.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=5)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # polling for the receiver's listener, bounded by the deadline


def _payload(tmp_path: Path, size: int = 3 << 20) -> tuple[Path, str]:
    data = os.urandom(size)
    path = tmp_path / "in.bin"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def test_send_recv_over_tcp_control(tmp_path: Path) -> None:
    src, digest = _payload(tmp_path)
    port = _free_port()
    out = tmp_path / "out.bin"
    keys = pinned_pair(tmp_path)
    recv = subprocess.Popen(
        [
            *CLI,
            "recv",
            "--control-listen",
            f"127.0.0.1:{port}",
            "--output",
            str(out),
            "--report",
            str(tmp_path / "r.json"),
            *keys.destination,
        ],
        stderr=subprocess.PIPE,
    )
    send = subprocess.run(
        [
            *CLI,
            "send",
            "--control",
            f"127.0.0.1:{port}",
            "--input",
            str(src),
            "--report",
            str(tmp_path / "s.json"),
            *keys.source,
        ],
        capture_output=True,
        timeout=60,
    )
    _, recv_err = recv.communicate(timeout=30)
    assert send.returncode == 0, send.stderr.decode()
    assert recv.returncode == 0, recv_err.decode()
    assert send.stdout == b""  # nothing but data may go to stdout
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
    # the default digest is BLAKE3 (both sides have it); the report names it
    b3 = blake3.blake3(out.read_bytes()).hexdigest()
    for name in ("r.json", "s.json"):
        report = json.loads((tmp_path / name).read_text())
        assert report["path"] == "direct"
        assert report["digest"] == "blake3"
        assert report["sha256"] == b3
        assert report["bytes"] == src.stat().st_size
        assert report["seconds"] > 0
        # this side's CPU over the transfer: something, and no more than its threads
        # (reader/hasher, sender, the event loop) could spend in its wall time
        assert 0 < report["cpu_seconds"] <= 4 * report["seconds"] + 0.05
        assert report["ok"] is True
        peer = "destination" if name == "s.json" else "source"
        assert report["control_peer"].startswith(f"pinned key {peer!r}")
    assert b"verified" in send.stderr
    assert f"blake3 {b3}".encode() in send.stderr
    assert b"s/GiB)" in send.stderr  # the human report says the CPU it took


def test_digest_sha256_matches_sha256sum(tmp_path: Path) -> None:
    """``--digest sha256`` on one side is enough: the session falls back to SHA-256 and
    the report holds what sha256sum prints."""
    src, digest = _payload(tmp_path)
    port = _free_port()
    out = tmp_path / "out.bin"
    keys = pinned_pair(tmp_path)
    recv = subprocess.Popen(
        [*CLI, "recv", "--control-listen", f"127.0.0.1:{port}", "--output", str(out),
         "--report", str(tmp_path / "r.json"), "--digest", "sha256", *keys.destination],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    send = subprocess.run(
        [*CLI, "send", "--control", f"127.0.0.1:{port}", "--input", str(src),
         "--report", str(tmp_path / "s.json"), *keys.source],
        capture_output=True, timeout=60,
    )  # fmt: skip
    _, recv_err = recv.communicate(timeout=30)
    assert send.returncode == 0, send.stderr.decode()
    assert recv.returncode == 0, recv_err.decode()
    for name in ("r.json", "s.json"):
        report = json.loads((tmp_path / name).read_text())
        assert report["digest"] == "sha256" and report["sha256"] == digest
    assert f"sha256 {digest}".encode() in send.stderr


def test_send_recv_over_subprocess_stdio(tmp_path: Path) -> None:
    src, digest = _payload(tmp_path)
    out = tmp_path / "out.bin"
    remote = f"{sys.executable} -m holepunch_mig.cli recv --control-stdio --output {out} -q"
    send = subprocess.run(
        [
            *CLI,
            "send",
            "--control-cmd",
            remote,
            "--peer-host",
            "127.0.0.1",
            "--input",
            str(src),
            "--report",
            str(tmp_path / "s.json"),
        ],
        capture_output=True,
        timeout=60,
    )
    assert send.returncode == 0, send.stderr.decode()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest


def test_stdin_to_stdout(tmp_path: Path) -> None:
    src, digest = _payload(tmp_path, 1 << 20)
    port = _free_port()
    sink = tmp_path / "stdout.bin"
    psk = tmp_path / "psk"
    psk.write_bytes(os.urandom(32))
    psk.chmod(0o600)
    auth = ["--psk-file", str(psk)]
    with sink.open("wb") as out_fh:
        recv = subprocess.Popen(
            [*CLI, "recv", "--control-listen", f"127.0.0.1:{port}", "-q", *auth],
            stdout=out_fh,
            stderr=subprocess.PIPE,
        )
        with src.open("rb") as fh:
            send = subprocess.run(
                [*CLI, "send", "--control", f"127.0.0.1:{port}", "-q", *auth],
                stdin=fh,
                capture_output=True,
                timeout=60,
            )
        _, err = recv.communicate(timeout=30)
    assert send.returncode == 0, send.stderr.decode()
    assert recv.returncode == 0, err.decode()
    assert hashlib.sha256(sink.read_bytes()).hexdigest() == digest


def test_unreachable_control_port_exit_1_with_verdict(tmp_path: Path) -> None:
    port = _free_port()
    report = tmp_path / "s.json"
    keys = pinned_pair(tmp_path)
    send = subprocess.run(
        [
            *CLI,
            "send",
            "--control",
            f"127.0.0.1:{port}",
            "--control-wait",
            "0.3",
            "--input",
            "/dev/null",
            "--report",
            str(report),
            *keys.source,
        ],
        capture_output=True,
        timeout=30,
    )
    assert send.returncode == 1
    assert b"cannot reach the control port" in send.stderr
    data = json.loads(report.read_text())
    assert data["ok"] is False
    assert "cannot reach the control port" in data["verdict"]


def test_usage_errors_exit_2() -> None:
    bad = subprocess.run([*CLI, "send", "--control", "nonsense"], capture_output=True, timeout=30)
    assert bad.returncode == 2
    assert b"no port" in bad.stderr
    clash = subprocess.run([*CLI, "recv", "--control-stdio"], capture_output=True, timeout=30)
    assert clash.returncode == 2
    assert b"give --output PATH" in clash.stderr


def test_sender_vanishing_leaves_no_output(tmp_path: Path) -> None:
    port = _free_port()
    out = tmp_path / "out.bin"
    recv = subprocess.Popen(
        [
            *CLI,
            "recv",
            "--control-listen",
            f"127.0.0.1:{port}",
            "--output",
            str(out),
            "--report",
            str(tmp_path / "r.json"),
            "--pair",
            "--pair-timeout",
            "3",
            "-q",
        ],
        stderr=subprocess.PIPE,
    )
    # a "sender" that connects, says nothing valid and leaves: refused, the receiver goes
    # on listening until its pairing code expires
    conn = _connect_when_listening(port)
    conn.sendall(b"\x00\x00\x00\x05\x01{}{}")
    conn.close()
    _, err = recv.communicate(timeout=30)
    assert recv.returncode == 1
    assert b"expected a control handshake frame" in err
    assert b"expired" in err
    assert b"PairingFailed" not in err and b"ProtocolError" not in err  # words, not classes
    assert not out.exists()
    assert not list(tmp_path.glob(".out.bin.*"))


def test_ssh_control_accepts_a_psk_and_a_one_sided_psk_fails_by_name(tmp_path: Path) -> None:
    src, digest = _payload(tmp_path, 1 << 20)
    psk = tmp_path / "psk"
    psk.write_bytes(os.urandom(32))
    psk.chmod(0o600)
    out = tmp_path / "out.bin"
    remote = f"{sys.executable} -m holepunch_mig.cli recv --control-stdio --output {out} -q"
    both = subprocess.run(
        [*CLI, "send", "--control-cmd", f"{remote} --psk-file {psk}", "--peer-host", "127.0.0.1",
         "--input", str(src), "--psk-file", str(psk), "--report", str(tmp_path / "s.json")],
        capture_output=True, timeout=60,
    )  # fmt: skip
    assert both.returncode == 0, both.stderr.decode()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["control_peer"] == "holder of the pre-shared secret"
    one_sided = subprocess.run(
        [*CLI, "send", "--control-cmd", remote, "--peer-host", "127.0.0.1", "--input", str(src),
         "--psk-file", str(psk), "-q"],
        capture_output=True, timeout=60,
    )  # fmt: skip
    assert one_sided.returncode == 1
    # the receiver (its stderr is ours) names what the sender used
    assert b"authenticated control frame" in one_sided.stderr, one_sided.stderr.decode()
