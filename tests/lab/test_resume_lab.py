"""Resume for real: the CLI in network namespaces while the data link is broken three
ways mid-transfer — the NAT forgets the link's mapping (conntrack -D on the router, with
loose pick-up off so the flow cannot silently re-map), an nft rule answers the link's
packets with TCP RST, and the sender's cable is pulled for a few seconds
(``ip link set eth0 down``).  Each time the transfer must finish with the right sha256
and both reports must list the interruption and its resume."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import blake3
import pytest
from testsupport.lab import require_netns

from holepunch_mig.lab import CONTROL_PORT, Lab, presets
from holepunch_mig.net.keyfiles import pinned_pair

pytestmark = pytest.mark.netns

CLI = [sys.executable, "-m", "holepunch_mig.cli"]
PAYLOAD = 96 << 20
RATE = 24e6  # bytes/s read by the sender (--rate-limit): ~4 s per transfer
CUT_AT = 24 << 20  # break the link once the receiver holds this much


@pytest.fixture(scope="module")
def payload(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("payload") / "payload.bin"
    data = os.urandom(PAYLOAD)
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


@pytest.fixture
def lab_of(request: pytest.FixtureRequest) -> Iterator[Callable[[str], Lab]]:
    labs: list[Lab] = []

    def make(name: str) -> Lab:
        require_netns(need=("conntrack", "ss") if name.startswith("nat") else ("ss",))
        lab = Lab(presets()[name])
        labs.append(lab)
        return lab.build()

    try:
        yield make
    finally:
        for lab in labs:
            lab.teardown()


def _received(workdir: Path) -> int:
    return sum(p.stat().st_size for p in workdir.glob(".out.bin.*.part"))


def _link_ports(lab: Lab) -> tuple[int, int]:
    """(local, remote) ports of the sender's data link: its established TCP connection
    that is not the control connection."""
    out = lab.run("left", ["ss", "-Htn", "state", "established"], timeout=5, capture_output=True)
    for line in out.stdout.decode().splitlines():
        fields = line.split()
        local, remote = fields[-2], fields[-1]
        lport, rport = int(local.rsplit(":", 1)[1]), int(remote.rsplit(":", 1)[1])
        if CONTROL_PORT not in (lport, rport) and rport != 3478:
            return lport, rport
    raise AssertionError(f"no data link among:\n{out.stdout.decode()}")


def _run_with_cut(
    lab: Lab, workdir: Path, payload: Path, cut: Callable[[Lab], str]
) -> tuple[dict[str, object], dict[str, object], Path, str, float]:
    out = workdir / "out.bin"
    rrep, srep = workdir / "recv.json", workdir / "send.json"
    common = ["-q", "--link-timeout", "2", "--resume-attempts", "3"]
    receiver = lab.popen(
        "right",
        [*CLI, "recv", "--control-listen", f"0.0.0.0:{CONTROL_PORT}", "--output", str(out),
         *pinned_pair(workdir).destination,
         "--report", str(rrep), *common],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    host, port = lab.control_endpoint("right", CONTROL_PORT)
    stun = lab.stun_endpoint()
    sender = lab.popen(
        "left",
        [*CLI, "send", "--control", f"{host}:{port}", "--input", str(payload),
         *pinned_pair(workdir).source,
         "--report", str(srep), "--rate-limit", str(RATE), *common,
         *(["--stun", f"{stun[0]}:{stun[1]}"] if stun else [])],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while _received(workdir) < CUT_AT:
            assert sender.poll() is None and receiver.poll() is None, "a side exited early"
            assert time.monotonic() < deadline, "the transfer never reached the cut point"
            time.sleep(0.05)
        what = cut(lab)
        cut_time = time.monotonic()
        _, send_err = sender.communicate(timeout=90)
        _, recv_err = receiver.communicate(timeout=30)
        total = time.monotonic() - cut_time
    finally:
        for proc in (sender, receiver):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert sender.returncode == 0, send_err.decode(errors="replace")
    assert receiver.returncode == 0, recv_err.decode(errors="replace")
    assert b"resumed in" in send_err, send_err
    return json.loads(rrep.read_text()), json.loads(srep.read_text()), out, what, total


def _check(rrep: dict[str, object], srep: dict[str, object], out: Path, digest: str) -> None:
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
    b3 = blake3.blake3(out.read_bytes()).hexdigest()  # the session's digest by default
    for rep in (rrep, srep):
        assert rep["ok"] is True and rep["bytes"] == PAYLOAD
        assert rep["digest"] == "blake3" and rep["sha256"] == b3
        cuts = rep["interruptions"]
        assert isinstance(cuts, list) and len(cuts) >= 1, cuts
        first = cuts[0]
        assert first["outcome"] == "resumed"
        assert 0 < first["acked"] <= first["resumed_from"] < PAYLOAD
        assert first["resume_seconds"] < 20
        assert first["seen"]
    s_cut, r_cut = srep["interruptions"][0], rrep["interruptions"][0]  # type: ignore[index]
    assert s_cut["resumed_from"] == r_cut["resumed_from"]  # type: ignore[index]
    assert s_cut["link"] and r_cut["link"]  # type: ignore[index]


def _record(
    name: str, what: str, rrep: dict[str, object], srep: dict[str, object], total: float
) -> None:
    """Print the figures (pytest -s shows them) for docs/reliability.md."""
    for role, rep in (("send", srep), ("recv", rrep)):
        for cut in rep["interruptions"]:  # type: ignore[attr-defined]
            print(
                f"RESUME {name} {role}: {what}; at {cut['at']} s seen {cut['detected_by']}: "
                f"{cut['seen'][:90]!r}; acked {cut['acked']} sent {cut['sent']} "
                f"resumed_from {cut['resumed_from']} in {cut['resume_seconds']} s; "
                f"cut->exit {total:.2f} s"
            )


def test_nat_mapping_flushed(
    lab_of: Callable[[str], Lab], payload: tuple[Path, str], tmp_path: Path
) -> None:
    lab = lab_of("nat-nat")
    # a NAT that lost its state must not silently re-learn a mid-stream flow
    lab.run(
        "left-router",
        ["sysctl", "-q", "-w", "net.netfilter.nf_conntrack_tcp_loose=0"],
        timeout=5,
        check=True,
    )

    def cut(lab: Lab) -> str:
        lport, _ = _link_ports(lab)
        lab.run(
            "left-router",
            ["conntrack", "-D", "-p", "tcp", "--orig-port-src", str(lport)],
            timeout=5,
            check=True,
            capture_output=True,
        )
        return f"conntrack -D of the link's mapping (sport {lport}) on left-router"

    rrep, srep, out, what, total = _run_with_cut(lab, tmp_path, payload[0], cut)
    _check(rrep, srep, out, payload[1])
    _record("nat-flush", what, rrep, srep, total)


def test_rst_injected(
    lab_of: Callable[[str], Lab], payload: tuple[Path, str], tmp_path: Path
) -> None:
    lab = lab_of("fw-fw")

    def cut(lab: Lab) -> str:
        lport, rport = _link_ports(lab)
        rules = (
            "table inet hpm_cut {\n  chain input {\n"
            "    type filter hook input priority -10; policy accept;\n"
            f"    tcp sport {lport} tcp dport {rport} reject with tcp reset\n  }}\n}}\n"
        )
        lab.run("right", ["nft", "-f", "-"], timeout=5, input=rules.encode(), check=True)
        return f"nft reject with tcp reset for {lport}->{rport} on the receiver"

    rrep, srep, out, what, total = _run_with_cut(lab, tmp_path, payload[0], cut)
    _check(rrep, srep, out, payload[1])
    assert "reset" in str(srep["interruptions"][0]["seen"]).lower()  # type: ignore[index]
    _record("rst", what, rrep, srep, total)


def test_cable_pulled(
    lab_of: Callable[[str], Lab], payload: tuple[Path, str], tmp_path: Path
) -> None:
    lab = lab_of("fw-fw")

    def cut(lab: Lab) -> str:
        lab.run("left", ["ip", "link", "set", "dev", "eth0", "down"], timeout=5, check=True)
        time.sleep(4)  # the outage itself, not a settle-wait
        lab.run("left", ["ip", "link", "set", "dev", "eth0", "up"], timeout=5, check=True)
        return "sender's eth0 down for 4 s"

    rrep, srep, out, what, total = _run_with_cut(lab, tmp_path, payload[0], cut)
    _check(rrep, srep, out, payload[1])
    _record("cable", what, rrep, srep, total)
