"""Diagnosis of a failed direct path: every cause gets a plain verdict with the fix."""

from __future__ import annotations

from holepunch_mig.report import PairReport, Report
from holepunch_mig.session.diagnosis import diagnose_pairs, explain_no_path
from holepunch_mig.wire.candidates import make_candidate


def _out(remote: str, outcome: str, detail: str = "", rnd: int = 1) -> PairReport:
    return PairReport(rnd, "0.0.0.0:40000", remote, outcome, detail)  # type: ignore[arg-type]


def _in(remote: str, outcome: str, detail: str = "") -> PairReport:
    return PairReport(1, "10.0.0.1:40000", remote, outcome, detail, direction="inbound")  # type: ignore[arg-type]


def test_nothing_to_diagnose_when_a_pair_was_nominated() -> None:
    d = diagnose_pairs(
        [_out("10.0.0.2:5000", "nominated"), _out("10.0.0.3:5000", "timed out")], role="source"
    )
    assert d.cause is None and d.findings == ()
    assert "worked" in d.verdict


def test_timeouts_both_ways() -> None:
    pairs = [_out("198.51.100.2:5000", "timed out"), _out("10.1.0.2:5000", "timed out")]
    d = diagnose_pairs(pairs, role="source")
    assert d.cause == "syn-timeout"
    v = d.verdict
    assert "timed out both ways" in v
    assert "inbound DROP on the destination's side" in v
    assert "symmetric NAT" in v and "holepunch-mig doctor" in v
    assert "198.51.100.2:5000" in v


def test_timeouts_one_way_only_when_inbound_arrived() -> None:
    pairs = [_out("198.51.100.2:5000", "timed out"), _in("198.51.100.2:5000", "abandoned")]
    d = diagnose_pairs(pairs, role="destination")
    assert d.cause == "syn-timeout"
    assert "both ways" not in d.verdict
    assert "source's firewall" in d.verdict


def test_rst_names_the_side_and_port() -> None:
    pairs = [
        _out("203.0.113.7:41234", "refused", "RST seen (attempt 9)"),
        _out("[2001:db8::7]:41234", "refused", "RST seen (attempt 9)"),
    ]
    d = diagnose_pairs(pairs, role="source")
    assert d.cause == "rst"
    v = d.verdict
    assert "answered with RST" in v
    assert "REJECT rule" in v and "nothing listening on port 41234" in v
    assert "in front of the destination (203.0.113.7, 2001:db8::7)" in v
    assert "DROP" in v


def test_handshake_rejected_beats_everything() -> None:
    pairs = [
        _out("203.0.113.7:41234", "rejected", "handshake failed: decryption failed"),
        _out("203.0.113.8:41234", "refused", "RST seen"),
    ]
    d = diagnose_pairs(pairs, role="destination")
    assert d.causes == ["handshake-rejected", "rst"]
    v = d.verdict
    assert v.startswith("TCP connected to 203.0.113.7:41234 but the Noise handshake failed")
    assert "not this session's source" in v
    assert "key does not match" in v and "middlebox" in v
    assert "Also: SYNs" in v


def test_handshake_timeout_counts_as_rejected() -> None:
    d = diagnose_pairs([_out("192.0.2.1:9", "rejected", "handshake timed out")], role="source")
    assert d.cause == "handshake-rejected"


def test_stun_endpoint_dependent_mapping_names_this_side() -> None:
    notes = [
        "STUN 192.0.2.10:3478: mapped to 198.51.100.1:61000 (port 40000 not preserved: "
        "NAT rewrites ports)",
        "STUN servers saw different mappings 198.51.100.1:61000, 198.51.100.1:61007: NAT "
        "mapping looks endpoint-dependent (symmetric); punching may fail",
    ]
    d = diagnose_pairs(
        [_out("203.0.113.9:5000", "timed out")], role="source", notes=notes, local_port=40000
    )
    assert d.causes[0] == "symmetric-nat"
    v = d.verdict
    assert v.startswith("this side is behind a NAT with endpoint-dependent (symmetric)")
    assert "this side (source)" in v
    assert "fully-random" in v and "holepunch-mig doctor" in v
    assert "Also: SYNs timed out both ways" in v


def test_port_rewriting_of_the_peer_is_seen_in_its_candidates() -> None:
    srflx = make_candidate("198.51.100.2", 52311, "srflx").to_line()
    host = make_candidate("10.2.0.2", 40001, "host").to_line()
    d = diagnose_pairs(
        [_out("198.51.100.2:52311", "timed out")],
        role="source",
        remote_candidates=[host, srflx],
        remote_port=40001,
        local_port=40000,
    )
    assert d.cause == "symmetric-nat"
    assert d.verdict.startswith("the destination is behind a NAT")
    assert "punch port 40001 appeared as 198.51.100.2:52311" in d.verdict


