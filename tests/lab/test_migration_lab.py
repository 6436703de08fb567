"""QEMU live migrations through ``holepunch-mig migrate-proxy`` between two firewalled
network namespaces (lab preset fw-fw: inbound only the control port), driven by
:func:`holepunch_mig.lab.qemu_lab.migrate_in_lab` (the manager of
examples/migration_manager.py); plus the migration API on this host (no namespaces).

Under CI=true these must run: the lab and QEMU helpers fail instead of skipping.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from testsupport.lab import require_netns
from testsupport.qemu import require_qemu

from holepunch_mig.errors import ProtocolError, ProxyError, ProxyNotReady
from holepunch_mig.lab import CONTROL_PORT, Lab, presets
from holepunch_mig.lab.qemu_lab import migrate_in_lab
from holepunch_mig.migration.api import (
    MigrationError,
    MigrationProgress,
    migration_destination,
    migration_destination_blocking,
    migration_source,
    migration_source_blocking,
)
from holepunch_mig.migration.mux import Mux
from holepunch_mig.migration.proxy import SourceProxy
from holepunch_mig.migration.qemu import (
    QemuVM,
    make_ram_image,
    migrate,
    start_incoming,
    wait_status,
)
from holepunch_mig.testing import memory_channel_pair
from holepunch_mig.wire import messages

MEM_MIB = 128
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fw_lab() -> Iterator[Lab]:
    require_netns()
    require_qemu()
    with Lab(presets()["fw-fw"]) as lab:
        yield lab


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_qemu()
    return make_ram_image(tmp_path_factory.mktemp("ram") / "ram.img", MEM_MIB)


async def _same_ram(src: QemuVM, dst: QemuVM, work: Path) -> None:
    start, size = 16 << 20, 32 << 20
    digests = []
    for vm in (src, dst):
        f = work / f"{vm.name}.mem"
        await vm.qmp.execute("pmemsave", {"val": start, "size": size, "filename": str(f)})
        digests.append(hashlib.sha256(f.read_bytes()).hexdigest())
    assert digests[0] == digests[1], "destination RAM differs from the source's"


def _check_success(outcome: Any, streams: int) -> None:
    assert outcome.qemu.status == "completed", outcome.qemu
    assert outcome.source_status == "postmigrate"
    assert outcome.destination_status == "running"
    assert outcome.source_exit == 0, outcome.source_report
    assert outcome.destination_exit == 0, outcome.destination_report
    s, d = outcome.source_report, outcome.destination_report
    for rep in (s, d):
        assert rep["ok"] is True
        assert rep["path"] == "direct"
        assert len(rep["streams"]) == streams
        assert rep["migration_seconds"] > 0
        assert rep["link"]["session"] == s["link"]["session"]
    assert s["bytes_sent"] == d["bytes_received"] > MEM_MIB * 1024 * 1024 * 0.9
    assert s["bytes_received"] == d["bytes_sent"]
    for a, b in zip(s["streams"], d["streams"], strict=True):
        assert (a["stream"], a["sent"], a["received"]) == (b["stream"], b["received"], b["sent"])
        assert a["sent_sha256"] == b["received_sha256"]


@pytest.mark.netns
@pytest.mark.qemu
@pytest.mark.parametrize(
    ("multifd", "extra"),
    [(0, ()), (4, ()), (0, ("--digest",))],
    ids=["plain", "multifd4", "sha256"],
)
def test_migration_through_firewalls(
    fw_lab: Lab, image: Path, tmp_path: Path, multifd: int, extra: tuple[str, ...]
) -> None:
    async def main() -> Any:
        with trio.fail_after(150):
            return await migrate_in_lab(
                fw_lab,
                tmp_path,
                mem_mib=MEM_MIB,
                multifd=multifd,
                ram_image=image,
                proxy_args=extra,
                after=lambda src, dst: _same_ram(src, dst, tmp_path),
            )

    outcome = trio.run(main)
    _check_success(outcome, streams=1 + multifd)
    # one punched link per QEMU connection (the manager told the proxy multifd's count),
    # and each of them carried its own connection's bytes
    s, d = outcome.source_report, outcome.destination_report
    for rep in (s, d):
        assert rep["links"] == 1 + multifd
        assert [st["link"] for st in rep["streams"]] == list(range(1 + multifd))
        nominated = [p for p in rep["link"]["pairs"] if p["outcome"] == "nominated"]
        assert len(nominated) == 1 + multifd
        assert len({(p["local"], p["remote"]) for p in nominated}) == 1 + multifd
    assert len(s["link_bytes"]) == 1 + multifd
    for st in s["streams"]:
        # a link's bytes on the wire cover its stream's bytes (plus record overhead)
        assert s["link_bytes"][st["link"]] >= st["sent"] > 0
    if multifd:
        # RAM goes over the multifd channels, each on its own link
        assert all(st["sent"] > 1 << 20 for st in s["streams"][1:]), s["streams"]
    if extra:
        streams = outcome.source_report["streams"]
        assert outcome.source_report["digest"] == "blake3"  # the session negotiated it; END uses it
        assert all(s["sent_sha256"] and len(s["sent_sha256"]) == 64 for s in streams)
    else:
        assert outcome.source_report["digest"] == "count-only"


def _cut_ruleset() -> str:
    # Drop every TCP packet of the left host except the control connection: the punched
    # link goes silent mid-migration, the control channel keeps working.
    rules = (
        f"    tcp dport {CONTROL_PORT} accept\n"
        f"    tcp sport {CONTROL_PORT} accept\n"
        "    meta l4proto tcp drop\n"
    )
    return (
        "table inet hpm_cut {\n"
        "  chain out {\n    type filter hook output priority -10; policy accept;\n"
        f"{rules}  }}\n"
        "  chain in {\n    type filter hook input priority -10; policy accept;\n"
        f"{rules}  }}\n"
        "}\n"
    )


def _one_link_ruleset(port: int) -> str:
    # Drop only the TCP packets of one local port: one of the parallel links goes silent.
    rules = f"    tcp sport {port} drop\n    tcp dport {port} drop\n"
    return (
        "table inet hpm_cut {\n"
        "  chain out {\n    type filter hook output priority -10; policy accept;\n"
        f"{rules}  }}\n"
        "  chain in {\n    type filter hook input priority -10; policy accept;\n"
        f"{rules}  }}\n"
        "}\n"
    )


def _link_ports(lab: Lab) -> list[int]:
    """Local ports of the left host's established TCP connections but the control one."""
    out = lab.run("left", ["ss", "-Htn", "state", "established"], timeout=10, capture_output=True)
    ports = set()
    for line in out.stdout.decode().splitlines():
        fields = line.split()
        local, peer = fields[-2], fields[-1]
        if local.endswith(f":{CONTROL_PORT}") or peer.endswith(f":{CONTROL_PORT}"):
            continue
        ports.add(int(local.rsplit(":", 1)[1]))
    return sorted(ports)


