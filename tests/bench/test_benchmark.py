"""The benchmark harness in a tiny mode, so it cannot rot.  No timing is asserted."""

from __future__ import annotations

import json
import socket
import struct
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from testsupport.lab import require_netns
from testsupport.qemu import require_qemu

from holepunch_mig.bench import harness
from holepunch_mig.bench import model as b
from holepunch_mig.bench.floor import paced_floor, pair_floor, qemu_floor, scale, stages
from holepunch_mig.bench.payload import CHUNK, CheckingSink, PatternSource, expected_sha256
from holepunch_mig.bench.report import load_result, render_markdown, targets
from holepunch_mig.cli.main import main
from holepunch_mig.errors import BenchError

TINY = 8 << 20


ALL_ROWS = [
    "plain-tcp", "tls", "rpc-tunnel", "tunnel", "direct", "direct-sha256", "direct-blake3"
]  # fmt: skip


def _check_rows(res: dict[str, Any], total: int) -> None:
    assert res["machine"]["nproc"] >= 1 and len(res["machine"]["loadavg_start"]) == 3
    for row in res["rows"]:
        if row["pending"]:
            assert not row["samples"]
            continue
        assert len(row["samples"]) == 1
        assert row["median"]["mbps"] > 0 and row["median"]["wall"] > 0
        assert row["median"]["send_cpu"] >= 0 and row["median"]["recv_cpu"] >= 0
        assert row["ratio"] is not None
        assert f"{row['total']} bytes" in row["verified"] and "chunk stamps" in row["verified"]
    by_key = {r["key"]: r for r in res["rows"] if r["rtt_ms"] == 0}
    assert "TLS_AES_256_GCM_SHA384" in by_key["tls"]["verified"]
    for key in ("rpc-tunnel", "tunnel"):
        assert "path tunnel" in by_key[key]["verified"]
        assert by_key[key]["time_to_link"] is not None
    for key in ("direct", "direct-sha256", "direct-blake3"):
        assert "path direct" in by_key[key]["verified"]
        assert by_key[key]["time_to_link"] is not None
    assert "sha256 both ends" in by_key["direct-sha256"]["verified"]
    assert "blake3 both ends" in by_key["direct-blake3"]["verified"]
    # 5a is the bare link: no resume (which would hash), 5b/5c what send/recv run
    assert by_key["direct"]["samples"][0]["extra"]["resumable"] is False
    assert by_key["direct-blake3"]["samples"][0]["extra"]["resumable"] is True
    for row in res["rows"]:
        if not row["pending"]:
            assert row["median"]["send_cpu_per_gib"] > 0 and row["median"]["recv_cpu_per_gib"] > 0
    # stop-and-wait: one credit reply per 64 KiB chunk
    rpc = by_key["rpc-tunnel"]["samples"][0]["extra"]
    assert rpc["tunnel_credits"] >= total // (64 << 10)
    assert by_key["plain-tcp"]["ratio"] == pytest.approx(1.0)


