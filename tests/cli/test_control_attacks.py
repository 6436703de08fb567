"""Attacks on the TCP control channel, with the real CLI on loopback: a stranger who
connects first, a squatter receiver, a relay with keys of its own between the two, a
silent connection and a flood of them, wrong pairing codes, a wrong psk; and the usage
error for an unauthenticated TCP control channel.

Before the control handshake existed, the first three delivered the stranger's bytes,
gave the squatter the payload and let the relay rewrite it, each with both sides
"verified"; one silent connection failed the real session."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trio

from holepunch_mig.net.keyfiles import load_auth, pinned_pair
from holepunch_mig.net.secure_control import accept_authenticated, connect_authenticated

CLI = [sys.executable, "-m", "holepunch_mig.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _payload(tmp_path: Path, name: str, size: int = 1 << 20) -> tuple[Path, str]:
    data = os.urandom(size)
    path = tmp_path / name
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """Until something accepts on ``port`` (a probe that connects and leaves at once:
    the authenticated listener counts it and goes on)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "the listener exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return
        except ConnectionRefusedError:
            assert time.monotonic() < deadline, f"nothing listens on {port}"
            time.sleep(0.05)  # polling for the listener, bounded by the deadline


def _stop(*procs: subprocess.Popen[bytes]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


def _keypair_dir(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    return folder


def test_stranger_who_connects_first_is_refused_and_the_real_sender_wins(tmp_path: Path) -> None:
    """Finding 1: the receiver took the first connection's bytes as the guest image."""
    real, digest = _payload(tmp_path, "real.bin")
    forged, _ = _payload(tmp_path, "forged.bin")
    keys = pinned_pair(_keypair_dir(tmp_path, "keys"))
    # the stranger has a key of its own and knows the receiver's (public) key
    stranger = pinned_pair(_keypair_dir(tmp_path, "stranger"))
    dst_pub = tmp_path / "keys" / "destination.pub"
    port = _free_port()
    out = tmp_path / "guest.img"
    recv = subprocess.Popen(
        [*CLI, "recv", "--control-listen", f"127.0.0.1:{port}", "--output", str(out),
         "--report", str(tmp_path / "r.json"), "-q", *keys.destination],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        _wait_listening(port, recv)
        bad = subprocess.run(
            [*CLI, "send", "--control", f"127.0.0.1:{port}", "--input", str(forged), "-q",
             "--identity", stranger.source[1], "--peers", str(dst_pub)],
            capture_output=True, timeout=60,
        )  # fmt: skip
        assert bad.returncode == 1
        assert b"your key is not pinned here" in bad.stderr, bad.stderr.decode()
        assert recv.poll() is None  # still serving
        good = subprocess.run(
            [*CLI, "send", "--control", f"127.0.0.1:{port}", "--input", str(real), "-q",
             *keys.source],
            capture_output=True, timeout=60,
        )  # fmt: skip
        _, err = recv.communicate(timeout=30)
    finally:
        _stop(recv)
    assert good.returncode == 0, good.stderr.decode()
    assert recv.returncode == 0, err.decode()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["control_peer"].startswith("pinned key 'source'")
    assert any("not pinned here" in n and "UnknownPeer" not in n for n in report["notes"])


def test_squatter_receiver_gets_nothing(tmp_path: Path) -> None:
    """Finding 2: a recv started first on the port received the sender's data."""
    src, _ = _payload(tmp_path, "secret.bin")
    keys = pinned_pair(_keypair_dir(tmp_path, "keys"))
    squat = pinned_pair(_keypair_dir(tmp_path, "squatter"))
    src_pub = tmp_path / "keys" / "source.pub"  # the squatter pins the real sender
    port = _free_port()
    loot = tmp_path / "loot.bin"
    squatter = subprocess.Popen(
        [*CLI, "recv", "--control-listen", f"127.0.0.1:{port}", "--output", str(loot), "-q",
         "--identity", squat.destination[1], "--peers", str(src_pub)],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        _wait_listening(port, squatter)
        send = subprocess.run(
            [*CLI, "send", "--control", f"127.0.0.1:{port}", "--input", str(src),
             "--report", str(tmp_path / "s.json"), "-q", *keys.source],
            capture_output=True, timeout=60,
        )  # fmt: skip
    finally:
        _stop(squatter)
    assert send.returncode == 1
    err = send.stderr.decode()
    assert "UnknownPeer" not in err and "the receiver proved key" in err and "--peers" in err, err
    assert not loot.exists()
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["ok"] is False and "not pinned here" in report["verdict"]


async def _relay(listen_port: int, target_port: int, relay_keys: Path, src_pub: Path) -> None:
    """A relay with keys of its own: accepts the sender as a receiver would and dials
    the receiver as a sender would (it knows both public keys, not the private ones)."""
    as_dst = load_auth(relay_keys / "destination.key", peers_file=src_pub)
    as_src = load_auth(relay_keys / "source.key", peers_file=relay_keys / "destination.pub")
    assert as_dst is not None and as_src is not None
    with trio.move_on_after(20):
        async with trio.open_nursery() as nursery:

            async def face_sender() -> None:
                with contextlib.suppress(Exception):  # refused by the sender: expected
                    await accept_authenticated("127.0.0.1", listen_port, as_dst)

            async def face_receiver() -> None:
                with contextlib.suppress(Exception):  # refused by the receiver: expected
                    await connect_authenticated("127.0.0.1", target_port, as_src, wait=10)

            nursery.start_soon(face_sender)
            nursery.start_soon(face_receiver)


def test_relay_with_its_own_keys_fails_both_ways(tmp_path: Path) -> None:
    """Finding 3: a relay that ran connect() towards each side with its own keys changed
    the payload in flight while both sides said "verified"."""
    src, _ = _payload(tmp_path, "in.bin")
    keys = pinned_pair(_keypair_dir(tmp_path, "keys"))
    relay_dir = _keypair_dir(tmp_path, "relay")
    pinned_pair(relay_dir)
    recv_port, relay_port = _free_port(), _free_port()
    out = tmp_path / "out.bin"
    recv = subprocess.Popen(
        [*CLI, "recv", "--control-listen", f"127.0.0.1:{recv_port}", "--output", str(out),
         "--report", str(tmp_path / "r.json"), "-q", *keys.destination],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        _wait_listening(recv_port, recv)
        relay_done = []

        def run_relay() -> None:
            trio.run(_relay, relay_port, recv_port, relay_dir, tmp_path / "keys" / "source.pub")
            relay_done.append(True)

        relay = threading.Thread(target=run_relay)
        relay.start()
        send = subprocess.run(
            [*CLI, "send", "--control", f"127.0.0.1:{relay_port}", "--input", str(src), "-q",
             *keys.source],
            capture_output=True, timeout=60,
        )  # fmt: skip
        relay.join(30)
        assert recv.poll() is None  # the receiver refused the relay and goes on serving
    finally:
        _stop(recv)
    assert send.returncode == 1
    assert b"which is not pinned here" in send.stderr, send.stderr.decode()
    assert b"UnknownPeer" not in send.stderr  # words, not class names
    assert not out.exists()


def test_silent_connection_and_a_flood_do_not_stop_the_real_session(tmp_path: Path) -> None:
    """Finding 5: one silent connection 0.7 s after recv started failed the session."""
    src, digest = _payload(tmp_path, "in.bin")
    keys = pinned_pair(tmp_path)
    port = _free_port()
    out = tmp_path / "out.bin"
    recv = subprocess.Popen(
        [*CLI, "recv", "--control-listen", f"127.0.0.1:{port}", "--output", str(out),
         "--report", str(tmp_path / "r.json"), "-q", *keys.destination],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    silent: list[socket.socket] = []
    try:
        _wait_listening(port, recv)
        silent.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        for _ in range(10):  # a flood from another address of the same /24
            s = socket.socket()
            s.bind(("127.0.0.2", 0))
            s.connect(("127.0.0.1", port))
            silent.append(s)
        send = subprocess.run(
            [*CLI, "send", "--control", f"127.0.0.1:{port}", "--input", str(src), "-q",
             *keys.source],
            capture_output=True, timeout=60,
        )  # fmt: skip
        _, err = recv.communicate(timeout=30)
    finally:
        for s in silent:
            s.close()
        _stop(recv)
    assert send.returncode == 0, send.stderr.decode()
    assert recv.returncode == 0, err.decode()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
    notes = json.loads((tmp_path / "r.json").read_text())["notes"]
    # 127.0.0.1 and 127.0.0.2 share a /24: 4 pending at once, the silent ones make room
    dropped = [re.search(r"dropped (\d+) pending connection\(s\)", n) for n in notes]
    assert any(m and int(m.group(1)) >= 7 for m in dropped), notes


def _start_pairing(tmp_path: Path, port: int, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    out = tmp_path / "out.bin"
    recv = subprocess.Popen(
        [*CLI, "recv", "--control-listen", f"127.0.0.1:{port}", "--output", str(out), "-q",
         "--pair", *extra],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    assert recv.stderr is not None
    line = recv.stderr.readline().decode()
    assert line.startswith("pairing code: "), line
    return recv, line.split()[2]


def test_pairing_code_wrong_then_right(tmp_path: Path) -> None:
    src, digest = _payload(tmp_path, "in.bin")
    port = _free_port()
    recv, code = _start_pairing(tmp_path, port)
    wrong = "zzzzz-zzzzz" if code != "zzzzz-zzzzz" else "00000-00000"
    try:
        _wait_listening(port, recv)
        bad = subprocess.run(
            [*CLI, "send", "--control", f"127.0.0.1:{port}", "--input", str(src), "-q",
             "--code", wrong],
            capture_output=True, timeout=60,
        )  # fmt: skip
        good = subprocess.run(
            [*CLI, "send", "--control", f"127.0.0.1:{port}", "--input", str(src), "-q",
             "--code", code],
            capture_output=True, timeout=60,
        )  # fmt: skip
        _, err = recv.communicate(timeout=30)
    finally:
        _stop(recv)
    assert bad.returncode == 1
    assert b"wrong pairing code (2 attempts left)" in bad.stderr, bad.stderr.decode()
    assert good.returncode == 0, good.stderr.decode()
    assert recv.returncode == 0, err.decode()
    assert hashlib.sha256((tmp_path / "out.bin").read_bytes()).hexdigest() == digest


def test_pairing_code_from_standard_input_stays_off_the_command_line(tmp_path: Path) -> None:
    """``--code -`` reads the code from standard input: the sender pairs without the code
    on its argv (which every user can read in the process list)."""
    src, digest = _payload(tmp_path, "in.bin")
    port = _free_port()
    recv, code = _start_pairing(tmp_path, port)
    try:
        _wait_listening(port, recv)
        argv = [*CLI, "send", "--control", f"127.0.0.1:{port}", "--input", str(src), "-q",
                "--code", "-"]  # fmt: skip
        good = subprocess.run(argv, input=f"{code}\n".encode(), capture_output=True, timeout=60)
        _, err = recv.communicate(timeout=30)
    finally:
        _stop(recv)
    assert code not in " ".join(argv)
    assert good.returncode == 0, good.stderr.decode()
    assert recv.returncode == 0, err.decode()
    assert hashlib.sha256((tmp_path / "out.bin").read_bytes()).hexdigest() == digest


@pytest.mark.parametrize(
    ("extra", "stdin", "message"),
    [
        (["--input", "-"], b"", b"--code - and --input - both read standard input"),
        (["--input", "/dev/null"], b"", b"no pairing code was given on standard input"),
    ],
    ids=["stdin-taken", "empty"],
)
def test_code_from_stdin_usage_errors(extra: list[str], stdin: bytes, message: bytes) -> None:
    run = subprocess.run(
        [*CLI, "send", "--control", "127.0.0.1:9", "--code", "-", *extra],
        input=stdin, capture_output=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr.decode()
    assert message in run.stderr, run.stderr.decode()


def test_three_wrong_codes_end_the_pairing(tmp_path: Path) -> None:
    port = _free_port()
    recv, code = _start_pairing(tmp_path, port)
    wrong = "zzzzz-zzzzz" if code != "zzzzz-zzzzz" else "00000-00000"
    try:
        _wait_listening(port, recv)
        for left in ("2 attempts", "1 attempt ", "0 attempts"):
            bad = subprocess.run(
                [*CLI, "send", "--control", f"127.0.0.1:{port}", "--input", "/dev/null",
                 "-q", "--code", wrong, "--control-wait", "2"],
                capture_output=True, timeout=60,
            )  # fmt: skip
            assert bad.returncode == 1
            assert f"({left.strip()}".encode() in bad.stderr, bad.stderr.decode()
        _, err = recv.communicate(timeout=30)
    finally:
        _stop(recv)
    assert recv.returncode == 1
    assert b"pairing ended after 3 wrong attempts" in err, err.decode()
    assert not (tmp_path / "out.bin").exists()


def test_psk_mismatch_is_refused_by_name(tmp_path: Path) -> None:
    mine, theirs = tmp_path / "a.psk", tmp_path / "b.psk"
    for f in (mine, theirs):
        f.write_bytes(os.urandom(32))
        f.chmod(0o600)
    port = _free_port()
    recv = subprocess.Popen(
        [*CLI, "recv", "--control-listen", f"127.0.0.1:{port}", "--output",
         str(tmp_path / "out.bin"), "-q", "--psk-file", str(mine)],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        _wait_listening(port, recv)
        send = subprocess.run(
            [*CLI, "send", "--control", f"127.0.0.1:{port}", "--input", "/dev/null", "-q",
             "--psk-file", str(theirs)],
            capture_output=True, timeout=60,
        )  # fmt: skip
        assert recv.poll() is None
    finally:
        _stop(recv)
    assert send.returncode == 1
    assert b"another pre-shared secret" in send.stderr, send.stderr.decode()


def test_short_or_readable_psk_file_is_a_usage_error(tmp_path: Path) -> None:
    short, loose = tmp_path / "short", tmp_path / "loose"
    short.write_bytes(os.urandom(16))
    short.chmod(0o600)
    loose.write_bytes(os.urandom(32))
    loose.chmod(0o644)
    for path, needle in ((short, b"needs at least 32 random bytes"), (loose, b"chmod 600")):
        run = subprocess.run(
            [*CLI, "send", "--control", "127.0.0.1:9", "--input", "/dev/null", "--psk-file",
             str(path)],
            capture_output=True, timeout=30,
        )  # fmt: skip
        assert run.returncode == 2, run.stderr.decode()
        assert needle in run.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["send", "--control", "127.0.0.1:9", "--input", "/dev/null"],
        ["recv", "--control-listen", "127.0.0.1:9", "--output", "x"],
        ["migrate-proxy", "source", "--listen-unix", "x", "--control", "127.0.0.1:9"],
        ["migrate-proxy", "destination", "--connect-unix", "x", "--control-listen",
         "127.0.0.1:9"],
    ],
)  # fmt: skip
def test_unauthenticated_tcp_control_is_a_usage_error(argv: list[str]) -> None:
    run = subprocess.run([*CLI, *argv], capture_output=True, timeout=30)
    assert run.returncode == 2
    err = run.stderr.decode()
    for option in ("--identity", "--peer", "--peers", "--psk-file", "--pair", "--code"):
        assert option in err, err


def test_keygen_writes_0600_refuses_overwrite_prints_the_line(tmp_path: Path) -> None:
    key = tmp_path / "host.key"
    run = subprocess.run(
        [*CLI, "keygen", "--out", str(key), "--name", "host-a"], capture_output=True, timeout=30
    )
    assert run.returncode == 0, run.stderr.decode()
    line = run.stdout.decode().strip()
    assert line.startswith("hpm-x25519 ") and line.endswith(" host-a") and len(line.split()) == 3
    assert key.stat().st_mode & 0o777 == 0o600
    before = key.read_bytes()
    again = subprocess.run([*CLI, "keygen", "--out", str(key)], capture_output=True, timeout=30)
    assert again.returncode == 2 and b"never overwrites" in again.stderr
    assert key.read_bytes() == before
    link = tmp_path / "link.key"
    link.symlink_to(tmp_path / "elsewhere")
    planted = subprocess.run([*CLI, "keygen", "--out", str(link)], capture_output=True, timeout=30)
    assert planted.returncode == 2
    assert not (tmp_path / "elsewhere").exists()