@pytest.mark.netns
@pytest.mark.qemu
@pytest.mark.parametrize(
    ("cut", "multifd"),
    [("nft-drop-link", 0), ("kill-destination-proxy", 0), ("nft-drop-one-of-5-links", 4)],
)
def test_link_cut_mid_migration(
    fw_lab: Lab, image: Path, tmp_path: Path, cut: str, multifd: int
) -> None:
    cut_at = 8 << 20
    cut_ports: list[int] = []

    async def during(src: QemuVM, dst: QemuVM, procs: dict[str, subprocess.Popen[bytes]]) -> None:
        with trio.fail_after(60):
            while True:
                info = await src.qmp.execute("query-migrate")
                if info.get("ram", {}).get("transferred", 0) > cut_at:
                    break
                assert info.get("status") in (None, "setup", "active"), info
                await trio.sleep(0.02)
        if cut == "nft-drop-link":
            fw_lab.run("left", ["nft", "-f", "-"], timeout=10, input=_cut_ruleset().encode())
        elif cut == "nft-drop-one-of-5-links":
            ports = _link_ports(fw_lab)
            assert len(ports) == 1 + multifd, ports
            cut_ports.append(ports[-1])
            rules = _one_link_ruleset(ports[-1]).encode()
            fw_lab.run("left", ["nft", "-f", "-"], timeout=10, input=rules)
        else:
            procs["destination"].kill()

    async def main() -> Any:
        with trio.fail_after(150):
            return await migrate_in_lab(
                fw_lab,
                tmp_path,
                mem_mib=MEM_MIB,
                ram_image=image,
                max_bandwidth=32 << 20,  # ~4 s for 128 MiB: time to cut it mid-way
                multifd=multifd,
                proxy_args=("--link-timeout", "3"),
                during=during,
            )

    try:
        outcome = trio.run(main)
    finally:
        fw_lab.run("left", ["nft", "delete", "table", "inet", "hpm_cut"], timeout=10,
                   capture_output=True)  # fmt: skip
    assert outcome.qemu.status == "failed", outcome.qemu
    assert outcome.source_status == "running", "source VM must keep running"
    assert outcome.destination_status != "running", "destination resumed on partial state"
    assert outcome.source_exit == 1
    s = outcome.source_report
    assert s is not None and s["ok"] is False and s["verdict"]
    assert 0 < s["bytes_sent"] < MEM_MIB << 20
    if cut.startswith("nft-drop"):
        d = outcome.destination_report
        assert outcome.destination_exit == 1
        assert d is not None and d["ok"] is False and d["verdict"]
        # each side also learnt of the other's failure over the control channel
        assert s["peer_ok"] is False and d["peer_ok"] is False, (s, d)
        if cut_ports:
            assert s["links"] == d["links"] == 1 + multifd
            # the other links were healthy: the group failed them all at once, and the
            # verdict names what happened on the cut one or the peer's abort
            assert "link" in s["verdict"] or "abort" in s["verdict"], s["verdict"]
    else:
        assert outcome.destination_exit == -9