def test_cli_bench_tiny_loopback_writes_verified_json_markdown_png(tmp_path: Path) -> None:
    out, md, png = tmp_path / "bench.json", tmp_path / "bench.md", tmp_path / "bench.png"
    code = main(
        ["bench", "--loopback", "--gib", str(TINY / b.GIB), "--runs", "1", "--lab-runs", "0",
         "--full-verify", "--rows", ",".join([*ALL_ROWS, "records-sha256", "records-blake3"]),
         "--json", str(out), "--markdown", str(md), "--png", str(png)]
    )  # fmt: skip
    assert code == 0
    res = json.loads(out.read_text())
    assert res["config"]["total"] == TINY and res["config"]["runs"] == 1
    assert res["where"] == "loopback" and res["rtts"] == [0]
    assert [r["key"] for r in res["rows"]] == [*ALL_ROWS, "records-sha256", "records-blake3"]
    _check_rows(res, TINY)
    for row in res["rows"]:
        alg = "blake3" if row["key"] in ("direct-blake3", "records-blake3") else "sha256"
        assert f"sink {alg}" in row["verified"]
    assert set(res["crypto_only"]) >= {"aes_gcm_encrypt_into_MBps", "sha256_MBps", "blake3_MBps"}
    assert res["time_to_link"] is None
    text = md.read_text()
    assert "| 5b |" in text and "nproc=" in text and "2009" in text and "### Targets" in text
    assert "| 5c |" in text and "of floor" in text
    # every row has its floor from this run's rates (row 1 and crypto-only were measured)
    loaded = load_result(out)
    for row in loaded.rows:
        fl = pair_floor(loaded, row)
        assert fl is not None and fl.mbps > 0
        if row.key == "plain-tcp":  # nothing on these sockets beats plain TCP: its own rate
            assert row.median["mbps"] / fl.mbps == pytest.approx(1.0, rel=0.02)
        else:  # the crypto is on top of plain's copies
            assert fl.send_cpu > loaded.rows[0].median["send_cpu_per_gib"]
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.netns
def test_cli_bench_tiny_lab_rows_between_namespaces(tmp_path: Path) -> None:
    """Every default row once between two namespaces of the lab, at 0 ms (and 20 ms,
    through the lab's delay stage), no QEMU."""
    require_netns()
    out, md, png = tmp_path / "bench.json", tmp_path / "bench.md", tmp_path / "bench.png"
    code = main(
        ["bench", "--gib", str(TINY / b.GIB), "--runs", "1", "--lab-runs", "0", "--rtts", "0,20",
         "--qemu-runs", "0", "--no-libvirt",
         "--json", str(out), "--markdown", str(md), "--png", str(png)]
    )  # fmt: skip
    assert code == 0
    res = json.loads(out.read_text())
    assert res["where"] == "lab" and res["rtts"] == [0, 20]
    assert [r["key"] for r in res["rows"] if r["rtt_ms"] == 0] == [
        *ALL_ROWS, "plain-file", "cli-blake3"
    ]  # fmt: skip
    _check_rows(res, TINY)
    # row 6: the real send/recv processes, their reports' digest and CPU
    cli = next(r for r in res["rows"] if r["key"] == "cli-blake3" and r["rtt_ms"] == 0)
    assert "blake3 both reports" in cli["verified"] and "resume on" in cli["verified"]
    assert "output file chunk stamps" in cli["verified"]
    assert cli["time_to_link"] is not None
    assert "| 6 |" in md.read_text() and "row 6, the real CLI" in md.read_text()
    assert (
        "| 1f |" in md.read_text() and "plain TCP moving the same file (row 1f)" in md.read_text()
    )
    twenty = [r for r in res["rows"] if r["rtt_ms"] == 20]
    assert all(r["pending"] or r["samples"] for r in twenty)
    text = md.read_text()
    assert "### 20 ms RTT" in text
    assert "### libvirt live migration" in text and "not run (--no-libvirt)" in text
    assert res["libvirt"] == []
    assert png.stat().st_size > 1000


def test_the_cli_row_is_pending_on_loopback_and_says_why(tmp_path: Path) -> None:
    res = harness.run_bench(
        b.BenchConfig(total=TINY, runs=1), rows=["plain-tcp", "cli-blake3"], where="loopback",
        lab_runs=0, qemu_runs=0, libvirt_runs=0, log=lambda _: None,
    )  # fmt: skip
    cli = next(r for r in res.rows if r.key == "cli-blake3")
    assert not cli.samples and "lab only" in (cli.pending or "")
    plain = next(r for r in res.rows if r.key == "plain-tcp")
    assert plain.samples and not plain.pending


@pytest.mark.netns
def test_the_cli_row_fails_on_a_digest_the_payload_does_not_have(tmp_path: Path) -> None:
    require_netns()
    from holepunch_mig.bench.cli_cells import run_cli_lab
    from holepunch_mig.bench.lab_cells import lab_spec
    from holepunch_mig.lab import Lab

    cfg = b.BenchConfig(total=4 << 20, runs=1, workdir=str(tmp_path), timeout=60)
    good = expected_sha256(cfg.total, cfg.seed, "blake3")
    with Lab(lab_spec(0)) as lab:
        sample = run_cli_lab(lab, cfg, good)
        assert sample.total == cfg.total and sample.mbps > 0 and sample.send_cpu > 0
        with pytest.raises(BenchError, match="want 4194304 bytes, blake3 00"):
            run_cli_lab(lab, cfg, "00" * 32)


