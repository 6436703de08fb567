"""A real coturn STUN server on loopback (the `coturn` fixture), a free-port helper and
hand-made Binding answers for fake servers."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aioice import stun as aiostun


def binding_response(
    tid: bytes,
    cls: aiostun.Class = aiostun.Class.RESPONSE,
    **attrs: object,
) -> bytes:
    """A Binding message of class ``cls``; ``XOR_MAPPED_ADDRESS=`` becomes XOR-MAPPED-ADDRESS."""
    msg = aiostun.Message(aiostun.Method.BINDING, cls, transaction_id=tid)
    for k, v in attrs.items():
        msg.attributes[k.replace("_", "-")] = v
    return bytes(msg)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing is bound to right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def coturn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """A real coturn STUN-only server on 127.0.0.1 (TCP; no TURN, no relay, no TLS).

    Skipped when turnserver is missing, except under CI=true where that fails.
    Readiness: poll connect() until it is accepted, with a deadline.  Always terminated.
    """
    exe = shutil.which("turnserver")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("coturn (turnserver) is required under CI=true")
        pytest.skip("coturn (turnserver) not installed")
    tmp: Path = tmp_path_factory.mktemp("coturn")
    port = free_port()
    cmd = [
        exe,
        "-n",  # no configuration file
        "--stun-only",
        "--no-cli",
        "--no-tls",
        "--no-dtls",
        "--listening-ip",
        "127.0.0.1",
        "--listening-port",
        str(port),
        "--log-file",
        str(tmp / "turn.log"),
        "--simple-log",
        "--no-stdout-log",
        "--db",
        str(tmp / "turndb"),
        "--pidfile",
        str(tmp / "turn.pid"),
    ]
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 15.0
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"turnserver did not accept on 127.0.0.1:{port} within 15 s")
            try:  # doubles as the poll interval and the "did it die?" check
                proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                continue
            pytest.fail(f"turnserver exited with {proc.returncode}; see {tmp / 'turn.log'}")
        yield ("127.0.0.1", port)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