# -- the API on this host (no namespaces) ----------------------------------------------


@pytest.mark.qemu
async def test_api_progress_and_report(image: Path, tmp_path: Path) -> None:
    a, b = memory_channel_pair()
    samples: list[MigrationProgress] = []
    reports: dict[str, Any] = {}
    with trio.fail_after(90):
        async with (
            QemuVM(tmp_path, name="src", mem_mib=MEM_MIB, ram_image=image) as src,
            QemuVM(tmp_path, name="dst", mem_mib=MEM_MIB, ram_image=image, incoming="defer") as dst,
        ):
            incoming = tmp_path / "in.sock"
            await start_incoming(dst.qmp, f"unix:{incoming}")

            async def destination() -> None:
                async with migration_destination(b, connect_unix=incoming) as proxy:
                    await proxy.wait()
                reports["dst"] = proxy.report

            async def source() -> None:
                async with migration_source(
                    a, progress=samples.append, expected_bytes=MEM_MIB << 20
                ) as proxy:
                    mode = stat.S_IMODE(proxy.path.stat().st_mode)
                    assert mode == 0o600
                    assert stat.S_IMODE(proxy.path.parent.stat().st_mode) == 0o700
                    # slow enough for a few progress samples
                    await migrate(src.qmp, proxy.uri, max_bandwidth=256 << 20, timeout=60)
                reports["src"] = proxy.report

            async with trio.open_nursery() as nursery:
                nursery.start_soon(destination)
                nursery.start_soon(source)
            await wait_status(dst.qmp, "running", timeout=10)
    assert reports["src"].ok and reports["dst"].ok
    assert reports["src"].path == "direct"
    moving = [p for p in samples if p.bytes]
    assert moving, "no progress sample during the migration"
    assert any(p.eta is not None and p.rate > 0 for p in moving)
    assert samples[-1].bytes == reports["src"].bytes_sent
    assert [p.bytes for p in samples] == sorted(p.bytes for p in samples)