def test_pattern_and_sink_agree_and_catch_reordering() -> None:
    seed = b"t"
    total = 3 * CHUNK + 100
    src = PatternSource(total, seed)
    data = bytearray()
    buf = memoryview(bytearray(300_000))  # odd size: chunk boundaries fall mid-buffer
    while n := src.readinto(buf):
        data += buf[:n]
    assert len(data) == total
    good = CheckingSink(seed, full_hash=True)
    for off in range(0, total, 77_777):
        good.write(data[off : off + 77_777])
    assert good.bad is None and good.pos == total
    assert good.hash is not None and good.hash.hexdigest() == expected_sha256(total, seed)
    swapped = data[CHUNK : 2 * CHUNK] + data[:CHUNK] + data[2 * CHUNK :]
    bad = CheckingSink(seed)
    bad.write(swapped)
    assert bad.bad is not None


def test_a_fast_wrong_answer_fails() -> None:
    def send(sock: socket.socket, src: PatternSource, cfg: b.BenchConfig) -> b.SideResult:
        return b.REGISTRY["plain-tcp"].factory(cfg).sender(sock, src, cfg)

    def drop_a_chunk(sock: socket.socket, sink: CheckingSink, cfg: b.BenchConfig) -> b.SideResult:
        view = memoryview(bytearray(CHUNK))
        got = chunks = 0
        while n := sock.recv_into(view, CHUNK, socket.MSG_WAITALL):
            chunks += 1
            if chunks != 2:
                sink.write(view[:n])
            got += n
        return b.SideResult(nbytes=got)

    cfg = b.BenchConfig(total=4 * CHUNK, runs=1)
    with pytest.raises(BenchError, match="byte count"):
        harness.run_pair(b.PairSpec(send, drop_a_chunk), cfg, None)


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _result() -> b.BenchResult:
    """A small made-up result (two rows at two RTTs, one QEMU pair): what the chart and
    the page need, without measuring."""
    rows = []
    for rtt in (0, 20):
        for number, key, mbps in (("1", "plain-tcp", 2000.0), ("5a", "direct", 1500.0)):
            sample = b.Sample(
                mbps=mbps / (1 + rtt), wall=1.0, send_cpu_per_gib=0.5, recv_cpu_per_gib=0.4,
                send_calls_per_gib=1.0, recv_calls_per_gib=1.0, send_vcsw_per_gib=1.0,
                recv_vcsw_per_gib=1.0, send_ivcsw_per_gib=1.0, recv_ivcsw_per_gib=1.0,
                send_cpu=0.5, recv_cpu=0.4, verified=f"{TINY} bytes, chunk stamps", total=TINY,
            )  # fmt: skip
            row = b.RowResult(number, key, key, key == "plain-tcp", rtt, "lab", TINY, [sample])
            b.summarise(row)
            row.ratio = 1.0
            rows.append(row)
    qemu = [
        b.QemuCell(0, case, 0, 512, walls=[w, w * 1.1], mbps=[600.0, 550.0], median_wall=w)
        for case, w in (("direct", 0.8), ("proxy", 0.9))
    ]
    machine = {
        "nproc": 2, "affinity": 2, "cpu_model": "test", "loadavg_start": [0.0, 0.0, 0.0],
        "kernel": "6", "python": "3", "cryptography": "46", "openssl": "OpenSSL 3",
    }  # fmt: skip
    config = {"total": TINY, "runs": 1, "sockbuf": 0, "pipeline": 3, "prefetch": 3}
    return b.BenchResult(
        machine, config, "holepunch-mig bench", rows, {"sha256_MBps": 1.0}, None, [0.0] * 3,
        where="lab", rtts=[0, 20], qemu=qemu,
    )  # fmt: skip


