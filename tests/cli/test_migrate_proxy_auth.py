"""migrate-proxy's control port under attack (real CLI processes on loopback, a UNIX
socket standing in for each QEMU): a stranger's source proxy cannot feed the destination
a forged stream, and a squatter destination proxy gets nothing of the source's guest.

Before the control handshake, the stranger's forged stream was delivered and reported
ok, and the squatter received the source's guest RAM."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from holepunch_mig.net.keyfiles import pinned_pair

CLI = [sys.executable, "-m", "holepunch_mig.cli", "migrate-proxy"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeQemu:
    """A destination QEMU's incoming socket: records every byte of every connection."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.streams: list[bytes] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(30)
            data = bytearray()
            with conn:
                while chunk := conn.recv(1 << 16):
                    data += chunk
            self.streams.append(bytes(data))

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self.sock.close()


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "the listener exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return
        except ConnectionRefusedError:
            assert time.monotonic() < deadline
            time.sleep(0.05)  # polling for the listener, bounded by the deadline


def _stop(*procs: subprocess.Popen[bytes]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


def _feed_source(path: Path, data: bytes, timeout: float = 15.0) -> None:
    """Be the source QEMU: connect to the proxy's socket, send, close."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, "the source proxy made no socket"
        time.sleep(0.05)  # polling for the socket, bounded by the deadline
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(30)
        while s.recv(1 << 16):
            pass


def test_stranger_source_cannot_feed_the_destination(tmp_path: Path) -> None:
    keys_dir, stranger_dir = tmp_path / "keys", tmp_path / "stranger"
    keys_dir.mkdir()
    stranger_dir.mkdir()
    keys, stranger = pinned_pair(keys_dir), pinned_pair(stranger_dir)
    qemu = FakeQemu(tmp_path / "in.sock")
    port = _free_port()
    report = tmp_path / "dst.json"
    dst = subprocess.Popen(
        [*CLI, "destination", "--connect-unix", str(qemu.path), "--control-listen",
         f"127.0.0.1:{port}", "--report", str(report), "-q", *keys.destination],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        _wait_listening(port, dst)
        forged = subprocess.run(
            [*CLI, "source", "--listen-unix", str(tmp_path / "forged.sock"), "--control",
             f"127.0.0.1:{port}", "-q", "--identity", stranger.source[1], "--peers",
             str(keys_dir / "destination.pub")],
            capture_output=True, timeout=60,
        )  # fmt: skip
        assert forged.returncode == 1
        assert b"your key is not pinned here" in forged.stderr, forged.stderr.decode()
        assert b"ready" not in forged.stdout
        assert dst.poll() is None  # still serving
        # the genuine source proxy then migrates through it
        data = os.urandom(1 << 20)
        src_sock = tmp_path / "out.sock"
        src = subprocess.Popen(
            [*CLI, "source", "--listen-unix", str(src_sock), "--control", f"127.0.0.1:{port}",
             "-q", *keys.source],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            assert src.stdout is not None
            assert src.stdout.readline().startswith(b"ready unix:")
            _feed_source(src_sock, data)
            _, serr = src.communicate(timeout=60)
            _, derr = dst.communicate(timeout=60)
        finally:
            _stop(src)
    finally:
        _stop(dst)
        qemu.close()
    assert src.returncode == 0, serr.decode()
    assert dst.returncode == 0, derr.decode()
    assert [hashlib.sha256(s).hexdigest() for s in qemu.streams] == [
        hashlib.sha256(data).hexdigest()
    ]
    rep = json.loads(report.read_text())
    assert rep["ok"] is True
    assert rep["link"]["control_peer"].startswith("pinned key 'source'")


def test_squatter_destination_gets_no_guest_ram(tmp_path: Path) -> None:
    keys_dir, squat_dir = tmp_path / "keys", tmp_path / "squatter"
    keys_dir.mkdir()
    squat_dir.mkdir()
    keys, squat = pinned_pair(keys_dir), pinned_pair(squat_dir)
    loot = FakeQemu(tmp_path / "loot.sock")
    port = _free_port()
    squatter = subprocess.Popen(
        [*CLI, "destination", "--connect-unix", str(loot.path), "--control-listen",
         f"127.0.0.1:{port}", "-q", "--identity", squat.destination[1], "--peers",
         str(keys_dir / "source.pub")],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        _wait_listening(port, squatter)
        src = subprocess.run(
            [*CLI, "source", "--listen-unix", str(tmp_path / "out.sock"), "--control",
             f"127.0.0.1:{port}", "-q", "--report", str(tmp_path / "src.json"), *keys.source],
            capture_output=True, timeout=60,
        )  # fmt: skip
    finally:
        _stop(squatter)
        loot.close()
    assert src.returncode == 1
    assert b"ready" not in src.stdout
    assert b"the receiver proved key" in src.stderr, src.stderr.decode()
    assert not (tmp_path / "out.sock").exists()  # QEMU was never told where to migrate
    assert loot.streams == []
    assert json.loads((tmp_path / "src.json").read_text())["ok"] is False