@pytest.mark.qemu
def test_blocking_twins_and_manager_abort(image: Path, tmp_path: Path) -> None:
    """Threaded manager: a migration through the blocking API, then one the manager
    aborts before QEMU connects (both sides fail, with the manager's reason)."""
    for attempt in ("complete", "abort"):
        work = tmp_path / attempt
        work.mkdir()
        ctl_a, ctl_b = socket.socketpair()

        async def main(work: Path = work, ctl_a: socket.socket = ctl_a,
                       ctl_b: socket.socket = ctl_b, attempt: str = attempt) -> None:  # fmt: skip
            with trio.fail_after(90):
                async with (
                    QemuVM(work, name="src", mem_mib=MEM_MIB, ram_image=image) as src,
                    QemuVM(
                        work, name="dst", mem_mib=MEM_MIB, ram_image=image, incoming="defer"
                    ) as dst,
                ):
                    incoming = work / "in.sock"
                    await start_incoming(dst.qmp, f"unix:{incoming}")
                    out: dict[str, Any] = {}

                    def dst_thread() -> None:
                        proxy = migration_destination_blocking(ctl_b, connect_unix=incoming)
                        try:
                            out["dst"] = proxy.wait(60)
                        except MigrationError as exc:
                            out["dst"] = exc.migration

                    t = threading.Thread(target=dst_thread)
                    t.start()
                    proxy = await trio.to_thread.run_sync(lambda: migration_source_blocking(ctl_a))
                    if attempt == "complete":
                        await migrate(src.qmp, proxy.uri, timeout=60)
                        report = await trio.to_thread.run_sync(proxy.wait)
                        assert report.ok
                        await wait_status(dst.qmp, "running", timeout=10)
                    else:
                        report = await trio.to_thread.run_sync(proxy.abort, "operator said no")
                        assert report.ok is False
                        assert "operator said no" in (report.verdict or "")
                    await trio.to_thread.run_sync(t.join, 60)
                    assert out["dst"].ok is (attempt == "complete"), out["dst"]
                    if attempt == "abort":
                        assert "operator said no" in out["dst"].verdict

        trio.run(main)


def test_source_socket_exact_path(tmp_path: Path) -> None:
    (a, _), (b, _) = socket.socketpair(), socket.socketpair()
    from holepunch_mig.net.record_io import RecordReader, RecordWriter

    key = os.urandom(32)
    mux = Mux(a, RecordWriter(a, key), RecordReader(a, key))
    path = tmp_path / "vm.sock"
    proxy = SourceProxy(mux, path=path)
    proxy.start()
    try:
        assert stat.S_ISSOCK(path.lstat().st_mode)
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600
        assert sorted(p.name for p in tmp_path.iterdir()) == ["vm.sock"]  # scratch dir gone
        with pytest.raises(ProxyError, match="already exists"):
            SourceProxy(mux, path=path).start()
    finally:
        proxy.close()
        a.close()
        b.close()
    assert not path.exists()


def test_migrate_messages_are_strict() -> None:
    for msg in (
        messages.MigrateOffer(digest=False),
        messages.MigrateReady(digest=True),
        messages.MigrateResult(ok=False, streams=5, sent=1, received=0, error="x"),
    ):
        assert messages.decode(messages.encode(msg)) == msg
    with pytest.raises(ProtocolError, match="digest"):
        messages.MigrateOffer(digest=1)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="lacks field 'error'"):
        _decode_json({"type": "migrate-result", "ok": True, "streams": 1, "sent": 1, "received": 1})
    with pytest.raises(ProtocolError, match="unknown field"):
        _decode_json({"type": "migrate-ready", "digest": True, "path": "/tmp/x"})