def test_floor_from_the_runs_rates() -> None:
    """The floor adds the crypto at the measured rates to row 1's copies, spreads both
    sides over the cores and never beats row 1; QEMU's adds the proxies' copies and
    AES-GCM to direct QEMU's own CPU and never beats direct QEMU."""
    res = _result()
    one_second_per_gib = b.GIB / 1e6  # MB/s at which 1 GiB takes 1 s
    res.crypto_only = {
        "aes_gcm_encrypt_into_MBps": one_second_per_gib,
        "aes_gcm_decrypt_into_MBps": one_second_per_gib / 2,  # 2 s/GiB
    }
    plain, direct = res.rows[0], res.rows[1]
    assert (plain.key, direct.key) == ("plain-tcp", "direct")
    fl = pair_floor(res, direct)
    assert fl is not None
    assert fl.send_cpu == pytest.approx(0.5 + 1.0) and fl.recv_cpu == pytest.approx(0.4 + 2.0)
    assert fl.mbps == pytest.approx(one_second_per_gib / ((1.5 + 2.4) / 2))  # CPU-bound
    pfl = pair_floor(res, plain)
    assert pfl is not None and pfl.mbps == pytest.approx(2000.0)  # row 1's own rate
    direct_q, proxy_q = res.qemu
    direct_q.median_mbps = 600.0
    direct_q.qemu_cpu_src, direct_q.qemu_cpu_dst = [1.0, 1.2], [0.8, 0.8]
    proxy_q.qemu_cpu_src, proxy_q.qemu_cpu_dst = [1.1], [0.9]
    proxy_q.proxy_cpu_src, proxy_q.proxy_cpu_dst = [0.7], [0.6]
    qf = qemu_floor(res, proxy_q)
    assert qf is not None
    # direct QEMU's median CPU + one more read and write (0.5 + 0.4) + AES per side
    assert qf.send_cpu == pytest.approx(1.1 + 0.9 + 1.0)
    assert qf.recv_cpu == pytest.approx(0.8 + 0.9 + 2.0)
    assert qf.mbps == pytest.approx(one_second_per_gib / ((3.0 + 3.7) / 2))
    # the paper model: one link is its slowest thread, many links meet the NIC
    st = stages(res)
    assert st is not None
    # (no UNIX-hop figure yet: QEMU's side costs a plain TCP receive / send)
    assert (st.pump, st.reader, st.deliverer) == pytest.approx((0.4 + 1 + 0.5, 0.4 + 2 + 0.5, 0.5))
    assert (st.qemu_src, st.qemu_dst) == pytest.approx((1.1, 0.8))
    one, why = scale(st, 1, 16, 3000.0)
    assert one == pytest.approx(one_second_per_gib / 2.9) and "destination's reader" in why
    assert scale(st, 16, 16, 3000.0) == (3000.0, "the NIC")
    few_cores, why = scale(st, 8, 4, 3000.0)
    assert few_cores == pytest.approx(4 * one_second_per_gib / (2.4 + 0.5 + 0.8))
    assert why == "the destination's cores"
    page = render_markdown(res)
    assert "## Scaling with cores and links (on paper)" in page
    assert "| 16 | 2969 | 23.8 | the NIC |" in page
    assert "CPU s/GiB src / dst (QEMU + proxy)" in page
    assert "1.80 / 1.50" in page  # the proxy row: QEMU + proxy, each side
    assert "1.10 / 0.80" in page  # the direct row: QEMU alone (medians)
    # a QEMU target below the floor says so, with the best ratio the floor allows
    proxy_q.ratio, proxy_q.median_mbps = 2.0, 300.0
    (verdict,) = [t for t in targets(res) if t[0].startswith("QEMU via migrate-proxy")]
    best = 600.0 / qf.mbps
    assert verdict[2].startswith("**missed**")
    assert f"could beat {best:.2f}x direct on this machine" in verdict[2]
    # a floor at direct QEMU's own rate does not rule the target out: no such clause
    direct_q.median_mbps = qf.mbps * 0.9
    (verdict,) = [t for t in targets(res) if t[0].startswith("QEMU via migrate-proxy")]
    assert verdict[2].startswith("**missed**") and "could beat" not in verdict[2]
    # with the UNIX hop measured (QEMU <-> proxy, 0.25 s/GiB), a side's floor is direct
    # QEMU's CPU (its TCP hop, which the proxies take over) + that hop + AES: the plain
    # TCP send and receive per proxy are not charged on top
    res.crypto_only["unix_hop_MBps"] = one_second_per_gib * 4
    qf = qemu_floor(res, proxy_q)
    assert qf is not None
    assert qf.send_cpu == pytest.approx(1.1 + 0.25 + 1.0)
    assert qf.recv_cpu == pytest.approx(0.8 + 0.25 + 2.0)
    # a cell faster than its floor is not explained by it: the page says the model erred
    proxy_q.median_mbps = qf.mbps * 1.2
    (verdict,) = [t for t in targets(res) if t[0].startswith("QEMU via migrate-proxy")]
    assert "beat this floor" in verdict[2] and "could beat" not in verdict[2]


