"""Birthday punching for real: a fully random (symmetric) nftables NAT on one side, a
port-preserving NAT or a plain firewall on the other, both CLIs in namespaces."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from testsupport.lab import cli_transfer

from holepunch_mig.lab import Lab, LabSpec

pytestmark = pytest.mark.netns

CLI = [sys.executable, "-m", "holepunch_mig.cli"]


@pytest.mark.parametrize("preset", ["symmetric-nat", "symmetric-fw", "nat-symmetric"])
def test_birthday_crosses_one_symmetric_nat(
    lab_factory: Callable[[LabSpec | str], Lab], tmp_path: Path, preset: str
) -> None:
    lab = lab_factory(preset)
    # both planned birthday rounds, as send/recv run by default: one round misses 1.7 %
    # of the time, two 0.03 %
    two = ["--rounds", "2"]
    send_code, recv_code, send, recv, out, info = cli_transfer(
        lab, tmp_path, send_extra=two, recv_extra=two
    )
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
    n = len(hard["rounds"])  # the budget is per birthday round
    assert n in (1, 2) and easy["rounds"] == hard["rounds"]
    assert 0 < hard["spent_syns"] <= 256 * n and 0 < easy["spent_syns"] <= 1024 * n
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
    send_code, _recv_code, send, recv, _out, _info = cli_transfer(
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
    send_code, _recv_code, send, _recv, _out, _info = cli_transfer(lab, tmp_path)
    assert send_code == 3
    assert send["hard_nat"] is None
    assert any("both sides are behind endpoint-dependent" in n for n in send["notes"])
    assert "both sides are behind a NAT with endpoint-dependent" in send["verdict"]


def test_a_one_socket_budget_misses_in_both_birthday_rounds(
    lab_factory: Callable[[LabSpec | str], Lab], tmp_path: Path
) -> None:
    """1 socket x 1 probe a round (a 1 in 64 512 chance) misses: both of the round plan's
    birthday rounds ran and the verdict counts them; round 3 is an ordinary round."""
    lab = lab_factory("symmetric-nat")
    tiny = ["--rounds", "3", "--birthday-sockets", "1", "--birthday-probes", "1"]
    send_code, recv_code, send, recv, _out, info = cli_transfer(
        lab, tmp_path, send_extra=tiny, recv_extra=tiny
    )
    assert send_code == 3 and recv_code == 3, info
    assert send["rounds"] == 3
    hard, easy = send["hard_nat"], recv["hard_nat"]
    assert hard["role"] == "hard" and easy["role"] == "easy"
    for side in (hard, easy):
        assert side["rounds"] == [1, 2]
        assert (side["sockets"], side["probes"]) == (1, 1)
        assert side["spent_syns"] == 2 and side["hits"] == 0  # one SYN in each round
        assert side["expected_success"] < 1e-4
    assert "as the hard side in rounds 1, 2: 2 SYNs" in send["verdict"]
    assert "chance of missing both is 100.0 %" in send["verdict"]


def test_policy_auto_keeps_both_birthday_rounds_before_the_tunnel(
    lab_factory: Callable[[LabSpec | str], Lab], tmp_path: Path
) -> None:
    """STUN shows the symmetric side before round 1, which under --policy auto would
    leave one direct round; birthday punching applies, so both of its rounds run."""
    lab = lab_factory("symmetric-nat")
    extra = ["--rounds", "3", "--birthday-sockets", "1", "--birthday-probes", "1",
             "--policy", "auto"]  # fmt: skip
    send_code, recv_code, send, _recv, _out, info = cli_transfer(
        lab, tmp_path, send_extra=extra, recv_extra=extra
    )
    assert send_code == 0 and recv_code == 0, info
    assert send["path"] == "tunnel" and send["fell_back"] is True
    assert send["rounds"] == 2 and send["hard_nat"]["rounds"] == [1, 2]
    assert any("2 direct rounds instead of 3, then the tunnel" in n for n in send["notes"])
