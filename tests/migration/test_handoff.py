"""Handoff mode (holepunch_mig.migration.handoff): the punched socket handed to QEMU, which
encrypts the migration with its own TLS-PSK derived from the session's Noise keys.

The lab test (two firewalled namespaces) is in test_migration_lab.py; here: key
derivation and the key file, SCM_RIGHTS over QMP, the API between two QEMUs on this
host, refusals (multifd, mode mismatch), and a byte flipped on the wire under QEMU's
TLS (both QEMUs fail; the source keeps running)."""

from __future__ import annotations

import array
import contextlib
import hashlib
import os
import re
import socket
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
from testsupport.qemu import require_qemu

from holepunch_mig.errors import HandoffRefused, HolepunchError
from holepunch_mig.migration import handoff
from holepunch_mig.migration.api import (
    MigrationError,
    migration_destination,
    migration_source,
)
from holepunch_mig.migration.handoff import PSK_IDENTITY, PskFile, derive_psk
from holepunch_mig.migration.qemu import (
    QemuVM,
    make_ram_image,
    query_status,
    set_migration_options,
    wait_migration,
)
from holepunch_mig.migration.qmp import QmpClient
from holepunch_mig.testing import memory_channel_pair

MEM_MIB = 128


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_qemu()
    return make_ram_image(tmp_path_factory.mktemp("ram") / "ram.img", MEM_MIB)


# -- key derivation and the key file ------------------------------------------------------


def test_derive_psk_is_shared_and_bound() -> None:
    k1, k2 = os.urandom(32), os.urandom(32)
    session = os.urandom(16).hex()
    psk = derive_psk(k1, k2, session)
    assert len(psk) == 32
    assert derive_psk(k1, k2, session) == psk  # both sides compute the same
    assert psk not in (k1, k2)
    assert derive_psk(k2, k1, session) != psk  # direction matters
    assert derive_psk(k1, k2, os.urandom(16).hex()) != psk  # bound to the session
    with pytest.raises(ValueError):
        derive_psk(k1[:16], k2, session)


def test_psk_file_permissions_and_removal(tmp_path: Path) -> None:
    psk = os.urandom(32)
    f = PskFile(psk, parent=tmp_path)
    d = f.create()
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    keys = d / "keys.psk"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600
    assert keys.read_text() == f"{PSK_IDENTITY}:{psk.hex()}\n"
    f.remove()
    f.remove()  # idempotent
    assert not d.exists()
    assert list(tmp_path.iterdir()) == []


def test_psk_default_parent_is_ram_backed() -> None:
    f = PskFile(os.urandom(32))
    d = f.create()
    try:
        if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK):
            assert d.parent == Path("/dev/shm")
    finally:
        f.remove()


# -- SCM_RIGHTS over QMP -------------------------------------------------------------------


async def test_execute_with_fd_passes_the_descriptor(tmp_path: Path) -> None:
    """A fake QMP server receives the command and the descriptor in one message."""
    path = tmp_path / "fake.qmp"
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(str(path))
    lst.listen(1)
    got: dict[str, Any] = {}

    def server() -> None:
        conn, _ = lst.accept()
        with conn:
            conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\n')
            conn.recv(4096)  # qmp_capabilities
            conn.sendall(b'{"return": {}, "id": 1}\n')
            fds = array.array("i")
            data, anc, _, _ = conn.recvmsg(4096, socket.CMSG_SPACE(4 * fds.itemsize))
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
            got["data"] = data
            got["fds"] = list(fds)
            conn.sendall(b'{"return": {}, "id": 2}\n')

    t = threading.Thread(target=server)
    t.start()
    a, b = socket.socketpair()
    try:
        with trio.fail_after(10):
            async with await QmpClient.connect(str(path)) as qmp:
                assert await qmp.execute_with_fd("getfd", a.fileno(), {"fdname": "x"}) == {}
        await trio.to_thread.run_sync(t.join, 10)
        assert b'"getfd"' in got["data"] and b'"fdname": "x"' in got["data"]
        assert len(got["fds"]) == 1
        passed = socket.socket(fileno=got["fds"][0])
        with passed:
            passed.sendall(b"through the passed fd")
            assert b.recv(100) == b"through the passed fd"
    finally:
        a.close()
        b.close()
        lst.close()


# -- the API between two QEMUs on this host ---------------------------------------------------


async def _ram_digest(vm: QemuVM, work: Path) -> str:
    f = work / f"{vm.name}.mem"
    await vm.qmp.execute("pmemsave", {"val": 16 << 20, "size": 32 << 20, "filename": str(f)})
    return hashlib.sha256(f.read_bytes()).hexdigest()