def test_the_file_rows_floor_and_target_build_on_plain_tcp_between_files(tmp_path: Path) -> None:
    res = _result()
    res.crypto_only = {
        "aes_gcm_encrypt_into_MBps": b.GIB / 1e6,  # 1 s/GiB
        "aes_gcm_decrypt_into_MBps": b.GIB / 1e6,
        "blake3_MBps": b.GIB / 1e6 * 2,  # 0.5 s/GiB
    }
    plain = res.rows[0]

    def row(number: str, key: str, mbps: float, send: float, recv: float) -> b.RowResult:
        sample = replace(plain.samples[0], mbps=mbps, send_cpu_per_gib=send, recv_cpu_per_gib=recv)
        r = b.RowResult(number, key, key, False, 0, "lab", TINY, [sample])
        b.summarise(r)
        return r

    res.rows += [row("1f", "plain-file", 1000.0, 0.6, 0.9), row("6", "cli-blake3", 650.0, 2, 3)]
    fl = pair_floor(res, res.rows[-1])
    assert fl is not None  # 1f's copies (not row 1's 0.5 / 0.4) + AES + BLAKE3
    assert (fl.send_cpu, fl.recv_cpu) == pytest.approx((0.6 + 1.5, 0.9 + 1.5))
    (verdict,) = [t for t in targets(res) if t[0].startswith("`send`/`recv` of a file")]
    assert verdict[1].startswith("0.65x (650 vs 1000 MB/s); row 6 0.33x row 1")
    assert verdict[2] == "met"
    # missed: the verdict names its floor, and with the page-write probe's figures the
    # floor with the output's pages charged at what they cost at row 6's rate
    res.rows[-1] = row("6", "cli-blake3", 400.0, 2.0, 3.0)
    (verdict,) = [t for t in targets(res) if t[0].startswith("`send`/`recv` of a file")]
    assert verdict[2].startswith("**missed**") and "Cause (measured)" not in verdict[2]
    assert paced_floor(res, res.rows[-1]) is None
    res.page_writes = {"full_s_per_gib": 0.3, "paced_s_per_gib": 0.9, "paced_MBps": 400.0}
    pf = paced_floor(res, res.rows[-1])
    assert pf is not None
    assert (pf.send_cpu, pf.recv_cpu) == pytest.approx((0.6 + 1.5, 0.9 + 1.5 + 0.6))
    assert pf.mbps == pytest.approx(b.GIB / 1e6 / ((2.1 + 3.0) / 2))
    assert paced_floor(res, res.rows[-2]) is None  # 1f writes at full speed: its own floor
    res.page_writes = {"full_s_per_gib": 0.3, "paced_s_per_gib": 0.32, "paced_MBps": 400.0}
    (verdict,) = [t for t in targets(res) if t[0].startswith("`send`/`recv` of a file")]
    assert "Cause (measured)" not in verdict[2]
    assert "so the output's pages do not explain the miss" in verdict[2]
    res.page_writes = {"full_s_per_gib": 0.3, "paced_s_per_gib": 0.9, "paced_MBps": 400.0}
    (verdict,) = [t for t in targets(res) if t[0].startswith("`send`/`recv` of a file")]
    assert "costs 0.90 CPU s/GiB at row 6's 400 MB/s and 0.30 at full speed" in verdict[2]
    assert f"the floor is {pf.mbps:.0f} MB/s (2.10 + 3.00)" in verdict[2]
    assert f"row 6 reached {400.0 / pf.mbps:.2f} of it" in verdict[2]
    assert "0.30 CPU s/GiB at full speed, 0.90 paced at row 6's 400 MB/s" in render_markdown(res)
    # the figures round-trip through the JSON, and a JSON from before the probe loads
    saved = json.loads(res.to_json())
    (tmp_path / "new.json").write_text(json.dumps(saved))
    assert load_result(tmp_path / "new.json").page_writes == res.page_writes
    del saved["page_writes"]
    (tmp_path / "old.json").write_text(json.dumps(saved))
    assert load_result(tmp_path / "old.json").page_writes == {}


