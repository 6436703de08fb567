"""Birthday punching for real: a fully random (symmetric) nftables NAT on one side, a
port-preserving NAT or a plain firewall on the other, both CLIs in namespaces."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from holepunch_mig.lab import CONTROL_PORT, Lab, LabSpec
from holepunch_mig.net.keyfiles import pinned_pair

pytestmark = pytest.mark.netns

CLI = [sys.executable, "-m", "holepunch_mig.cli"]


def _run(
    lab: Lab,
    tmp: Path,
    *,
    send_extra: Sequence[str] = (),
    recv_extra: Sequence[str] = (),
) -> tuple[int, int, dict[str, Any], dict[str, Any], Path, str]:
    data = os.urandom(1 << 20)
    payload = tmp / "in.bin"
    payload.write_bytes(data)
    out, rrep, srep = tmp / "out.bin", tmp / "recv.json", tmp / "send.json"
    stun = [a for h, p in lab.stun_endpoints() for a in ("--stun", f"{h}:{p}")]
    keys = pinned_pair(tmp)
    common = ["-q", "--rounds", "1", *stun]
    recv = lab.popen(
        "right",
        [*CLI, "recv", "--control-listen", f"0.0.0.0:{CONTROL_PORT}", "--output", str(out),
         "--report", str(rrep), *common, *keys.destination, *recv_extra],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    lab.wait_listening("right", CONTROL_PORT, timeout=15.0)
    host, port = lab.control_endpoint("right", CONTROL_PORT)
    send = lab.popen(
        "left",
        [*CLI, "send", "--control", f"{host}:{port}", "--input", str(payload),
         "--report", str(srep), *common, *keys.source, *send_extra],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        _, send_err = send.communicate(timeout=60)
        _, recv_err = recv.communicate(timeout=30)
    finally:
        for proc in (send, recv):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    reports = json.loads(srep.read_text()), json.loads(rrep.read_text())
    errs = (send_err + recv_err).decode(errors="replace")
    return (
        send.returncode,
        recv.returncode,
        reports[0],
        reports[1],
        out,
        (hashlib.sha256(data).hexdigest() + "\n" + errs),
    )


@pytest.mark.parametrize("preset", ["symmetric-nat", "symmetric-fw", "nat-symmetric"])
def test_birthday_crosses_one_symmetric_nat(
    lab_factory: Callable[[LabSpec | str], Lab], tmp_path: Path, preset: str
) -> None:
    lab = lab_factory(preset)
    send_code, recv_code, send, recv, out, info = _run(lab, tmp_path)
    digest, errs = info.split("\n", 1)
    assert send_code == 0 and recv_code == 0, errs
    assert send["path"] == "direct" and recv["ok"] is True
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
    hard_side, easy_side = (send, recv) if preset != "nat-symmetric" else (recv, send)
    hard, easy = hard_side["hard_nat"], easy_side["hard_nat"]
    assert hard["role"] == "hard" and easy["role"] == "easy"
    # both sides agree on the budget and say what they spent, within it
    for side in (hard, easy):
        assert (side["sockets"], side["probes"]) == (256, 1024)
        assert 0.97 < side["expected_success"] < 0.99
    assert 0 < hard["spent_syns"] <= 256 and 0 < easy["spent_syns"] <= 1024
    assert hard["spent_sockets"] <= 256 and easy["spent_sockets"] <= 512
    assert hard["hits"] + easy["hits"] >= 1
    # the nominated link runs between the easy side's punch port and a port the hard
    # side's NAT picked at random
    nominated = [p for p in send["pairs"] if p["outcome"] == "nominated"]
    assert len(nominated) == 1
    easy_port = easy_side["local_port"]
    ends = {nominated[0]["local"].rsplit(":", 1)[1], nominated[0]["remote"].rsplit(":", 1)[1]}
    assert str(easy_port) in ends


def test_birthday_off_on_one_side_fails_with_the_symmetric_verdict(
    lab_factory: Callable[[LabSpec | str], Lab], tmp_path: Path
) -> None:
    """The receiver says --hard-nat off: no birthday dials at all, the old verdict."""
    lab = lab_factory("symmetric-nat")
    send_code, _recv_code, send, recv, _out, _info = _run(
        lab, tmp_path, recv_extra=["--hard-nat", "off"]
    )
    assert send_code == 3
    assert send["hard_nat"] is None and recv["hard_nat"] is None
    assert any("birthday punching not used: turned off on the peer" in n for n in send["notes"])
    assert "symmetric" in send["verdict"]


def test_both_symmetric_fails_fast_naming_both(
    lab_factory: Callable[[LabSpec | str], Lab], tmp_path: Path
) -> None:
    lab = lab_factory("symmetric-symmetric")
    send_code, _recv_code, send, _recv, _out, _info = _run(lab, tmp_path)
    assert send_code == 3
    assert send["hard_nat"] is None
    assert any("both sides are behind endpoint-dependent" in n for n in send["notes"])
    assert "both sides are behind a NAT with endpoint-dependent" in send["verdict"]