def _vms(work: Path, image: Path) -> tuple[QemuVM, QemuVM]:
    return (
        QemuVM(work, name="src", mem_mib=MEM_MIB, ram_image=image, proxy_monitor=True),
        QemuVM(
            work,
            name="dst",
            mem_mib=MEM_MIB,
            ram_image=image,
            incoming="defer",
            proxy_monitor=True,
        ),
    )


@pytest.mark.qemu
async def test_api_handoff_migrates(image: Path, tmp_path: Path) -> None:
    a, b = memory_channel_pair()
    reports: dict[str, Any] = {}
    samples: list[Any] = []
    psk_parent = tmp_path / "psk"
    psk_parent.mkdir()
    with trio.fail_after(90):
        vsrc, vdst = _vms(tmp_path, image)
        async with vsrc as src, vdst as dst:
            await set_migration_options(src.qmp, max_bandwidth=256 << 20)

            async def destination() -> None:
                async with migration_destination(
                    b, mode="handoff", qmp=dst.proxy_qmp_path, psk_dir=psk_parent
                ) as proxy:
                    assert proxy.uri.startswith("fd:hpm-")
                    keydirs = list(psk_parent.iterdir())
                    assert len(keydirs) == 1 and stat.S_IMODE(keydirs[0].stat().st_mode) == 0o700
                    await proxy.wait()
                reports["dst"] = proxy.report

            async def source() -> None:
                async with migration_source(
                    a,
                    mode="handoff",
                    qmp=src.proxy_qmp_path,
                    psk_dir=psk_parent,
                    progress=samples.append,
                ) as proxy:
                    await proxy.wait()
                reports["src"] = proxy.report

            async with trio.open_nursery() as nursery:
                nursery.start_soon(destination)
                nursery.start_soon(source)
            assert await query_status(dst.qmp) == "running"
            assert await query_status(src.qmp) == "postmigrate"
            assert await _ram_digest(src, tmp_path) == await _ram_digest(dst, tmp_path)
            # the credentials are gone from both QEMUs, TLS is off again
            for vm in (src, dst):
                params = await vm.qmp.execute("query-migrate-parameters")
                assert params.get("tls-creds", "") == ""
                objs = await vm.qmp.execute("qom-list", {"path": "/objects"})
                assert not [o for o in objs if o["name"].startswith("hpm-tls-")]
    assert list(psk_parent.iterdir()) == [], "key directory not deleted"
    s, d = reports["src"], reports["dst"]
    assert s.ok and d.ok, (s.verdict, d.verdict)
    assert s.mode == d.mode == "handoff" and s.digest == "tls"
    assert s.path == "direct"
    assert s.qemu_status == "completed" and d.qemu_status == "running"
    assert s.bytes_sent > MEM_MIB * 1024 * 1024 * 0.9
    assert d.bytes_received == s.bytes_sent
    assert s.peer_ok is True and d.peer_ok is True
    for rep in (s, d):  # no key material in reports (the session id is 32 hex digits)
        assert not re.search(r"[0-9a-f]{64}", rep.to_json() + rep.summary())
    assert samples and samples[-1].bytes == s.bytes_sent


@pytest.mark.qemu
async def test_handoff_refuses_multifd(image: Path, tmp_path: Path) -> None:
    a, _b = memory_channel_pair()
    with trio.fail_after(60):
        vsrc, _ = _vms(tmp_path, image)
        async with vsrc as src:
            await set_migration_options(src.qmp, multifd_channels=4)
            with pytest.raises(HandoffRefused, match="multifd"):
                async with migration_source(a, mode="handoff", qmp=src.proxy_qmp_path):
                    pytest.fail("entered")
    with pytest.raises(ValueError, match="qmp"):
        async with migration_source(a, mode="handoff"):
            pass


@pytest.mark.qemu
async def test_handoff_source_meets_mux_destination(image: Path, tmp_path: Path) -> None:
    """Mismatched modes fail on both sides with a message naming the modes."""
    a, b = memory_channel_pair()
    errors: dict[str, BaseException] = {}
    with trio.fail_after(60):
        vsrc, _ = _vms(tmp_path, image)
        async with vsrc as src:

            async def destination() -> None:
                try:
                    async with migration_destination(b, connect_unix=tmp_path / "none.sock"):
                        pass
                except HolepunchError as exc:
                    errors["dst"] = exc

            async def source() -> None:
                try:
                    async with migration_source(a, mode="handoff", qmp=src.proxy_qmp_path):
                        pass
                except HolepunchError as exc:
                    errors["src"] = exc

            async with trio.open_nursery() as nursery:
                nursery.start_soon(destination)
                nursery.start_soon(source)
            assert await query_status(src.qmp) == "running"
    assert "runs --mode mux" in str(errors["dst"])
    assert isinstance(errors["src"], HandoffRefused)
    assert "runs --mode mux" in str(errors["src"])