def test_page_write_cost_is_cpu_per_gib_and_paced(tmp_path: Path) -> None:
    from holepunch_mig.bench.cli_cells import page_write_cost

    nbytes = 16 << 20
    t0 = time.monotonic()
    paced = page_write_cost(nbytes, 64.0, folder=tmp_path)  # 16 MiB at 64 MB/s: >= 0.26 s
    assert time.monotonic() - t0 >= nbytes / 64e6 - 0.02
    assert paced > 0 and page_write_cost(nbytes, None, folder=tmp_path) > 0
    assert list(tmp_path.iterdir()) == []  # the probe's file is gone


def test_unix_hop_rate_is_cpu_per_byte_through_a_socketpair() -> None:
    rate = harness.unix_hop_rate(0.05)
    # both threads' CPU for every byte: a copy in and a copy out, far from free and far
    # from the pace of a memcpy (well above 100 MB/s, under 100 GB/s, on any machine)
    assert 100 < rate < 100_000
    assert "unix_hop_MBps" in harness.crypto_only(0.02)


def test_chart_is_a_png_that_matplotlib_drew() -> None:
    from holepunch_mig.bench.chart import render_png

    png = render_png(_result())
    assert png.startswith(PNG_MAGIC)
    assert b"Matplotlib" in png[:200]  # the Software text chunk matplotlib writes
    width, height = struct.unpack("!II", png[16:24])
    assert width >= 600 and height >= 300 and len(png) > 10_000


def _without_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every later ``import matplotlib...`` fails, as on a host without the extra."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_bench_without_matplotlib_writes_page_and_says_how_to_get_the_chart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data, md, png = tmp_path / "bench.json", tmp_path / "bench.md", tmp_path / "bench.png"
    data.write_text(_result().to_json())
    _without_matplotlib(monkeypatch)
    code = main(["bench", "--from-json", str(data), "--markdown", str(md), "--png", str(png)])
    assert code == 0
    assert "### 20 ms RTT" in md.read_text()
    assert not png.exists()
    hints = [line for line in capsys.readouterr().err.splitlines() if "pip install" in line]
    assert hints == [
        f"holepunch-mig bench: no chart written to {png}: matplotlib is missing "
        "(pip install 'holepunch_mig[plot]')"
    ]


