"""The benchmark harness in a tiny mode, so it cannot rot.  No timing is asserted."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from holepunch_mig import benchmark as b
from holepunch_mig.cli import main

TINY = 8 << 20


def test_cli_bench_tiny_writes_verified_json_and_markdown(tmp_path: Path) -> None:
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    code = main(
        ["bench", "--gib", str(TINY / b.GIB), "--runs", "1", "--lab-runs", "0", "--full-verify",
         "--json", str(out), "--markdown", str(md)]
    )  # fmt: skip
    assert code == 0
    res = json.loads(out.read_text())
    assert res["machine"]["nproc"] >= 1 and len(res["machine"]["loadavg_start"]) == 3
    assert res["config"]["total"] == TINY and res["config"]["runs"] == 1
    keys = [r["key"] for r in res["rows"]]
    assert keys[:3] == ["plain-tcp", "records", "records-sha256"]
    for row in res["rows"]:
        assert len(row["samples"]) == 1
        assert row["median"]["mbps"] > 0
        assert row["median"]["send_cpu_per_gib"] >= 0 and row["median"]["recv_cpu_per_gib"] >= 0
        assert row["ratio"] is not None
        assert "8388608 bytes" in row["verified"] and "sink sha256" in row["verified"]
    digest_row = next(r for r in res["rows"] if r["key"] == "records-sha256")
    assert "sha256 both ends" in digest_row["verified"]
    assert next(r for r in res["rows"] if r["baseline"])["ratio"] == pytest.approx(1.0)
    assert set(res["crypto_only"]) >= {"aes_gcm_encrypt_into_MBps", "sha256_MBps"}
    assert res["time_to_link"] is None
    text = md.read_text()
    assert "| 5b |" in text and "nproc=" in text


def test_pattern_and_sink_agree_and_catch_reordering() -> None:
    seed = b"t"
    total = 3 * b.CHUNK + 100
    src = b.PatternSource(total, seed)
    data = bytearray()
    buf = memoryview(bytearray(300_000))  # odd size: chunk boundaries fall mid-buffer
    while n := src.readinto(buf):
        data += buf[:n]
    assert len(data) == total
    good = b.CheckingSink(seed, full_hash=True)
    for off in range(0, total, 77_777):
        good.write(data[off : off + 77_777])
    assert good.bad is None and good.pos == total
    assert good.hash is not None and good.hash.hexdigest() == b.expected_sha256(total, seed)
    swapped = data[b.CHUNK : 2 * b.CHUNK] + data[: b.CHUNK] + data[2 * b.CHUNK :]
    bad = b.CheckingSink(seed)
    bad.write(swapped)
    assert bad.bad is not None


def test_a_fast_wrong_answer_fails() -> None:
    def send(sock: socket.socket, src: b.PatternSource, cfg: b.BenchConfig) -> b.SideResult:
        return b.REGISTRY["plain-tcp"].factory(cfg).sender(sock, src, cfg)

    def drop_a_chunk(sock: socket.socket, sink: b.CheckingSink, cfg: b.BenchConfig) -> b.SideResult:
        view = memoryview(bytearray(b.CHUNK))
        got = chunks = 0
        while n := sock.recv_into(view, b.CHUNK, socket.MSG_WAITALL):
            chunks += 1
            if chunks != 2:
                sink.write(view[:n])
            got += n
        return b.SideResult(nbytes=got)

    cfg = b.BenchConfig(total=4 * b.CHUNK, runs=1)
    with pytest.raises(b.BenchError, match="byte count"):
        b.run_pair(b.PairSpec(send, drop_a_chunk), cfg, None)
