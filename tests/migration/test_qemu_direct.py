"""Direct QEMU-to-QEMU migrations on this host, driven by holepunch_mig.migration.qmp/qemu.

These check the helpers the tunnel tests build on: two real TCG guests, random RAM,
a UNIX-socket migration (plain and multifd x4), destination running afterwards and
its RAM equal to the source's.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import trio
from testsupport.qemu import require_qemu

from holepunch_mig.errors import QmpError
from holepunch_mig.migration.qemu import (
    MigrationFailed,
    QemuVM,
    make_ram_image,
    migrate,
    query_status,
    wait_status,
)
from holepunch_mig.migration.qmp import QmpClient

pytestmark = pytest.mark.qemu

MEM_MIB = 128


@pytest.fixture
def ram_image(tmp_path: Path) -> Path:
    require_qemu()
    return make_ram_image(tmp_path / "ram.img", MEM_MIB)


async def _ram_digest(qmp: QmpClient, path: Path, start: int, size: int) -> str:
    await qmp.execute("pmemsave", {"val": start, "size": size, "filename": str(path)})
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def _check_same_ram(src: QemuVM, dst: QemuVM, tmp: Path) -> None:
    # 32 MiB from 16 MiB: above the firmware areas, well inside the random image.
    start, size = 16 * 1024 * 1024, 32 * 1024 * 1024
    a = await _ram_digest(src.qmp, tmp / "src.mem", start, size)
    b = await _ram_digest(dst.qmp, tmp / "dst.mem", start, size)
    assert a == b, "destination RAM differs from source RAM"
    assert (tmp / "dst.mem").read_bytes() != bytes(size), "guest RAM is all zero"


def _migrate_pair(tmp_path: Path, ram_image: Path, multifd: int) -> None:
    async def main() -> None:
        with trio.fail_after(90):
            async with (
                QemuVM(tmp_path, name="src", mem_mib=MEM_MIB, ram_image=ram_image) as src,
                QemuVM(
                    tmp_path, name="dst", mem_mib=MEM_MIB, ram_image=ram_image, incoming="defer"
                ) as dst,
            ):
                assert await query_status(src.qmp) == "running"
                assert await query_status(dst.qmp) == "inmigrate"
                uri = f"unix:{tmp_path / 'mig.sock'}"
                result = await migrate(
                    src.qmp, uri, dst=dst.qmp, multifd_channels=multifd, timeout=60
                )
                assert result.status == "completed"
                assert result.transferred is not None
                assert result.transferred > MEM_MIB * 1024 * 1024 * 0.9
                assert result.total_time_ms is not None
                await wait_status(dst.qmp, "running", timeout=10)
                assert await query_status(src.qmp) == "postmigrate"
                await _check_same_ram(src, dst, tmp_path)

    trio.run(main)


def test_direct_unix_migration(tmp_path: Path, ram_image: Path) -> None:
    _migrate_pair(tmp_path, ram_image, multifd=0)


def test_multifd4_unix_migration(tmp_path: Path, ram_image: Path) -> None:
    _migrate_pair(tmp_path, ram_image, multifd=4)


def test_qmp_error_carries_class_and_desc(tmp_path: Path, ram_image: Path) -> None:
    async def main() -> None:
        with trio.fail_after(30):
            async with QemuVM(tmp_path, name="vm", mem_mib=MEM_MIB, ram_image=ram_image) as vm:
                with pytest.raises(QmpError) as info:
                    await vm.qmp.execute("no-such-command")
                assert info.value.error_class == "CommandNotFound"
                assert info.value.desc
                # the session is still usable after an error
                assert await query_status(vm.qmp) == "running"

    trio.run(main)


def test_failed_migration_leaves_source_running(tmp_path: Path, ram_image: Path) -> None:
    async def main() -> None:
        with trio.fail_after(30):
            async with QemuVM(tmp_path, name="src", mem_mib=MEM_MIB, ram_image=ram_image) as src:
                with pytest.raises(MigrationFailed) as info:
                    await migrate(src.qmp, f"unix:{tmp_path / 'nobody.sock'}", timeout=20)
                assert info.value.result.status == "failed"
                assert await query_status(src.qmp) == "running"

    trio.run(main)


def test_vm_is_killed_on_exit(tmp_path: Path, ram_image: Path) -> None:
    async def main() -> int:
        with trio.fail_after(30):
            async with QemuVM(tmp_path, name="vm", mem_mib=MEM_MIB, ram_image=ram_image) as vm:
                pid = vm.pid
                assert pid is not None
            return pid

    pid = trio.run(main)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_vm_in_network_namespace(tmp_path: Path, ram_image: Path) -> None:
    import subprocess

    ns = f"hpm-qemu-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:

        async def main() -> None:
            with trio.fail_after(60):
                async with (
                    QemuVM(
                        tmp_path, name="src", mem_mib=MEM_MIB, ram_image=ram_image, netns=ns
                    ) as src,
                    QemuVM(
                        tmp_path,
                        name="dst",
                        mem_mib=MEM_MIB,
                        ram_image=ram_image,
                        incoming="defer",
                        netns=ns,
                    ) as dst,
                ):
                    # QMP and migration sockets are filesystem paths: reachable across netns
                    await migrate(src.qmp, f"unix:{tmp_path / 'mig.sock'}", dst=dst.qmp, timeout=40)
                    await wait_status(dst.qmp, "running", timeout=10)

        trio.run(main)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