def _decode_json(body: dict[str, object]) -> messages.Event:
    return messages.decode(b"\x01" + json.dumps({"v": 2, **body}).encode())


# -- handoff mode: the punched socket handed to QEMU (its own TLS-PSK) ------------------


def _check_handoff_success(outcome: Any) -> None:
    assert outcome.qemu.status == "completed", outcome.qemu
    assert outcome.source_status == "postmigrate"
    assert outcome.destination_status == "running"
    assert outcome.source_exit == 0, outcome.source_report
    assert outcome.destination_exit == 0, outcome.destination_report
    s, d = outcome.source_report, outcome.destination_report
    for rep in (s, d):
        assert rep["ok"] is True and rep["peer_ok"] is True
        assert rep["mode"] == "handoff" and rep["digest"] == "tls"
        assert rep["path"] == "direct"
        assert rep["socket"].startswith("fd:hpm-")
        assert rep["link"]["session"] == s["link"]["session"]
    assert s["qemu_status"] == "completed" and d["qemu_status"] == "running"
    assert s["bytes_sent"] == d["bytes_received"] == outcome.qemu.transferred
    assert s["bytes_sent"] > MEM_MIB * 1024 * 1024 * 0.9


def _psk_parent(tmp_path: Path) -> Path:
    """Where this test's proxies put their key directories: its own, so the check that
    they are removed does not see another run's."""
    parent = tmp_path / "psk"
    parent.mkdir(mode=0o700)
    return parent


@pytest.mark.netns
@pytest.mark.qemu
def test_handoff_through_firewalls(fw_lab: Lab, image: Path, tmp_path: Path) -> None:
    async def main() -> Any:
        with trio.fail_after(150):
            return await migrate_in_lab(
                fw_lab,
                tmp_path,
                mem_mib=MEM_MIB,
                ram_image=image,
                mode="handoff",
                proxy_args=("--psk-dir", str(keys)),
                after=lambda src, dst: _same_ram(src, dst, tmp_path),
            )

    keys = _psk_parent(tmp_path)
    _check_handoff_success(trio.run(main))
    # the key directories are gone (this test's own parent: others may run at once)
    assert not list(keys.glob("hpm-psk-*"))


@pytest.mark.netns
@pytest.mark.qemu
@pytest.mark.parametrize("cut", ["nft-drop-link", "kill-destination-qemu"])
def test_handoff_link_cut_mid_migration(fw_lab: Lab, image: Path, tmp_path: Path, cut: str) -> None:
    """After the handoff QEMU owns the data path: the link dies under it (firewall drop
    with the proxies' TCP_USER_TIMEOUT on QEMU's socket; or the destination QEMU killed).
    The source VM keeps running, the destination never runs, both proxies report the
    failure (the control channel carries each side's verdict to the other)."""
    cut_at = 8 << 20

    async def during(src: QemuVM, dst: QemuVM, procs: dict[str, subprocess.Popen[bytes]]) -> None:
        with trio.fail_after(60):
            while True:
                info = await src.qmp.execute("query-migrate")
                if info.get("ram", {}).get("transferred", 0) > cut_at:
                    break
                assert info.get("status") in (None, "setup", "active"), info
                await trio.sleep(0.02)
        if cut == "nft-drop-link":
            fw_lab.run("left", ["nft", "-f", "-"], timeout=10, input=_cut_ruleset().encode())
        else:
            assert dst.pid is not None
            os.kill(dst.pid, 9)

    async def main() -> Any:
        with trio.fail_after(150):
            return await migrate_in_lab(
                fw_lab,
                tmp_path,
                mem_mib=MEM_MIB,
                ram_image=image,
                mode="handoff",
                max_bandwidth=32 << 20,  # ~4 s for 128 MiB: time to cut it mid-way
                proxy_args=("--link-timeout", "3", "--psk-dir", str(keys)),
                during=during,
            )

    keys = _psk_parent(tmp_path)
    try:
        outcome = trio.run(main)
    finally:
        fw_lab.run("left", ["nft", "delete", "table", "inet", "hpm_cut"], timeout=10,
                   capture_output=True)  # fmt: skip
    # "cancelled" when the destination side noticed first: its proxy reports over the
    # control channel and the source proxy cancels at once instead of waiting for TCP
    assert outcome.qemu.status in ("failed", "cancelled"), outcome.qemu
    assert outcome.source_status == "running", "source VM must keep running"
    assert outcome.destination_status != "running", "destination resumed on partial state"
    assert outcome.source_exit == 1 and outcome.destination_exit == 1
    s, d = outcome.source_report, outcome.destination_report
    assert s is not None and d is not None
    print("source:", s["verdict"], "\ndestination:", d["verdict"])
    assert s["ok"] is False and s["verdict"] and s["qemu_status"] == outcome.qemu.status
    assert 0 < s["bytes_sent"] < MEM_MIB << 20
    assert d["ok"] is False and d["verdict"]
    assert s["peer_ok"] is False and d["peer_ok"] is False, (s, d)
    assert not list(keys.glob("hpm-psk-*"))


