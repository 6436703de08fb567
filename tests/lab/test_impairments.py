"""Lab link impairments for real: loss, jitter/reordering (the NFQUEUE stage) and a rate
limit (tc tbf), measured with packets between the two sides' namespaces."""

from __future__ import annotations

import itertools
import json
import socket
import struct
import threading
from collections.abc import Callable

import pytest

from holepunch_mig.lab import Lab, LabSpec, SideSpec
from holepunch_mig.lab.netns import run_cmd
from holepunch_mig.lab.spec import LabError, spec_from_dict, spec_to_dict

pytestmark = pytest.mark.netns

COUNT = 600


def _udp_burst(lab: Lab, count: int = COUNT) -> list[int]:
    """Send `count` numbered datagrams left -> right; the sequence numbers that arrived,
    in arrival order."""
    rx = lab.socket("right", socket.AF_INET, socket.SOCK_DGRAM)
    tx = lab.socket("left", socket.AF_INET, socket.SOCK_DGRAM)
    got: list[int] = []
    with rx, tx:
        # room for the whole burst: a receiver thread starved on a loaded machine must
        # not add socket-buffer drops to the stage's (SO_RCVBUFFORCE: root)
        rx.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)
        rx.bind(("0.0.0.0", 0))
        rx.settimeout(3.0)
        port = rx.getsockname()[1]

        def receive() -> None:
            while True:
                try:
                    data = rx.recv(64)
                except TimeoutError:
                    return
                got.append(struct.unpack("!I", data[:4])[0])

        thread = threading.Thread(target=receive)
        thread.start()
        for seq in range(count):
            tx.sendto(struct.pack("!I", seq), (lab.public_address("right"), port))
        thread.join()
    return got


def _open_fw(**right: float) -> LabSpec:
    return LabSpec(
        left=SideSpec(firewall="open"),
        right=SideSpec(firewall="open", **right),  # type: ignore[arg-type]
        name="impair",
    )


def test_loss_drops_about_that_share(lab_factory: Callable[[LabSpec | str], Lab]) -> None:
    lab = lab_factory(_open_fw(loss_pct=20.0))
    got = _udp_burst(lab)
    # binomial(600, 0.8): mean 480, sd ~10; a stage that drops nothing or everything fails
    assert 420 < len(got) < 540, len(got)
    assert len(set(got)) == len(got)
    lab.teardown()
    # every missing datagram was the stage's doing (the stage counts every IPv4 packet it
    # dropped, so a stray packet of the lab's own may add one or two)
    missing = COUNT - len(got)
    assert missing <= lab.delay_counters()["right"]["dropped"] <= missing + 3


def test_reordering_and_jitter_reorder(lab_factory: Callable[[LabSpec | str], Lab]) -> None:
    spec = _open_fw(reorder_pct=30.0, jitter_ms=5.0)
    lab = lab_factory(LabSpec(left=spec.left, right=spec.right, rtt_ms=20, name="reorder"))
    got = _udp_burst(lab)
    assert sorted(got) == list(range(COUNT))  # nothing lost
    inversions = sum(1 for a, b in itertools.pairwise(got) if b < a)
    assert inversions > COUNT // 20, inversions
    # and the same lab without impairments keeps the order
    plain = lab_factory(LabSpec(left=spec.left, right=SideSpec(firewall="open"), rtt_ms=20))
    got = _udp_burst(plain)
    assert got == list(range(COUNT))


def test_rate_limit_is_a_token_bucket_on_both_ends(
    lab_factory: Callable[[LabSpec | str], Lab],
) -> None:
    lab = lab_factory(_open_fw(rate_kbit=800))
    for ns, dev in ((lab.netns("right"), "eth0"), (lab.segment_netns, "right")):
        out = run_cmd(["ip", "netns", "exec", ns, "tc", "-j", "-s", "qdisc", "show", "dev", dev])
        (qdisc,) = [q for q in json.loads(out.stdout) if q["kind"] == "tbf"]
        assert qdisc["options"]["rate"] == 800_000 // 8  # bytes per second
    # a burst far above the bucket: the download end queues and drops
    _udp_burst(lab, count=3000)
    out = run_cmd(
        [
            "ip",
            "netns",
            "exec",
            lab.segment_netns,
            "tc",
            "-j",
            "-s",
            "qdisc",
            "show",
            "dev",
            "right",
        ]
    )
    (qdisc,) = [q for q in json.loads(out.stdout) if q["kind"] == "tbf"]
    assert qdisc["overlimits"] > 0 or qdisc["drops"] > 0


def test_impairment_keys_in_spec_files() -> None:
    data = {
        "name": "lossy",
        "rtt_ms": 20,
        "right": {"firewall": "drop", "loss_pct": 1.5, "jitter_ms": 2, "rate_kbit": 10000},
    }
    spec = spec_from_dict(data)
    assert spec.right.loss_pct == 1.5 and spec.right.rate_kbit == 10000 and spec.needs_queue
    assert spec_from_dict(spec_to_dict(spec)) == spec
    for bad, msg in (
        ({"loss_pct": 101}, "right.loss_pct must be in 0..100"),
        ({"loss_pct": "1%"}, "right.loss_pct must be a number"),
        ({"rate_kbit": 1.5}, "right.rate_kbit must be an integer"),
        ({"rate_kbit": 4}, "right.rate_kbit must be 0"),
        ({"jitter_ms": -1}, "right.jitter_ms must be in"),
    ):
        with pytest.raises(LabError, match=msg):
            spec_from_dict({"right": bad})