@pytest.mark.netns
@pytest.mark.qemu
def test_qemu_cells_meter_qemu_and_proxy_cpu(tmp_path: Path) -> None:
    """One tiny QEMU pair in the lab: each cell carries QEMU's own CPU per GiB (from
    /proc) and, through the proxies, their CPU and the link count; the page shows them
    against the floor."""
    require_netns()
    require_qemu()
    from holepunch_mig.bench.lab_cells import lab_spec
    from holepunch_mig.bench.qemu_cells import run_qemu_cells
    from holepunch_mig.lab import Lab

    lines: list[str] = []
    with Lab(lab_spec(0)) as lab:
        cells = run_qemu_cells(lab, tmp_path, 64, 1, (2,), lines.append)
    direct, proxy = cells
    # each case ran once unmeasured before its measured run, which alone is in the cell
    warm = [line for line in lines if "warm-up" in line]
    assert [w.split()[4] for w in warm] == ["qemu-direct", "qemu-proxy"], lines
    assert lines.index(warm[-1]) < min(i for i, x in enumerate(lines) if "run 1/1" in x)
    assert (direct.case, proxy.case) == ("direct", "proxy")
    for cell in cells:
        assert len(cell.qemu_cpu_src) == len(cell.qemu_cpu_dst) == 1
        assert cell.qemu_cpu_src[0] > 0 and cell.qemu_cpu_dst[0] > 0
    assert proxy.links == 3  # main channel + 2 multifd channels, one link each
    assert proxy.proxy_cpu_src[0] > 0 and proxy.proxy_cpu_dst[0] > 0
    assert direct.proxy_cpu_src == []
    res = _result()
    res.qemu = cells
    res.crypto_only = harness.crypto_only(0.05)
    fl = qemu_floor(res, proxy)
    assert fl is not None and fl.mbps > 0
    # the floor holds QEMU's measured CPU plus the proxies' work on top
    assert fl.send_cpu > direct.qemu_cpu_src[0] and fl.recv_cpu > direct.qemu_cpu_dst[0]
    assert "5: QEMU via migrate-proxy (punched, Noise, AES-GCM), 3 links" in render_markdown(res)


