"""Dual-stack labs for real: NAT44 as each side says, beside a routed IPv6 path behind
the same stateful firewalls (no NAT66).  Where NAT44 is symmetric on both sides the link
comes up over IPv6."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from testsupport.lab import cli_transfer

from holepunch_mig.lab import Lab, LabSpec
from holepunch_mig.lab.spec import LabError, LabUnsupported, spec_from_dict

pytestmark = pytest.mark.netns


def test_ipv6_path_is_routed_and_firewalled(lab_factory: Callable[[LabSpec | str], Lab]) -> None:
    lab = lab_factory("dual-stack")
    left6, right6 = lab.address6("left"), lab.address6("right")
    assert left6.startswith("2001:db8:11::") and right6.startswith("2001:db8:12::")
    server = lab.socket("right", socket.AF_INET6)
    with server:
        server.bind(("::", 0))
        server.listen(1)
        port = server.getsockname()[1]
        # inbound NEW over IPv6 is dropped by right's router (a v6 firewall, not a NAT)
        client = lab.socket("left", socket.AF_INET6)
        with client:
            client.settimeout(1.5)
            with pytest.raises((TimeoutError, socket.timeout)):
                client.connect((right6, port))
    # outbound works, from the host's own (unNATed) address
    public = lab.socket("public", socket.AF_INET6)
    with public:
        public.bind(("::", 0))
        public.listen(1)
        out = lab.socket("left", socket.AF_INET6)
        with out:
            out.settimeout(3.0)
            out.connect((lab.address6("public"), public.getsockname()[1]))
            conn, addr = public.accept()
            conn.close()
            assert addr[0] == left6


def test_two_symmetric_nat44s_crossed_over_ipv6(
    lab_factory: Callable[[LabSpec | str], Lab], tmp_path: Path
) -> None:
    lab = lab_factory("symmetric-symmetric-v6")
    send_code, recv_code, send, _recv, out, info = cli_transfer(lab, tmp_path)
    digest, errs = info.split("\n", 1)
    assert send_code == 0 and recv_code == 0, errs
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
    nominated = [p for p in send["pairs"] if p["outcome"] == "nominated"]
    assert len(nominated) == 1
    assert nominated[0]["local"].startswith("[2001:db8:11::2]")
    assert nominated[0]["remote"].startswith("[2001:db8:12::2]")
    # IPv4 alone could not have done it: both NAT44s are symmetric
    assert "both sides are behind endpoint-dependent" in " ".join(send["notes"])


def test_ipv6_spec_key() -> None:
    spec = spec_from_dict({"ipv6": True, "left": {"nat": "masquerade"}})
    assert spec.ipv6
    with pytest.raises(LabError, match="ipv6 must be true or false"):
        spec_from_dict({"ipv6": "yes"})
    with pytest.raises(LabUnsupported, match=r"ipv6 with left\.nat 'double'"):
        spec_from_dict({"ipv6": True, "left": {"nat": "double"}})