# -- tampering under QEMU's TLS -------------------------------------------------------------


def _relay(a: socket.socket, b: socket.socket, flip_at: int, seen: dict[str, Any]) -> None:
    """Copy a->b and b->a; flip one bit of the a->b stream at offset ``flip_at``; keep
    the first bytes each way (the TLS hellos)."""
    lock = threading.Lock()
    ended: list[str] = []

    def pump(src: socket.socket, dst: socket.socket, name: str, flip: int | None) -> None:
        n = 0
        head = bytearray()
        try:
            while True:
                data = bytearray(src.recv(1 << 16))
                if not data:
                    break
                if len(head) < 4096:
                    head += data[: 4096 - len(head)]
                    seen[name] = bytes(head)
                if flip is not None and n <= flip < n + len(data):
                    data[flip - n] ^= 0x01
                    seen["flipped"] = True
                n += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            with lock:
                ended.append(name)
                if len(ended) == 2:
                    # Closing (not just shutting down) with unread data sends RST, like a
                    # dead QEMU's socket: the other QEMU's blocked send fails at once.
                    a.close()
                    b.close()

    threads = [
        threading.Thread(target=pump, args=(a, b, "client", flip_at), daemon=True),
        threading.Thread(target=pump, args=(b, a, "server", None), daemon=True),
    ]
    for t in threads:
        t.start()
    seen["threads"] = threads


def _server_hello(data: bytes) -> tuple[int, dict[int, bytes]]:
    """(cipher suite, {extension type: body}) of the first ServerHello in a TLS stream."""
    # record header (5) + handshake header (4) + version (2) + random (32)
    assert data[0] == 22 and data[5] == 2, data[:16].hex()
    p = 5 + 4 + 2 + 32
    p += 1 + data[p]  # session id
    suite = int.from_bytes(data[p : p + 2], "big")
    p += 2 + 1  # cipher suite, compression
    ext_end = p + 2 + int.from_bytes(data[p : p + 2], "big")
    p += 2
    exts = {}
    while p < ext_end:
        etype = int.from_bytes(data[p : p + 2], "big")
        elen = int.from_bytes(data[p + 2 : p + 4], "big")
        exts[etype] = data[p + 4 : p + 4 + elen]
        p += 4 + elen
    return suite, exts


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        a = socket.create_connection(lst.getsockname())
        b, _ = lst.accept()
    return a, b


@pytest.mark.qemu
@pytest.mark.parametrize("flip", [None, 48 << 20], ids=["clean", "bit-flipped"])
async def test_qemu_tls_psk_over_passed_fds(image: Path, tmp_path: Path, flip: int | None) -> None:
    """The same QEMU setup the proxies do (PskFile, install_tls, getfd, fd: URIs), over
    two TCP connections joined by a relay that can flip one bit of the source's stream:
    clean -> completed over TLS 1.3 (AES-128-GCM, PSK with ECDHE); flipped -> QEMU's TLS
    rejects the record, the source fails and keeps running, the destination never runs."""
    psk = os.urandom(32)
    seen: dict[str, Any] = {}
    src_sock, relay_a = _tcp_pair()
    relay_b, dst_sock = _tcp_pair()
    _relay(relay_a, relay_b, flip if flip is not None else -1, seen)
    files = [PskFile(psk, parent=tmp_path), PskFile(psk, parent=tmp_path)]
    for f in files:
        f.create()
    try:
        with trio.fail_after(90):
            vsrc, vdst = _vms(tmp_path, image)
            async with vsrc as src, vdst as dst:
                await handoff.install_tls(dst.qmp, endpoint="server", cred_id="t", psk=files[1])
                await handoff.install_tls(src.qmp, endpoint="client", cred_id="t", psk=files[0])
                await set_migration_options(src.qmp, max_bandwidth=10**10)
                await dst.qmp.execute_with_fd("getfd", dst_sock.fileno(), {"fdname": "m"})
                await src.qmp.execute_with_fd("getfd", src_sock.fileno(), {"fdname": "m"})
                src_sock.close()
                dst_sock.close()
                await dst.qmp.execute("migrate-incoming", {"uri": "fd:m"})
                await src.qmp.execute("migrate", {"uri": "fd:m"})
                result = await wait_migration(src.qmp, timeout=60)
                if flip is None:
                    assert result.status == "completed", result
                    assert await query_status(dst.qmp) == "running"
                    assert await query_status(src.qmp) == "postmigrate"
                else:
                    assert seen.get("flipped"), "the relay never reached the offset"
                    assert result.status == "failed", result
                    assert await query_status(src.qmp) == "running"
                    try:
                        state = await query_status(dst.qmp)
                    except HolepunchError:
                        state = "exited"
                    assert state != "running"
    finally:
        for f in files:
            f.remove()
        for s in (src_sock, dst_sock, relay_a, relay_b):
            s.close()
    # both ways the bytes on the wire are TLS: a 1.3 ServerHello (supported_versions)
    suite, exts = _server_hello(seen["server"])
    assert exts[43] == b"\x03\x04"  # supported_versions: TLS 1.3
    assert suite == 0x1301  # TLS_AES_128_GCM_SHA256 (handoff.TLS_PRIORITY)
    assert 41 in exts  # pre_shared_key: the PSK was used...
    assert 51 in exts  # ...with an (EC)DHE key_share: psk_dhe_ke, forward secret
    assert seen["client"][0] == 22  # ClientHello record
    assert psk.hex().encode() not in seen["client"] + seen["server"]