def _libvirt_cells() -> list[Any]:
    from holepunch_mig.bench.libvirt_cells import LibvirtCell

    def cell(row: str, par: int, walls: list[float]) -> LibvirtCell:
        c = LibvirtCell(row, par, 256, walls=walls, median_wall=walls[len(walls) // 2])
        c.mb_per_s = 256 * 2**20 / c.median_wall / 1e6
        return c

    one = [
        cell("direct", 0, [2.0, 2.1, 2.2]),
        cell("tunnelled", 0, [2.6, 2.7, 2.8]),
        cell("tls", 0, [2.5, 2.5, 2.6]),
        cell("holepunch_mig", 0, [2.1, 2.2, 2.3]),
    ]
    four = [cell("direct", 4, [1.0, 1.0, 1.0]), cell("tls", 4, [1.5, 1.6, 1.7]),
            cell("holepunch_mig", 4, [1.2, 1.3, 1.3])]  # fmt: skip
    for group in (one, four):
        for c in group:
            c.ratio = c.median_wall / group[0].median_wall
    four[2].time_to_link = [0.02, 0.03, 0.02]
    return one + four


def test_libvirt_rows_on_the_page_targets_and_chart_from_json(tmp_path: Path) -> None:
    """An earlier run's JSON with libvirt rows re-renders them: their section with the
    ratios to libvirt direct, a target per group (<= 1.10x direct; faster than tunnelled
    and TLS) and a third chart panel; a JSON without them says they were not run."""
    from holepunch_mig.bench.chart import libvirt_panel, render_png

    res = _result()
    res.libvirt = _libvirt_cells()
    data, md, png = tmp_path / "bench.json", tmp_path / "bench.md", tmp_path / "bench.png"
    data.write_text(res.to_json())
    assert main(["bench", "--from-json", str(data), "--markdown", str(md), "--png", str(png)]) == 0
    text = md.read_text()
    section = text[text.index("### libvirt live migration") : text.index("### Targets")]
    assert "| holepunch_mig | 0 | 256 MiB | 2.200 | 122 | 1.05x |" in section
    assert "| holepunch_mig | 4 | 256 MiB | 1.300 | 206 | 1.30x |" in section
    assert "time to link before libvirt's call: median 20 ms over 3 runs" in section
    targets = text[text.index("### Targets") :]
    assert (
        "| libvirt: holepunch_mig <= 1.10x libvirt direct (plain TCP), one stream "
        "| 1.05x (2.20 vs 2.10 s) | met |" in targets
    )
    assert (
        "1.10x libvirt direct (plain TCP), parallel 4 | 1.30x (1.30 vs 1.00 s) | **missed** |"
        in (targets)
    )
    assert "| libvirt: holepunch_mig faster than tunnelled (libvirt RPC), one stream |" in targets
    assert "faster than native TLS, parallel 4 | 1.30 vs 1.60 s | met |" in targets
    assert "tunnelled (libvirt RPC), parallel 4" not in targets  # no such row with parallel
    loaded = load_result(data)
    panel = libvirt_panel(loaded)
    assert panel is not None
    assert panel.groups == ["one stream", "parallel 4"]
    assert panel.series == ["libvirt direct", "libvirt tunnelled", "libvirt tls", "holepunch_mig"]
    assert panel.values[1][1] is None and panel.values[1][3] == (1.3, 1.2, 1.3)
    assert png.read_bytes().startswith(PNG_MAGIC)
    assert len(png.read_bytes()) > len(render_png(_result()))  # the third panel
    # an older JSON (no libvirt key): not measured, no panel
    old = json.loads(res.to_json())
    del old["libvirt"], old["libvirt_note"]
    data.write_text(json.dumps(old))
    assert libvirt_panel(load_result(data)) is None
    assert "### libvirt live migration" in render_markdown(load_result(data))
    assert "Not measured in this run: not run." in render_markdown(load_result(data))


@pytest.mark.netns
@pytest.mark.qemu
@pytest.mark.libvirt
def test_cli_bench_runs_the_libvirt_rows_by_default(tmp_path: Path) -> None:
    """``holepunch-mig bench`` without --libvirt runs the libvirt rows after the others
    when it can (here: one tiny run of two rows) and puts them on the page."""
    from testsupport.libvirt import require_libvirt

    require_libvirt()
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    code = main(
        ["bench", "--gib", str(TINY / b.GIB), "--runs", "1", "--lab-runs", "0", "--rtts", "0",
         "--rows", "plain-tcp", "--qemu-runs", "0", "--libvirt-mem", "64", "--libvirt-runs",
         "1", "--libvirt-rows", "direct,holepunch_mig", "--json", str(out), "--markdown",
         str(md), "--no-docs"]
    )  # fmt: skip
    assert code == 0
    res = json.loads(out.read_text())
    assert [(c["row"], len(c["walls"])) for c in res["libvirt"]] == [
        ("direct", 1),
        ("holepunch_mig", 1),
    ]
    assert res["libvirt_note"] == ""
    text = md.read_text()
    assert "| holepunch_mig | 0 | 64 MiB |" in text
    assert "libvirt: holepunch_mig <= 1.10x libvirt direct (plain TCP), one stream" in text


def test_steal_is_measured_per_phase_and_on_the_page() -> None:
    """The share of CPU time the hypervisor took, from /proc/stat, per bench phase: cells
    that ran while the host was busy elsewhere are recognisable on the page."""
    before = b.cpu_ticks()
    assert before is not None and before[0] > 0 and 0 <= before[1] <= before[0]
    assert b.steal_between((1000, 50), (2000, 150)) == pytest.approx(10.0)
    assert b.steal_between((1000, 50), (1000, 50)) is None  # no time passed
    assert b.steal_between(None, before) is None
    res = _result()
    assert "steal" not in render_markdown(res)
    res.steal_pct = {"rows 0 ms": 2.5, "QEMU 0 ms": 14.0}
    page = render_markdown(res)
    assert "rows 0 ms: 2.5 %; QEMU 0 ms: 14.0 %" in page


def test_every_row_says_what_crypto_its_floor_holds() -> None:
    """A row missing from the floor's table would get a floor without its digest (as
    records-blake3 did when it was added)."""
    from holepunch_mig.bench.floor import CRYPTO_WORK

    assert set(b.REGISTRY) <= set(CRYPTO_WORK) | {"plain-tcp"}
    for key, work in CRYPTO_WORK.items():
        for alg in ("sha256", "blake3"):
            assert (alg in key) == (alg in work), key