@pytest.mark.netns
@pytest.mark.qemu
def test_handoff_refuses_multifd_in_lab(fw_lab: Lab, image: Path, tmp_path: Path) -> None:
    async def main() -> Any:
        with trio.fail_after(120):
            return await migrate_in_lab(
                fw_lab, tmp_path, mem_mib=MEM_MIB, ram_image=image, mode="handoff", multifd=4
            )

    with pytest.raises(ProxyNotReady, match="did not get ready") as err:
        trio.run(main)
    report = json.loads((tmp_path / "source-proxy.json").read_text())
    assert report["ok"] is False and report["mode"] == "handoff"
    assert "multifd" in report["verdict"] and "--mode mux" in report["verdict"]
    assert report["verdict"] in str(err.value)  # the manager sees the proxy's reason


@pytest.mark.netns
@pytest.mark.qemu
def test_example_manager_ends_in_one_line_when_the_proxies_refuse() -> None:
    require_netns()
    require_qemu()
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "migration_manager.py"),
            "--mode",
            "handoff",
            "--multifd",
            "2",
            "--mem",
            "64",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert run.returncode == 1
    assert "Traceback" not in run.stderr, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("migration_manager: source proxy did not get ready (exit 1): ")
    assert "multifd" in last


def test_cli_handoff_usage_errors(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cases = [
        (["source", "--mode", "handoff", "--control", "127.0.0.1:1"], "needs --qmp"),
        (
            ["source", "--mode", "handoff", "--qmp", "q", "--listen-unix", "x",
             "--control", "127.0.0.1:1"],
            "takes no --listen-unix",
        ),
        (["destination", "--control-listen", "127.0.0.1:1"], "needs --connect-unix"),
        (
            ["destination", "--connect-unix", "x", "--qmp", "q",
             "--control-listen", "127.0.0.1:1"],
            "are for --mode handoff",
        ),
    ]  # fmt: skip
    for args, message in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "holepunch_mig.cli", "migrate-proxy", *args],
            capture_output=True,
            env=env,
            timeout=30,
        )
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr.decode(), proc.stderr


def test_migrate_messages_carry_the_mode() -> None:
    for kind in (messages.MigrateOffer, messages.MigrateReady):
        for mode in ("mux", "handoff"):
            msg = kind(digest=False, mode=mode)
            assert messages.decode(messages.encode(msg)) == msg
        with pytest.raises(ProtocolError, match="mode"):
            kind(digest=False, mode="relay")  # type: ignore[arg-type]