def test_migration_error_type() -> None:
    assert issubclass(MigrationError, HolepunchError)
    assert issubclass(HandoffRefused, HolepunchError)


@pytest.mark.qemu
async def test_handoff_manager_abort(image: Path, tmp_path: Path) -> None:
    """The source manager raises inside the block while QEMU migrates: the source
    proxy cancels, both reports fail with the manager's reason, the source VM runs,
    the destination never does, and the key directories are gone."""
    a, b = memory_channel_pair()
    out: dict[str, Any] = {}
    psk_parent = tmp_path / "psk"
    psk_parent.mkdir()
    with trio.fail_after(90):
        vsrc, vdst = _vms(tmp_path, image)
        async with vsrc as src, vdst as dst:
            await set_migration_options(src.qmp, max_bandwidth=32 << 20)  # ~4 s

            async def destination() -> None:
                try:
                    async with migration_destination(
                        b, mode="handoff", qmp=dst.proxy_qmp_path, psk_dir=psk_parent
                    ) as proxy:
                        await proxy.wait()
                except MigrationError as exc:
                    out["dst"] = exc.migration

            async def source() -> None:
                class Stop(Exception):
                    pass

                try:
                    async with migration_source(
                        a, mode="handoff", qmp=src.proxy_qmp_path, psk_dir=psk_parent
                    ) as proxy:
                        out["proxy"] = proxy
                        while True:
                            info = await src.qmp.execute("query-migrate")
                            if info.get("ram", {}).get("transferred", 0) > 8 << 20:
                                break
                            await trio.sleep(0.02)
                        raise Stop("operator said no")
                except Stop:
                    out["src"] = out["proxy"].report

            async with trio.open_nursery() as nursery:
                nursery.start_soon(destination)
                nursery.start_soon(source)
            result = await wait_migration(src.qmp, timeout=30)
            assert result.status == "cancelled", result
            assert await query_status(src.qmp) == "running"
            try:
                state = await query_status(dst.qmp)
            except HolepunchError:
                state = "exited"
            assert state != "running"
    s, d = out["src"], out["dst"]
    assert s.ok is False and "operator said no" in s.verdict
    assert d.ok is False and "operator said no" in (d.verdict or ""), d.verdict
    assert s.qemu_status == "cancelled" and 0 < s.bytes_sent < MEM_MIB << 20
    assert list(psk_parent.iterdir()) == []


@pytest.mark.qemu
def test_handoff_blocking_twins(image: Path, tmp_path: Path) -> None:
    """A threaded manager: migration_*_blocking(..., mode="handoff", qmp=PATH)."""
    from holepunch_mig.migration.api import (
        migration_destination_blocking,
        migration_source_blocking,
    )

    ctl_a, ctl_b = socket.socketpair()

    async def main() -> None:
        with trio.fail_after(90):
            vsrc, vdst = _vms(tmp_path, image)
            async with vsrc as src, vdst as dst:
                out: dict[str, Any] = {}

                def dst_thread() -> None:
                    proxy = migration_destination_blocking(
                        ctl_b, mode="handoff", qmp=dst.proxy_qmp_path
                    )
                    out["dst"] = proxy.wait(60)

                t = threading.Thread(target=dst_thread)
                t.start()
                proxy = await trio.to_thread.run_sync(
                    lambda: migration_source_blocking(ctl_a, mode="handoff", qmp=src.proxy_qmp_path)
                )
                assert proxy.uri.startswith("fd:hpm-")
                report = await trio.to_thread.run_sync(proxy.wait)
                await trio.to_thread.run_sync(t.join, 60)
                assert report.ok and out["dst"].ok
                assert out["dst"].qemu_status == "running"
                assert await query_status(dst.qmp) == "running"

    trio.run(main)
