"""Lab cells of the benchmark: every row between two network namespaces of the lab.

The receiver runs in the lab's "right" host and the sender in "left" (both firewalled,
fw-fw; the right side lets in the control port and, for rows 1-2 and QEMU's direct
baseline, :data:`DATA_PORT`), each as its own ``python -m holepunch_mig.bench.lab_cells side``
process started with ``ip netns exec`` (``Lab.popen``).  A side sets up its connection
(listen/accept or connect; the session rows then punch or open the tunnel), prints
``READY``, waits for ``GO`` on stdin (the harness sends it once both are ready), runs the
row's side function under the same meters as the loopback runner and prints ``RESULT
<json>``; the harness checks the pair exactly as on loopback.

Round-trip delay is ``LabSpec.rtt_ms``: the lab's delay stage.  An RTT the delay stage
cannot emulate makes ``Lab`` raise ``LabUnsupported``; the harness reports those cells
as pending.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import IO

from holepunch_mig.bench import rows as _rows  # noqa: F401  (the side process needs the rows)
from holepunch_mig.bench.model import REGISTRY, BenchConfig, PairSpec, Sample, SideResult
from holepunch_mig.bench.pair import check_pair, receive_with, run_side, send_with, tune_socket
from holepunch_mig.errors import BenchError
from holepunch_mig.lab import CONTROL_PORT, Lab, LabSpec, SideSpec

__all__ = ["DATA_PORT", "lab_spec", "run_pair_lab"]

#: The opened inbound port on the destination for rows 1-2 (and QEMU's direct baseline).
DATA_PORT = 7071


def lab_spec(rtt_ms: int = 0) -> LabSpec:
    """fw-fw (both hosts drop inbound NEW), the destination's control port and DATA_PORT
    let in, ``rtt_ms`` between the two sides."""
    return LabSpec(
        left=SideSpec(firewall="drop"),
        right=SideSpec(firewall="drop", allow_inbound_tcp=(CONTROL_PORT, DATA_PORT)),
        stun=False,
        rtt_ms=rtt_ms,
        name=f"bench-fw-fw-{rtt_ms}ms",
    )


# --------------------------------------------------------------------------- parent side


def _cfg_to_json(cfg: BenchConfig) -> str:
    d = asdict(cfg)
    d["seed"] = cfg.seed.hex()
    d["key"] = cfg.key.hex()
    return json.dumps(d)


def _cfg_from_json(text: str) -> BenchConfig:
    d = json.loads(text)
    d["seed"] = bytes.fromhex(d["seed"])
    d["key"] = bytes.fromhex(d["key"])
    return BenchConfig(**d)


class _Side:
    """One side process and a thread turning its stdout lines into a queue."""

    def __init__(self, lab: Lab, host: str, argv: list[str], errpath: Path) -> None:
        self.err = errpath.open("wb")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.proc = lab.popen(
            host, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, env=env
        )
        self.errpath = errpath
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))
        self.lines.put(None)

    def expect(self, token: str, deadline: float) -> str:
        while True:
            try:
                line = self.lines.get(timeout=max(0.05, deadline - time.monotonic()))
            except queue.Empty:
                raise BenchError(f"timed out waiting for {token} {self.tail()}") from None
            if line is None:
                self.proc.wait(5)
                raise BenchError(
                    f"side exited {self.proc.returncode} before {token}: {self.tail()}"
                )
            if line.startswith(token):
                return line[len(token) :].strip()

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"GO\n")
        self.proc.stdin.flush()

    def tail(self) -> str:
        self.err.flush()
        return self.errpath.read_text(errors="replace")[-1500:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()
        self.err.close()


_counter = 0


def run_pair_lab(lab: Lab, key: str, cfg: BenchConfig, expected: str | None) -> Sample:
    """One transfer of ``cfg.total`` bytes of row ``key`` from the lab's left host to its
    right host (one process each, under ``ip netns exec``)."""
    global _counter
    _counter += 1
    spec: PairSpec = REGISTRY[key].factory(cfg)
    work = Path(cfg.workdir)
    cfg_path = work / f"side-{_counter}.json"
    cfg_path.write_text(_cfg_to_json(cfg))
    port = CONTROL_PORT if spec.port == "control" else DATA_PORT
    base = [sys.executable, "-m", "holepunch_mig.bench.lab_cells", "side", str(cfg_path), key]
    deadline = time.monotonic() + cfg.timeout
    sides: list[_Side] = []
    try:
        recv = _Side(
            lab, "right", [*base, "receiver", f"0.0.0.0:{port}"], work / f"recv-{_counter}.err"
        )
        sides.append(recv)
        recv.expect("LISTENING", time.monotonic() + 30)
        host, rport = lab.control_endpoint("right", port)
        send = _Side(
            lab, "left", [*base, "sender", f"{host}:{rport}"], work / f"send-{_counter}.err"
        )
        sides.append(send)
        for s in (recv, send):
            s.expect("READY", deadline)
        for s in (recv, send):
            s.go()
        out = {}
        for role, s in (("sender", send), ("receiver", recv)):
            rec = json.loads(s.expect("RESULT", deadline))
            if rec[6]["error"]:
                raise BenchError(f"{role} failed: {rec[6]['error']} {s.tail()[-600:]}")
            out[role] = tuple(rec)
        for s in sides:
            s.proc.wait(30)
    finally:
        for s in sides:
            s.close()
        cfg_path.unlink(missing_ok=True)
    return check_pair(spec, cfg, expected, out["sender"], out["receiver"])


# --------------------------------------------------------------------------- child side


def _side_child(cfg_path: str, key: str, role: str, endpoint: str) -> int:
    cfg = _cfg_from_json(Path(cfg_path).read_text())
    spec = REGISTRY[key].factory(cfg)
    host, port = endpoint.rsplit(":", 1)
    out: IO[str] = sys.stdout
    try:
        if role == "receiver":
            lsock = socket.socket()
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tune_socket(lsock, cfg.sockbuf)
            lsock.bind((host, int(port)))
            lsock.listen(1)
            print("LISTENING", file=out, flush=True)
            sock, _ = lsock.accept()
            lsock.close()
        else:
            sock = socket.socket()
            tune_socket(sock, cfg.sockbuf)
            sock.settimeout(15)
            sock.connect((host, int(port)))
            sock.settimeout(None)
        tune_socket(sock, cfg.sockbuf)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        fn = receive_with(spec, sock, cfg) if role == "receiver" else send_with(spec, sock, cfg)

        def sync() -> None:
            print("READY", file=out, flush=True)
            if sys.stdin.readline().strip() != "GO":
                raise BenchError("no go from the harness")

        rec = run_side(role, spec, fn, sync)
    except BaseException as exc:
        err = asdict(SideResult(error=f"{type(exc).__name__}: {exc}"))
        rec = (role, 0.0, 0.0, 0.0, 0, 0, err)
    print("RESULT " + json.dumps(rec), file=out, flush=True)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 5 and argv[0] == "side":
        return _side_child(*argv[1:])
    print(
        "usage: python -m holepunch_mig.bench.lab_cells side CONFIG ROW ROLE HOST:PORT",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