def test_both_sides_rewriting_ports() -> None:
    mine = make_candidate("198.51.100.1", 60001, "srflx").to_line()
    theirs = make_candidate("198.51.100.2", 60002, "srflx").to_line()
    d = diagnose_pairs(
        [_out("198.51.100.2:60002", "timed out")],
        role="destination",
        local_candidates=[mine],
        remote_candidates=[theirs],
        local_port=40000,
        remote_port=40001,
    )
    assert d.verdict.startswith("both sides are behind a NAT")
    assert "this side (destination)" in d.verdict and "the source:" in d.verdict


def test_port_preserving_nat_is_not_blamed() -> None:
    srflx = make_candidate("198.51.100.2", 40001, "srflx").to_line()
    d = diagnose_pairs(
        [_out("198.51.100.2:40001", "timed out")],
        role="source",
        remote_candidates=[srflx],
        remote_port=40001,
    )
    assert d.cause == "syn-timeout"


def test_unoffered_inbound_points_at_the_peers_nat() -> None:
    pairs = [
        _out("198.51.100.2:40001", "timed out"),
        _in("198.51.100.2:59999", "rejected", "source address was not offered"),
    ]
    d = diagnose_pairs(pairs, role="destination")
    assert d.cause == "unoffered-inbound"
    assert "198.51.100.2:59999" in d.verdict
    assert "NAT in front of the source rewrote its source port" in d.verdict


def test_unreachable() -> None:
    d = diagnose_pairs([_out("10.9.9.9:5000", "unreachable", "No route to host")], role="source")
    assert d.cause == "unreachable"
    assert "no route from this side (source) to 10.9.9.9:5000" in d.verdict
    assert "--candidate" in d.verdict


def test_no_pairs() -> None:
    d = diagnose_pairs([], role="source")
    assert d.cause == "no-pairs"
    assert "--candidate" in d.verdict


def test_other_outcomes_are_listed() -> None:
    d = diagnose_pairs([_out("192.0.2.1:9", "error", "OSError: weird")], role="source")
    assert d.cause == "other"
    assert "192.0.2.1:9 error (OSError: weird)" in d.verdict


def test_long_endpoint_lists_are_cut() -> None:
    pairs = [_out(f"192.0.2.{i}:9", "refused") for i in range(10)]
    d = diagnose_pairs(pairs, role="source")
    assert "and 6 more" in d.verdict


def test_explain_no_path_reads_the_report() -> None:
    report = Report(session="00" * 16, role="destination")
    report.pairs = [_out("203.0.113.7:41234", "refused", "RST seen")]
    report.local_port, report.remote_port = 40000, 41234
    d = explain_no_path(report)
    assert d.cause == "rst"
    assert "to the source at 203.0.113.7:41234" in d.verdict


def test_unreachable_private_candidates_do_not_hide_timeouts_both_ways() -> None:
    pairs = [
        _out("198.51.100.2:5000", "timed out"),
        _out("10.2.0.2:5000", "unreachable", "Network is unreachable"),
    ]
    d = diagnose_pairs(pairs, role="source")
    assert d.causes == ["syn-timeout"]
    assert "timed out both ways" in d.verdict


def test_birthday_miss_says_what_was_spent_and_the_odds() -> None:
    from holepunch_mig.report import HardNatReport

    spent = HardNatReport(
        role="easy", sockets=256, probes=1024, expected_success=0.983, rate=500,
        spent_syns=1024, seconds=2.05, refused=3,
    )  # fmt: skip
    notes = ["STUN servers saw different mappings 198.51.100.1:61000, 198.51.100.1:61007"]
    d = diagnose_pairs(
        [_out("198.51.100.1:61000", "timed out")], role="destination", notes=[], hard_nat=spent
    )
    assert d.cause == "birthday-missed"
    assert "1024 SYNs in 2.05 s (3 refused" in d.verdict
    assert "chance of missing it is 1.7 %" in d.verdict and "--birthday-probes" in d.verdict
    twice = HardNatReport(
        role="hard", sockets=256, probes=1024, expected_success=1 - 0.017**2, rate=500,
        spent_syns=512, seconds=1.2, rounds=[1, 2], round_success=0.983,
    )  # fmt: skip
    d2 = diagnose_pairs([_out("198.51.100.1:61000", "timed out")], role="source", notes=[],
                        hard_nat=twice)  # fmt: skip
    assert d2.cause == "birthday-missed"
    assert "as the hard side in rounds 1, 2: 512 SYNs" in d2.verdict
    assert "chance of missing both is 0.029 %" in d2.verdict and "--birthday-sockets" in d2.verdict
    without = diagnose_pairs([_out("198.51.100.1:61000", "timed out")], role="source", notes=notes)
    assert "birthday-missed" not in without.causes
