"""`make demo`: two peers on this machine move a payload through a punched, encrypted link.

As root (with network namespaces) the peers live in two namespaces behind stateful
nftables firewalls that drop every inbound connection except the receiver's control
port; otherwise they run on loopback.  The demo says which, gives each host a key
(``holepunch-mig keygen``) that the other pins, runs the real CLI on both sides, checks
the payload's sha256 and prints the sender's report.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from holepunch_mig.lab import CONTROL_PORT, Lab, LabError, presets

CLI = [sys.executable, "-m", "holepunch_mig.cli"]
PAYLOAD_MIB = 256


def _netns_usable() -> str | None:
    """None when the namespace lab can run here, else why not."""
    if os.geteuid() != 0:
        return "not root"
    try:
        with Lab(presets()["fw-fw"]):
            return None
    except LabError as exc:
        return str(exc)


@contextlib.contextmanager
def _peers() -> Iterator[tuple[str, object, tuple[str, int]]]:
    why_not = _netns_usable()
    if why_not is None:
        with Lab(presets()["fw-fw"]) as lab:
            print(
                "mode: two network namespaces behind stateful nftables firewalls\n"
                f"      (inbound NEW connections dropped; only control port {CONTROL_PORT} "
                "open on the receiver)"
            )
            yield "netns", lab, lab.control_endpoint("right", CONTROL_PORT)
    else:
        print(f"mode: loopback on this machine (network namespaces unavailable: {why_not})")
        yield "loopback", None, ("127.0.0.1", CONTROL_PORT)


def _keygen(work: Path, name: str) -> tuple[Path, str]:
    """A host identity as an operator makes one: the key file and its public line."""
    key = work / f"{name}.key"
    line = subprocess.run(
        [*CLI, "keygen", "--out", str(key), "--name", name],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return key, line


def _start(where: object, host: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
    if isinstance(where, Lab):
        return where.popen(host, argv)
    return subprocess.Popen(list(argv))


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="holepunch-demo-") as tmp:
        work = Path(tmp)
        payload = work / "payload.bin"
        out = work / "received.bin"
        data = os.urandom(PAYLOAD_MIB << 20)
        payload.write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        del data
        # each host pins the other's public key: the control channel authenticates both
        src_key, src_line = _keygen(work, "source")
        dst_key, dst_line = _keygen(work, "destination")
        print(f"keys: source {src_line}\n      destination {dst_line}")
        with _peers() as (mode, where, (host, port)):
            listen = "0.0.0.0" if mode == "netns" else "127.0.0.1"
            receiver = _start(
                where,
                "right",
                [
                    *CLI,
                    "recv",
                    "--control-listen",
                    f"{listen}:{CONTROL_PORT}",
                    "--output",
                    str(out),
                    "--report",
                    str(work / "recv.json"),
                    "--identity",
                    str(dst_key),
                    "--peer",
                    src_line,
                    "-q",
                ],
            )
            sender = _start(
                where,
                "left",
                [
                    *CLI,
                    "send",
                    "--control",
                    f"{host}:{port}",
                    "--input",
                    str(payload),
                    "--report",
                    str(work / "send.json"),
                    "--identity",
                    str(src_key),
                    "--peer",
                    dst_line,
                ],
            )
            try:
                send_code = sender.wait(timeout=120)
                recv_code = receiver.wait(timeout=30)
            finally:
                for proc in (sender, receiver):
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
        if send_code or recv_code:
            print(f"demo FAILED: sender exit {send_code}, receiver exit {recv_code}")
            return 1
        got = hashlib.sha256(out.read_bytes()).hexdigest()
        report = json.loads((work / "send.json").read_text())
        print("\nsender's JSON report (abridged):")
        keys = (
            "session",
            "control_peer",
            "path",
            "path_reason",
            "local",
            "remote",
            "time_to_link",
            "rtt",
            "rounds",
            "bytes",
            "digest",
            "sha256",
            "seconds",
            "ok",
        )
        print(json.dumps({k: report.get(k) for k in keys}, indent=2))
        if got != digest:
            print("demo FAILED: received payload differs from what was sent")
            return 1
        rate = report["bytes"] / report["seconds"] / 1e6 if report.get("seconds") else 0
        print(
            f"\ndemo OK ({mode}): {PAYLOAD_MIB} MiB through a punched, Noise-authenticated, "
            f"AES-256-GCM link at {rate:.0f} MB/s, control channel authenticated by pinned "
            f"keys; the peers verified {report.get('digest', 'the digest')} end to end and the "
            "received file's sha256 matches the sent one's."
        )
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
